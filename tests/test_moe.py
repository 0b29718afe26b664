"""Mixture of experts (mixtral, qwen3_moe): trlax vs transformers (PyTorch), float32, atol 1e-4.

Generation, TRL checkpoints both ways, reference sharing and parameter order run in the
generic tests (tests/test_generation.py, test_trl_interop.py, test_reference.py) over
tests/tiny_configs.py; LoRA vs PEFT in tests/test_adapters.py. Here: forward and cached
parity for the MoE options, the per-expert checkpoint layout, routing (top-k order and
ties), refused options, and sharded == unsharded with an `expert` mesh axis on 8
simulated devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from tests.helpers import PADDINGS, batch, built_once, max_diff, save_torch, subprocess_env, torch_random_init
from tests.parity_checks import check_cached_decoding, check_forward, check_save_roundtrip, make_pair
from tests.tiny_configs import TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead, LoraConfig
from trlax.errors import TrlaxError, UnsupportedModelError
from trlax.models.moe import combine_weights, moe_options, route

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4


def _qwen3_moe_variant() -> transformers.PretrainedConfig:
    # Renormalised top-k, every 2nd layer sparse (layers 1 and 3), a sliding window over every layer.
    config = TINY_CAUSAL["qwen3_moe"]()
    config.num_hidden_layers, config.decoder_sparse_step, config.mlp_only_layers = 4, 2, []
    config.norm_topk_prob, config.use_sliding_window, config.sliding_window = True, True, 4
    return config


def _mixtral_top3() -> transformers.PretrainedConfig:
    config = TINY_CAUSAL["mixtral"]()
    config.num_experts_per_tok, config.sliding_window = 3, None
    return config


CONFIGS = {"mixtral": TINY_CAUSAL["mixtral"], "qwen3_moe": TINY_CAUSAL["qwen3_moe"],
           "qwen3_moe-sparse-step": _qwen3_moe_variant, "mixtral-top3": _mixtral_top3}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    return make_pair(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_logits_and_hidden_states_match_pytorch(pair, padding, explicit_positions):
    diff = check_forward(*pair, padding, explicit_positions)
    print(f"[moe] {pair[0].config.model_type} padding={padding}: max|logit diff| {diff:.2e}")


@pytest.mark.parametrize("padding", PADDINGS)
def test_cached_decoding_matches_full_forward(pair, padding):
    check_cached_decoding(pair[1], padding, explicit_positions=False)


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    check_save_roundtrip(*pair, tmp_path)


def test_sparse_and_dense_layers_follow_the_config(pair):
    """Qwen3-MoE's dense layers (mlp_only_layers, decoder_sparse_step) hold a plain MLP, as in torch."""
    pt, model = pair
    layers = model.params["model"]["layers"]
    for i, torch_layer in enumerate(pt.model.layers):
        block = "block_sparse_moe" if pt.config.model_type == "mixtral" else "mlp"
        sparse = hasattr(torch_layer.mlp, "experts")
        assert ("experts" in layers[str(i)][block]) == sparse, i
    assert any(hasattr(layer.mlp, "experts") for layer in pt.model.layers)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_checkpoint_keys_are_the_ones_transformers_writes(model_type, tmp_path):
    """Experts are saved one Linear weight per expert (transformers 5's on-disk layout) and the
    stacked params hold exactly transformers' in-memory tensors."""
    config = TINY_CAUSAL[model_type]()
    torch.manual_seed(0)
    pt = torch_random_init(transformers.AutoModelForCausalLM.from_config(config), std=0.1)
    save_torch(pt, tmp_path / "torch")
    model = FlaxAutoModelForCausalLM.from_pretrained(tmp_path / "torch")
    model.save_pretrained(tmp_path / "trlax")
    keys = {}
    for name in ("torch", "trlax"):
        with safe_open(str(tmp_path / name / "model.safetensors"), "np") as f:
            keys[name] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    assert set(keys["trlax"]) == set(keys["torch"])
    assert any(".experts.3." in k for k in keys["torch"])
    for key, value in keys["torch"].items():
        np.testing.assert_array_equal(keys["trlax"][key], value, err_msg=key)
    block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    experts = model.params["model"]["layers"]["0"][block]["experts"]
    torch_experts = pt.model.layers[0].mlp.experts
    np.testing.assert_array_equal(np.asarray(experts["gate_up_proj"]),
                                  torch_experts.gate_up_proj.detach().numpy().transpose(0, 2, 1))
    np.testing.assert_array_equal(np.asarray(experts["down_proj"]),
                                  torch_experts.down_proj.detach().numpy().transpose(0, 2, 1))


