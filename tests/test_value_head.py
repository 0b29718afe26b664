"""Value-head wrappers: TRL semantics, TRL checkpoint layout both ways, bad input."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from tests.helpers import batch, max_diff, save_torch, torch_random_init
from tests.tiny_configs import TINY_CAUSAL, gpt2, t5
from trlax import (
    AutoModelForCausalLMWithValueHead,
    CheckpointError,
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
    ValueHead,
)
from trlax.errors import TrlaxTypeError
from trlax.value_head import value_head_hidden_size

ATOL = 1e-4


def _trl_checkpoint(config, folder, seed=0, **save_kwargs):
    """What TRL's save_pretrained writes: the LM's keys plus v_head.summary.* (torch Linear(H, 1))."""
    torch.manual_seed(seed)
    lm = torch_random_init(transformers.AutoModelForCausalLM.from_config(config), seed=seed, std=0.1)
    head = torch.nn.Linear(value_head_hidden_size(config), 1)
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight" or not config.tie_word_embeddings}
    state["v_head.summary.weight"] = head.weight.detach().clone()
    state["v_head.summary.bias"] = head.bias.detach().clone()
    save_torch(lm, folder, state_dict=state, **save_kwargs)
    return lm, head


def _torch_values(lm, head, ids, mask):
    with torch.no_grad():
        out = lm(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
        return out.logits.numpy(), head(out.hidden_states[-1]).squeeze(-1).numpy()


@pytest.mark.parametrize("model_type", sorted(TINY_CAUSAL))
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_trl_checkpoint_loads_with_its_value_head(model_type, layout, tmp_path):
    config = TINY_CAUSAL[model_type]()
    kwargs = {"max_shard_size": "20KB"} if layout == "sharded" else {}
    lm, head = _trl_checkpoint(config, tmp_path, **kwargs)
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, strict=True)
    ids, mask = batch(config.vocab_size, "left", low=2)
    ref_logits, ref_values = _torch_values(lm, head, ids, mask)
    logits, loss, values = model(ids, attention_mask=mask)
    assert loss is None
    assert logits.dtype == np.float32 and values.dtype == np.float32
    assert values.shape == ids.shape and logits.shape == (*ids.shape, config.vocab_size)
    assert max_diff(ref_logits, logits, mask) < ATOL
    assert max_diff(ref_values, values, mask) < ATOL


def test_legacy_bin_trl_checkpoint_loads_with_its_value_head(tmp_path):
    config = gpt2()
    lm, head = _trl_checkpoint(config, tmp_path / "st")
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tmp_path / "st" / "config.json", folder)
    state = dict(lm.state_dict())
    state["v_head.summary.weight"], state["v_head.summary.bias"] = head.weight.detach(), head.bias.detach()
    torch.save(state, folder / "pytorch_model.bin")
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(folder, strict=True)
    ids, mask = batch(config.vocab_size, "none")
    assert max_diff(_torch_values(lm, head, ids, mask)[1], model(ids)[2]) < ATOL


@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_save_pretrained_writes_trl_layout_that_torch_reads(tmp_path, max_shard_size):
    config = gpt2()
    lm, head = _trl_checkpoint(config, tmp_path / "src")
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "src", strict=True)
    model.save_pretrained(tmp_path / "out", max_shard_size=max_shard_size)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    from safetensors.torch import load_file

    files = sorted((tmp_path / "out").glob("*.safetensors"))
    state = {k: v for f in files for k, v in load_file(f).items()}
    assert state["v_head.summary.weight"].shape == (1, 32) and state["v_head.summary.bias"].shape == (1,)
    torch.testing.assert_close(state["v_head.summary.weight"], head.weight.detach(), rtol=0, atol=0)
    ids, mask = batch(config.vocab_size, "right")
    assert max_diff(_torch_values(reloaded, head, ids, mask)[0], model(ids, mask)[0], mask) < ATOL
    again = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "out", strict=True)
    assert max_diff(again(ids, mask)[2], model(ids, mask)[2]) == 0.0


def test_missing_value_head_is_initialised_with_warning_or_refused_when_strict(tmp_path, caplog):
    config = gpt2()
    save_torch(transformers.AutoModelForCausalLM.from_config(config), tmp_path)
    with caplog.at_level(logging.WARNING, logger="trlax"):
        model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    assert "no value head" in caplog.text
    assert model.params["v_head"]["summary"]["kernel"].shape == (32, 1)
    with pytest.raises(CheckpointError, match="no value head.*, and strict=True refuses to initialise one"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, strict=True)


def test_part_of_a_value_head_is_kept_and_the_rest_initialised_as_trl_does(tmp_path, caplog):
    """A checkpoint with v_head.summary.weight but no bias: TRL keeps the stored weight; trlax threw it away and
    said the checkpoint had no value head."""
    lm = transformers.AutoModelForCausalLM.from_config(gpt2())
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    state["v_head.summary.weight"] = torch.arange(32, dtype=torch.float32)[None] / 100
    save_torch(lm, tmp_path, state_dict=state)
    with caplog.at_level(logging.WARNING, logger="trlax"):
        model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, seed=4)
    assert "only part of a value head (no v_head.summary.bias); initialised the missing part" in caplog.text
    np.testing.assert_array_equal(np.asarray(model.params["v_head"]["summary"]["kernel"])[:, 0],
                                  np.arange(32, dtype=np.float32) / 100)
    fresh = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(FlaxAutoModelForCausalLM.from_config(gpt2()), seed=4)
    np.testing.assert_array_equal(model.params["v_head"]["summary"]["bias"], fresh.params["v_head"]["summary"]["bias"])
    with pytest.raises(CheckpointError, match="only part of a value head.*strict=True"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, strict=True)


def test_value_head_of_wrong_shape_is_refused(tmp_path):
    config = gpt2()
    lm = transformers.AutoModelForCausalLM.from_config(config)
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    state["v_head.summary.weight"], state["v_head.summary.bias"] = torch.ones(1, 16), torch.zeros(1)
    save_torch(lm, tmp_path, state_dict=state)
    with pytest.raises(CheckpointError, match=r"v_head\.summary\.weight: checkpoint \(1, 16\) vs model \(1, 32\)"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


def test_trl_defaults_dropout_precedence_and_init_strategies():
    config = gpt2()
    lm = FlaxAutoModelForCausalLM.from_config(config)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(lm)
    assert model.v_head.dropout_prob == 0.1
    bias = np.asarray(model.params["v_head"]["summary"]["bias"])
    kernel = np.asarray(model.params["v_head"]["summary"]["kernel"])
    assert np.all(bias != 0) and np.abs(kernel).max() <= 1 / np.sqrt(32)  # torch Linear default init
    assert AutoModelForCausalLMWithValueHead.from_pretrained(lm, summary_dropout_prob=0.5).v_head.dropout_prob == 0.5
    config.summary_dropout_prob = 0.3  # a value on the config wins over the kwarg, as in TRL
    lm_with_config = FlaxAutoModelForCausalLM.from_config(config)
    assert AutoModelForCausalLMWithValueHead.from_pretrained(
        lm_with_config, summary_dropout_prob=0.5).v_head.dropout_prob == 0.3
    normal = AutoModelForCausalLMWithValueHead.from_pretrained(
        lm, v_head_init_strategy="normal", v_head_initializer_range=0.2, seed=3)
    assert np.all(np.asarray(normal.params["v_head"]["summary"]["bias"]) == 0)
    assert 0.1 < float(np.std(np.asarray(normal.params["v_head"]["summary"]["kernel"]))) < 0.3
    with pytest.raises(ValueError, match="v_head_init_strategy"):
        AutoModelForCausalLMWithValueHead.from_pretrained(lm, v_head_init_strategy="xavier")
    # TRL's nn.Dropout refuses these; trlax took them (1.5 zeroed every hidden state in train mode)
    plain = FlaxAutoModelForCausalLM.from_config(gpt2())  # `lm`'s config now names a dropout, which would win
    for bad in (1.5, -0.1, "0.1"):
        with pytest.raises(ValueError, match=f"summary_dropout_prob must be a probability in \\[0, 1\\].*{bad}"):
            AutoModelForCausalLMWithValueHead.from_pretrained(plain, summary_dropout_prob=bad)
    config.summary_dropout_prob = 2.0
    with pytest.raises(ValueError, match="the config's summary_dropout_prob must be a probability"):
        AutoModelForCausalLMWithValueHead.from_pretrained(FlaxAutoModelForCausalLM.from_config(config))
    # the normal init's std: TRL's torch normal_ refuses these (trlax built a NaN or garbage head); TRL reads it
    # only with v_head_init_strategy="normal", so the default strategy ignores it there as here
    for bad in (-1.0, float("nan"), "0.2", None, True):
        with pytest.raises(ValueError, match=f"v_head_initializer_range .* >= 0 .*got {re.escape(repr(bad))}"):
            AutoModelForCausalLMWithValueHead.from_pretrained(plain, v_head_init_strategy="normal",
                                                              v_head_initializer_range=bad)
        AutoModelForCausalLMWithValueHead.from_pretrained(plain, v_head_initializer_range=bad)
    zero = AutoModelForCausalLMWithValueHead.from_pretrained(plain, v_head_init_strategy="normal",
                                                             v_head_initializer_range=0)
    assert not np.any(np.asarray(zero.params["v_head"]["summary"]["kernel"]))


def test_dropout_of_a_trl_model_carries_over_both_ways():
    """A TRL model built with summary_dropout_prob=0.3 came over with trlax's default 0.1 (and went back with it)."""
    trl_ppo = pytest.importorskip("trl.experimental.ppo")
    for dropout in (0.3, 0.0):
        trl_model = trl_ppo.AutoModelForCausalLMWithValueHead(transformers.GPT2LMHeadModel(gpt2()),
                                                              summary_dropout_prob=dropout)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(trl_model)
        assert model.v_head.dropout_prob == dropout
        back = model.to_torch().v_head.dropout
        assert (back.p if dropout else type(back).__name__) == (dropout or "Identity")
    assert AutoModelForCausalLMWithValueHead.from_pretrained(trl_model, summary_dropout_prob=0.2).v_head.dropout_prob \
        == 0.2  # the call's own value wins


