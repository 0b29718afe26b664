"""LoRA policy adapters: PEFT config semantics, PEFT files both ways, masks, the adapter-off reference."""

from __future__ import annotations

import json
import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULT_TARGETS
from safetensors.numpy import save_file

from tests.helpers import batch, max_diff, save_torch, torch_random_init
from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ
from trlax import (
    CheckpointError,
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
    LoraConfig,
    create_reference_model,
)
from trlax.errors import TrlaxError, TrlaxTypeError, UnsupportedModelError
from trlax.models.registry import spec_for_type, supported_model_types
from trlax.peft.lora import check_applied, init_lora, lora_modules, resolve_targets
from trlax.peft.reward import load_reward_adapter

ATOL = 1e-4
# Causal families whose every projection is LoRA-aware (layers.Dense) and checked against PEFT here.
LORA_FAMILIES = ("gpt2", "opt", "gpt_neo", "gpt_neox", "llama", "gemma", "gemma3_text", "phi3", "phi",
                 "starcoder2", "bloom", "falcon", "gptj", "cohere", "granite", "gpt_bigcode", "smollm3",
                 "olmo2", "olmo3", "glm4", "glm")
PARITY_FAMILIES = LORA_FAMILIES


def torch_base(model_type: str, folder, seed: int = 0):
    """A tiny random transformers causal LM saved to `folder`; returns (config, torch model)."""
    config = TINY_CAUSAL[model_type]()
    torch.manual_seed(seed)
    lm = torch_random_init(transformers.AutoModelForCausalLM.from_config(config), seed=seed, std=0.1)
    save_torch(lm, folder)
    lm.name_or_path = str(folder)  # what from_pretrained(folder) records; PEFT saves it as the adapter's base
    return config, lm


