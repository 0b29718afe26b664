"""Sharding: rules -> PartitionSpecs, sharded loading, and sharded == unsharded on 8 simulated devices.

The rule tests run in this process on abstract meshes. The device tests run this file as
a script in subprocesses with `XLA_FLAGS=--xla_force_host_platform_device_count=8`
(`python tests/test_sharding.py devices|memory DIR`); one subprocess computes every
device check and reports JSON, which the test functions then assert on.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from tests.helpers import built_once, random_gpt2_checkpoint, subprocess_env, trl_checkpoint
from trlax.models.registry import all_specs
from trlax.sharding import (
    GENERIC_RULES,
    ShardingRules,
    check_mesh,
    logical_axes,
    make_mesh,
    path_str,
    resolve_rules,
    spec_for,
)

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
MESHES = ("fsdp8", "tp2_data4")
FAMILIES = ("gpt2", "llama", "gemma3_text", "phi3", "phi", "starcoder2")


def _spec(axes: tuple, shape: tuple, sizes: dict[str, int], rules: ShardingRules | None = None) -> PartitionSpec:
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
    return spec_for(axes, shape, mesh, rules or resolve_rules())


# --- rules, in this process ----------------------------------------------------------------


def test_axes_that_do_not_divide_are_dropped() -> None:
    sizes = {"data": 4, "fsdp": 2, "tp": 2}
    assert _spec(("vocab", "embed"), (50257, 768), sizes) == PartitionSpec(None, "fsdp")  # GPT-2's vocab
    assert _spec(("vocab", "embed"), (50258, 768), sizes) == PartitionSpec("tp", "fsdp")
    assert _spec(("batch", None), (8, 5), sizes) == PartitionSpec(("data", "fsdp"))
    assert _spec(("batch", None), (4, 5), sizes) == PartitionSpec("data")
    assert _spec(("batch", None), (3, 5), sizes) == PartitionSpec()
    assert _spec(("embed", "heads"), (32, 96), {"tp": 2}) == PartitionSpec(None, "tp")  # no fsdp axis: replicated dim
    assert _spec(("embed", "mlp"), (32, 96), {"fsdp": 1, "tp": 1}) == PartitionSpec()  # size-1 axes are left out


def test_an_axis_is_used_once_per_tensor() -> None:
    rules = resolve_rules(overrides=ShardingRules(logical={"mlp": ("fsdp",)}))
    assert _spec(("embed", "mlp"), (32, 64), {"fsdp": 8}, rules) == PartitionSpec("fsdp")


@pytest.mark.parametrize(("path", "ndim", "want"), [
    ("pretrained_model/transformer/h/0/attn/c_attn/kernel", 2, ("embed", "heads")),
    ("transformer/h/3/mlp/c_proj/kernel", 2, ("mlp", "embed")),
    ("transformer/h/3/attn/c_proj/kernel", 2, ("heads", "embed")),
    ("transformer/wte/embedding", 2, ("vocab", "embed")),
    ("transformer/ln_f/scale", 1, (None,)),
    ("opt_state/0/mu/pretrained_model/model/layers/1/self_attn/k_proj/kernel", 2, ("embed", "kv_heads")),
    ("v_head/summary/kernel", 2, ("embed", None)),
    ("v_head/summary/bias", 1, (None,)),
    ("lora/transformer/h/0/attn/c_attn/lora_A", 2, ("embed", None)),  # follows the kernel's in-axis
    ("lora/transformer/h/0/attn/c_attn/lora_B", 2, (None, "heads")),  # and its out-axis
    ("lora/model/layers/0/mlp/down_proj/lora_A", 2, ("mlp", None)),
    ("lora/model/layers/0/mlp/down_proj/scaling", 0, ()),
    ("opt_state/0/count", 0, ()),
    ("some/unknown/weights", 3, (None, None, None)),
])
def test_logical_axes(path: str, ndim: int, want: tuple) -> None:
    model_type = "llama" if "layers" in path else "gpt2"
    assert logical_axes(path, ndim, resolve_rules(model_type)) == want


def test_user_rules_come_first_and_logical_overrides_merge() -> None:
    rules = resolve_rules("gpt2", [(r"wte/embedding$", (None, None))])
    assert logical_axes("transformer/wte/embedding", 2, rules) == (None, None)
    assert logical_axes("transformer/h/0/attn/c_attn/kernel", 2, rules) == ("embed", "heads")
    rules = resolve_rules("gpt2", ShardingRules(logical={"embed": ("data", "fsdp")}))
    assert rules.logical["embed"] == ("data", "fsdp") and rules.logical["vocab"] == ("tp",)
    assert resolve_rules("gpt2", rules) is rules  # a resolved rule set is used as it is


def test_unknown_logical_axis_is_an_error() -> None:
    rules = resolve_rules(overrides=[(r"kernel$", ("embed", "experts"))])
    with pytest.raises(ValueError, match="logical axis 'experts' has no mesh mapping"):
        _spec(logical_axes("a/kernel", 2, rules), (8, 8), {"fsdp": 2}, rules)


def _abstract_params(model_type: str) -> dict:
    from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ
    from trlax import FlaxAutoModelForCausalLM, FlaxAutoModelForSeq2SeqLM

    auto = FlaxAutoModelForCausalLM if model_type in TINY_CAUSAL else FlaxAutoModelForSeq2SeqLM
    config = {**TINY_CAUSAL, **TINY_SEQ2SEQ}[model_type]()
    return auto.model_class(config).abstract_params()


def test_family_rules_match_their_models() -> None:
    """Every family rule matches a param of a tiny model of that family (no stale names), and
    every projection kernel gets a tensor-parallel axis (heads / kv_heads / mlp / vocab)."""
    from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ

    unmatched: dict[int, set[str]] = {}
    family_of = {t: spec.sharding_rules for spec in all_specs() for t in spec.model_types}
    for model_type in sorted(set(family_of) & {*TINY_CAUSAL, *TINY_SEQ2SEQ}):
        family = family_of[model_type]
        rules = resolve_rules(model_type)
        abstract = _abstract_params(model_type)
        paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
        leaves = dict(zip(paths, jax.tree_util.tree_leaves(abstract), strict=True))
        pending = unmatched.setdefault(id(family), {pattern for pattern, _ in family})
        for pattern, _ in family:
            if any(re.search(pattern, p) for p in paths):
                pending.discard(pattern)
        for path, leaf in leaves.items():
            if path.endswith("kernel") and leaf.ndim == 2 and "v_head" not in path and "project_" not in path:
                axes = logical_axes(path, 2, rules)
                assert {"heads", "kv_heads", "mlp", "vocab"} & set(axes), (model_type, path, axes)
    assert all(not pending for pending in unmatched.values()), unmatched


def test_generic_rules_cover_an_unlisted_family() -> None:
    rules = resolve_rules("some_new_llama_like")
    assert rules.params == GENERIC_RULES
    assert logical_axes("model/layers/0/self_attn/q_proj/kernel", 2, rules) == ("embed", "heads")
    assert logical_axes("model/layers/0/mlp/down_proj/kernel", 2, rules) == ("mlp", "embed")


def test_make_mesh_errors() -> None:
    with pytest.raises(ValueError, match="at most one mesh axis size may be -1"):
        make_mesh(data=-1, fsdp=-1)
    for sizes in ({"data": 0}, {"tp": -2}, {"expert": 0}):  # ZeroDivisionError / numpy's reshape error before
        with pytest.raises(ValueError, match="must be >= 1"):
            make_mesh(**sizes)
    with pytest.raises(ValueError, match="needs 2 devices"):
        make_mesh(data=2, fsdp=1, tp=1)
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tp": 1}


def test_mesh_argument_errors(tmp_path: Path) -> None:
    from trlax import FlaxAutoModelForCausalLM

    folder = trl_checkpoint("gpt2", tmp_path, value_head=False)
    with pytest.raises(ValueError, match="either place= .* or mesh="):
        FlaxAutoModelForCausalLM.from_pretrained(folder, mesh=make_mesh(), place=lambda p, a: jnp.asarray(a))
    with pytest.raises(ValueError, match="sharding_rules only apply with a mesh"):
        FlaxAutoModelForCausalLM.from_pretrained(folder, sharding_rules=[])


    for mesh, error, match in (("fsdp", TypeError, "mesh must be a jax.sharding.Mesh"),
                               (4, TypeError, "mesh must be a jax.sharding.Mesh")):
        with pytest.raises(error, match=match):  # AttributeError: no 'axis_types' before
            FlaxAutoModelForCausalLM.from_pretrained(folder, mesh=mesh)
    for rules, error, match in ((["wte"], TypeError, "sharding rule 'wte' is not a \\(regex, logical axes\\) pair"),
                                ([("(", ("embed",))], ValueError, "'\\(' is not a regular expression"),
                                ("wte", TypeError, "a list of \\(regex, logical axes\\) pairs; got str"),
                                (ShardingRules(logical={"embed": 3}), TypeError, "mesh axis names .* got 3")):
        with pytest.raises(error, match=match):  # raw re.error / unpacking errors before
            FlaxAutoModelForCausalLM.from_pretrained(folder, mesh=make_mesh(), sharding_rules=rules)


def test_mesh_axes_count_as_used_when_a_param_rule_or_the_kv_cache_names_them(caplog) -> None:
    """An expert axis counted as used on a dense family (no warning, half the devices idle); and only param
    rules counted, so a mesh over the KV cache's `length` axis was refused. (check_mesh reads axis names and
    sizes only: stand-ins for 8-device meshes.)"""
    def mesh(**sizes: int) -> SimpleNamespace:
        return SimpleNamespace(axis_names=tuple(sizes), shape=sizes, size=int(np.prod(list(sizes.values()))))

    check_mesh(mesh(seq=8), resolve_rules("llama", ShardingRules(logical={"length": ("seq",)})))
    with caplog.at_level(logging.WARNING, logger="trlax"):
        check_mesh(mesh(fsdp=4, expert=2), resolve_rules("llama"))
        assert "mesh axes ['expert'] are not used by the sharding rules" in caplog.text
        caplog.clear()
        check_mesh(mesh(fsdp=4, expert=2), resolve_rules("mixtral"))  # its expert weights use it
        assert "not used" not in caplog.text


@pytest.mark.slow
def test_params_off_the_models_mesh_are_an_input_error(device_report: dict) -> None:
    """Params on one device assigned to a model on a mesh failed every call with JAX's raw "Received incompatible
    devices" ValueError."""
    error = device_report["mesh_errors"]["params_off_the_mesh"]
    assert error.startswith("InputError: the params or inputs of this FlaxAutoModelForCausalLMWithValueHead are on "
                            "other devices than the model"), error
    assert "shard_model(model, mesh)" in error