def test_the_base_class_points_to_its_subclasses(tmp_path):
    """PreTrainedModelWrapper (exported, as TRL's) failed with "no attribute 'apply'" when built or loaded."""
    lm = FlaxAutoModelForCausalLM.from_config(gpt2())
    lm.save_pretrained(tmp_path)
    for build in (lambda: PreTrainedModelWrapper(lm), lambda: PreTrainedModelWrapper.from_pretrained(tmp_path)):
        with pytest.raises(TrlaxTypeError, match="base class of the value-head models .* use "
                                                 "FlaxAutoModelForCausalLMWithValueHead"):
            build()


def test_params_pytree_and_pure_jitted_functional_form():
    lm = FlaxAutoModelForCausalLM.from_config(gpt2())
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm)
    assert set(model.params) == {"pretrained_model", "v_head"}
    assert not hasattr(model, "is_encoder_decoder")  # TRL's trainers test hasattr; only its seq2seq wrapper has it
    assert model.params["pretrained_model"] is lm.params
    ids, mask = batch(101, "left")

    def loss(params):
        logits, _, values = model.apply(params, ids, mask, train=True, dropout_rng=jax.random.key(0))
        return values.mean() + logits.mean()

    grads = jax.jit(jax.grad(loss))(model.params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(model.params)
    assert float(np.abs(np.asarray(grads["v_head"]["summary"]["kernel"])).sum()) > 0
    a = model(ids, mask, train=True, dropout_rng=jax.random.key(1))[2]
    b = model(ids, mask, train=True, dropout_rng=jax.random.key(2))[2]
    assert max_diff(a, b) > 0  # value-head dropout is active in train mode
    assert max_diff(model(ids, mask)[2], model(ids, mask)[2]) == 0.0


def test_hidden_size_lookup_follows_trl():
    assert value_head_hidden_size(transformers.OPTConfig(hidden_size=16, word_embed_proj_dim=8)) == 8
    assert value_head_hidden_size(gpt2()) == 32
    assert value_head_hidden_size(transformers.T5Config(d_model=24)) == 24
    multimodal = transformers.Gemma3Config(text_config={"hidden_size": 40})  # no top-level hidden_size
    assert not hasattr(multimodal, "hidden_size") and value_head_hidden_size(multimodal) == 40

    class Bare(transformers.PretrainedConfig):
        model_type = "bare"

    with pytest.raises(ValueError, match="Cannot determine the value head's hidden size"):
        value_head_hidden_size(Bare())


def test_bad_arguments_are_refused(tmp_path):
    lm = FlaxAutoModelForCausalLM.from_config(gpt2())
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm)
    with pytest.raises(TypeError, match="unknown keyword argument.*not_an_option"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm, not_an_option=1)
    with pytest.raises(TypeError, match="must be a path, a hub id or a trlax model"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(3)
    with pytest.raises(ValueError, match="2-D"):
        model(np.zeros((5,), np.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        model(np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(np.zeros((1, 5), np.int32), attention_mask=np.ones((1, 4), np.int32))
    # TRL's constructor wraps a transformers model; trlax's wraps a trlax LM (raw AttributeErrors before)
    for other in (transformers.AutoModelForCausalLM.from_config(gpt2()), str(tmp_path)):
        with pytest.raises(TrlaxTypeError, match=r"wraps a trlax LM; got .*use FlaxAutoModelForCausalLMWithValueHead"
                                                 r"\.from_pretrained"):
            FlaxAutoModelForCausalLMWithValueHead(other)
    # trlax's ValueHead is a Flax module over the hidden size; TRL's ValueHead(config) is make_value_head(config)
    with pytest.raises(TrlaxTypeError, match="ValueHead takes the hidden size H.*got GPT2Config.*make_value_head"):
        ValueHead(gpt2())


def test_return_dict_is_accepted_as_trl_passes_it_on_and_false_is_refused_by_name():
    """TRL's forward hands `return_dict` to the LM and reads `.hidden_states` of what comes back: True works,
    False fails there (AttributeError on a tuple); trlax returns the same tuple and names the False case."""
    ids, mask = batch(101, "left")
    causal = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(FlaxAutoModelForCausalLM.from_config(gpt2()))
    seq2seq = FlaxAutoModelForSeq2SeqLMWithValueHead.from_pretrained(FlaxAutoModelForSeq2SeqLM.from_config(t5()))
    for model, extra in ((causal, {}), (seq2seq, {"decoder_input_ids": ids[:, :3]})):
        plain = model(ids, mask, **extra)
        for return_dict in (True, None):
            out = model(ids, mask, return_dict=return_dict, **extra)
            assert len(out) == 3 and all(max_diff(a, b) == 0.0 for a, b in zip(out[::2], plain[::2], strict=True))
        with pytest.raises(TrlaxTypeError, match=r"return_dict=False.*leave return_dict out"):
            model(ids, mask, return_dict=False, **extra)
        with pytest.raises(TrlaxTypeError, match="return_dict must be a bool or None, got str"):
            model(ids, mask, return_dict="yes", **extra)


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = (repo_id, kwargs, sorted(p.name for p in Path(folder_path).iterdir()))
        shutil.copytree(folder_path, tmp_path / repo_id.replace("/", "--"))
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(FlaxAutoModelForCausalLM.from_config(gpt2()))
    result = model.push_to_hub("me/tiny", token="tok", private=True, revision="dev")
    assert result == "commit-info"
    assert calls["create_repo"] == ("me/tiny", {"token": "tok", "private": True, "exist_ok": True})
    repo_id, kwargs, files = calls["upload_folder"]
    assert repo_id == "me/tiny" and kwargs["token"] == "tok" and kwargs["revision"] == "dev"
    assert files == ["config.json", "model.safetensors"]
    loaded = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "me--tiny", strict=True)
    ids, _ = batch(101, "none")
    assert max_diff(loaded(ids)[2], model(ids)[2]) == 0.0
    plain = FlaxAutoModelForCausalLM.from_config(gpt2())
    plain.push_to_hub("me/plain")
    assert calls["upload_folder"][2] == ["config.json", "model.safetensors"]