def randomise_lora_b(model, seed: int = 1, std: float = 0.3) -> None:
    """Give a PEFT model's lora_B (zeros at init) random values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _peft_modules(model) -> dict[str, tuple[int, float]]:
    """PEFT's adapted modules -> (r, scaling) of its "default" adapter (torch module names)."""
    return {name: (m.r["default"], m.scaling["default"]) for name, m in model.base_model.model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_default_target_modules_are_pefts():
    for model_type in supported_model_types():
        expected = tuple(PEFT_DEFAULT_TARGETS.get(model_type, ()))  # none: PEFT asks the user to name them
        assert spec_for_type(model_type).peft_targets == expected, model_type


CONFIGS = {
    "names": {"target_modules": ["c_attn", "c_proj", "q_proj", "o_proj", "fc2", "dense"], "r": 4, "lora_alpha": 8},
    "regex": {"target_modules": r".*\.1\..*\.(c_attn|q_proj|v_proj|query_key_value|fc1)", "r": 2, "lora_alpha": 3},
    "all_linear": {"target_modules": "all-linear", "r": 2, "lora_alpha": 16, "use_rslora": True},
    "patterns": {"target_modules": "all-linear", "r": 4, "lora_alpha": 8, "rank_pattern": {"h.0.mlp.c_fc": 2,
                 "layers.0.mlp.up_proj": 2, "fc1": 6}, "alpha_pattern": {"1.attn.c_attn": 5, "v_proj": 3},
                 "exclude_modules": ["c_proj", "down_proj", "out_proj"]},
    "default": {"r": 4},
}


@pytest.mark.parametrize("model_type", LORA_FAMILIES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_targets_ranks_and_scalings_match_peft(model_type, name, tmp_path):
    config, lm = torch_base(model_type, tmp_path)
    kwargs = CONFIGS[name]
    try:
        ref = _peft_modules(peft.get_peft_model(lm, peft.LoraConfig(**kwargs)))
    except ValueError as e:  # PEFT refuses configs that match nothing, or rely on a default it lacks; trlax too
        no_default = "specify `target_modules`" in str(e)
        with pytest.raises(UnsupportedModelError, match="has no PEFT default" if no_default else "match no module"):
            resolve_targets(LoraConfig.from_peft(kwargs), FlaxAutoModelForCausalLM.from_pretrained(tmp_path).params,
                            model_type)
        assert no_default or "not found" in str(e) or "match" in str(e)
        return
    model = FlaxAutoModelForCausalLM.from_pretrained(tmp_path)
    lora_config = LoraConfig.from_peft(kwargs)
    targets = resolve_targets(lora_config, model.params, model_type)
    got = {p: lora_config.rank_and_alpha(p)[0] for p in targets}
    assert got == {p: r for p, (r, _) in ref.items()}
    assert {p: pytest.approx(lora_config.scaling(p)) for p in targets} == {p: s for p, (_, s) in ref.items()}


def test_config_parsing_accepts_peft_dicts_and_objects_and_round_trips():
    source = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.05,
                             use_rslora=True, rank_pattern={"c_fc": 2}, alpha_pattern={"c_attn": 4},
                             task_type="CAUSAL_LM")
    from_object = LoraConfig.from_peft(source)
    from_dict = LoraConfig.from_peft(json.loads(json.dumps(source.to_dict(), default=list)))
    assert from_object == from_dict
    assert from_object.target_modules == ["c_attn", "c_fc"] and from_object.use_rslora
    assert from_object.scaling("transformer.h.0.mlp.c_fc") == pytest.approx(8 / 2**0.5)
    assert from_object.scaling("transformer.h.0.attn.c_attn") == pytest.approx(4 / 2)
    back = peft.LoraConfig(**{k: v for k, v in from_object.to_peft_dict().items() if k != "peft_type"})
    assert LoraConfig.from_peft(back) == from_object
    assert LoraConfig.from_peft({"target_modules": r".*c_attn"}).target_modules == r".*c_attn"


@pytest.mark.parametrize(("config", "error", "match"), [
    ({"r": 0}, ValueError, "r must be a positive integer; got 0"),
    ({"r": -2}, ValueError, "r must be a positive integer"),
    ({"r": 4, "rank_pattern": {"c_fc": 0}}, ValueError, r"rank_pattern\['c_fc'\] must be a positive integer"),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}, UnsupportedModelError,
     r"PEFT type 'PREFIX_TUNING' is not supported by trlax; supported PEFT types: \['LORA'\]"),
    ({"use_dora": True}, UnsupportedModelError, "use_dora=True is not supported"),
    ({"bias": "all"}, UnsupportedModelError, "bias='all'"),
    ({"layers_to_transform": [0]}, UnsupportedModelError, "layers_to_transform"),
    ({"layers_to_transform": 0}, UnsupportedModelError, "layers_to_transform=0"),  # layer 0 only, not unset
    ({"init_lora_weights": "pissa"}, UnsupportedModelError, "init_lora_weights='pissa' is not supported"),
    ({"lora_dropout": 1.0}, ValueError, "lora_dropout must be in"),
    ({"lora_dropout": "0.1"}, ValueError, "lora_dropout must be in"),  # was a raw ValueError from float()
    ({"lora_alpha": float("nan")}, ValueError, "lora_alpha must be a finite number"),  # was a NaN forward
    ({"lora_alpha": "16"}, ValueError, "lora_alpha must be a finite number"),  # was a TypeError at the forward
    ({"alpha_pattern": {"c_fc": None}}, ValueError, r"alpha_pattern\['c_fc'\] must be a finite number"),
    ({"layers_pattern": "layers"}, UnsupportedModelError, "layers_pattern needs layers_to_transform"),  # PEFT too
])
def test_bad_configs_are_refused(config, error, match):
    with pytest.raises(error, match=match):
        LoraConfig.from_peft(config)


def test_non_lora_peft_config_object_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"PEFT type 'IA3' is not supported.*\['LORA'\]"):
        LoraConfig.from_peft(peft.IA3Config(target_modules=["c_attn"], feedforward_modules=[]))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    torch_base("gpt2", folder)
    return folder


@pytest.mark.parametrize(("targets", "match"), [
    (["q_proj", "k_proj"], r"match no module of this gpt2 model; its linear layers are named \['c_attn'"),
    (r"transformer\.h\.9\..*", "match no module"),
    (["wte"], r"match \['transformer.wte'\], which are not linear layers"),
    (["attn"], "which are not linear layers"),
    # PEFT adapts GPT-2's tied head; trlax has no linear layer there (nor says PEFT ignores it).
    (["c_attn", "lm_head"], r"LoRA target 'lm_head' is no linear layer of this gpt2 model: its LM head is tied"),
    (["lm_head"], "LoRA target 'lm_head' is no linear layer"),
    (r".*(c_attn|lm_head)", "LoRA target 'lm_head' is no linear layer"),  # a regex: the head was left out silently
])
def test_target_modules_that_match_nothing_or_no_linear_layer_are_refused(gpt2_folder, targets, match):
    with pytest.raises(UnsupportedModelError, match=match):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(gpt2_folder, peft_config={"target_modules": targets})


