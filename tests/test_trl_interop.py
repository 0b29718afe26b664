"""Interop with TRL itself (PyTorch, trl.experimental.ppo): checkpoints both ways, same numbers."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import transformers

from tests.helpers import batch, max_diff, save_torch, torch_random_init
from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ
from trlax import FlaxAutoModelForCausalLMWithValueHead, FlaxAutoModelForSeq2SeqLMWithValueHead

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

ATOL = 1e-4
CASES = [("causal", t) for t in sorted(TINY_CAUSAL)] + [("seq2seq", t) for t in sorted(TINY_SEQ2SEQ)]
CLASSES = {
    "causal": (transformers.AutoModelForCausalLM, AutoModelForCausalLMWithValueHead,
               FlaxAutoModelForCausalLMWithValueHead),
    "seq2seq": (transformers.AutoModelForSeq2SeqLM, AutoModelForSeq2SeqLMWithValueHead,
                FlaxAutoModelForSeq2SeqLMWithValueHead),
}


def _config(kind, model_type):
    return (TINY_CAUSAL if kind == "causal" else TINY_SEQ2SEQ)[model_type]()


def _trl_model(kind, model_type, folder):
    """A TRL value-head model over a tiny random transformers model saved in `folder`."""
    auto, trl_cls, _ = CLASSES[kind]
    torch.manual_seed(0)
    save_torch(torch_random_init(auto.from_config(_config(kind, model_type)), std=0.1), folder)
    model = trl_cls.from_pretrained(str(folder), dtype=torch.float32, v_head_init_strategy="normal")
    return model.eval()


def _compare(kind, trl_model, flax_model, vocab_size):
    ids, mask = batch(vocab_size, "right", low=2)
    if kind == "causal":
        with torch.no_grad():
            ref = trl_model(torch.tensor(ids), attention_mask=torch.tensor(mask))
        out = flax_model(ids, attention_mask=mask)
        check = mask
    else:
        dec, dmask = batch(vocab_size, "right", seq_len=6, seed=1, low=2)
        with torch.no_grad():
            ref = trl_model(torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec),
                            decoder_attention_mask=torch.tensor(dmask))
        out = flax_model(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
        check = dmask
    assert max_diff(ref[0], out[0], check) < ATOL
    assert max_diff(ref[2], out[2], check) < ATOL
    return max_diff(ref[2], out[2], check)


@pytest.mark.parametrize(("kind", "model_type"), CASES)
def test_checkpoint_saved_by_trl_loads_in_trlax(kind, model_type, tmp_path):
    trl_model = _trl_model(kind, model_type, tmp_path / "base")
    trl_model.save_pretrained(str(tmp_path / "trl"))
    flax_model = CLASSES[kind][2].from_pretrained(tmp_path / "trl", strict=True)
    np.testing.assert_allclose(np.asarray(flax_model.params["v_head"]["summary"]["kernel"]).T,
                               trl_model.v_head.summary.weight.detach().numpy(), rtol=0, atol=0)
    _compare(kind, trl_model, flax_model, trl_model.config.vocab_size)


@pytest.mark.parametrize(("kind", "model_type"), CASES)
def test_checkpoint_saved_by_trlax_loads_in_trl(kind, model_type, tmp_path):
    _trl_model(kind, model_type, tmp_path / "base")  # writes the base checkpoint
    flax_model = CLASSES[kind][2].from_pretrained(tmp_path / "base", v_head_init_strategy="normal", seed=5)
    flax_model.save_pretrained(tmp_path / "trlax")
    reloaded = CLASSES[kind][1].from_pretrained(str(tmp_path / "trlax"), dtype=torch.float32).eval()
    np.testing.assert_allclose(reloaded.v_head.summary.weight.detach().numpy(),
                               np.asarray(flax_model.params["v_head"]["summary"]["kernel"]).T, rtol=0, atol=0)
    _compare(kind, reloaded, flax_model, reloaded.config.vocab_size)