@pytest.mark.slow
def test_meshes_the_rules_cannot_use_are_errors(device_report: dict) -> None:
    """A mesh with none of the axes the rules map to (or rules naming a missing axis) replicated every param
    on every device, silently."""
    errors = device_report["mesh_errors"]
    for name in ("model8", "dp2_mp4", "shard_model_x8", "restore_state_model8"):
        assert errors[name].startswith("TrlaxError: no axis of this mesh"), errors[name]
    assert "8 devices" in errors["model8"] and "{'dp': 2, 'mp': 4}" in errors["dp2_mp4"]
    assert errors["logical_typo"].startswith("TrlaxError: the sharding rules map logical axes to mesh axes "
                                             "['fsdpp'], which this mesh lacks"), errors["logical_typo"]
    assert errors["unused_axis_warnings"] == [f"mesh axes ['{axis}'] are not used by the sharding rules: params are "
                                              "replicated over them" for axis in ("extra", "expert")]


# --- 8 simulated devices, in a subprocess -----------------------------------------------------


def _start_worker(mode: str, root: Path, *args: str, devices: int = 8) -> subprocess.Popen:
    # glibc hands large freed blocks back to the OS at once, so RSS tracks live memory
    # instead of the allocator's cache (what the memory test measures).
    env = subprocess_env(devices, MALLOC_MMAP_THRESHOLD_="65536")
    return subprocess.Popen([sys.executable, __file__, mode, str(root), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _report(proc: subprocess.Popen) -> dict[str, Any]:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _device_report(root: Path) -> dict[str, Any]:
    for family in FAMILIES:
        trl_checkpoint(family, root)
    # Two workers side by side (one per core), each taking every other family: a worker's start
    # (imports, the JAX client) costs as much as checking a family.
    workers = [_start_worker("devices", root, *FAMILIES[i::2]) for i in range(2)]
    return {key: value for worker in workers for key, value in _report(worker).items()}


# Session scope, built once per run (`built_once`): minutes of subprocesses.
@pytest.fixture(scope="session")
def device_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return built_once(tmp_path_factory, "sharding", _device_report)


def _assert_within_rounding(r: dict[str, Any]) -> None:
    """Sharded logits and values within what float32 rounding alone moves them.

    Sharding changes only the order of float32 sums, so the outputs may differ by what rounding alone moves
    them: the unsharded model's jitted forward vs the same forward op by op (`rounding`). Tiny Gemma 3 moves
    ~10x the others (7e-6 on logits up to 2.7 with one draw of random weights; torch draws other weights on
    another CPU: its vectorised normal_ kernels differ), so each family's bound is 4x its own, TOL at least.
    """
    for out in ("logits", "values"):
        rounding = r["rounding"][out]
        assert rounding < 1e-4, (out, rounding)  # a jitted forward that far from op by op is a bug of its own
        assert r[f"{out}_diff"] < max(TOL, 4 * rounding), (out, r[f"{out}_diff"], rounding)


def _rounding(model: Any, ids: Any, mask: Any, logits: Any, values: Any) -> dict[str, float]:
    """How far the same forward op by op lands from the jitted `logits` and `values`: float32 rounding alone."""
    with jax.disable_jit():
        eager_logits, _, eager_values = model.apply(model.params, jnp.asarray(ids), jnp.asarray(mask))
    return {"logits": _diff(eager_logits, logits), "values": _diff(eager_values, values)}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_equals_unsharded(device_report: dict, family: str, mesh: str) -> None:
    r = device_report[f"{family}/{mesh}"]
    assert r["n_devices"] == 8
    assert r["params_diff"] == 0 and r["orbax_params_diff"] == 0  # the same numbers, only placed differently
    _assert_within_rounding(r)
    assert r["generate_equal"], r["generate_mismatch"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_ppo_update_under_the_mesh(device_report: dict, family: str, mesh: str) -> None:
    """One PPO update (the policy sharing its first layer with the reference) matches unsharded."""
    r = device_report[f"{family}/{mesh}"]
    # Layer 1, the final norm, the LM head and the value head: 10 leaves or more (Phi-3's fused
    # projections make its layer 6 leaves; the others have more).
    assert r["ppo_trainable"] >= 10
    assert r["ppo_params_diff"] < TOL and r["ppo_loss_diff"] < TOL
    assert r["ppo_layout_changed"] == []  # updated params keep their sharding


# (family, mesh) -> {param path suffix: (PartitionSpec as a list, per-device shard shape)}.
EXPECTED_LAYOUT = {
    ("gpt2", "fsdp8"): {
        "attn/c_attn/kernel": (["fsdp"], [4, 96]),
        "mlp/c_proj/kernel": ([None, "fsdp"], [128, 4]),
        "wte/embedding": ([None, "fsdp"], [101, 4]),
        "v_head/summary/kernel": (["fsdp"], [4, 1]),
        "ln_f/scale": ([], [32]),
    },
    ("gpt2", "tp2_data4"): {
        "attn/c_attn/kernel": ([None, "tp"], [32, 48]),
        "mlp/c_proj/kernel": (["tp"], [64, 32]),
        "wte/embedding": ([], [101, 32]),  # vocab 101: tp dropped, no fsdp axis
        "v_head/summary/kernel": ([], [32, 1]),
    },
    ("llama", "fsdp8"): {
        "self_attn/q_proj/kernel": (["fsdp"], [4, 32]),
        "self_attn/o_proj/kernel": ([None, "fsdp"], [32, 4]),
        "mlp/down_proj/kernel": ([None, "fsdp"], [48, 4]),
        "embed_tokens/embedding": ([None, "fsdp"], [101, 4]),
        "lm_head/kernel": (["fsdp"], [4, 101]),
    },
    ("llama", "tp2_data4"): {
        "self_attn/q_proj/kernel": ([None, "tp"], [32, 16]),
        "self_attn/k_proj/kernel": ([None, "tp"], [32, 8]),  # 2 kv heads, one per tp shard
        "self_attn/q_proj/bias": (["tp"], [16]),
        "mlp/up_proj/kernel": ([None, "tp"], [32, 24]),
        "mlp/down_proj/kernel": (["tp"], [24, 32]),
        "lm_head/kernel": ([], [32, 101]),
    },
    ("gemma3_text", "fsdp8"): {
        "self_attn/k_proj/kernel": (["fsdp"], [4, 32]),
        "self_attn/q_norm/scale": ([], [16]),
    },
    ("gemma3_text", "tp2_data4"): {
        "self_attn/k_proj/kernel": ([None, "tp"], [32, 16]),
        "self_attn/k_norm/scale": ([], [16]),
    },
    ("phi3", "fsdp8"): {
        "self_attn/qkv_proj/kernel": (["fsdp"], [4, 64]),  # fused [q | k | v]
        "mlp/gate_up_proj/kernel": (["fsdp"], [4, 96]),
    },
    ("phi3", "tp2_data4"): {
        "self_attn/qkv_proj/kernel": ([None, "tp"], [32, 32]),
        "mlp/gate_up_proj/kernel": ([None, "tp"], [32, 48]),
        "mlp/down_proj/kernel": (["tp"], [24, 32]),
    },
    ("phi", "fsdp8"): {
        "self_attn/dense/kernel": ([None, "fsdp"], [32, 4]),
        "mlp/fc1/kernel": (["fsdp"], [4, 48]),
        "lm_head/bias": ([], [101]),
    },
    ("phi", "tp2_data4"): {
        "self_attn/dense/kernel": (["tp"], [16, 32]),
        "self_attn/v_proj/bias": (["tp"], [8]),
        "mlp/fc1/kernel": ([None, "tp"], [32, 24]),
    },
    ("starcoder2", "fsdp8"): {
        "mlp/c_fc/kernel": (["fsdp"], [4, 48]),
        "input_layernorm/bias": ([], [32]),
    },
    ("starcoder2", "tp2_data4"): {
        "mlp/c_fc/kernel": ([None, "tp"], [32, 24]),
        "mlp/c_proj/kernel": (["tp"], [24, 32]),
        "self_attn/o_proj/kernel": (["tp"], [16, 32]),
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_params_really_are_sharded(device_report: dict, family: str, mesh: str) -> None:
    r = device_report[f"{family}/{mesh}"]
    assert r["not_on_mesh"] == []
    assert r["orbax_layout_differs"] == []  # an Orbax model folder restores straight into the same layout
    leaves = r["leaves"]
    want = EXPECTED_LAYOUT[family, mesh]
    for suffix, (spec, shard) in want.items():
        matches = {p: v for p, v in leaves.items() if p.endswith(suffix)}
        assert matches, suffix
        for path, got in matches.items():
            assert (got["spec"], got["shard"]) == (spec, shard), path
            assert got["devices"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_outputs_and_kv_cache_follow_the_mesh(device_report: dict, family: str, mesh: str) -> None:
    r = device_report[f"{family}/{mesh}"]
    batch_axes = ["fsdp"] if mesh == "fsdp8" else ["data"]
    assert r["logits_spec"][:1] == batch_axes  # layer outputs are pinned batch-sharded
    assert r["generate_spec"][:1] == batch_axes
    kv = {"fsdp8": ["fsdp"], "tp2_data4": ["data", "tp"]}[mesh]  # [B, Hkv, S, D]
    assert r["kv_cache_spec"] == kv
    assert r["kv_cache_in_jit_spec"] == kv


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_reference_model_keeps_shared_leaves_sharded_and_shared(device_report: dict, family: str, mesh: str) -> None:
    r = device_report[f"{family}/{mesh}"]
    assert r["ref_shared"] >= 1  # the embeddings at least
    assert r["ref_shared_not_identical"] == []
    assert r["ref_leaves_layout_changed"] == []


@pytest.mark.slow
def test_sharding_a_policy_and_its_reference_keeps_them_sharing(device_report: dict) -> None:
    """shard_model of a policy and then of its reference moved the shared layers twice: held twice from then on."""
    r = device_report["sharded_after_reference"]
    assert r["shared"] >= 3 and r["not_identical"] == []
    assert r["bytes"] == r["bytes_apart"]  # the shared layers' buffers are counted once: the policy's
    assert not r["again_deleted"] and r["again_other_kept"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_lora_adapter_is_sharded_like_its_kernel(device_report: dict, mesh: str) -> None:
    lora = device_report[f"lora/{mesh}"]
    assert lora["not_on_mesh"] == []
    if mesh == "fsdp8":
        assert lora["c_attn/lora_A"] == (["fsdp"]) and lora["c_attn/lora_B"] == []
    else:
        assert lora["c_attn/lora_A"] == [] and lora["c_attn/lora_B"] == [None, "tp"]
    assert lora["logits_diff"] < TOL


# Families checked for forward and generation only (their tiny_configs entry).
FORWARD_FAMILIES = ("bloom", "falcon", "gptj", "cohere", "granite", "gpt_bigcode", "olmo2", "glm4")


def _forward_report(root: Path) -> dict[str, Any]:
    for family in FORWARD_FAMILIES:
        trl_checkpoint(family, root)
    workers = [_start_worker("forward", root, *FORWARD_FAMILIES[i::2]) for i in range(2)]
    return {key: value for worker in workers for key, value in _report(worker).items()}


# Session scope, built once per run (`built_once`): minutes of subprocesses.
@pytest.fixture(scope="session")
def forward_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return built_once(tmp_path_factory, "sharding-forward", _forward_report)


@pytest.mark.slow
@pytest.mark.parametrize("family", FORWARD_FAMILIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_family_sharded_equals_unsharded(forward_report: dict, family: str, mesh: str) -> None:
    """The family's own sharding rules on 8 devices: same logits, values and greedy tokens as one device."""
    r = forward_report[f"{family}/{mesh}"]
    assert r["n_devices"] == 8 and r["not_on_mesh"] == []
    assert r["split_leaves"] > 0  # some params really are split over devices
    _assert_within_rounding(r)
    assert r["generate_equal"], r["generate_mismatch"]


@pytest.mark.slow
def test_sharded_loading_peak_host_memory(tmp_path: Path) -> None:
    """Loading with a mesh never holds much more than the sharded model plus one tensor.

    A bf16 checkpoint of ~75 MB of float32 params (largest tensor 4 MB) is loaded onto 8
    simulated devices (all on this host, so the per-host share is the whole sharded model).
    The worker samples anonymous RSS after every placed tensor and every 0.5 ms.
    """
    random_gpt2_checkpoint(tmp_path / "big", n_embd=512, n_layer=6)
    random_gpt2_checkpoint(tmp_path / "small", n_embd=64, n_layer=1)  # warms imports and code paths first
    r = _report(_start_worker("memory", tmp_path))
    mib = 2**20
    assert r["model"] > 70 * mib and r["largest"] == 4 * mib
    # Nothing model-sized stays behind: resident growth is the shards plus small bookkeeping.
    assert r["after"] - r["share"] < 0.1 * r["share"], r
    # While loading, the host never holds more than 1.5 tensors beyond what it ends up with
    # (a naive loader holding the state dict would peak a whole model higher).
    assert r["peak"] - r["after"] <= 1.5 * r["largest"], r
    assert r["peak"] <= r["share"] + 1.5 * r["largest"] + 0.1 * r["share"], r


# --- the worker (runs in the subprocess) --------------------------------------------------------


def _spec_list(sharding: Any) -> list | None:
    """A NamedSharding's PartitionSpec as JSON-able lists; None for other shardings (one device)."""
    if not hasattr(sharding, "spec"):
        return None
    return [list(e) if isinstance(e, tuple) else e for e in sharding.spec]


def _diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _flat(tree: Any) -> dict[str, Any]:
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_model(model: Any, mesh: Any, inputs: dict[str, np.ndarray], refs: dict[str, Any]) -> dict:
    """Every device check of one sharded model (which it consumes: the PPO update donates its params)."""
    from jax.sharding import NamedSharding

    from trlax.reference import create_reference_model
    from trlax.sharding import constrain_kv_cache, kv_cache_shardings

    r: dict[str, Any] = {"n_devices": jax.device_count()}
    leaves = _flat(model.params)
    r["params_diff"] = max(_diff(x, refs["params"][p]) for p, x in leaves.items())
    logits, _, values = model(inputs["ids"], inputs["mask"])  # plain numpy inputs, as users call it
    r["logits_diff"], r["values_diff"] = _diff(logits, refs["logits"]), _diff(values, refs["values"])
    r["rounding"] = refs["rounding"]
    r["logits_spec"] = _spec_list(logits.sharding)
    out = model.generate(inputs["prompt"], attention_mask=inputs["prompt_mask"], max_new_tokens=6).sequences
    r["generate_equal"] = bool(np.array_equal(out, refs["generate"]))
    r["generate_mismatch"] = np.argwhere(np.asarray(out) != refs["generate"]).tolist()[:5]
    r["generate_spec"] = _spec_list(out.sharding)

    lm = model.pretrained_model
    cache = jax.eval_shape(lambda: lm.spec.init_cache(lm.config, 8, 16, jnp.float32))
    r["kv_cache_spec"] = _spec_list(jax.tree_util.tree_leaves(kv_cache_shardings(cache, mesh))[0])
    made = jax.jit(lambda: constrain_kv_cache(lm.spec.init_cache(lm.config, 8, 16, jnp.float32), lm.mesh))()
    r["kv_cache_in_jit_spec"] = _spec_list(jax.tree_util.tree_leaves(made)[0].sharding)

    r["not_on_mesh"] = [p for p, x in leaves.items()
                        if not (isinstance(x.sharding, NamedSharding) and x.sharding.mesh == lm.mesh)]
    r["leaves"] = {p: {"spec": _spec_list(x.sharding), "shard": list(x.addressable_shards[0].data.shape),
                       "devices": len(x.addressable_shards)} for p, x in leaves.items()}

    ref = create_reference_model(model, num_shared_layers=1)
    ref_leaves = _flat(ref.params)
    shared = [p for p, trainable in _flat(model.trainable_mask).items() if not trainable]
    r["ref_shared"] = len(shared)
    r["ref_shared_not_identical"] = [p for p in shared if ref_leaves[p] is not leaves[p]]
    r["ref_leaves_layout_changed"] = [p for p in leaves if ref_leaves[p].sharding != leaves[p].sharding]

    new, stats, old_specs = _ppo_update(model, refs["experience"], mesh)
    r["ppo_params_diff"] = max(_diff(x, refs["ppo"][0][p]) for p, x in new.items())
    r["ppo_loss_diff"] = max(_diff(stats[k], refs["ppo"][1][k]) for k in ("loss/total", "loss/policy", "loss/value"))
    r["ppo_trainable"] = len(new)
    r["ppo_layout_changed"] = [p for p, x in new.items() if _spec_list(x.sharding) != old_specs[p]]
    return r


def _ppo_update(policy: Any, experience: dict[str, np.ndarray], mesh: Any = None) -> tuple[dict, dict, dict]:
    """One PPO update (SGD, so parameter differences are gradient differences) on a rollout's experience.

    Donates the policy's trainable params: the policy is not usable afterwards.
    """
    import optax

    from trlax.ppo import make_ppo_update
    from trlax.sharding import shard_batch
    from trlax.trainable import split_trainable

    if mesh is not None:
        experience = shard_batch(experience, mesh)
    trainable, frozen = split_trainable(policy.params, policy.trainable_mask)
    old_specs = {p: _spec_list(x.sharding) for p, x in _flat(trainable).items()}
    tx = optax.sgd(0.5)
    new, _, stats = make_ppo_update(policy, tx)(trainable, frozen, tx.init(trainable), experience)
    return _flat(new), stats, old_specs


def _unsharded_results(base: Any, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """What every sharded run must reproduce, from the unsharded model (consumed by its PPO update)."""
    from trlax.ppo import make_rollout
    from trlax.reference import create_reference_model

    logits, _, values = base(inputs["ids"], inputs["mask"])
    refs = {"logits": np.asarray(logits), "values": np.asarray(values),
            "rounding": _rounding(base, inputs["ids"], inputs["mask"], logits, values),
            "params": {p: np.asarray(x) for p, x in _flat(base.params).items()},
            "generate": np.asarray(base.generate(inputs["prompt"], attention_mask=inputs["prompt_mask"],
                                                 max_new_tokens=6).sequences)}
    ref = create_reference_model(base, num_shared_layers=1)
    batch = {"input_ids": inputs["ids"], "attention_mask": inputs["mask"], "response_mask": inputs["response_mask"]}
    experience = make_rollout(base, ref)(base.params, ref.params, batch, inputs["scores"], jnp.float32(0.2))
    refs["experience"] = {k: np.asarray(v) for k, v in experience.items()}
    new, stats, _ = _ppo_update(base, refs["experience"])
    refs["ppo"] = ({p: np.asarray(x) for p, x in new.items()}, {k: np.asarray(v) for k, v in stats.items()})
    return refs


def _worker_devices(root: Path, *families: str) -> None:
    from tests.helpers import batch
    from trlax import FlaxAutoModelForCausalLMWithValueHead
    from trlax.checkpoint.convert import load_orbax, to_orbax

    meshes = {"fsdp8": make_mesh(fsdp=8), "tp2_data4": make_mesh(data=4, fsdp=1, tp=2)}
    ids, mask = batch(101, "right", batch_size=8, seq_len=12, seed=1, low=2)
    response_mask = mask * (np.arange(12) >= 4)  # prompt: the first 4 tokens
    prompt, prompt_mask = batch(101, "left", batch_size=8, seq_len=7, seed=2, low=2)
    inputs = {"ids": ids, "mask": mask, "response_mask": response_mask, "prompt": prompt, "prompt_mask": prompt_mask,
              "scores": np.linspace(-1, 1, 8, dtype=np.float32)}
    report: dict[str, Any] = {}
    load = functools.partial(FlaxAutoModelForCausalLMWithValueHead.from_pretrained, strict=True)
    for family in families:
        refs = _unsharded_results(load(root / family), inputs)
        to_orbax(root / family, root / f"{family}-orbax", progress=False)
        for name, mesh in meshes.items():
            r = _check_model(load(root / family, mesh=mesh), mesh, inputs, refs)
            restored = _flat(load_orbax(root / f"{family}-orbax", mesh=mesh).params)
            r["orbax_params_diff"] = max(_diff(x, refs["params"][p]) for p, x in restored.items())
            r["orbax_layout_differs"] = [p for p, x in restored.items()
                                         if _spec_list(x.sharding) != r["leaves"][p]["spec"]]
            report[f"{family}/{name}"] = r
        if family == "gpt2":
            report.update(_lora_checks(root, meshes, inputs))
            report["mesh_errors"] = _mesh_errors(root / family)
            report["sharded_after_reference"] = _sharded_after_reference(root / family, meshes["fsdp8"])
    print(json.dumps(report))


def _sharded_after_reference(folder: Path, mesh: Any) -> dict[str, Any]:
    """A policy and its reference (one shared layer) created unsharded, then each sharded with shard_model."""
    from trlax import FlaxAutoModelForCausalLMWithValueHead
    from trlax.reference import create_reference_model
    from trlax.sharding import shard_model, shard_params
    from trlax.trainable import unique_buffer_bytes

    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(folder)
    ref = create_reference_model(policy, num_shared_layers=1)
    shared = [p for p, trainable in _flat(policy.trainable_mask).items() if not trainable]
    source = policy.params
    shard_model(policy, mesh)
    shard_model(ref, mesh)
    pol, rf = _flat(policy.params), _flat(ref.params)
    report = {"shared": len(shared), "not_identical": [p for p in shared if pol[p] is not rf[p]],
              "bytes": unique_buffer_bytes(policy.params, ref.params),
              "bytes_apart": unique_buffer_bytes(policy.params) + unique_buffer_bytes(
                  [leaf for p, leaf in rf.items() if p not in shared])}
    # A moved array a donating step deleted is not handed out again: its source is moved anew. The embedding,
    # split over the devices, is in new buffers (a replicated leaf's device-0 shard is its source's buffer,
    # which deleting it deletes too).
    embedding, other = "pretrained_model/transformer/wte/embedding", "pretrained_model/transformer/wpe/embedding"
    pol[embedding].delete()
    again = _flat(shard_params(source, mesh))
    return {**report, "again_deleted": again[embedding].is_deleted(), "again_other_kept": again[other] is pol[other]}


def _call_with_params_on_one_device(folder: Path) -> None:
    from trlax import FlaxAutoModelForCausalLMWithValueHead

    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(folder, mesh=make_mesh(fsdp=8))
    policy.params = jax.device_put(policy.params, jax.devices()[0])  # e.g. a state restored without a target
    policy(np.ones((8, 4), np.int32))


def _mesh_errors(folder: Path) -> dict[str, str]:
    """What loading or sharding on meshes the rules cannot use says (each replicated every param silently)."""
    from trlax import FlaxAutoModelForCausalLMWithValueHead
    from trlax.checkpoint import restore_state, save_state
    from trlax.sharding import shard_model

    state = folder.parent / "gpt2_state"
    save_state(state, 1, FlaxAutoModelForCausalLMWithValueHead.from_pretrained(folder).params).close()
    attempts = {
        "model8": lambda: FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
            folder, mesh=jax.make_mesh((8,), ("model",))),
        "dp2_mp4": lambda: FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
            folder, mesh=jax.make_mesh((2, 4), ("dp", "mp"))),
        "logical_typo": lambda: FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
            folder, mesh=make_mesh(fsdp=8), sharding_rules=ShardingRules(logical={"embed": ("fsdpp",)})),
        "shard_model_x8": lambda: shard_model(FlaxAutoModelForCausalLMWithValueHead.from_pretrained(folder),
                                              jax.make_mesh((8,), ("x",))),
        # restore_state replicated every leaf onto such a mesh without a word
        "restore_state_model8": lambda: restore_state(state, target_sharding=jax.make_mesh((8,), ("model",)),
                                                      model_type="gpt2"),
        "params_off_the_mesh": lambda: _call_with_params_on_one_device(folder),
    }
    report = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            report[name] = "accepted"
        except ValueError as e:
            report[name] = f"{type(e).__name__}: {e}"
    # A mesh axis the rules leave unused: one warning per load (the loader's placer repeated it).
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("trlax").addHandler(handler)
    try:
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(folder, mesh=jax.make_mesh((4, 2), ("fsdp", "extra")))
        # a dense family's rules name no expert axis: it went unwarned, unlike any other unused axis
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(folder, mesh=make_mesh(fsdp=4, expert=2))
    finally:
        logging.getLogger("trlax").removeHandler(handler)
    report["unused_axis_warnings"] = [m for m in messages if "not used by the sharding rules" in m]
    return report


def _worker_forward(root: Path, *families: str) -> None:
    """Sharded vs unsharded value-head forward and greedy generation of each family, on both meshes."""
    from tests.helpers import batch
    from trlax import FlaxAutoModelForCausalLMWithValueHead

    meshes = {"fsdp8": make_mesh(fsdp=8), "tp2_data4": make_mesh(data=4, fsdp=1, tp=2)}
    ids, mask = batch(101, "right", batch_size=8, seq_len=12, seed=1, low=2)
    prompt, prompt_mask = batch(101, "left", batch_size=8, seq_len=7, seed=2, low=2)
    report: dict[str, Any] = {}
    for family in families:
        load = functools.partial(FlaxAutoModelForCausalLMWithValueHead.from_pretrained, root / family, strict=True)
        base = load()
        logits, _, values = base(ids, mask)
        rounding = _rounding(base, ids, mask, logits, values)
        tokens = np.asarray(base.generate(prompt, attention_mask=prompt_mask, max_new_tokens=6).sequences)
        for name, mesh in meshes.items():
            model = load(mesh=mesh)
            leaves = _flat(model.params)
            sharded_logits, _, sharded_values = model(ids, mask)
            out = np.asarray(model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=6).sequences)
            report[f"{family}/{name}"] = {
                "n_devices": jax.device_count(),
                "not_on_mesh": [p for p, x in leaves.items() if getattr(x.sharding, "mesh", None) != mesh],
                "split_leaves": sum(x.addressable_shards[0].data.shape != x.shape for x in leaves.values()),
                "logits_diff": _diff(sharded_logits, logits), "values_diff": _diff(sharded_values, values),
                "rounding": rounding, "generate_equal": bool(np.array_equal(out, tokens)),
                "generate_mismatch": np.argwhere(out != tokens).tolist()[:5],
            }
    print(json.dumps(report))


def _lora_checks(root: Path, meshes: dict[str, Any], inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """A policy LoRA adapter added at load time joins the mesh; its forward matches unsharded."""
    from trlax import FlaxAutoModelForCausalLMWithValueHead, LoraConfig

    load = functools.partial(FlaxAutoModelForCausalLMWithValueHead.from_pretrained, strict=True,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                    init_lora_weights=False))
    want = np.asarray(load(root / "gpt2")(inputs["ids"], inputs["mask"])[0])
    report = {}
    for name, mesh in meshes.items():
        model = load(root / "gpt2", mesh=mesh)
        lora = _flat(model.params["lora"])
        report[f"lora/{name}"] = {
            "not_on_mesh": [p for p, x in lora.items() if getattr(x.sharding, "mesh", None) != mesh],
            "c_attn/lora_A": _spec_list(lora["transformer/h/0/attn/c_attn/lora_A"].sharding),
            "c_attn/lora_B": _spec_list(lora["transformer/h/0/attn/c_attn/lora_B"].sharding),
            "logits_diff": _diff(model(inputs["ids"], inputs["mask"])[0], want),
        }
    return report


def _anon_rss() -> int:
    """Anonymous resident memory of this process in bytes (device buffers of CPU devices included)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def _worker_memory(root: Path) -> None:
    import threading

    import trlax.models.base
    from trlax import FlaxAutoModelForCausalLM

    mesh = make_mesh(fsdp=8)
    FlaxAutoModelForCausalLM.from_pretrained(root / "small", mesh=mesh)
    samples: list[int] = []
    real_make_placer = trlax.models.base.make_placer

    def recording_placer(*args: Any, **kwargs: Any) -> Any:
        place = real_make_placer(*args, **kwargs)

        def recorded(path: tuple[str, ...], array: np.ndarray) -> jax.Array:
            out = place(path, array)
            samples.append(_anon_rss())  # the tensor's peak: its host copy and all its shards alive
            return out

        return recorded

    trlax.models.base.make_placer = recording_placer
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_anon_rss())
            stop.wait(0.0005)

    base = _anon_rss()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    model = FlaxAutoModelForCausalLM.from_pretrained(root / "big", mesh=mesh)
    jax.block_until_ready(model.params)
    stop.set()
    thread.join()
    after = _anon_rss()
    leaves = jax.tree_util.tree_leaves(model.params)
    print(json.dumps({
        "peak": max([*samples, after]) - base, "after": after - base,
        "share": sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards),
        "model": sum(leaf.nbytes for leaf in leaves), "largest": max(leaf.nbytes for leaf in leaves),
        "samples": len(samples),
    }))


if __name__ == "__main__":
    {"devices": _worker_devices, "forward": _worker_forward, "memory": _worker_memory}[sys.argv[1]](
        Path(sys.argv[2]), *sys.argv[3:])
