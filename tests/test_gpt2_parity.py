"""GPT-2's own checks; the generic parity checks over its variants are in tests/test_causal_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from tests.helpers import batch, max_diff, save_torch, torch_random_init
from tests.tiny_configs import CAUSAL_VARIANTS, TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM

ATOL = 1e-4

VARIANTS = {"default": TINY_CAUSAL["gpt2"]} | {
    name: make for name, make in CAUSAL_VARIANTS.items() if name.startswith("gpt2/")}


def _config(**overrides: object) -> transformers.GPT2Config:
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=32,
                                   bos_token_id=0, eos_token_id=1, **overrides)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    config = VARIANTS[request.param]()
    torch.manual_seed(0)
    pt = torch_random_init(transformers.GPT2LMHeadModel(config), std=0.1)
    folder = save_torch(pt, tmp_path_factory.mktemp(request.param.replace("/", "-")))
    return pt, FlaxAutoModelForCausalLM.from_pretrained(folder)


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