# --- routing -----------------------------------------------------------------------------------


def _torch_router(model_type: str, logits: np.ndarray, top_k: int, norm: bool) -> tuple[np.ndarray, np.ndarray]:
    """transformers' own router module on given logits (an identity input, weight = logits' map)."""
    num_experts = logits.shape[-1]
    if model_type == "mixtral":
        config = transformers.MixtralConfig(hidden_size=num_experts, num_local_experts=num_experts,
                                            num_experts_per_tok=top_k)
        router = transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter(config)
    else:
        config = transformers.Qwen3MoeConfig(hidden_size=num_experts, num_experts=num_experts,
                                             num_experts_per_tok=top_k, norm_topk_prob=norm)
        router = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
        _, weights, experts = router(torch.tensor(logits))
    return weights.numpy(), experts.numpy()


@pytest.mark.parametrize(("model_type", "norm"), [("mixtral", True), ("qwen3_moe", False), ("qwen3_moe", True)])
@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 2), (8, 2), (60, 4), (128, 8)])
def test_routing_matches_transformers_including_ties_inside_the_top_k(model_type, norm, num_experts, top_k):
    """Same experts in the same order and the same weights as transformers' router wherever the
    k-th and (k+1)-th probabilities differ, on logits with exact ties: rows 0::3 tie their top two
    experts, rows 1::3 the k-th and (k+1)-th (a boundary tie), rows 2::3 have distinct logits."""
    rng = np.random.default_rng(num_experts)
    logits = (np.argsort(rng.random((513, num_experts)), axis=-1) / 4).astype(np.float32)  # distinct per row
    order = np.argsort(-logits, axis=-1)
    rows = np.arange(len(logits))
    logits[rows[0::3], order[0::3, 1]] = logits[rows[0::3], order[0::3, 0]]
    logits[rows[1::3], order[1::3, top_k]] = logits[rows[1::3], order[1::3, top_k - 1]]
    ref_w, ref_i = _torch_router(model_type, logits, top_k, norm)
    weights, experts = route(jnp.asarray(logits), top_k, norm)
    all_probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    sorted_probs = np.sort(all_probs, axis=-1)[:, ::-1]
    clear = sorted_probs[:, top_k - 1] != sorted_probs[:, top_k]  # no tie across the top-k boundary
    tie_inside = np.any(sorted_probs[:, : top_k - 1] == sorted_probs[:, 1:top_k], axis=-1)
    assert clear.sum() == 342 and (clear & tie_inside).sum() == 171  # the cases this test is about
    # Equal probabilities inside the top k: the same set; the order among equals is torch's
    # unspecified nth_element order, so compare each row's (weight, expert) pairs as sets.
    np.testing.assert_array_equal(np.sort(np.asarray(experts)[clear], -1), np.sort(ref_i[clear], -1))
    np.testing.assert_allclose(np.asarray(weights)[clear], ref_w[clear], rtol=0, atol=1e-6)
    no_tie = clear & ~tie_inside  # and with no tie at all: the same order too
    np.testing.assert_array_equal(np.asarray(experts)[no_tie], ref_i[no_tie])
    # A tie across the boundary picks the lower expert ids (jax.lax.top_k's documented rule).
    tied = np.flatnonzero(~clear)
    assert len(tied) > 0
    for row in tied[:20]:
        boundary = sorted_probs[row, top_k - 1]
        probs = all_probs[row]
        above = set(np.flatnonzero(probs > boundary))
        lowest_equal = [int(i) for i in np.flatnonzero(probs == boundary)][: top_k - len(above)]
        assert set(np.asarray(experts)[row].tolist()) == above | set(lowest_equal)


def test_combine_weights_scatter_the_top_k():
    weights = jnp.asarray([[0.7, 0.3], [0.5, 0.5]])
    experts = jnp.asarray([[2, 0], [1, 3]])
    np.testing.assert_array_equal(np.asarray(combine_weights(weights, experts, 4)),
                                  np.asarray([[0.3, 0.0, 0.7, 0.0], [0.0, 0.5, 0.0, 0.5]], np.float32))


