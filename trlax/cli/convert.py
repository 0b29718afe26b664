"""`trlax convert SRC DST`: HF/PyTorch checkpoints <-> Orbax model folders (see `trlax.checkpoint.convert`)."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from trlax.checkpoint.convert import is_orbax_model, to_hf, to_orbax
from trlax.checkpoint.gather import on_writer_process
from trlax.checkpoint.hub import HubOptions
from trlax.cli.preflight import check_output_dir, shard_size
from trlax.errors import TrlaxError
from trlax.sharding import make_mesh


def add_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a checkpoint: HF/PyTorch <-> Orbax",
        description="Convert a hub id or local transformers (PyTorch) checkpoint, with or without TRL's value "
                    "head, into an Orbax model folder that restores directly sharded; or an Orbax model folder "
                    "back into HF safetensors.")
    parser.add_argument("src", help="hub id, local HF/PyTorch checkpoint folder, or Orbax model folder")
    parser.add_argument("dst", help="output folder (for Orbax: new or empty)")
    parser.add_argument("--to", choices=("orbax", "hf"), default=None,
                        help="target format (default: hf for an Orbax model folder, else orbax)")
    parser.add_argument("--value-head", choices=("auto", "yes", "no"), default="auto",
                        help="Orbax output: keep TRL's value head: auto = when the checkpoint has one (default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="Orbax output: the param dtype it stores (default float32)")
    parser.add_argument("--max-shard-size", type=shard_size, default=None,
                        help="HF output: split safetensors, e.g. 5GB")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--cache-dir", default=None, help="huggingface_hub cache folder")
    parser.add_argument("--local-files-only", action="store_true", help="never download; use the hub cache")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--distributed", action="store_true",
                        help="run on every host of a pod (jax.distributed) with one FSDP mesh over all devices: "
                             "each host reads only its slices; HF output is written by process 0")
    parser.add_argument("--coordinator", default=None, help="with --distributed: HOST:PORT of process 0 "
                        "(default: found from the environment, as on TPU pods and SLURM)")
    parser.add_argument("--num-processes", type=int, default=None, help="with --distributed: how many processes")
    parser.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's rank")
    parser.set_defaults(func=run_convert)


FORMATS = {"hf": "HF", "orbax": "Orbax"}


def distributed_mesh(args: argparse.Namespace) -> Mesh | None:
    """With --distributed: join the other processes (unless already joined) and mesh every device (FSDP)."""
    if not args.distributed:
        given = [flag for flag, value in (("--coordinator", args.coordinator), ("--num-processes", args.num_processes),
                                          ("--process-id", args.process_id)) if value is not None]
        if given:
            raise TrlaxError(f"{', '.join(given)} only apply with --distributed; add it (or drop them)")
        return None
    if not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs/TPUs ignore it
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    return make_mesh(fsdp=-1)


def run_convert(args: argparse.Namespace) -> int:
    mesh = distributed_mesh(args)
    # Writable, before anything is read. Only process 0 writes, so only it checks: the processes checking
    # at once would race on creating and removing the same folder; a failure stops every process here.
    on_writer_process(lambda: [check_output_dir(args.dst, "DST")], f"{args.dst} (checking it)")
    to = args.to or ("hf" if is_orbax_model(args.src) else "orbax")
    main_process = jax.process_index() == 0
    progress = not args.no_progress and main_process
    for flag, given, target in (("--dtype", args.dtype is not None, "orbax"),
                                 ("--value-head", args.value_head != "auto", "orbax"),
                                 ("--revision", args.revision is not None, "orbax"),
                                 ("--cache-dir", args.cache_dir is not None, "orbax"),
                                 ("--local-files-only", args.local_files_only, "orbax"),
                                 ("--max-shard-size", args.max_shard_size is not None, "hf")):
        if given and to != target:
            raise TrlaxError(f"{flag} applies to {FORMATS[target]} output only, and this converts to {FORMATS[to]}; "
                             f"drop {flag}")
    if to == "hf":
        written = to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, mesh=mesh, progress=progress)
        if main_process:
            print(f"wrote {len(written)} file(s) to {args.dst}")
        return 0
    value_head = {"auto": None, "yes": True, "no": False}[args.value_head]
    options = HubOptions(args.revision, None, args.cache_dir, args.local_files_only)
    to_orbax(args.src, args.dst, value_head=value_head, param_dtype=jnp.dtype(args.dtype or "float32"),
             hub_options=options, mesh=mesh, progress=progress)
    if main_process:
        print(f"wrote an Orbax model folder to {args.dst}")
    return 0
