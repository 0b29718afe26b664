"""Reward adapters (TRL's multi-adapter PPO): PEFT parity, isolation from the policy, one shared base."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from tests.helpers import batch, max_diff
from tests.test_adapters import PARITY_FAMILIES, randomise_lora_b, torch_base
from tests.tiny_configs import TINY_CAUSAL
from trlax import (
    CheckpointError,
    FlaxAutoModelForCausalLMWithValueHead,
    UnsupportedModelError,
    create_reference_model,
)
from trlax.checkpoint.reader import CheckpointReader
from trlax.peft.lora import read_adapter

ATOL = 1e-4
POLICY = {"target_modules": "all-linear", "r": 4, "lora_alpha": 8, "init_lora_weights": False}
# The reference is a PEFT sequence classifier: types transformers has no such head for (cohere) have none.
REWARD_FAMILIES = tuple(t for t in PARITY_FAMILIES
                        if type(TINY_CAUSAL[t]()) in transformers.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)


def reward_adapter(base_folder, folder, num_labels: int = 2, task_type: str = "SEQ_CLS", seed: int = 2):
    """A PEFT LoRA reward model (sequence classification, score head saved in full) with random weights."""
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(base_folder), num_labels=num_labels)
    torch.manual_seed(seed)
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.5)
    pm = peft.get_peft_model(rm, peft.LoraConfig(task_type=task_type, target_modules="all-linear", r=4,
                                                 lora_alpha=16))
    randomise_lora_b(pm, seed=seed)
    pm.save_pretrained(str(folder))
    return pm.eval()


def _padded_batch(padding: str):
    ids, mask = batch(101, padding, low=2)
    return np.where(mask == 1, ids, 1), mask  # pads hold pad_token_id (1), as the classifier pools on it


@pytest.mark.parametrize("model_type", REWARD_FAMILIES)
def test_reward_scores_match_peft_and_transformers(model_type, tmp_path):
    torch_base(model_type, tmp_path / "base")
    pm = reward_adapter(tmp_path / "base", tmp_path / "rm")
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "base", peft_config=POLICY,
                                                                  reward_adapter=str(tmp_path / "rm"))
    assert model.supports_rm_adapter and model.rm_adapter_name == "reward_adapter"
    assert sorted(model.peft_config) == ["default", "reward_adapter"]
    worst = 0.0
    for padding in ("right", "left"):
        ids, mask = _padded_batch(padding)
        scores = model.compute_reward_score(ids, attention_mask=mask)
        assert scores.shape == (*ids.shape, 2) and scores.dtype == np.float32
        with torch.no_grad():
            out = pm(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
            per_token = pm.base_model.model.score(out.hidden_states[-1])  # TRL's compute_reward_score
        last = np.where(mask[:, -1] == 1, ids.shape[1] - 1, mask.sum(-1) - 1)  # the classifier's pooled token
        worst = max(worst, max_diff(per_token, scores, mask),
                    max_diff(out.logits, np.asarray(scores)[np.arange(len(ids)), last]))
    print(f"[reward] {model_type}: trlax vs PEFT reward scores max|diff| {worst:.2e}")
    assert worst < ATOL


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    torch_base("gpt2", root / "base")
    reward_adapter(root / "base", root / "rm", num_labels=1)
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "base", peft_config=POLICY,
                                                                  reward_adapter=str(root / "rm"))
    return root, model


def test_policy_gradients_never_reach_the_reward_adapter(setup):
    _, model = setup
    ids, mask = (jnp.asarray(a) for a in _padded_batch("right"))

    def loss(params, reward_params):
        logits, _, values = model.apply(params, ids, mask)
        return logits.mean() + values.mean() + model.apply_reward(params, reward_params, ids, mask).mean()

    def policy_loss(params):
        logits, _, values = model.apply(params, ids, mask)
        return logits.mean() + values.mean()

    @jax.jit
    def all_grads(params, reward_params):
        return jax.grad(loss, argnums=(0, 1))(params, reward_params), jax.grad(policy_loss)(params)

    (grads, reward_grads), policy_only = all_grads(model.params, model.reward_params)
    assert sorted(grads) == ["lora", "pretrained_model", "v_head"]  # reward params are not in `params`
    assert not any(np.asarray(g).any() for g in jax.tree_util.tree_leaves(reward_grads))
    # The reward term adds nothing to the policy's gradients either (TRL scores under no_grad).
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(policy_only), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_reward_adapter_survives_saving_the_policy(setup, tmp_path):
    root, model = setup
    ids, mask = _padded_batch("left")
    before_leaves = jax.tree_util.tree_leaves(model.reward_params)
    before_values = [np.array(leaf) for leaf in before_leaves]
    scores = np.asarray(model.compute_reward_score(ids, mask))
    model.save_pretrained(tmp_path)
    after = jax.tree_util.tree_leaves(model.reward_params)
    assert all(a is b for a, b in zip(before_leaves, after, strict=True))
    for a, b in zip(before_values, after, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(scores, model.compute_reward_score(ids, mask))
    with CheckpointReader([tmp_path / "adapter_model.safetensors", tmp_path / "model.safetensors"]) as reader:
        saved = reader.keys()
    assert not [k for k in saved if "score" in k]
    assert len(saved) == 2 + 2 * len(jax.tree_util.tree_leaves(model.params["lora"])) // 3  # v_head + lora A/B
    back = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, reward_adapter=str(root / "rm"),
                                                                 reward_adapter_name="rm")
    assert back.rm_adapter_name == "rm"
    np.testing.assert_allclose(back.compute_reward_score(ids, mask), scores, atol=1e-6)


def test_one_base_serves_policy_reference_and_reward_in_one_jit(setup):
    _, model = setup
    ref = create_reference_model(model)
    ids, mask = (jnp.asarray(a) for a in _padded_batch("right"))

    @jax.jit
    def three_roles(params, ref_v_head, reward_params, ids, mask):
        policy_logits, _, values = model.apply(params, ids, mask)
        ref_params = {"pretrained_model": params["pretrained_model"], "v_head": ref_v_head}  # adapter off
        ref_logits, _, _ = ref.apply(ref_params, ids, mask)
        return policy_logits, values, ref_logits, model.apply_reward(params, reward_params, ids, mask)

    args = (model.params, ref.params["v_head"], model.reward_params, ids, mask)
    policy_logits, values, ref_logits, scores = three_roles(*args)
    np.testing.assert_allclose(policy_logits, model(ids, mask)[0], atol=1e-5)
    np.testing.assert_allclose(values, model(ids, mask)[2], atol=1e-5)
    np.testing.assert_allclose(ref_logits, ref(ids, mask)[0], atol=1e-5)
    np.testing.assert_allclose(scores, model.compute_reward_score(ids, mask), atol=1e-5)
    assert max_diff(policy_logits, ref_logits, np.asarray(mask)) > 1e-2
    # One copy of the base: the reference holds the policy's very buffers, and the jitted
    # function takes the base once (its arguments are the base plus the small adapters and heads).
    base = jax.tree_util.tree_leaves(model.params["pretrained_model"])
    shared = base + jax.tree_util.tree_leaves(ref.params["pretrained_model"])
    assert len({leaf.unsafe_buffer_pointer() for leaf in shared}) == len(base)
    base_bytes = sum(leaf.nbytes for leaf in base)
    stats = three_roles.lower(*args).compile().memory_analysis()
    if stats is not None:
        extra = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(args) if not any(leaf is b for b in base))
        assert base_bytes <= stats.argument_size_in_bytes <= base_bytes + extra < 1.5 * base_bytes
        print(f"[reward] one jit, three roles: {len(base)} base buffers ({base_bytes} B) shared; "
              f"jit arguments {stats.argument_size_in_bytes} B")


def test_reward_adapter_without_score_weights_is_refused(setup, tmp_path):
    root, _ = setup
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(root / "base"))
    peft.get_peft_model(lm, peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"])).save_pretrained(
        str(tmp_path))
    with pytest.raises(CheckpointError, match=r"has no score head weights \(base_model.model.score.weight\)"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "base", peft_config=POLICY,
                                                              reward_adapter=str(tmp_path))


def test_non_lora_reward_adapter_is_refused(setup, tmp_path):
    root, _ = setup
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(root / "base"), num_labels=1)
    peft.get_peft_model(rm, peft.IA3Config(task_type="SEQ_CLS", target_modules=["c_attn", "c_fc"],
                                           feedforward_modules=["c_fc"])).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match=r"PEFT type 'IA3' is not supported.*\['LORA'\]"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "base", peft_config=POLICY,
                                                              reward_adapter=str(tmp_path))


def test_reward_adapter_for_another_base_is_refused(setup, tmp_path):
    root, _ = setup
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, pad_token_id=1, num_labels=1)
    rm = transformers.GPT2ForSequenceClassification(config)
    pm = peft.get_peft_model(rm, peft.LoraConfig(task_type="SEQ_CLS", target_modules=["c_attn"], r=4))
    pm.peft_config["default"].base_model_name_or_path = "big-gpt2"
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"\(trained on base 'big-gpt2'\) does not fit the base model"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "base", peft_config=POLICY,
                                                              reward_adapter=str(tmp_path))


def test_reward_adapter_misuse_is_refused(setup):
    root, model = setup
    with pytest.raises(ValueError, match="reward_adapter can only be used with a LoRA policy"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "base", reward_adapter=str(root / "rm"))
    with pytest.raises(ValueError, match="reward_adapter must be a local folder or a hub id"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "base", peft_config=POLICY, reward_adapter=3)
    plain = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "base")
    with pytest.raises(ValueError, match="does not support reward modeling adapter"):
        plain.compute_reward_score(np.ones((1, 3), np.int32))
    # The policy adapter's name: model.peft_config then listed the reward adapter's config as the policy's.
    with pytest.raises(ValueError, match="reward_adapter_name 'default' is the policy adapter's name"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "base", peft_config=POLICY, reward_adapter=str(
            root / "rm"), reward_adapter_name="default")


def test_a_reward_adapter_crosses_to_and_from_torch(setup):
    """TRL model -> trlax and trlax -> TRL left the reward adapter out (with a warning): it crosses both ways now,
    scoring as TRL's `compute_reward_score`, with the policy adapter still the active one."""
    trl_ppo = pytest.importorskip("trl.experimental.ppo")
    root, model = setup
    ids, mask = _padded_batch("left")
    want = np.asarray(model.compute_reward_score(ids, attention_mask=mask))
    torch_model = model.to_torch()
    assert isinstance(torch_model, trl_ppo.AutoModelForCausalLMWithValueHead)
    assert torch_model.supports_rm_adapter and torch_model.rm_adapter_name == "reward_adapter"
    with torch.no_grad():
        scores = torch_model.compute_reward_score(torch.tensor(ids), attention_mask=torch.tensor(mask))
        logits, _, values = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask))
    assert scores.shape == want.shape and max_diff(scores, want, mask) < ATOL
    assert torch_model.pretrained_model.active_adapters == ["default"]
    assert not any(p.requires_grad for n, p in torch_model.named_parameters() if "reward_adapter" in n or "score" in n)
    want_logits, _, want_values = model(ids, mask)
    assert max_diff(logits, want_logits, mask) < ATOL and max_diff(values, want_values, mask) < ATOL

    trl_model = trl_ppo.AutoModelForCausalLMWithValueHead.from_pretrained(
        str(root / "base"), peft_config=peft.LoraConfig(r=4, target_modules=["c_attn"]),
        reward_adapter=str(root / "rm"))
    with torch.no_grad():
        trl_scores = trl_model.compute_reward_score(torch.tensor(ids), attention_mask=torch.tensor(mask))
    back = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(trl_model)
    assert back.supports_rm_adapter and back.rm_adapter_name == "reward_adapter"
    assert max_diff(trl_scores, back.compute_reward_score(ids, attention_mask=mask), mask) < ATOL
    # the same tensors as the adapter's folder gives (which a reward_adapter= argument brings instead)
    from_folder = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(trl_model, reward_adapter=str(root / "rm"))
    assert jax.tree_util.tree_structure(back.reward_params) == jax.tree_util.tree_structure(from_folder.reward_params)
    for got, saved in zip(jax.tree_util.tree_leaves(back.reward_params),
                          jax.tree_util.tree_leaves(from_folder.reward_params), strict=True):
        np.testing.assert_array_equal(got, saved)


def test_bin_adapters_and_other_base_names_load(setup, tmp_path, caplog):
    root, _ = setup
    pm = reward_adapter(root / "base", tmp_path / "safe", num_labels=1)
    pm.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    safe, legacy = read_adapter(tmp_path / "safe"), read_adapter(tmp_path / "bin")
    assert (tmp_path / "bin" / "adapter_model.bin").is_file() and sorted(safe.tensors) == sorted(legacy.tensors)
    for key, value in safe.tensors.items():
        np.testing.assert_array_equal(value, legacy.tensors[key])
    config = json.loads((tmp_path / "safe" / "adapter_config.json").read_text())
    (tmp_path / "safe" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "a/b"}))
    with caplog.at_level(logging.WARNING, logger="trlax"):
        model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(root / "base", peft_config=POLICY,
                                                                      reward_adapter=tmp_path / "safe")
    assert f"was trained on base 'a/b'; applying it to '{root / 'base'}' (shapes are checked)" in caplog.text
    assert model.reward_params["score"]["kernel"].shape == (32, 1)