def test_adapter_folder_into_a_plain_lm_names_the_wrapper(gpt2_folder, tmp_path):
    pt = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder),
                             peft.LoraConfig(r=2, target_modules=["c_attn"]))
    pt.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(CheckpointError, match=r"is a PEFT adapter .* FlaxAutoModelForCausalLMWithValueHead"):
        FlaxAutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "adapter").is_peft_model


def test_partly_unmatched_target_names_warn(gpt2_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="trlax"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(gpt2_folder,
                                                              peft_config={"target_modules": ["c_attn", "q_proj"]})
    assert "['q_proj'] match no linear layer" in caplog.text


def test_a_lora_policy_saved_with_params_of_the_base_alone_is_refused_by_name(gpt2_folder, tmp_path):
    """save_pretrained / to_torch with params without the adapter (the reference's: the forward takes them) raised
    a bare KeyError('lora')."""
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
        gpt2_folder, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    base_only = {k: v for k, v in policy.params.items() if k != "lora"}
    assert policy(np.ones((1, 3), np.int32), params=base_only)[0].shape == (1, 3, policy.config.vocab_size)
    for call, what in ((lambda: policy.save_pretrained(tmp_path / "out", params=base_only), "save_pretrained"),
                       (lambda: policy.to_torch(params=base_only), "to_torch")):
        with pytest.raises(TrlaxError, match=f"{what}: these params hold no 'lora' adapter"):
            call()
    assert not (tmp_path / "out").exists()


def test_fresh_adapter_is_peft_init_and_starts_as_the_base(gpt2_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="trlax"):
        model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
            gpt2_folder, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                lora_dropout=0.1))
    assert "lora_dropout" not in caplog.text  # applied in training forwards: nothing to warn about
    assert model.peft_config["default"].lora_dropout == 0.1
    modules = lora_modules(model.params["lora"])
    assert sorted(modules) == [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")]
    a = np.asarray(modules["transformer.h.0.attn.c_attn"]["lora_A"])
    assert a.shape == (32, 4) and 0 < np.abs(a).max() <= 32**-0.5  # kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in))
    assert all(not np.asarray(m["lora_B"]).any() for m in modules.values())  # so the policy starts as the base
    assert float(modules["transformer.h.0.mlp.c_fc"]["scaling"]) == 2.0


def test_trainable_mask_covers_only_the_adapter_and_the_value_head(gpt2_folder):
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(gpt2_folder,
                                                                  peft_config={"target_modules": ["c_attn"]})
    flat = jax.tree_util.tree_leaves_with_path(model.trainable_mask)
    trainable = sorted(jax.tree_util.keystr(path) for path, on in flat if on)
    assert trainable == sorted([f"['lora']['transformer']['h']['{i}']['attn']['c_attn']['lora_{ab}']"
                                for i in (0, 1) for ab in "AB"] + ["['v_head']['summary']['bias']",
                                                                   "['v_head']['summary']['kernel']"])
    assert jax.tree_util.tree_structure(model.trainable_mask) == jax.tree_util.tree_structure(model.params)
    assert model.is_peft_model and model.peft_config["default"].target_modules == ["c_attn"]


def test_a_lora_scaling_an_optimizer_changed_is_refused_at_save(gpt2_folder, tmp_path):
    """A plain optimizer over params["lora"] (adamw's weight decay) moved the `scaling` leaves; save_pretrained
    wrote lora_alpha alone, so the saved adapter gave other logits (0.065 off) without a word."""
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
        gpt2_folder, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    policy.save_pretrained(tmp_path / "kept")  # unchanged scalings save
    lora = policy.params["lora"]
    decayed = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0.9 if path[-1].key == "scaling" else x, lora)
    policy.params = {**policy.params, "lora": decayed}
    with pytest.raises(TrlaxError, match="LoRA scaling of 2 module\\(s\\), e.g. transformer.h.0.attn.c_attn, is no "
                                         "longer lora_alpha / r .*trainable_mask"):
        policy.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_adapter_policy_save_refuses_the_full_model_options(gpt2_policy, tmp_path):
    """dtype= and max_shard_size= (even dtype="int8") were ignored without a word: PEFT's layout is one adapter
    file, the adapter as it is held. Nothing is written."""
    for options in ({"dtype": "bfloat16"}, {"dtype": "int8"}, {"max_shard_size": "1KB"}):
        with pytest.raises(TrlaxTypeError, match=f"takes no {next(iter(options))} here"):
            gpt2_policy.save_pretrained(tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", PARITY_FAMILIES)
def test_peft_adapters_load_and_save_with_the_same_logits(model_type, tmp_path):
    """PEFT -> trlax (load a PEFT adapter as the policy) and trlax -> PEFT (save it, PeftModel loads it)."""
    _, lm = torch_base(model_type, tmp_path / "base")
    pt = peft.get_peft_model(lm, peft.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=4,
                                                 lora_alpha=16, use_rslora=True))
    randomise_lora_b(pt)
    pt.save_pretrained(str(tmp_path / "adapter"))
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "adapter", is_trainable=True)
    assert model.is_peft_model and any(jax.tree_util.tree_leaves(model.trainable_mask["lora"]))
    ids, mask = batch(101, "left", low=2)
    with torch.no_grad():
        ref = pt.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        with pt.disable_adapter():
            base_logits = pt(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    logits = model(ids, mask)[0]
    loaded = max_diff(ref, logits, mask)
    assert max_diff(ref, base_logits, mask) > 1e-2  # the adapter does something

    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM" and saved["use_rslora"]
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")
    assert saved["fan_in_fan_out"] == (model_type == "gpt2")
    with torch.no_grad():
        again = peft.PeftModel.from_pretrained(lm, str(tmp_path / "saved")).eval()
        ref_saved = again(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    written = max_diff(ref_saved, logits, mask)
    print(f"[lora] {model_type}: policy logits vs PEFT max|diff| loaded {loaded:.2e}, saved {written:.2e}")
    assert loaded < ATOL and written < ATOL


@pytest.mark.parametrize(("model_type", "target"), [("llama", "q_proj"), ("gptj", "q_proj"), ("phi", "dense")])
def test_peft_adapter_on_an_untied_lm_head_loads(model_type, target, tmp_path):
    """PEFT also saves an adapted lm_head's base weight (save_embedding_layers), and its bias where the head has
    one (GPT-J, Phi: refused as "saved in full" before, from a folder and in memory): an unchanged copy loads, a
    changed one (a retrained head) is refused."""
    from safetensors.torch import load_file, save_file

    _, lm = torch_base(model_type, tmp_path / "base")  # untied head
    pt = peft.get_peft_model(lm, peft.LoraConfig(r=4, target_modules=[target, "lm_head"]))
    randomise_lora_b(pt)
    pt.save_pretrained(str(tmp_path / "adapter"))
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    saved = [k for k in load_file(weights) if ".base_layer." in k]
    assert "base_model.model.lm_head.base_layer.weight" in saved
    assert ("base_model.model.lm_head.base_layer.bias" in saved) == (model_type != "llama")
    ids, mask = batch(101, "left", low=2)
    with torch.no_grad():
        ref = pt.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    for source in (tmp_path / "adapter", pt):
        model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(source)
        assert max_diff(ref, model(ids, mask)[0], mask) < ATOL
    tensors = load_file(weights)
    for key in saved:
        changed = dict(tensors)
        changed[key] = changed[key] + 0.5
        save_file(changed, weights)
        with pytest.raises(CheckpointError, match=f"{re.escape(key.removeprefix('base_model.model.'))}'.* differs"):
            FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "adapter")


def test_gpt_neox_head_uses_pefts_name_lm_head(tmp_path):
    """transformers 5 holds GPT-NeoX's head (`embed_out` in the file) as `lm_head`, the name PEFT adapts and
    saves: trlax refused PEFT's adapter, and wrote `embed_out` keys that PEFT skipped (logits 2.6 off)."""
    _, lm = torch_base("gpt_neox", tmp_path / "base")
    pt = peft.get_peft_model(lm, peft.LoraConfig(r=4, target_modules=["query_key_value", "lm_head"]))
    randomise_lora_b(pt)
    pt.save_pretrained(str(tmp_path / "adapter"))
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "adapter")
    assert "embed_out" in lora_modules(model.params["lora"])
    ids, mask = batch(101, "left", low=2)
    with torch.no_grad():
        ref = pt.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    logits = model(ids, mask)[0]
    assert max_diff(ref, logits, mask) < ATOL
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["lm_head", "query_key_value"]
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    with torch.no_grad():
        again = peft.PeftModel.from_pretrained(base, str(tmp_path / "saved")).eval()
        assert "lm_head" in {name.rsplit(".", 1)[-1] for name in _peft_modules(again)}
        assert max_diff(again(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits, logits, mask) < ATOL
    in_torch = model.to_torch()  # PEFT takes the adapter under its names
    with torch.no_grad():
        assert max_diff(in_torch(torch.tensor(ids), attention_mask=torch.tensor(mask))[0], logits, mask) < ATOL


@pytest.mark.parametrize(("model_type", "targets", "fused"), [
    ("qwen3_moe", ["q_proj", "down_proj"], "['down_proj']"),  # PEFT skips layer 1's dense down_proj too
    ("mixtral", ["q_proj", "v_proj", "w1", "w2", "w3"], "['w1', 'w2', 'w3']"),  # the usual Mixtral recipe
    ("mixtral", "All-Linear", "['gate', 'w1', 'w2', 'w3']"),
])
def test_targets_peft_turns_into_fused_expert_parameters_are_refused(model_type, targets, fused):
    """PEFT (on transformers 5) adapts these names as target_parameters of the fused experts and router; trlax
    adapted the attention (and a dense layer) only, without a word."""
    config = peft.LoraConfig(r=2, target_modules=targets)
    pt = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(TINY_CAUSAL[model_type]()), config)
    assert pt.peft_config["default"].target_parameters  # PEFT's own reading of the same config
    lm = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL[model_type]())
    with pytest.raises(UnsupportedModelError, match=re.escape(f"name {fused} of this {model_type} model")):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm, peft_config=LoraConfig(r=2, target_modules=targets))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_a_regex_target_on_a_moe_family_is_refused(model_type):
    """PEFT (on transformers 5) rewrites a regex on a MoE model into the bare names it matches and adapts them in
    every layer (layer 1's q_proj became every q_proj); trlax adapted layer 1's only, and an adapter it saved
    lost keys in PEFT (logits off by 0.68)."""
    regex = r"model\.layers\.1\.self_attn\.q_proj"
    pt = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(TINY_CAUSAL[model_type]()),
                             peft.LoraConfig(r=2, target_modules=regex))
    assert pt.peft_config["default"].target_modules == {"q_proj"}  # PEFT's own reading of the regex
    lm = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL[model_type]())
    with pytest.raises(UnsupportedModelError, match="PEFT \\(with transformers 5\\) rewrites a regex"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm, peft_config=LoraConfig(r=2, target_modules=regex))
    llama = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL["llama"]())  # a dense family: the regex as PEFT reads it
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(llama, peft_config=LoraConfig(
        r=2, target_modules=regex))
    assert list(lora_modules(policy.params["lora"])) == ["model.layers.1.self_attn.q_proj"]


