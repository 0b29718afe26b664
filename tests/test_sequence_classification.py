"""FlaxAutoModelForSequenceClassification: parity with transformers for every decoder family, checkpoints both ways,
losses, PEFT SEQ_CLS adapters and sharded loading."""

from __future__ import annotations

import copy
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from tests.helpers import PADDINGS, batch, max_diff, save_torch, torch_random_init
from tests.test_adapters import randomise_lora_b
from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ
from trlax import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSequenceClassification,
    TrlaxError,
    UnsupportedModelError,
)
from trlax.errors import CheckpointError, InputError, TrlaxTypeError
from trlax.models.sequence_classification import last_non_pad_index
from trlax.peft.seq_cls import FlaxPeftModelForSequenceClassification
from trlax.sharding import make_mesh

ATOL = 1e-4
VOCAB = 101
SEQ = 11


def torch_classifier(model_type: str, folder, num_labels: int = 3, seed: int = 0, **config_kwargs):
    """A random transformers *ForSequenceClassification of the tiny config, saved to `folder`."""
    config = TINY_CAUSAL[model_type]()
    config.num_labels = num_labels
    for key, value in config_kwargs.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    pt = torch_random_init(transformers.AutoModelForSequenceClassification.from_config(config), seed=seed, std=0.2)
    save_torch(pt, folder)
    pt.name_or_path = str(folder)
    return pt


def padded(config, padding: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids [B, T] whose pad positions hold the config's pad id (what the pooling looks for), and the mask."""
    pad = config.get_text_config().pad_token_id
    ids, mask = batch(VOCAB, padding, seq_len=SEQ, seed=seed)
    ids = np.where(ids == pad, pad + 1, ids)  # no accidental pads among the real tokens
    return np.where(mask == 1, ids, pad), mask


def torch_forward(pt, ids, mask, **kwargs):
    with torch.no_grad():
        return pt(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True, **kwargs)


# transformers has no *ForSequenceClassification for some types (cohere): nothing to compare against there.
WITH_TORCH_CLASSIFIER = sorted(t for t in TINY_CAUSAL if t in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)


@pytest.mark.parametrize("model_type", WITH_TORCH_CLASSIFIER)
def test_logits_match_transformers(model_type, tmp_path):
    pt = torch_classifier(model_type, tmp_path / "pt")
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt")
    assert type(model.module).__name__.endswith("ForSequenceClassification")
    for padding in PADDINGS:
        ids, mask = padded(pt.config, padding)
        ref = torch_forward(pt, ids, mask)
        out = model(ids, mask)
        assert out.logits.shape == (3, 3) and out.logits.dtype == np.float32
        assert max_diff(ref.logits, out.logits) < ATOL, padding
        # Every position: the score head on transformers' last hidden state (what a value model reads).
        with torch.no_grad():
            token_ref = pt.score(ref.hidden_states[-1])
        assert max_diff(token_ref, out.token_logits, mask) < ATOL, padding
        lengths = mask.sum(axis=1)
        expected = lengths - 1 if padding != "left" else np.full_like(lengths, SEQ - 1)
        np.testing.assert_array_equal(out.pooled_index, expected)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt"])
def test_save_loads_in_transformers(model_type, tmp_path):
    pt = torch_classifier(model_type, tmp_path / "pt", num_labels=1, problem_type="regression")
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt")
    model.save_pretrained(tmp_path / "flax")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "flax")).eval()
    assert type(back) is type(pt)
    assert back.config.problem_type == "regression" and back.config.num_labels == 1
    assert back.config.architectures == [type(pt).__name__]
    ref_sd, back_sd = pt.state_dict(), back.state_dict()
    assert set(back_sd) == set(ref_sd)
    for key, value in ref_sd.items():
        assert torch.equal(back_sd[key], value), key
    ids, mask = padded(pt.config, "right")
    assert max_diff(torch_forward(back, ids, mask).logits, model(ids, mask).logits) < ATOL


@pytest.mark.parametrize("model_type", WITH_TORCH_CLASSIFIER)
def test_to_torch_gives_transformers_classifier(model_type, tmp_path):
    """to_torch() built the family's *ForCausalLM and failed on `score.weight` (every family)."""
    pt = torch_classifier(model_type, tmp_path / "pt", num_labels=2)
    back = FlaxAutoModelForSequenceClassification.from_pretrained(pt).to_torch()
    assert type(back) is type(pt)
    ref_sd, back_sd = pt.state_dict(), back.state_dict()
    assert set(back_sd) == set(ref_sd)
    for key, value in ref_sd.items():
        assert torch.equal(back_sd[key], value), key


