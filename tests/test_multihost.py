"""Two real JAX processes x 4 CPU devices, one 8-device mesh: what a pod does, on one machine.

`tests/multihost_worker.py` runs every check inside the two processes (loading from a
safetensors file, an indexed set and an Orbax folder; forward, greedy generation, the
reference model, one PPO update, save_pretrained / push_to_hub / convert from the mesh,
Orbax states across topologies) and reports; the tests here assert on the reports and on
what the processes wrote, reading it back with trlax, transformers and TRL in this one
process. `examples/multihost_ppo.py --distributed` runs as two processes too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from tests.helpers import batch, built_once, max_diff, random_gpt2_checkpoint, trl_checkpoint
from tests.multihost import run_processes

pytestmark = pytest.mark.slow

TOL = 1e-5


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def build_inputs(root: Path) -> None:
    """The checkpoints, states and inputs the worker reads, made in this one process."""
    from trlax import FlaxAutoModelForCausalLMWithValueHead
    from trlax.checkpoint import save_state
    from trlax.checkpoint.convert import to_orbax

    trl_checkpoint("llama", root)
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "llama", strict=True)
    model.save_pretrained(root / "llama-sharded", max_shard_size=20_000)
    to_orbax(root / "llama", root / "llama-orbax", progress=False)
    save_state(root / "state-1p", 1, model.params)
    random_gpt2_checkpoint(root / "gpt2-big", n_embd=512, n_layer=4, dtype=np.float32)
    ids, mask = batch(101, "right", batch_size=8, seq_len=12, seed=1, low=2)
    prompt, prompt_mask = batch(101, "left", batch_size=8, seq_len=7, seed=2, low=2)
    np.savez(root / "inputs.npz", ids=ids, mask=mask, prompt=prompt, prompt_mask=prompt_mask,
             response_mask=mask * (np.arange(12) >= 4), scores=np.linspace(-1, 1, 8, dtype=np.float32))


def _run(root: Path) -> dict[str, Any]:
    """Build the inputs here (one process), run the worker as 2 processes: their folder and reports."""
    build_inputs(root)
    run_processes(["tests/multihost_worker.py", str(root)], root / "logs", timeout=420)
    return {"root": str(root), "reports": [json.loads((root / f"report{i}.json").read_text()) for i in range(2)]}


# Session scope, built once per run (`built_once`): minutes of subprocesses.
@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    result = built_once(tmp_path_factory, "multihost", _run)
    return Path(result["root"]), result["reports"]


def test_two_processes_form_one_mesh(run: tuple[Path, list[dict]]) -> None:
    _, reports = run
    assert [r["process"] for r in reports] == [0, 1]
    assert all(r["devices"] == 8 and r["local_devices"] == 4 for r in reports)
    assert all(r["spans_both_processes"] for r in reports)


def test_each_process_reads_only_its_slices(run: tuple[Path, list[dict]]) -> None:
    _, reports = run
    for r in reports:
        # Exactly the distinct slices of its own devices, each once ...
        assert r["bytes_read"] == r["bytes_needed"], r
        # ... which for this checkpoint (norms and tp-only biases whole) is about half of it.
        assert 0.45 * r["bytes_total"] < r["bytes_read"] < 0.6 * r["bytes_total"], r
        assert r["index_bytes_read"] == r["bytes_read"]
        assert r["rchar_during_load"] >= r["bytes_read"]  # the kernel counted those reads too


def test_a_larger_model_reads_half_and_saves_without_gathering_everything(run: tuple[Path, list[dict]]) -> None:
    root, reports = run
    for r in reports:
        assert r["big_bytes_read"] == r["big_bytes_needed"], r
        assert 0.45 * r["big_bytes_total"] < r["big_bytes_read"] < 0.55 * r["big_bytes_total"], r
        # One tensor at a time: gathering the whole state dict first would peak above the model's
        # size (53 MB); one tensor (4 MB at most) is in flight, with its copies on the 4 CPU devices,
        # in numpy and in the writer's buffer, plus XLA's temporaries.
        assert r["big_save_peak_rss"] < 0.75 * r["big_bytes_total"], r
    source, saved = _tensors(root / "gpt2-big"), _tensors(root / "big-saved")
    assert saved.keys() == source.keys() and all(np.array_equal(saved[k], source[k]) for k in source)


def test_loading_forward_and_generation_match_unsharded(run: tuple[Path, list[dict]]) -> None:
    _, reports = run
    for r in reports:
        assert r["params_diff"] == 0 and r["index_params_diff"] == 0 and r["orbax_params_diff"] == 0, r
        assert r["logits_diff"] < TOL and r["values_diff"] < TOL, r
        assert r["generate_equal"], r


def test_reference_sharing_and_ppo_update_match_unsharded(run: tuple[Path, list[dict]]) -> None:
    _, reports = run
    for r in reports:
        assert r["ref_shared"] > 0 and r["ref_shared_not_identical"] == [], r
        assert r["rollout_diff"] < TOL, r
        assert r["ppo_trainable"] > 0 and r["ppo_params_diff"] < TOL and r["ppo_loss_diff"] < TOL, r


def test_host_only_calls_name_the_multihost_call(run: tuple[Path, list[dict]]) -> None:
    _, reports = run
    for r in reports:
        assert r["state_dict_error"] and "save_pretrained(folder), called on every process" in r["state_dict_error"]


def test_save_pretrained_from_the_mesh_writes_the_checkpoint(run: tuple[Path, list[dict]]) -> None:
    import torch
    import transformers
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead

    from trlax import FlaxAutoModelForCausalLMWithValueHead

    root, reports = run
    source = _tensors(root / "llama")
    for name in ("saved", "saved-sharded", "converted", "cli-hf"):
        saved = _tensors(root / name)
        assert saved.keys() == source.keys(), name
        assert all(np.array_equal(saved[k], source[k]) for k in source), name
    assert (root / "saved" / "model.safetensors").is_file()
    first, second = reports
    assert first["cli_codes"] == second["cli_codes"] == [0, 0]  # the processes raced on checking DST before
    assert first["cli_bad_dst_code"] == second["cli_bad_dst_code"] == 1
    assert "DST " in first["cli_bad_dst_error"] and "exists and is not a folder" in first["cli_bad_dst_error"]
    assert "process 0 failed to write " in second["cli_bad_dst_error"]
    index = json.loads((root / "saved-sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(source)
    assert not list(root.glob("saved*/.trlax-save-*"))  # nothing half-written left behind

    ids, mask = batch(101, "right", batch_size=3, seq_len=9, seed=3, low=2)
    ours = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "saved-sharded", strict=True)
    logits, _, values = ours(ids, mask)
    with torch.no_grad():
        # TRL reads the single file (it cannot find v_head in a local sharded folder: it asks the
        # hub for the shard files); transformers reads the shards.
        theirs = AutoModelForCausalLMWithValueHead.from_pretrained(str(root / "saved")).eval()  # no dropout
        t_logits, _, t_values = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        plain = transformers.AutoModelForCausalLM.from_pretrained(str(root / "saved-sharded"))
        p_logits = plain(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_diff(logits, t_logits, mask) < 1e-4 and max_diff(values, t_values, mask) < 1e-4
    assert max_diff(logits, p_logits, mask) < 1e-4


def test_adapter_policy_saved_from_the_mesh(run: tuple[Path, list[dict]]) -> None:
    from trlax import FlaxAutoModelForCausalLMWithValueHead, LoraConfig
    from trlax.sharding import path_str

    root, _ = run
    # The same seeded adapter built in this one process, and the one the 2-process mesh saved.
    want = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "llama", strict=True, peft_config=LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    got = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "adapter", strict=True)
    flat = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(got.params)[0]}
    expected = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(want.params)[0]}
    assert flat.keys() == expected.keys()
    assert all(np.array_equal(flat[p], expected[p]) for p in expected)


def test_push_to_hub_uploads_from_process_0_only(run: tuple[Path, list[dict]]) -> None:
    _, (first, second) = run
    assert first["push_result"] == "commit"
    assert first["hub_calls"] == ["create_repo me/tiny", "upload_folder me/tiny"]
    assert {"config.json", "model.safetensors"} <= set(first["hub_uploaded"])
    assert second["push_result"] is None and second["hub_calls"] == []
    # The hub refuses process 0: process 1 raises too, instead of waiting in the save's gathers forever.
    assert first["push_failure"] == "OSError: 401 Unauthorized"
    assert second["push_failure"].startswith("CheckpointError: process 0 failed to write to the hub repo me/tiny")


def test_a_held_state_folder_stops_every_process(run: tuple[Path, list[dict]]) -> None:
    """Process 0 takes the folder's writer lock for the job; when another writer holds it, the other processes
    raise too (they waited in Orbax's setup barrier forever)."""
    _, (first, second) = run
    assert first["locked_state_error"].startswith("CheckpointError: ") and "already has a writer" in \
        first["locked_state_error"]
    assert second["locked_state_error"].startswith("CheckpointError: process 0 failed to write ")


def test_state_moves_between_one_and_two_processes(run: tuple[Path, list[dict]]) -> None:
    from trlax import FlaxAutoModelForCausalLMWithValueHead
    from trlax.checkpoint import restore_state
    from trlax.sharding import path_str

    root, reports = run
    for r in reports:  # saved by this one process, restored on the 2-process mesh
        assert r["state_1p_to_2p_diff"] == 0 and r["state_1p_to_2p_step"] == 1, r
    want = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "llama", strict=True).params
    state = restore_state(root / "state-2p", target={"params": want})  # saved by both, restored by one
    got = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    expected = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
    assert state.step == 3 and got.keys() == expected.keys()
    assert all(np.array_equal(got[p], expected[p]) for p in expected)


def test_example_runs_as_two_processes(tmp_path: Path) -> None:
    from trlax import FlaxAutoModelForCausalLMWithValueHead

    logs = run_processes(["examples/multihost_ppo.py", "--distributed", "--fsdp", "4", "--tp", "2", "--steps", "2",
                          "--checkpoint-dir", str(tmp_path / "run"), "--output-dir", str(tmp_path / "policy")],
                         tmp_path / "logs", timeout=300)
    assert "2 process(es), 8 devices" in logs[0] and "step 1:" in logs[0], logs[0][-2000:]
    assert "saved the policy" in logs[0]
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy", strict=True)
    assert policy.config.model_type == "gpt2"
    assert (tmp_path / "run" / "1").is_dir()  # the Orbax state of step 1 (save every 2 steps)