def test_peft_model_with_modules_to_save_in_memory_names_the_saved_module(tmp_path):
    _, lm = torch_base("llama", tmp_path / "base")
    pt = peft.get_peft_model(lm, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(UnsupportedModelError, match=r"saves \['lm_head.weight'\] in full \(modules_to_save\)"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(pt)


def test_a_loaded_adapter_keeps_its_dropout_and_applies_it_in_training(gpt2_folder, tmp_path, caplog):
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(gpt2_folder))
    lm.name_or_path = str(gpt2_folder)
    pt = peft.get_peft_model(lm, peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.1))
    randomise_lora_b(pt)  # so the adapter, and dropping its inputs, changes the output
    pt.save_pretrained(str(tmp_path / "adapter"))
    for is_trainable in (False, True):
        with caplog.at_level(logging.WARNING, logger="trlax"):
            policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "adapter",
                                                                           is_trainable=is_trainable)
        assert "lora_dropout" not in caplog.text  # applied in training forwards: nothing to warn about
        assert policy.peft_config["default"].lora_dropout == 0.1
    ids, mask = batch(policy.config.vocab_size, "right")
    key = jax.random.key(0)
    # The same key draws the same masks for the model's own dropouts (GPT-2's 0.1): only the LoRA branches differ.
    with_lora_dropout = policy(ids, mask, train=True, dropout_rng=key)[0]
    policy.peft_config["default"].lora_dropout = 0.0
    assert max_diff(with_lora_dropout, policy(ids, mask, train=True, dropout_rng=key)[0]) > 1e-3