def test_model_with_tied_router_rows_matches_pytorch(tmp_path):
    """Two experts with identical router rows tie on every token (both chosen, k=2): same logits."""
    config = TINY_CAUSAL["mixtral"]()
    torch.manual_seed(0)
    pt = torch_random_init(transformers.AutoModelForCausalLM.from_config(config), std=0.2)
    with torch.no_grad():
        for layer in pt.model.layers:
            gate = layer.mlp.gate.weight
            gate[1] = gate[0]
            gate[0] += 50.0 * torch.sign(torch.randn(gate.shape[1]))  # expert 0 dominates: it and...
            gate[1] = gate[0]  # ...its twin take the top 2 on (almost) every token
    model = FlaxAutoModelForCausalLM.from_pretrained(save_torch(pt, tmp_path))
    ids, mask = batch(101, "left", seq_len=9)
    with torch.no_grad():
        ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_diff(ref, model(ids, mask).logits, mask) < ATOL


def test_an_unrouted_expert_that_overflows_float16_adds_nothing(tmp_path):
    """Experts are computed densely: an expert no token is routed to overflowed float16 to inf, and inf * 0 made
    every logit NaN, where transformers (which never runs it) is finite."""
    config = TINY_CAUSAL["mixtral"]()
    torch.manual_seed(0)
    pt = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        pt.model.embed_tokens.weight[:, 0] = 10.0  # a dimension every token carries
        pt.model.layers[0].mlp.gate.weight[0, 0] = -10.0  # expert 0: router logit ~ -56, never in the top 2
        pt.model.layers[0].mlp.experts.gate_up_proj[0, :, 0] = 100.0  # its silu(g) * u ~ 3e5 > 65504
    save_torch(pt.to(torch.float16), tmp_path)
    model = FlaxAutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto", param_dtype="auto")
    assert model.dtype == jnp.float16
    ids, mask = batch(101, "left", seq_len=9)
    with torch.no_grad():
        ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float()
    logits = np.asarray(model(ids, mask).logits)
    assert np.isfinite(logits).all() and torch.isfinite(ref).all()
    # both compute in float16: 3 float16 epsilons (2**-11) of the largest logit, as the other half-precision tests
    assert max_diff(ref, logits, mask) < 3 * 2**-11 * float(ref.abs().max())
    # and training through it: masking after the product left 0 * inf = NaN in the router's gradient
    grads = jax.grad(lambda p: model.apply(p, ids, mask).logits.astype(jnp.float32).mean())(model.params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


# --- refused options -----------------------------------------------------------------------------


def _with(model_type: str, **changes: Any) -> transformers.PretrainedConfig:
    config = TINY_CAUSAL[model_type]()
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize(("config", "match"), [
    (lambda: _with("mixtral", router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    (lambda: _with("qwen3_moe", num_experts_per_tok=5), "num_experts_per_tok=5"),
    (lambda: _with("mixtral", rope_parameters={"rope_type": "proportional", "factor": 2.0, "rope_theta": 1e4}),
     "rope_type 'proportional'"),
    (lambda: _with("qwen3_moe", is_causal=False), "bidirectional attention"),
])
def test_unsupported_options_are_refused(config, match):
    with pytest.raises(UnsupportedModelError, match=match):
        FlaxAutoModelForCausalLM.model_class(config())
    assert issubclass(UnsupportedModelError, TrlaxError)


@pytest.mark.parametrize(("model_type", "targets", "match"), [
    ("qwen3_moe", None, "no PEFT default for model_type 'qwen3_moe'"),  # PEFT's table has no qwen3_moe either
    ("mixtral", ["w1"], "match no module"),  # transformers 5 has no per-expert Linear to adapt
    ("mixtral", ["experts"], "not linear layers"),
    ("qwen3_moe", ["gate"], "not linear layers"),  # the router is not an nn.Linear in transformers 5
])
def test_lora_targets_peft_cannot_adapt_are_refused(model_type, targets, match):
    lm = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL[model_type]())
    with pytest.raises(UnsupportedModelError, match=match):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm, peft_config=LoraConfig(r=2, target_modules=targets))


def test_peft_refuses_qwen3_moe_without_target_modules():
    import peft

    pt = transformers.AutoModelForCausalLM.from_config(TINY_CAUSAL["qwen3_moe"]())
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(pt, peft.LoraConfig(r=2))


# --- 8 simulated devices -----------------------------------------------------------------------------

MESHES = {"expert4_data2": {"data": 2, "fsdp": 1, "expert": 4}, "expert2_tp2_data2": {"data": 2, "fsdp": 1,
                                                                                      "expert": 2, "tp": 2}}


def _device_report(root: Path) -> dict[str, Any]:
    for model_type in ("mixtral", "qwen3_moe"):
        torch.manual_seed(0)
        pt = torch_random_init(transformers.AutoModelForCausalLM.from_config(TINY_CAUSAL[model_type]()), std=0.1)
        save_torch(pt, root / model_type)
    env = subprocess_env(8)
    proc = subprocess.run([sys.executable, __file__, str(root)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Session scope, built once per run (`built_once`): minutes of subprocesses.
@pytest.fixture(scope="session")
def device_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return built_once(tmp_path_factory, "moe-sharding", _device_report)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_sharded_over_experts_equals_unsharded(device_report, model_type, mesh):
    r = device_report[f"{model_type}/{mesh}"]
    assert r["n_devices"] == 8
    assert r["logits_diff"] < 1e-5 and r["values_diff"] < 1e-5
    assert r["generate_equal"]
    experts = MESHES[mesh]["expert"]
    for path, spec in r["expert_specs"].items():  # [E, in, out]: the experts split over the expert axis
        assert spec[0] == "expert", (path, spec)
        assert r["expert_shards"][path][0] == 4 // experts
    if "tp" in MESHES[mesh]:
        assert all("tp" in spec for spec in r["expert_specs"].values())


def _worker(root: Path) -> None:
    from trlax.sharding import make_mesh

    ids, mask = batch(101, "right", batch_size=8, seq_len=12, seed=1, low=2)
    prompt, prompt_mask = batch(101, "left", batch_size=8, seq_len=7, seed=2, low=2)
    report: dict[str, Any] = {}
    for model_type in ("mixtral", "qwen3_moe"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
            root / model_type, v_head_init_strategy="normal").save_pretrained(root / f"{model_type}-trl")
        base = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / f"{model_type}-trl", strict=True)
        logits, _, values = base(ids, mask)
        generated = np.asarray(base.generate(prompt, attention_mask=prompt_mask, max_new_tokens=6).sequences)
        for name, sizes in MESHES.items():
            mesh = make_mesh(**sizes)
            model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / f"{model_type}-trl", mesh=mesh,
                                                                          strict=True)
            sharded_logits, _, sharded_values = model(ids, mask)
            out = np.asarray(model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=6).sequences)
            leaves = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
                      for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]}
            experts = {p: x for p, x in leaves.items() if p.endswith(("gate_up_proj", "down_proj")) and x.ndim == 3}
            report[f"{model_type}/{name}"] = {
                "n_devices": jax.device_count(),
                "logits_diff": float(np.abs(np.asarray(sharded_logits) - np.asarray(logits)).max()),
                "values_diff": float(np.abs(np.asarray(sharded_values) - np.asarray(values)).max()),
                "generate_equal": bool(np.array_equal(out, generated)),
                "expert_specs": {p: list(x.sharding.spec) for p, x in experts.items()},
                "expert_shards": {p: list(x.addressable_shards[0].data.shape) for p, x in experts.items()},
            }
    print(json.dumps(report))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


