"""Models and wrappers pickle (multiprocessing, Ray, joblib) and copy as torch's do: an independent model whose
jitted functions are its own; what cannot be copied is refused naming why."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from tests import tiny_configs
from tests.helpers import subprocess_env
from trlax import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
    FlaxAutoModelForSequenceClassification,
    LoraConfig,
    TrlaxError,
    create_reference_model,
    ppo,
    split_trainable,
)
from trlax.errors import DeletedParamsError
from trlax.sharding import shard_model

IDS = np.array([[5, 6, 7, 8], [0, 9, 10, 11]], dtype=np.int32)
MASK = np.array([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=np.int32)


def _greedy(model) -> np.ndarray:
    return np.asarray(model.generate(IDS, attention_mask=MASK, max_new_tokens=3, do_sample=False,
                                     pad_token_id=0, eos_token_id=None).sequences)


def _wrapper_outputs(model) -> tuple[np.ndarray, np.ndarray]:
    decoder = {"decoder_input_ids": IDS[:, :2]} if model.pretrained_model.is_encoder_decoder else {}
    logits, _, values = model(IDS, attention_mask=MASK, **decoder)
    return np.asarray(logits), np.asarray(values)


@pytest.mark.parametrize("seq2seq", [False, True])
def test_a_pickled_wrapper_gives_the_same_outputs_and_tokens(seq2seq):
    """pickle failed on the SPEC's functions and the jitted forwards ("Can't pickle <function <lambda>>")."""
    cls = FlaxAutoModelForSeq2SeqLMWithValueHead if seq2seq else FlaxAutoModelForCausalLMWithValueHead
    lm_cls = FlaxAutoModelForSeq2SeqLM if seq2seq else FlaxAutoModelForCausalLM
    lm = lm_cls.from_config(tiny_configs.t5() if seq2seq else tiny_configs.llama())
    model = cls.from_pretrained(lm)
    restored = pickle.loads(pickle.dumps(model))
    for got, want in zip(_wrapper_outputs(restored), _wrapper_outputs(model), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_greedy(restored), _greedy(model))
    assert restored.pretrained_model.params is restored.params["pretrained_model"]
    assert restored.pretrained_model.spec is model.pretrained_model.spec  # a registered family by reference
    restored.params = jax.tree_util.tree_map(jnp.zeros_like, restored.params)  # the copy is independent
    assert np.abs(_wrapper_outputs(model)[0]).max() > 0


def test_a_policy_and_its_reference_pickled_together_still_share_their_layers():
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(FlaxAutoModelForCausalLM.from_config(
        tiny_configs.gpt2()))
    reference = create_reference_model(policy, num_shared_layers=1)
    policy2, reference2 = pickle.loads(pickle.dumps((policy, reference)))
    embeddings = [p["pretrained_model"]["transformer"]["wte"]["embedding"] for p in (policy2.params, reference2.params)]
    assert embeddings[0] is embeddings[1]
    last = [p["pretrained_model"]["transformer"]["h"]["1"]["mlp"]["c_fc"]["kernel"]
            for p in (policy2.params, reference2.params)]
    assert last[0] is not last[1]
    assert reference2.frozen and not policy2.frozen
    np.testing.assert_array_equal(_wrapper_outputs(reference2)[0], _wrapper_outputs(reference)[0])


def test_a_pickled_lora_policy_keeps_its_adapter_and_what_trains():
    lm = FlaxAutoModelForCausalLM.from_config(tiny_configs.gpt2())
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
        lm, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    restored = pickle.loads(pickle.dumps(policy))
    assert restored.is_peft_model
    assert jax.tree_util.tree_structure(restored.trainable_mask) == jax.tree_util.tree_structure(policy.trainable_mask)
    assert jax.tree_util.tree_leaves(restored.trainable_mask) == jax.tree_util.tree_leaves(policy.trainable_mask)
    np.testing.assert_array_equal(_wrapper_outputs(restored)[0], _wrapper_outputs(policy)[0])
    with pytest.raises(TrlaxError, match="LoRA adapter"):  # the adapter's structure check came along
        restored(IDS, attention_mask=MASK, params={**restored.params, "lora": {}})


def _classifier() -> FlaxAutoModelForSequenceClassification:
    config = tiny_configs.llama()
    config.num_labels, config.pad_token_id = 2, 0
    return FlaxAutoModelForSequenceClassification.from_config(config)


def test_a_pickled_sequence_classifier_gives_the_same_logits():
    """Its Linen class is built at run time, so pickle could not find it by name."""
    model = _classifier()
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(np.asarray(restored(IDS, MASK).logits), np.asarray(model(IDS, MASK).logits))
    assert type(restored.module) is type(model.module)


@pytest.mark.slow
def test_models_pickled_here_run_in_another_process(tmp_path):
    """Where the classes a pickle names must be found by import (the classifier's is built at run time)."""
    models = (FlaxAutoModelForCausalLM.from_config(tiny_configs.llama()), _classifier())
    (tmp_path / "models.pkl").write_bytes(pickle.dumps(models))
    np.savez(tmp_path / "logits.npz", *(np.asarray(m(IDS, MASK).logits) for m in models))
    pickled, logits = str(tmp_path / "models.pkl"), str(tmp_path / "logits.npz")
    check = ("import pickle, numpy as np; from tests.test_pickle import IDS, MASK; "
             f"models = pickle.loads(open({pickled!r}, 'rb').read()); want = np.load({logits!r}); "
             "[np.testing.assert_array_equal(np.asarray(m(IDS, MASK).logits), want[f'arr_{i}']) "
             "for i, m in enumerate(models)]")
    subprocess.run([sys.executable, "-c", check], check=True, env=subprocess_env(), timeout=300)


def test_a_model_on_a_mesh_is_refused_naming_what_to_do():
    """Its mesh's devices do not pickle: pickle raised TypeError: cannot pickle 'Device' object."""
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    model = shard_model(FlaxAutoModelForCausalLM.from_config(tiny_configs.gpt2()), mesh)
    with pytest.raises(TrlaxError, match="placed on a mesh does not pickle.*save_pretrained"):
        pickle.dumps(model)
    with pytest.raises(TrlaxError, match="placed on a mesh does not pickle"):
        pickle.dumps(FlaxAutoModelForCausalLMWithValueHead.from_pretrained(model))
    assert copy.deepcopy(model).mesh is mesh and copy.copy(model).mesh is mesh  # a copy in this process keeps it


def test_copying_a_model_whose_arrays_a_donated_update_deleted_says_so():
    """deepcopy and pickle raised JAX's bare RuntimeError "Array has been deleted"."""
    lm = FlaxAutoModelForCausalLM.from_config(tiny_configs.gpt2())
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm, summary_dropout_prob=0.0)
    ref = create_reference_model(policy)
    batch = {"input_ids": IDS, "attention_mask": MASK, "response_mask": np.array([[0, 0, 1, 1], [0, 0, 1, 1]])}
    exp = ppo.make_rollout(policy, ref)(policy.params, ref.params, batch, np.array([1.0, -1.0]), 0.2)
    tx = optax.sgd(0.1)
    trainable, frozen = split_trainable(policy.params, policy.trainable_mask)
    ppo.make_ppo_update(policy, tx)(trainable, frozen, tx.init(trainable), exp)
    for copier in (copy.deepcopy, pickle.dumps):
        with pytest.raises(DeletedParamsError, match="FlaxModelForCausalLM being copied hold deleted arrays"):
            copier(lm)
        with pytest.raises(DeletedParamsError, match="being copied hold deleted arrays"):
            copier(policy)