def test_peft_edge_cases_load_as_peft_applies_them_or_are_refused(tmp_path):
    """From a review against PEFT 0.21: full embedding / head copies saved with save_embedding_layers=True were
    refused as modules_to_save; an excluded lm_head of a tied model was refused as a tied-head target; the base's
    revision was dropped on save; several active adapters, or disabled adapter layers, were applied silently."""
    _, lm = torch_base("llama", tmp_path / "llama")
    pt = peft.get_peft_model(lm, peft.LoraConfig(r=2, target_modules=["q_proj"], revision="v1.0"))
    randomise_lora_b(pt)
    pt.save_pretrained(str(tmp_path / "embeddings"), save_embedding_layers=True)
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "embeddings")
    ids, mask = batch(101, "left", low=2)
    with torch.no_grad():
        ref = pt.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_diff(ref, model(ids, mask)[0], mask) < ATOL
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["revision"] == "v1.0"

    pt.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    pt.base_model.set_adapter(["default", "other"])
    with pytest.raises(TrlaxError, match=r"2 active adapters \['default', 'other'\].*set_adapter"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(pt)
    pt.base_model.set_adapter("default")
    pt.base_model.disable_adapter_layers()
    with pytest.raises(TrlaxError, match=r"adapter layers are disabled \(disable_adapter_layers\(\)\)"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(pt)

    for model_type in ("gpt2", "gptj"):  # a tied head (PEFT saves it as a copy of wte), a head with a bias
        _, base = torch_base(model_type, tmp_path / f"{model_type}_base")
        other = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_attn" if model_type == "gpt2"
                                                                               else "q_proj"]))
        randomise_lora_b(other)
        other.save_pretrained(str(tmp_path / model_type), save_embedding_layers=True)
        loaded = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / model_type)
        with torch.no_grad():
            ref = other.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        assert max_diff(ref, loaded(ids, mask)[0], mask) < ATOL, model_type

    _, tied = torch_base("gpt2", tmp_path / "gpt2")
    excluded = {"target_modules": ["c_attn", "lm_head"], "exclude_modules": ["lm_head"]}
    peft_tied = peft.get_peft_model(tied, peft.LoraConfig(r=2, **excluded))
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "gpt2", peft_config=excluded)
    assert sorted(policy.params["lora"]["transformer"]["h"]) == ["0", "1"]
    assert sum("lora_A" in name for name, _ in peft_tied.named_parameters()) == 2  # PEFT: c_attn of both layers


