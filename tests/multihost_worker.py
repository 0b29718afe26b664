"""One process of the multi-process tests (started by `tests/multihost.py`; see tests/test_multihost.py).

    python tests/multihost_worker.py ROOT --coordinator HOST:PORT --num-processes 2 --process-id I

Every process runs the same checks on one global mesh (fsdp 4 x tp 2 over 2 x 4 CPU
devices) and writes what it measured to ROOT/report{I}.json; the test asserts on those.
Results are compared inside the worker with the unsharded model (this process's first
device), because a sharded output spans both processes and must be gathered first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import threading
from pathlib import Path
from typing import Any

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402 - the collectives are chosen before JAX starts its backends
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

TOL = 1e-5


def _gather(x: Any) -> np.ndarray:
    """A global array as numpy on this host (a collective: every process calls it)."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _flat(tree: Any) -> dict[str, Any]:
    from trlax.sharding import path_str

    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _max_diff(tree: Any, want: dict[str, np.ndarray]) -> float:
    """Max |x - want| over the leaves of a sharded tree (gathered one at a time)."""
    leaves = _flat(tree)
    assert leaves.keys() == want.keys(), sorted(set(leaves) ^ set(want))
    return max(float(np.max(np.abs(_gather(x) - want[p]))) for p, x in leaves.items())


def _expected_bytes(tree: Any) -> tuple[int, int]:
    """(bytes this process's devices need: each distinct slice once, bytes of the whole tree)."""
    need = total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        indices = leaf.sharding.addressable_devices_indices_map(leaf.shape).values()
        boxes = {tuple(s.indices(dim)[:2] for s, dim in zip(index, leaf.shape, strict=True)) for index in indices}
        need += sum(int(np.prod([b - a for a, b in box])) for box in boxes) * leaf.dtype.itemsize
        total += leaf.nbytes
    return need, total


def _rchar() -> int:
    """Bytes this process has read with read-like system calls (/proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _anon_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakRss:
    """Peak anonymous RSS above the level at entry, sampled every millisecond."""

    def __enter__(self) -> PeakRss:
        self.base, self.samples, self.stop = _anon_rss(), [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(_anon_rss())
            self.stop.wait(0.001)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max([*self.samples, _anon_rss()]) - self.base


def _raised(call: Any) -> str | None:
    """`call()`'s exception as "Type: message", or None when it returns."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - reported to the test, which names the type it expects
        return f"{type(e).__name__}: {e}"
    return None


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.uploaded: dict[str, int] = {}

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(f"create_repo {repo_id}")

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs: Any) -> str:
        self.calls.append(f"upload_folder {repo_id}")
        self.uploaded = {p.name: p.stat().st_size for p in Path(folder_path).iterdir()}
        return "commit"


