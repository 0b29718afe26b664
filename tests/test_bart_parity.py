"""BART: trlax vs transformers (PyTorch), float32, atol 1e-4 (checks shared with the T5 tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from tests.helpers import max_diff, save_torch
from tests.test_t5_parity import (
    ATOL,
    check_cached_decoding,
    check_dropout,
    check_forward,
    check_round_trip,
    check_shared_prefix,
    inputs,
    torch_forward,
    torch_model,
)
from tests.tiny_configs import TINY_SEQ2SEQ
from trlax import FlaxAutoModelForSeq2SeqLM, FlaxAutoModelForSeq2SeqLMWithValueHead
from trlax.errors import UnsupportedModelError
from trlax.models.seq2seq import FlaxModelForSeq2SeqLM


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A random BART (a non-zero final_logits_bias too) and trlax's load of its checkpoint."""
    pt = torch_model(TINY_SEQ2SEQ["bart"]())
    pt.final_logits_bias.copy_(torch.randn(pt.final_logits_bias.shape, generator=torch.Generator().manual_seed(1)))
    folder = save_torch(pt, tmp_path_factory.mktemp("bart"))
    return pt, FlaxAutoModelForSeq2SeqLM.from_pretrained(folder)


@pytest.mark.parametrize("enc_padding", ["none", "right", "left"])
def test_forward_matches_transformers(pair: tuple[Any, Any], enc_padding: str) -> None:
    diff = check_forward(*pair, enc_padding)
    print(f"bart ({enc_padding} encoder padding): max abs logit diff {diff:.2e}")


def test_cached_decoding_matches_full_decode(pair: tuple[Any, Any]) -> None:
    check_cached_decoding(pair[1])


def test_round_trip_through_transformers(pair: tuple[Any, Any], tmp_path: Path) -> None:
    np.testing.assert_array_equal(np.asarray(pair[1].params["final_logits_bias"]), pair[0].final_logits_bias.numpy())
    check_round_trip(pair[1], tmp_path)


def test_checkpoint_without_final_logits_bias_loads_zeros(pair: tuple[Any, Any], tmp_path: Path) -> None:
    pt, model = pair
    folder = save_torch(pt, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["final_logits_bias"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    loaded = FlaxAutoModelForSeq2SeqLM.from_pretrained(folder)
    assert not np.asarray(loaded.params["final_logits_bias"]).any()
    ids, mask, dec_ids, dec_mask = inputs("right")
    pt_zero = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ref = torch_forward(pt_zero, ids, mask, dec_ids, dec_mask)
    out = model(ids, mask, dec_ids, dec_mask, params=loaded.params, output_hidden_states=True)
    assert max_diff(ref.logits, out.logits, dec_mask) < ATOL


@pytest.mark.parametrize("layer", [0, 2])
def test_layer_pattern_shares_encoder_and_first_decoder_layers(pair: tuple[Any, Any], layer: int) -> None:
    # TRL's named_parameters order: decoder.embed_positions precedes the decoder layers,
    # decoder.layernorm_embedding follows them.
    check_shared_prefix(*pair, layer, ("model.shared.", "model.decoder.embed_positions."))


def test_without_decoder_inputs_the_decoder_reads_input_ids_shifted_as_transformers(pair: tuple[Any, Any]) -> None:
    """transformers' BartModel shifts input_ids right when given neither decoder_input_ids nor labels (so TRL's
    seq2seq value-head forward takes input_ids alone); trlax raised, as it does for T5, where transformers does."""
    pt, model = pair
    ids, mask, _, _ = inputs("right")
    with torch.no_grad():
        ref = pt(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert max_diff(model(ids, mask).logits, ref) < ATOL
    wrapper = FlaxAutoModelForSeq2SeqLMWithValueHead.from_pretrained(model)
    assert wrapper.is_encoder_decoder is True  # TRL's attribute, set on its seq2seq wrapper only
    logits, _, values = wrapper(ids, mask)
    assert max_diff(logits, ref) < ATOL and values.shape == ids.shape
    with pytest.raises(ValueError, match="batch size 1 but input_ids has 3"):
        model(ids, decoder_input_ids=np.zeros((1, 1), np.int32))


def test_from_config_round_trip_and_dropout(tmp_path: Path) -> None:
    config = TINY_SEQ2SEQ["bart"]()
    config.encoder_layers = config.decoder_layers = 1  # init compiles slowly on CPU; one layer is enough
    config.dropout = config.attention_dropout = config.activation_dropout = 0.3
    model = FlaxAutoModelForSeq2SeqLM.from_config(config, seed=1)
    check_round_trip(model, tmp_path)
    check_dropout(model)


def test_unsupported_configs_raise(pair: tuple[Any, Any]) -> None:
    config = TINY_SEQ2SEQ["bart"]()
    config.tie_word_embeddings = False
    with pytest.raises(UnsupportedModelError, match="tie_word_embeddings=False"):
        FlaxAutoModelForSeq2SeqLM.from_config(config)
    config = TINY_SEQ2SEQ["bart"]()
    config.activation_function = "unknown_act"
    with pytest.raises(UnsupportedModelError, match="activation_function='unknown_act'"):
        FlaxAutoModelForSeq2SeqLM.from_config(config)

    model = pair[1]
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.encoder_layerdrop = 0.1
    dropping = FlaxModelForSeq2SeqLM(config, model.spec, params=model.params)
    ids, mask, dec_ids, dec_mask = inputs("none")
    with pytest.raises(UnsupportedModelError, match="encoder_layerdrop=0.1"):
        dropping(ids, mask, dec_ids, dec_mask, train=True, dropout_rng=jax.random.key(0))
    too_long = np.ones((1, model.config.max_position_embeddings + 1), np.int32)
    with pytest.raises(ValueError, match="BART has 64 positions"):
        model(too_long, decoder_input_ids=too_long[:, :1])


def test_float16_encoder_layer_clamps_overflow_as_transformers(tmp_path: Path) -> None:
    """transformers clamps a float16 encoder layer output holding inf/NaN to +-(65504 - 1000); a scaled
    final_layer_norm of encoder layer 0 (weights x 3e4, still within float16) overflows it (trlax left inf there)."""
    pt = torch_model(TINY_SEQ2SEQ["bart"]())
    with torch.no_grad():
        pt.model.encoder.layers[0].final_layer_norm.weight.mul_(3e4)
    folder = save_torch(pt, tmp_path)
    ids, mask, dec_ids, dec_mask = inputs("right")
    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float16).eval()
    expected = torch_forward(ref, ids, mask, dec_ids, dec_mask).encoder_hidden_states[1].float().numpy()
    model = FlaxAutoModelForSeq2SeqLM.from_pretrained(folder, dtype=jnp.float16, param_dtype=jnp.float16)
    got = np.asarray(model(ids, mask, dec_ids, dec_mask, output_hidden_states=True).encoder_hidden_states[1],
                     np.float32)
    assert np.abs(expected).max() == np.abs(got).max() == 64512  # clamped (float16 rounds 64504 up)
    # The layer's float16 input differs by float16 rounding between the frameworks (2^-11 relative); the norm
    # divides it by its std and the scaled weight multiplies by 3e4, so the output carries ~2^-11 * 3e4 *
    # max|x| / std. Measured 128 (4 float16 ulps at 3e4-6e4, 0.2% of the clamp value); 1% allowed.
    assert max_diff(expected, got, mask) <= 0.01 * 64512