@pytest.fixture(scope="module")
def gpt2_policy(gpt2_folder):
    """A trlax adapter policy on every linear layer with random lora_B (init_lora_weights=False)."""
    return FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
        gpt2_folder, seed=3, peft_config={"target_modules": "all-linear", "r": 4, "lora_alpha": 8,
                                          "init_lora_weights": False})


def test_adapter_policy_generates_with_its_adapter(gpt2_policy):
    """Greedy rollouts of a LoRA policy follow the adapted logits, not the base's."""
    model = gpt2_policy
    ids = np.random.RandomState(0).randint(2, 100, (2, 5)).astype(np.int32)
    new = 4
    out = np.asarray(model.generate(ids, max_new_tokens=new, eos_token_id=[]).sequences)
    seq = ids
    for _ in range(new):  # the same greedy rollout from full forwards of the adapted policy
        logits, _, _ = model(seq)
        seq = np.concatenate([seq, np.asarray(logits)[:, -1].argmax(-1)[:, None].astype(np.int32)], axis=1)
    np.testing.assert_array_equal(out, seq)
    base = {k: v for k, v in model.params.items() if k != "lora"}
    assert not np.array_equal(np.asarray(model.generate(ids, params=base, max_new_tokens=new,
                                                        eos_token_id=[]).sequences), out)


