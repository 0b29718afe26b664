"""GPT-Neo: trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4."""

from __future__ import annotations

import pytest
import transformers

from tests.helpers import batch, max_diff
from tests.parity_checks import (
    SEQ,
    VOCAB,
    make_pair,
)
from tests.tiny_configs import TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError


def _local_first_untied() -> transformers.GPTNeoConfig:
    # Local layer first, a window of 3, an untied head, a non-default MLP width and activation.
    return transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                     attention_types=[[["local", "global"], 1]], window_size=3,
                                     intermediate_size=40, activation_function="gelu",
                                     tie_word_embeddings=False, max_position_embeddings=64, bos_token_id=0,
                                     eos_token_id=1)


VARIANTS = {
    "global_local_w4": TINY_CAUSAL["gpt_neo"],
    "local_global_w3_untied": _local_first_untied,
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    return make_pair(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))


def test_local_window_changes_the_output(pair):
    """The tiny windows are shorter than the sequence: with a window covering it, logits differ."""
    _, model = pair
    wide = model.config.__class__.from_dict(model.config.to_dict())
    wide.window_size = 64
    ids, mask = batch(VOCAB, "none", seq_len=SEQ)
    full = type(model)(wide, model.spec, params=model.params)
    out = model(ids, mask, output_hidden_states=True).logits
    assert max_diff(out, full(ids, mask, output_hidden_states=True).logits) > 1e-3


def test_unknown_attention_type_is_refused():
    config = TINY_CAUSAL["gpt_neo"]()
    config.attention_layers = ["global", "sparse"]
    with pytest.raises(UnsupportedModelError, match=r"attention types \['sparse'\].*'global', 'local'"):
        FlaxAutoModelForCausalLM.from_config(config)