def test_to_torch_without_a_transformers_classifier_says_so(tmp_path):
    model = FlaxAutoModelForSequenceClassification.from_config(TINY_CAUSAL["cohere"]())
    with pytest.raises(UnsupportedModelError, match="has no CohereForSequenceClassification, so to_torch"):
        model.to_torch()


@pytest.mark.parametrize("model_type", ["llama", "bloom"])  # untied: lm_head missing; tied: score.weight unexpected
def test_a_classifier_checkpoint_given_to_an_lm_loader_names_the_classifier_loader(model_type, tmp_path):
    """The error said the config.json did not match the weights (it did): the checkpoint is a classifier's."""
    torch_classifier(model_type, tmp_path / "pt", num_labels=1)
    for loader in (FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead):
        with pytest.raises(CheckpointError, match=r"is a sequence-classification checkpoint \(\w+ForSequenceClass"
                                                  r"ification.*FlaxAutoModelForSequenceClassification"):
            loader.from_pretrained(tmp_path / "pt")


def test_all_pad_row_and_pad_id_inside_a_row_pool_as_transformers(tmp_path):
    pt = torch_classifier("llama", tmp_path / "pt")
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt")
    pad = pt.config.pad_token_id
    ids = np.array([[pad] * 5, [5, pad, 7, pad, pad], [pad, 4, pad, 6, 8]])
    mask = np.ones_like(ids)
    ref = torch_forward(pt, ids, mask)
    out = model(ids, mask)
    np.testing.assert_array_equal(out.pooled_index, [0, 2, 4])
    assert max_diff(ref.logits, out.logits) < ATOL


def test_no_pad_id_pools_the_last_token_and_refuses_batches(tmp_path):
    pt = torch_classifier("gpt2", tmp_path / "pt", pad_token_id=None)
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt")
    ids = np.array([[5, 6, 7, 8]])
    assert max_diff(torch_forward(pt, ids, np.ones_like(ids)).logits, model(ids).logits) < ATOL
    np.testing.assert_array_equal(last_non_pad_index(ids, None), [3])
    with pytest.raises(TrlaxError, match="pad_token_id"):
        model(np.array([[5, 6], [7, 8]]))


@pytest.mark.parametrize(("num_labels", "problem_type", "labels"), [
    (1, None, np.array([0.5, -1.0, 2.0], np.float32)),
    (3, None, np.array([0, 2, -100])),
    (3, "multi_label_classification", np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0]], np.float32)),
    (2, "regression", np.array([[0.5, 1.0], [0.0, -1.0], [2.0, 0.1]], np.float32)),
])
def test_loss_matches_transformers(num_labels, problem_type, labels, tmp_path):
    pt = torch_classifier("gpt2", tmp_path / "pt", num_labels=num_labels, problem_type=problem_type)
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt")
    ids, mask = padded(pt.config, "left")
    ref = torch_forward(pt, ids, mask, labels=torch.tensor(labels))
    out = model(ids, mask, labels=labels)
    assert abs(float(ref.loss) - float(out.loss)) < ATOL
    assert model.config.problem_type == pt.config.problem_type  # inferred the same way, and kept


def test_labels_that_do_not_fit_raise_as_in_transformers(tmp_path):
    """transformers raises IndexError / ValueError; trlax gave a NaN loss for a class out of bounds and a raw
    reshape TypeError for another batch size."""
    torch_classifier("gpt2", tmp_path / "pt", num_labels=2)
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt")
    ids, mask = padded(model.config, "left")  # a batch of 3
    for labels, match in ((np.array([0, 5, 1]), "labels holds class 5; classes are 0..1"),
                          (np.array([0, -3, 1]), "labels holds class -3"),
                          (np.array([0, 1]), r"labels has shape \(2,\); .* a batch of 3 takes \(3,\)"),
                          (np.array([0.0, 1.0, 1.0]), r"\(3,\); a multi_label_classification .* takes \(3, 2\)"),
                          # as many values as [3, 2] but another shape: a raw JAX broadcasting error before, and
                          # the problem type inferred from them stayed stored
                          (np.zeros((2, 3), np.float32), r"\(2, 3\); a multi_label_classification .* \(3, 2\)"),
                          (np.zeros(6, np.float32), r"\(6,\); a multi_label_classification .* \(3, 2\)")):
        with pytest.raises(InputError, match=match):
            model(ids, mask, labels=labels)
    assert model.config.problem_type is None  # nothing inferred from labels that were refused
    model.config.problem_type = "regression"
    with pytest.raises(InputError, match=r"labels has shape \(6,\); a regression model with 2 label"):
        model(ids, mask, labels=np.zeros(6, np.float32))
    model.config.problem_type = "bogus"  # set after loading: named, rather than the labels blamed
    with pytest.raises(InputError, match="config.problem_type 'bogus' is not one of"):
        model(ids, mask, labels=np.array([0, 1, 1]))
    model.config.problem_type = None
    assert np.isfinite(float(model(ids, mask, labels=np.array([0, -100, 1])).loss))