def test_adapter_policy_round_trips_with_its_value_head(gpt2_policy, tmp_path):
    model = gpt2_policy
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "model.safetensors"]
    assert sorted(model.state_dict()) == ["v_head.summary.bias", "v_head.summary.weight"]
    back = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, strict=True, is_trainable=True)
    ids, mask = batch(101, "right", low=2)
    for a, b in zip(model(ids, mask), back(ids, mask), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6) if a is not None else None
    assert jax.tree_util.tree_structure(back.trainable_mask) == jax.tree_util.tree_structure(model.trainable_mask)
    frozen = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)  # TRL/PEFT default: inference mode
    assert not any(jax.tree_util.tree_leaves(frozen.trainable_mask["lora"]))


def test_part_of_a_value_head_beside_an_adapter_is_kept_as_trl_does(gpt2_policy, tmp_path, caplog):
    """An adapter policy folder whose head file holds v_head.summary.weight alone: TRL keeps that weight
    (`load_state_dict(strict=False)`) as for a full checkpoint; trlax dropped it and said there was no head."""
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead

    gpt2_policy.save_pretrained(tmp_path)
    weight = np.arange(32, dtype=np.float32)[None] / 100
    save_file({"v_head.summary.weight": weight}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="trlax"):
        model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, seed=4)
    assert "only part of a value head (no v_head.summary.bias); initialised the missing part" in caplog.text
    np.testing.assert_array_equal(np.asarray(model.params["v_head"]["summary"]["kernel"]), weight.T)
    fresh = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(FlaxAutoModelForCausalLM.from_config(
        gpt2_policy.config), seed=4)
    np.testing.assert_array_equal(model.params["v_head"]["summary"]["bias"], fresh.params["v_head"]["summary"]["bias"])
    torch_model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(torch_model.v_head.summary.weight.detach().numpy(), weight)
    with pytest.raises(CheckpointError, match="only part of a value head.*strict=True"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, strict=True)


def test_reference_of_an_adapter_policy_is_the_base_with_no_copy(gpt2_policy):
    model = gpt2_policy
    ref = create_reference_model(model)
    base_leaves = jax.tree_util.tree_leaves(model.params["pretrained_model"])
    ref_leaves = jax.tree_util.tree_leaves(ref.params["pretrained_model"])
    assert all(a is b for a, b in zip(base_leaves, ref_leaves, strict=True))
    pointers = {leaf.unsafe_buffer_pointer() for leaf in base_leaves + ref_leaves}
    assert len(pointers) == len(base_leaves)  # one copy of the base between policy and reference
    assert "lora" not in ref.params and ref.frozen and not any(jax.tree_util.tree_leaves(ref.trainable_mask))
    assert not ref.is_peft_model and ref.reward_params is None
    v_head, ref_v_head = model.params["v_head"]["summary"]["kernel"], ref.params["v_head"]["summary"]["kernel"]
    assert v_head.unsafe_buffer_pointer() != ref_v_head.unsafe_buffer_pointer()  # trained: copied
    ids, mask = batch(101, "right", low=2)
    ref_out = ref(ids, mask)
    # The policy's own forward selects per call: without its "lora" tree it is the reference.
    adapter_off = {k: v for k, v in model.params.items() if k != "lora"}
    for a, b in zip(ref_out, model.apply(adapter_off, jnp.asarray(ids), jnp.asarray(mask)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6) if a is not None else None
    assert max_diff(ref_out[0], model(ids, mask)[0], mask) > 1e-2
    with pytest.raises(ValueError, match="num_shared_layers/pattern do not apply to a LoRA adapter policy"):
        create_reference_model(model, num_shared_layers=1)


@pytest.mark.parametrize(("change", "match"), [
    ({"n_embd": 64}, r"does not fit the base model .*c_attn.lora_A.weight has shape \(4, 64\).*needs \(4, 32\)"),
    ({"n_layer": 3}, r"it adapts \['transformer.h.2.attn.c_attn'"),
])
def test_adapter_for_another_base_is_refused(gpt2_folder, tmp_path, change, match):
    config = TINY_CAUSAL["gpt2"]()
    for key, value in change.items():
        setattr(config, key, value)
    other = peft.get_peft_model(transformers.GPT2LMHeadModel(config), peft.LoraConfig(target_modules=["c_attn"], r=4))
    other.peft_config["default"].base_model_name_or_path = "someone/other-gpt2"
    other.save_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        **json.loads((tmp_path / "adapter_config.json").read_text()), "base_model_name_or_path": str(gpt2_folder)}))
    with pytest.raises(CheckpointError, match=match):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