def checks(root: Path) -> dict[str, Any]:
    from trlax import FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead, LoraConfig
    from trlax.checkpoint import restore_state, save_state
    from trlax.checkpoint.convert import load_orbax, to_hf
    from trlax.checkpoint.lock import WriterLock
    from trlax.checkpoint.slices import READ_COUNTER
    from trlax.cli import main as cli_main
    from trlax.errors import MultiHostError
    from trlax.ppo import make_ppo_update, make_rollout
    from trlax.reference import create_reference_model
    from trlax.sharding import make_mesh, shard_batch
    from trlax.trainable import split_trainable

    r: dict[str, Any] = {"process": jax.process_index(), "devices": jax.device_count(),
                         "local_devices": jax.local_device_count()}
    mesh = make_mesh(fsdp=4, tp=2)
    inputs = dict(np.load(root / "inputs.npz"))
    load = FlaxAutoModelForCausalLMWithValueHead.from_pretrained

    # --- unsharded reference, on this process's first device ---------------------------------
    base = load(root / "llama", strict=True)
    want = {p: np.asarray(x) for p, x in _flat(base.params).items()}
    logits, _, values = base(inputs["ids"], inputs["mask"])
    greedy = base.generate(inputs["prompt"], attention_mask=inputs["prompt_mask"], max_new_tokens=6).sequences

    # --- loading: one safetensors file, read slice by slice ------------------------------------
    READ_COUNTER.reset()
    rchar = _rchar()
    policy = load(root / "llama", strict=True, mesh=mesh)
    r["rchar_during_load"] = _rchar() - rchar
    r["bytes_read"], r["read_calls"] = READ_COUNTER.bytes, READ_COUNTER.reads
    r["bytes_needed"], r["bytes_total"] = _expected_bytes(policy.params)
    r["params_diff"] = _max_diff(policy.params, want)
    r["spans_both_processes"] = all(not x.is_fully_addressable for x in jax.tree_util.tree_leaves(policy.params))

    # --- forward and greedy generation --------------------------------------------------------
    s_logits, _, s_values = policy(inputs["ids"], inputs["mask"])
    r["logits_diff"] = float(np.max(np.abs(_gather(s_logits) - np.asarray(logits))))
    r["values_diff"] = float(np.max(np.abs(_gather(s_values) - np.asarray(values))))
    out = policy.generate(inputs["prompt"], attention_mask=inputs["prompt_mask"], max_new_tokens=6).sequences
    r["generate_equal"] = bool(np.array_equal(_gather(out), np.asarray(greedy)))

    # --- a sharded safetensors set with an index, and an Orbax model folder -------------------
    READ_COUNTER.reset()
    r["index_params_diff"] = _max_diff(load(root / "llama-sharded", strict=True, mesh=mesh).params, want)
    r["index_bytes_read"] = READ_COUNTER.bytes
    r["orbax_params_diff"] = _max_diff(load_orbax(root / "llama-orbax", mesh=mesh).params, want)

    # --- host-only operations name the call to use instead ------------------------------------
    try:
        policy.state_dict()
        r["state_dict_error"] = None
    except MultiHostError as e:
        r["state_dict_error"] = str(e)

    # --- save_pretrained, push_to_hub and convert from the 2-process mesh ---------------------
    policy.save_pretrained(root / "saved")
    policy.save_pretrained(root / "saved-sharded", max_shard_size=20_000)
    hub = FakeHub()
    r["push_result"] = policy.push_to_hub("me/tiny", api=hub)
    r["hub_calls"], r["hub_uploaded"] = hub.calls, hub.uploaded
    failing = FakeHub()
    failing.create_repo = lambda repo_id, **kwargs: (_ for _ in ()).throw(OSError("401 Unauthorized"))
    r["push_failure"] = _raised(lambda: policy.push_to_hub("me/tiny", api=failing))
    to_hf(root / "llama-orbax", root / "converted", mesh=mesh, progress=False)
    r["cli_codes"] = [cli_main(["convert", "--distributed", "--no-progress", str(root / src), str(root / dst)])
                      for src, dst in (("llama", "cli-orbax"), ("cli-orbax", "cli-hf"))]
    error = io.StringIO()
    with contextlib.redirect_stderr(error):  # a DST process 0 cannot write stops every process at once
        r["cli_bad_dst_code"] = cli_main(["convert", "--distributed", "--no-progress", str(root / "llama"),
                                          str(root / "llama" / "config.json")])
    r["cli_bad_dst_error"] = error.getvalue()
    adapter_policy = load(root / "llama", strict=True, mesh=mesh, peft_config=LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_policy.save_pretrained(root / "adapter")
    del adapter_policy

    # --- Orbax training states across topologies: 1 process -> 2 and 2 -> 1 --------------------
    restored = restore_state(root / "state-1p", target={"params": policy.params}, target_sharding=mesh,
                             model_type="llama")
    r["state_1p_to_2p_diff"] = _max_diff(restored.params, want)
    r["state_1p_to_2p_step"] = restored.step
    save_state(root / "state-2p", 3, policy.params)
    # Another writer holds the folder's lock (process 0 takes it for the job): every process raises, none waits.
    (root / "state-locked").mkdir(exist_ok=True)
    locked = WriterLock(root / "state-locked") if jax.process_index() == 0 else None
    r["locked_state_error"] = _raised(lambda: save_state(root / "state-locked", 1, policy.params))
    if locked is not None:
        locked.release()

    # --- a larger model (53 MB): bytes read, and host memory while saving from the mesh --------
    READ_COUNTER.reset()
    big = FlaxAutoModelForCausalLM.from_pretrained(root / "gpt2-big", mesh=mesh)
    r["big_bytes_read"] = READ_COUNTER.bytes
    r["big_bytes_needed"], r["big_bytes_total"] = _expected_bytes(big.params)
    r["big_largest_tensor"] = max(x.nbytes for x in jax.tree_util.tree_leaves(big.params))
    with PeakRss() as rss:
        big.save_pretrained(root / "big-saved")
    r["big_save_peak_rss"] = rss.peak
    del big

    # --- the reference shares the policy's arrays; one PPO update matches unsharded -----------
    reference = create_reference_model(policy, num_shared_layers=1)
    frozen = [p for p, trainable in _flat(policy.trainable_mask).items() if not trainable]
    policy_leaves, ref_leaves = _flat(policy.params), _flat(reference.params)
    r["ref_shared"] = len(frozen)
    r["ref_shared_not_identical"] = [p for p in frozen if ref_leaves[p] is not policy_leaves[p]]
    base_ref = create_reference_model(base, num_shared_layers=1)
    batch = {"input_ids": inputs["ids"], "attention_mask": inputs["mask"], "response_mask": inputs["response_mask"]}
    scores = jnp.asarray(inputs["scores"])
    experience = make_rollout(base, base_ref)(base.params, base_ref.params, batch, scores, jnp.float32(0.2))
    experience = {k: np.asarray(v) for k, v in experience.items()}
    s_experience = make_rollout(policy, reference)(policy.params, reference.params, shard_batch(batch, mesh),
                                                   shard_batch(scores, mesh), jnp.float32(0.2))
    r["rollout_diff"] = max(float(np.max(np.abs(_gather(v) - experience[k]))) for k, v in s_experience.items())

    import optax

    def update(model: Any, exp: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        tx = optax.sgd(0.5)  # SGD: parameter differences are gradient differences
        trainable, frozen_params = split_trainable(model.params, model.trainable_mask)
        new, _, stats = make_ppo_update(model, tx)(trainable, frozen_params, tx.init(trainable), exp)
        return new, stats

    new, stats = update(base, experience)
    s_new, s_stats = update(policy, shard_batch(experience, mesh))
    r["ppo_trainable"] = len(_flat(new))
    r["ppo_params_diff"] = _max_diff(s_new, {p: np.asarray(x) for p, x in _flat(new).items()})
    r["ppo_loss_diff"] = max(abs(float(_gather(s_stats[k])) - float(stats[k]))
                             for k in ("loss/total", "loss/policy", "loss/value"))
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    args = parser.parse_args()
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id, initialization_timeout=60)
    report = checks(args.root)
    (args.root / f"report{jax.process_index()}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