# --- LoRA vs PEFT ------------------------------------------------------------------------------------

# PEFT's "all-linear" also adapts the stacked experts of transformers 5 (`target_parameters`), which
# trlax refuses clearly, and PEFT maps MLP names (gate_proj, ...) onto the fused experts too; these
# name the attention projections.
LORA_TARGETS = {"mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"], "qwen3_moe": ["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]}


@pytest.mark.parametrize("model_type", sorted(LORA_TARGETS))
def test_peft_adapters_load_and_save_with_the_same_logits(model_type, tmp_path):
    import peft

    from tests.test_adapters import randomise_lora_b, torch_base

    _, lm = torch_base(model_type, tmp_path / "base")
    pt = peft.get_peft_model(lm, peft.LoraConfig(task_type="CAUSAL_LM", target_modules=LORA_TARGETS[model_type],
                                                 r=4, lora_alpha=16, use_rslora=True))
    randomise_lora_b(pt)
    pt.save_pretrained(str(tmp_path / "adapter"))
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "adapter", is_trainable=True)
    ids, mask = batch(101, "left", low=2)
    with torch.no_grad():
        ref = pt.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        with pt.disable_adapter():
            base_logits = pt(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    logits = model(ids, mask)[0]
    assert max_diff(ref, base_logits, mask) > 1e-2  # the adapter does something
    loaded = max_diff(ref, logits, mask)
    model.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        again = peft.PeftModel.from_pretrained(lm, str(tmp_path / "saved")).eval()
        written = max_diff(again(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits, logits, mask)
    print(f"[lora] {model_type}: policy logits vs PEFT max|diff| loaded {loaded:.2e}, saved {written:.2e}")
    assert loaded < ATOL and written < ATOL


def test_peft_all_linear_on_experts_is_refused_clearly(tmp_path):
    import peft

    from tests.test_adapters import torch_base

    _, lm = torch_base("mixtral", tmp_path / "base")
    pt = peft.get_peft_model(lm, peft.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=2))
    pt.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(UnsupportedModelError, match="target_parameters"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "adapter")


def _router_grad(model: Any, params: dict, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """d loss / d (the first sparse layer's router weight)."""
    def loss(p):
        return model.apply(p, jnp.asarray(ids), jnp.asarray(mask), labels=jnp.asarray(labels)).loss

    layers = jax.grad(loss)(params)["model"]["layers"]
    return next(np.asarray(layer[block]["gate"]["weight"]) for layer in layers.values()
                for block in ("block_sparse_moe", "mlp") if "gate" in layer.get(block, {}))


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_router_aux_loss_logits_and_gradient_match_transformers(pair, gradient_checkpointing):
    """output_router_logits=True: transformers returns the router logits and the load-balancing loss over the
    real tokens and adds router_aux_loss_coef x it to the LM loss. trlax returned the LM loss alone (4.61
    against 5.62), then refused it."""
    pt, model = pair
    ids, mask = batch(model.vocab_size, "left", seq_len=7)
    labels = np.where(mask == 1, ids, -100)
    model(ids, mask)  # traced with the switch off: the switch must not reuse that program
    for m in (pt, model):
        m.config.output_router_logits = True
        m.config.router_aux_loss_coef = 0.37  # both read it when the model is built: no effect now
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    try:
        ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
        out = model(ids, mask, labels=labels)
        assert len(out.router_logits) == len(ref.router_logits) == sum(moe_options(model.config).sparse)
        for r, o in zip(ref.router_logits, out.router_logits, strict=True):
            assert o.shape == tuple(r.shape) and max_diff(r.detach(), o) < ATOL
        assert abs(float(out.aux_loss) - float(ref.aux_loss)) < ATOL and float(ref.aux_loss) > 1
        assert abs(float(out.loss) - float(ref.loss)) < ATOL
        lm_loss = float(out.loss) - pt.router_aux_loss_coef * float(out.aux_loss)  # the coefficient it was built with
        model.config.output_router_logits = False
        assert abs(float(model(ids, mask, labels=labels).loss) - lm_loss) < 1e-5
        model.config.output_router_logits = True
        no_aux = model(ids, mask)  # without labels: aux_loss and router_logits, no loss
        assert no_aux.loss is None and float(no_aux.aux_loss) == float(out.aux_loss)
        ref.loss.backward()
        gate = next(m for name, m in pt.named_modules() if name.endswith(".gate") and hasattr(m, "weight"))
        assert max_diff(gate.weight.grad, _router_grad(model, model.params, ids, mask, labels)) < 1e-5
        pt.zero_grad()
    finally:
        for m in (pt, model):
            m.config.output_router_logits = False
        model.gradient_checkpointing_disable()
    assert model(ids, mask, labels=labels).aux_loss is None


def test_router_aux_loss_reaches_the_value_head_wrappers_loss_as_in_trl(tmp_path):
    """TRL's forward returns the LM's loss, aux loss included."""
    config = TINY_CAUSAL["mixtral"]()
    config.output_router_logits = True
    pt, _ = make_pair(config, tmp_path / "lm")
    trl_model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "lm"))
    trl_model.save_pretrained(str(tmp_path / "trl"))
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "trl")
    ids, mask = batch(policy.config.vocab_size, "left", seq_len=7)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        _, ref_loss, _ = trl_model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    _, loss, _ = policy(ids, mask, labels=labels)
    assert abs(float(loss) - float(ref_loss)) < ATOL


def test_router_aux_loss_without_a_sparse_layer_is_refused():
    """transformers' load-balancing loss over no router is 0 / 0: a NaN loss."""
    config = _with("qwen3_moe", output_router_logits=True, mlp_only_layers=[0, 1, 2])
    with pytest.raises(UnsupportedModelError, match="output_router_logits=True and no sparse layer"):
        FlaxAutoModelForCausalLM.model_class(config)


@pytest.mark.parametrize("model_type", ["mixtral", "phi3", "starcoder2"])
def test_a_window_slides_every_layer_whatever_layer_types_say(model_type, tmp_path):
    """transformers' Mixtral, Phi-3 and StarCoder2 slide every layer when sliding_window is set and ignore a
    config's layer_types; trlax slid only the layers marked sliding (logits 3.7 to 4.7 off)."""
    config = TINY_CAUSAL[model_type]()
    config.sliding_window = 3
    config.layer_types = ["full_attention", "sliding_attention"] + ["full_attention"] * (config.num_hidden_layers - 2)
    pt, model = make_pair(config, tmp_path)
    check_forward(pt, model, "left", explicit_positions=False)