def test_causal_checkpoint_gets_a_new_score_head(tmp_path, caplog):
    config = TINY_CAUSAL["llama"]()
    torch.manual_seed(0)
    lm = torch_random_init(transformers.AutoModelForCausalLM.from_config(config), std=0.2)
    save_torch(lm, tmp_path / "lm")
    with caplog.at_level(logging.WARNING, logger="trlax"):
        model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1)
    assert "no score.weight" in caplog.text
    assert model.params["score"]["kernel"].shape == (32, 1)
    # The backbone is the causal LM's: last hidden states match transformers' base model.
    ids, mask = padded(config, "right")
    with torch.no_grad():
        hidden = lm.model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    assert max_diff(hidden, model(ids, mask).last_hidden_state, mask) < ATOL


def test_an_encoder_decoder_classifier_is_refused_by_both_loaders_without_sending_to_the_other(tmp_path):
    """A BART classifier checkpoint: the classifier loader said "use FlaxAutoModelForSeq2SeqLM", which said "load
    it with FlaxAutoModelForSequenceClassification"."""
    config = TINY_SEQ2SEQ["bart"]()
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder classifier .* is not supported"):
        FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="trlax has no encoder-decoder classifier: use a seq2seq LM checkpoint"):
        FlaxAutoModelForSeq2SeqLM.from_pretrained(tmp_path)


def test_bad_num_labels_is_refused(tmp_path):
    config = TINY_CAUSAL["gpt2"]()
    torch_classifier("gpt2", tmp_path)
    with pytest.raises(TrlaxTypeError, match=r"num_labels must be an int >= 1; got '3' \(str\)"):  # a raw TypeError
        FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels="3")
    config.num_labels = 0
    with pytest.raises(UnsupportedModelError, match="num_labels"):
        FlaxAutoModelForSequenceClassification.from_config(config)


def test_bad_ids_and_positions_past_the_table_raise_like_the_lm(tmp_path):
    """transformers raises IndexError; the classifier gave NaN or a silently wrong score (the LM raised already)."""
    torch_classifier("gpt2", tmp_path / "pt")  # 64 learned positions, vocabulary 101
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt")
    for ids, match in (([[5] * 65], "has 64 positions"), ([[5, 101]], "token id 101"), ([[5, -3]], "token id -3")):
        with pytest.raises(TrlaxError, match=match):
            model(np.array(ids))


def test_a_pad_id_set_after_a_call_is_used(tmp_path):
    """TRL's RewardTrainer, and trlax's own no-pad-id message, set config.pad_token_id on a loaded model: a shape
    already called pooled with the old pad id."""
    pt = torch_classifier("gpt2", tmp_path / "pt", pad_token_id=None)
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt")
    ids = np.array([[5, 6, 7, 0, 0]])
    model(ids)  # pools the last position: no pad id
    model.config.pad_token_id = pt.config.pad_token_id = 0
    assert max_diff(torch_forward(pt, ids, np.ones_like(ids)).logits, model(ids).logits) < ATOL
    np.testing.assert_array_equal(model(ids).pooled_index, [2])


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_peft_seq_cls_adapter_matches_peft_and_saves_back(model_type, tmp_path):
    pt = torch_classifier(model_type, tmp_path / "base", num_labels=2)
    pm = peft.get_peft_model(pt, peft.LoraConfig(task_type="SEQ_CLS", target_modules="all-linear", r=4,
                                                 lora_alpha=16))
    randomise_lora_b(pm)
    with torch.no_grad():
        pm.base_model.model.score.modules_to_save["default"].weight.normal_(0, 0.5)
    pm.save_pretrained(str(tmp_path / "adapter"))
    pm.eval()
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert isinstance(model, FlaxPeftModelForSequenceClassification)
    # PEFT counts the score head twice (the original and its modules_to_save copy); trlax has one.
    score = pm.base_model.model.score.modules_to_save["default"].weight.numel()
    assert model.num_params() == pm.get_nb_trainable_parameters()[1] - score
    for padding in ("right", "left"):
        ids, mask = padded(pt.config, padding)
        with torch.no_grad():
            ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        assert max_diff(ref, model(ids, mask).logits) < ATOL, padding
    ids, mask = padded(pt.config, "left")
    np.testing.assert_array_equal(model(ids, mask, params=model.params).logits, model(ids, mask).logits)  # adapter on
    with pytest.raises(TrlaxError, match="head of 2 labels, not num_labels=3"):
        FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "adapter", num_labels=3)
    same = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "adapter", num_labels=2)
    assert same.config.num_labels == 2
    model.save_pretrained(tmp_path / "again")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base"))
    back = peft.PeftModel.from_pretrained(base, str(tmp_path / "again")).eval()
    ids, mask = padded(pt.config, "left")
    with torch.no_grad():
        ref = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_diff(ref, model(ids, mask).logits) < ATOL
    in_torch = model.to_torch()  # PEFT's model over transformers' classifier: it returned a CausalLM (and failed)
    assert isinstance(in_torch, peft.PeftModelForSequenceClassification)
    with torch.no_grad():
        ref = in_torch(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_diff(ref, model(ids, mask).logits) < ATOL


def test_a_classifier_adapters_base_revision_is_kept_unless_another_base_is_given(tmp_path):
    """adapter_config.json's `revision` (the base's) was dropped on save; with `base_model=` another base, the
    adapter's revision must not be saved as that base's."""
    pt = torch_classifier("gpt2", tmp_path / "pt", num_labels=2)
    pt.name_or_path = str(tmp_path / "pt")
    peft.get_peft_model(pt, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["c_attn"], revision="v1.0")
                        ).save_pretrained(str(tmp_path / "adapter"))
    for extra, want in (({}, "v1.0"), ({"base_model": str(tmp_path / "pt")}, None)):
        FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "adapter", **extra).save_pretrained(
            tmp_path / "saved")
        assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["revision"] == want, extra