def test_layers_that_ignore_the_adapter_are_caught():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            return nn.Dense(4, name="proj")(x.astype(jnp.float32)[..., None] * jnp.ones(3))

    class Fake:
        module = Tiny()
        config = transformers.PretrainedConfig()
        config.model_type = "tiny"

        def dummy_inputs(self):
            return jnp.zeros((1, 1)), jnp.ones((1, 1))

        def apply(self, params, x, mask, lora):
            return self.module.apply({"params": params, "lora": lora}, x, mask)

        def abstract_params(self):
            return jax.eval_shape(lambda: self.module.init(jax.random.key(0), *self.dummy_inputs())["params"])

    fake = Fake()
    lora = init_lora(LoraConfig(r=2, target_modules=["proj"]), fake.abstract_params(), "tiny", jax.random.key(0))
    with pytest.raises(UnsupportedModelError, match=r"the layers \['proj'\] do not apply LoRA adapters"):
        check_applied(fake, lora)


# name -> (PEFT target_modules, one cross-attention module the adapter must reach)
SEQ2SEQ_TARGETS = {"t5": (["q", "k", "v", "o", "wi", "wo"], "decoder.block.2.layer.1.EncDecAttention.q"),
                   "t5-gated": ("all-linear", "decoder.block.2.layer.1.EncDecAttention.q"),
                   "bart": (["q_proj", "v_proj", "fc1"], "model.decoder.layers.1.encoder_attn.q_proj")}


@pytest.mark.parametrize("name", sorted(SEQ2SEQ_TARGETS))
def test_seq2seq_peft_adapters_load_and_save_with_the_same_logits(name, tmp_path):
    config = TINY_SEQ2SEQ[name]()
    torch.manual_seed(0)
    lm = torch_random_init(transformers.AutoModelForSeq2SeqLM.from_config(config), std=0.1)
    save_torch(lm, tmp_path / "base")
    lm.name_or_path = str(tmp_path / "base")
    targets, cross_attention = SEQ2SEQ_TARGETS[name]
    pt = peft.get_peft_model(lm, peft.LoraConfig(task_type="SEQ_2_SEQ_LM", target_modules=targets,
                                                 r=4, lora_alpha=8))
    randomise_lora_b(pt)
    pt.save_pretrained(str(tmp_path / "adapter"))
    model = FlaxAutoModelForSeq2SeqLMWithValueHead.from_pretrained(tmp_path / "adapter", is_trainable=True)
    adapted = sorted(lora_modules(model.params["lora"]))
    assert len(adapted) == len(_peft_modules(pt)) and cross_attention in adapted
    ids, mask = batch(101, "right", low=2)
    dec_ids, dec_mask = batch(101, "right", batch_size=3, seq_len=6, seed=1, low=2)
    args = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "decoder_input_ids": torch.tensor(dec_ids), "decoder_attention_mask": torch.tensor(dec_mask)}
    with torch.no_grad():
        ref = pt.eval()(**args).logits
        with pt.disable_adapter():
            base_logits = pt(**args).logits
    logits = model(ids, mask, dec_ids, dec_mask)[0]
    assert max_diff(ref, base_logits, dec_mask) > 1e-2
    loaded = max_diff(ref, logits, dec_mask)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_2_SEQ_LM" and not saved["fan_in_fan_out"]
    with torch.no_grad():
        ref_saved = peft.PeftModel.from_pretrained(lm, str(tmp_path / "saved")).eval()(**args).logits
    written = max_diff(ref_saved, logits, dec_mask)
    print(f"[lora] {name}: policy logits vs PEFT max|diff| loaded {loaded:.2e}, saved {written:.2e}")
    assert loaded < ATOL and written < ATOL
    with pytest.raises(UnsupportedModelError, match="reward adapters need a causal LM base"):
        load_reward_adapter(model.pretrained_model, str(tmp_path / "adapter"), model.v_head.hidden_size,
                            base_name=None)
    ref_model = create_reference_model(model)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(model.params["pretrained_model"]),
                                      jax.tree_util.tree_leaves(ref_model.params["pretrained_model"]), strict=True))
