"""`trlax convert SRC DST`: HF/PyTorch checkpoints <-> Orbax model folders (see `trlax.checkpoint.convert`)."""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from trlax.checkpoint.convert import is_orbax_model, to_hf, to_orbax
from trlax.checkpoint.hub import HubOptions
from trlax.cli.preflight import check_output_dir, shard_size


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
                        help="keep TRL's value head: auto = when the checkpoint has one (default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="param dtype stored in the Orbax folder (default float32)")
    parser.add_argument("--max-shard-size", type=shard_size, default=None,
                        help="HF output: split safetensors, e.g. 5GB")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--cache-dir", default=None, help="huggingface_hub cache folder")
    parser.add_argument("--local-files-only", action="store_true", help="never download; use the hub cache")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    check_output_dir(args.dst, "DST")  # writable, before anything is read
    to = args.to or ("hf" if is_orbax_model(args.src) else "orbax")
    progress = not args.no_progress
    if to == "hf":
        written = to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, progress=progress)
        print(f"wrote {len(written)} file(s) to {args.dst}")
        return 0
    value_head = {"auto": None, "yes": True, "no": False}[args.value_head]
    options = HubOptions(args.revision, None, args.cache_dir, args.local_files_only)
    to_orbax(args.src, args.dst, value_head=value_head, param_dtype=jnp.dtype(args.dtype), hub_options=options,
             progress=progress)
    print(f"wrote an Orbax model folder to {args.dst}")
    return 0