def test_an_in_memory_peft_classifier_is_pointed_to_its_folder(tmp_path):
    """It was sent to the value-head wrapper, which cannot load a classifier either."""
    pt = torch_classifier("gpt2", tmp_path / "pt", num_labels=2)
    pm = peft.get_peft_model(pt, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["c_attn"]))
    with pytest.raises(UnsupportedModelError, match="sequence-classification adapter, which trlax loads from its "
                                                    "folder: save_pretrained"):
        FlaxAutoModelForSequenceClassification.from_pretrained(pm)


def test_a_failed_adapter_save_keeps_the_saved_adapter(tmp_path, monkeypatch):
    """The SEQ_CLS adapter was written in place: a save failing part-way left a truncated adapter."""
    pt = torch_classifier("gpt2", tmp_path / "base", num_labels=2)
    peft.get_peft_model(pt, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["c_attn"])).save_pretrained(
        str(tmp_path / "adapter"))
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "saved")
    before = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    import trlax.peft.lora as lora

    def broken(path, tensors, metadata):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lora, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "saved")
    assert {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()} == before
    with pytest.raises(TrlaxError, match="no max_shard_size"):
        model.save_pretrained(tmp_path / "saved", max_shard_size="1MB")


def test_sharded_load_on_a_mesh(tmp_path):
    pt = torch_classifier("llama", tmp_path / "pt", num_labels=1)
    mesh = make_mesh()
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt", mesh=mesh)
    kernel = model.params["score"]["kernel"]
    assert isinstance(kernel.sharding, jax.sharding.NamedSharding) and kernel.sharding.mesh.shape == mesh.shape
    ids, mask = padded(pt.config, "left")
    assert max_diff(torch_forward(pt, ids, mask).logits, model(ids, mask).logits) < ATOL


def test_transformers_loading_keywords_and_in_memory_models_load_as_for_lms(tmp_path):
    pt = torch_classifier("llama", tmp_path / "pt", num_labels=2)
    copy.deepcopy(pt).to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    auto = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16", dtype="auto", param_dtype="auto")
    assert auto.dtype == jnp.bfloat16 and auto.storage_dtype == np.dtype(jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(auto.params)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.warns(FutureWarning, match="torch_dtype"):
        f32 = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt", torch_dtype=torch.float32)
    with pytest.warns(UserWarning, match="device_map"):
        FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt", device_map="cpu")
    in_memory = FlaxAutoModelForSequenceClassification.from_pretrained(pt)  # no file in between
    ids, mask = padded(pt.config, "left")
    ref = torch_forward(pt, ids, mask).logits
    assert max_diff(ref, f32(ids, mask).logits) < ATOL
    assert max_diff(ref, in_memory(ids, mask).logits) < ATOL


def test_config_overrides_go_to_a_copy_and_a_classifier_cannot_generate(tmp_path):
    torch_classifier("gpt2", tmp_path / "pt", num_labels=1)
    config = transformers.AutoConfig.from_pretrained(str(tmp_path / "pt"))
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt", config=config,
                                                                   problem_type="regression")
    assert model.config.problem_type == "regression" and config.problem_type is None
    with pytest.raises(TrlaxTypeError, match="cannot generate"):
        model.generate(np.ones((1, 3), np.int32))
    with pytest.raises(TrlaxTypeError, match="unknown keyword"):
        FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "pt", num_label=1)
