"""GPT-2: trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from tests.helpers import PADDINGS, batch, max_diff, save_torch, torch_random_init
from trlax import FlaxAutoModelForCausalLM

ATOL = 1e-4

VARIANTS = {
    "default": {},
    "untied": {"tie_word_embeddings": False},
    "inverse_layer_idx": {"scale_attn_by_inverse_layer_idx": True},
    "reorder_upcast": {"reorder_and_upcast_attn": True},
    "gelu_exact_no_scale": {"activation_function": "gelu", "scale_attn_weights": False, "n_inner": 48},
}


def _config(**overrides: object) -> transformers.GPT2Config:
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=32,
                                   bos_token_id=0, eos_token_id=1, **overrides)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    config = _config(**VARIANTS[request.param])
    torch.manual_seed(0)
    pt = torch_random_init(transformers.GPT2LMHeadModel(config), std=0.1)
    folder = save_torch(pt, tmp_path_factory.mktemp(request.param))
    return pt, FlaxAutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_logits_and_hidden_states_match_pytorch(pair, padding, explicit_positions):
    pt, model = pair
    ids, mask = batch(101, padding)
    positions = np.clip(mask.cumsum(-1) - 1, 0, None) if explicit_positions else None
    with torch.no_grad():
        ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True,
                 position_ids=None if positions is None else torch.tensor(positions))
    out = model(ids, mask, position_ids=positions, output_hidden_states=True)
    assert out.logits.dtype == np.float32
    assert max_diff(ref.logits, out.logits, mask) < ATOL
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for ref_h, h in zip(ref.hidden_states, out.hidden_states, strict=True):
        assert max_diff(ref_h, h, mask) < ATOL
    assert max_diff(ref.hidden_states[-1], out.last_hidden_state, mask) < ATOL


def test_left_padded_rows_match_unpadded_rows_with_mask_positions(pair):
    _, model = pair
    ids, mask = batch(101, "left")
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    padded = np.asarray(model(ids, mask, position_ids=positions).logits)
    for row in range(ids.shape[0]):
        keep = mask[row].astype(bool)
        alone = np.asarray(model(ids[row : row + 1, keep]).logits)[0]
        assert np.abs(alone - padded[row, keep]).max() < ATOL


def test_jit_matches_eager_and_bf16_is_close(pair):
    pt, model = pair
    ids, mask = batch(101, "right")
    eager = model.apply(model.params, ids, mask)
    jitted = model(ids, mask)
    assert max_diff(eager.logits, jitted.logits) < 1e-5
    bf16 = FlaxAutoModelForCausalLM.from_config(model.config, dtype=np.dtype("bfloat16"))
    out = bf16(ids, mask, params=model.params)
    assert out.logits.dtype == np.float32
    log_p = torch.log_softmax(torch.tensor(np.asarray(jitted.logits)), -1)
    log_q = torch.log_softmax(torch.tensor(np.asarray(out.logits)), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[torch.tensor(mask).bool()]
    assert float(kl.max()) < 2e-2


def test_dropout_only_in_train_mode_with_rng(tmp_path):
    import jax

    config = _config(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    model = FlaxAutoModelForCausalLM.from_config(config)
    ids, mask = batch(101, "none")
    a = model(ids, mask).logits
    assert max_diff(a, model(ids, mask).logits) == 0.0
    b = model(ids, mask, train=True, dropout_rng=jax.random.key(1)).logits
    assert max_diff(a, b) > 1e-3
    with pytest.raises(ValueError, match="dropout_rng"):
        model(ids, mask, train=True)


def test_unsupported_gpt2_option_is_refused():
    with pytest.raises(ValueError, match="add_cross_attention"):
        FlaxAutoModelForCausalLM.from_config(_config(add_cross_attention=True))
