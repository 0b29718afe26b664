"""T5 family (t5, Flan-style gated t5, mt5): trlax vs transformers (PyTorch), float32, atol 1e-4.

The check functions here (no `test_` prefix) are shared with tests/test_bart_parity.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from tests.helpers import batch, max_diff, save_torch, torch_random_init
from tests.tiny_configs import TINY_SEQ2SEQ
from trlax import FlaxAutoModelForSeq2SeqLM, FlaxAutoModelForSeq2SeqLMWithValueHead
from trlax.errors import UnsupportedModelError
from trlax.models.layers import clamp_float16_overflow
from trlax.models.t5 import relative_position_buckets

ATOL = 1e-4
VOCAB = 101
ENC_LEN, DEC_LEN = 11, 7
KINDS = ("t5", "t5-gated", "mt5")


# --- shared checks -----------------------------------------------------------------------


def torch_model(config: transformers.PretrainedConfig, untie: bool = False, seed: int = 0) -> Any:
    """A random transformers seq2seq LM (norms included). `untie`: give it its own lm_head, as
    Flan-T5 / mT5 checkpoints have (transformers v5 ties it in `from_config`)."""
    torch.manual_seed(seed)
    pt = transformers.AutoModelForSeq2SeqLM.from_config(config, dtype=torch.float32)
    if untie:
        pt.lm_head.weight = torch.nn.Parameter(pt.lm_head.weight.detach().clone())
    return torch_random_init(pt, seed=seed, std=0.2)


def inputs(enc_padding: str) -> tuple[np.ndarray, ...]:
    """Encoder ids/mask [3, 11] padded on `enc_padding`, decoder ids/mask [3, 7] right-padded."""
    ids, mask = batch(VOCAB, enc_padding, seq_len=ENC_LEN)
    dec_ids, dec_mask = batch(VOCAB, "right", seq_len=DEC_LEN, seed=1)
    return ids, mask, dec_ids, dec_mask


def torch_forward(pt: Any, ids: np.ndarray, mask: np.ndarray, dec_ids: np.ndarray, dec_mask: np.ndarray) -> Any:
    with torch.no_grad():
        return pt(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  decoder_input_ids=torch.tensor(dec_ids), decoder_attention_mask=torch.tensor(dec_mask),
                  output_hidden_states=True)


def check_forward(pt: Any, model: Any, enc_padding: str) -> float:
    """Logits, encoder and decoder hidden states match on non-pad positions; returns the logit diff."""
    ids, mask, dec_ids, dec_mask = inputs(enc_padding)
    ref = torch_forward(pt, ids, mask, dec_ids, dec_mask)
    out = model(ids, mask, dec_ids, dec_mask, output_hidden_states=True)
    assert out.logits.dtype == np.float32 and out.logits.shape == (3, DEC_LEN, VOCAB)
    assert len(out.encoder_hidden_states) == len(ref.encoder_hidden_states)
    assert len(out.decoder_hidden_states) == len(ref.decoder_hidden_states) == model.spec.num_layers(model.config) + 1
    for layer, (ref_h, h) in enumerate(zip(ref.encoder_hidden_states, out.encoder_hidden_states, strict=True)):
        assert max_diff(ref_h, h, mask) < ATOL, f"encoder hidden state {layer}"
    for layer, (ref_h, h) in enumerate(zip(ref.decoder_hidden_states, out.decoder_hidden_states, strict=True)):
        assert max_diff(ref_h, h, dec_mask) < ATOL, f"decoder hidden state {layer}"
    assert max_diff(ref.encoder_last_hidden_state, out.encoder_last_hidden_state, mask) < ATOL
    # TRL's seq2seq value head reads decoder_hidden_states[-1].
    assert max_diff(ref.decoder_hidden_states[-1], out.last_hidden_state, dec_mask) < ATOL
    diff = max_diff(ref.logits, out.logits, dec_mask)
    assert diff < ATOL
    return diff


def check_cached_decoding(model: Any) -> None:
    """`encode`, then `decode` with a KV cache one token at a time, gives the full forward's
    encoder state and logits, for right- and left-padded encoder inputs.

    The cache has 2 spare slots; the decoder mask covers all slots (spare ones 0).
    """
    variables = {"params": model.params}
    encode = jax.jit(lambda ids, mask: model.module.apply(variables, ids, mask, method="encode"))

    @jax.jit
    def step(dec: Any, key_mask: Any, encoded: Any, mask: Any, cache: Any, index: Any) -> Any:
        return model.module.apply(variables, dec, key_mask, encoded, mask, cache=cache, cache_index=index,
                                  method="decode")

    for enc_padding in ("right", "left"):
        ids, mask, dec_ids, dec_mask = inputs(enc_padding)
        full = model(ids, mask, dec_ids, dec_mask, output_hidden_states=True)
        encoded, hidden = encode(ids, mask)
        assert hidden is None
        # `encode` alone and the encoder inside the full forward are two XLA programs whose fusions
        # may round differently: equal up to a few float32 ulps of the state's scale, not bit for bit.
        ulp = np.finfo(np.float32).eps * float(np.max(np.abs(np.asarray(encoded))))
        assert max_diff(full.encoder_last_hidden_state, encoded, mask) <= 8 * ulp
        b, t = dec_ids.shape
        key_mask = np.zeros((b, t + 2), np.int32)
        key_mask[:, :t] = dec_mask
        cache = model.spec.init_cache(model.config, b, t + 2, model.dtype)
        pieces = []
        for i in range(t):
            out = step(dec_ids[:, i:i + 1], key_mask, encoded, mask, cache, i)
            cache = out.cache
            pieces.append(np.asarray(out.logits))
        assert max_diff(full.logits, np.concatenate(pieces, axis=1), dec_mask) < ATOL


def check_round_trip(model: Any, folder: Path) -> None:
    """trlax save_pretrained -> transformers from_pretrained: same tensors, same logits."""
    model.save_pretrained(folder)
    pt = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    expected = transformers.models.auto.modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES[
        model.config.model_type]
    assert type(pt).__name__ == expected and pt.config.architectures == [expected]
    torch_state = {k: v.numpy() for k, v in pt.state_dict().items()}
    for key, array in model.state_dict().items():
        np.testing.assert_array_equal(torch_state[key], array, err_msg=key)
    ids, mask, dec_ids, dec_mask = inputs("left")
    ref = torch_forward(pt, ids, mask, dec_ids, dec_mask)
    out = model(ids, mask, dec_ids, dec_mask, output_hidden_states=True)
    assert max_diff(ref.logits, out.logits, dec_mask) < ATOL


def check_shared_prefix(pt: Any, model: Any, layer: int, embeddings: tuple[str, ...]) -> None:
    """What TRL's order-based rule shares for `layer_pattern` at `layer`, walking transformers'
    named_parameters: the embeddings, the whole encoder and decoder layers < `layer`."""
    pattern = model.spec.layer_pattern.format(layer=layer) + "."
    names = [name for name, _ in pt.named_parameters()]
    first = next(i for i, name in enumerate(names) if pattern in name)
    stem = model.spec.layer_pattern.split("{")[0]  # "decoder.block." / "model.decoder.layers."
    expected = {key for key in model.state_dict() if key.startswith(embeddings) or "encoder." in key
                or (key.startswith(stem) and int(key[len(stem):].split(".")[0]) < layer)}
    assert set(names[:first]) == expected


def check_missing_decoder_inputs(model: Any) -> None:
    ids = np.ones((2, 5), np.int32)
    with pytest.raises(ValueError, match=r"decoder_input_ids .*shifted right.*decoder_start_token_id"):
        model(ids)
    with pytest.raises(ValueError, match="batch size 1 but input_ids has 2"):
        model(ids, decoder_input_ids=np.zeros((1, 1), np.int32))


# --- T5 tests ----------------------------------------------------------------------------

_PAIRS: dict[str, tuple[str, Any, Any]] = {}


def get_pair(kind: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Any]:
    """(kind, transformers model, trlax model loaded from its checkpoint), built once per kind."""
    if kind not in _PAIRS:
        pt = torch_model(TINY_SEQ2SEQ[kind](), untie=kind != "t5")
        folder = save_torch(pt, tmp_path_factory.mktemp(kind))
        _PAIRS[kind] = (kind, pt, FlaxAutoModelForSeq2SeqLM.from_pretrained(folder))
    return _PAIRS[kind]


@pytest.fixture(params=KINDS)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Any]:
    return get_pair(request.param, tmp_path_factory)


@pytest.mark.parametrize("enc_padding", ["none", "right", "left"])
def test_forward_matches_transformers(pair: tuple[str, Any, Any], enc_padding: str) -> None:
    kind, pt, model = pair
    diff = check_forward(pt, model, enc_padding)
    print(f"{kind} ({enc_padding} encoder padding): max abs logit diff {diff:.2e}")


@pytest.mark.parametrize("kind", ["t5", "mt5"])  # t5-gated differs only in FF and head
def test_cached_decoding_matches_full_decode(kind: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    check_cached_decoding(get_pair(kind, tmp_path_factory)[2])


def test_round_trip_through_transformers(pair: tuple[str, Any, Any], tmp_path: Path) -> None:
    check_round_trip(pair[2], tmp_path)


def test_saved_keys_leave_out_tied_copies(pair: tuple[str, Any, Any], tmp_path: Path) -> None:
    kind, pt, model = pair
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert "shared.weight" in keys and not {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} & keys
    assert ("lm_head.weight" in keys) == (kind != "t5")


def test_checkpoint_without_lm_head_ties_it(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """transformers v5 `from_config` ties mT5's (and Flan-T5's) lm_head to shared and saves no
    lm_head.weight: trlax loads lm_head as a copy of shared, and transformers ties the saved
    copy back."""
    pt = torch_model(TINY_SEQ2SEQ["mt5"](), seed=3)
    assert pt.lm_head.weight is pt.shared.weight
    loaded = FlaxAutoModelForSeq2SeqLM.from_pretrained(save_torch(pt, tmp_path / "torch"))
    np.testing.assert_array_equal(np.asarray(loaded.params["lm_head"]["kernel"]),
                                  np.asarray(loaded.params["shared"]["embedding"]).T)
    ids, mask, dec_ids, dec_mask = inputs("left")
    ref = torch_forward(pt, ids, mask, dec_ids, dec_mask)
    compiled = get_pair("mt5", tmp_path_factory)[2]  # same param tree: reuse its compiled forward
    out = compiled(ids, mask, dec_ids, dec_mask, params=loaded.params, output_hidden_states=True)
    assert max_diff(ref.logits, out.logits, dec_mask) < ATOL
    loaded.save_pretrained(tmp_path / "trlax")
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "trlax"), dtype=torch.float32).eval()
    assert back.lm_head.weight is back.shared.weight
    assert max_diff(ref.logits, torch_forward(back, ids, mask, dec_ids, dec_mask).logits) == 0.0


def test_from_config_round_trip_and_dropout(tmp_path: Path) -> None:
    config = TINY_SEQ2SEQ["mt5"]()
    config.num_layers = config.num_decoder_layers = 1  # init compiles slowly on CPU; one block is enough
    config.dropout_rate = 0.3  # transformers' eval mode ignores it; trlax's train=True applies it
    model = FlaxAutoModelForSeq2SeqLM.from_config(config, seed=1)
    check_round_trip(model, tmp_path)
    check_dropout(model)


@pytest.mark.parametrize("layer", [0, 2])
def test_layer_pattern_shares_encoder_and_first_decoder_blocks(pair: tuple[str, Any, Any], layer: int) -> None:
    check_shared_prefix(pair[1], pair[2], layer, ("shared.",))


def test_missing_decoder_inputs_raise(pair: tuple[str, Any, Any]) -> None:
    check_missing_decoder_inputs(pair[2])


def check_dropout(model: Any) -> None:
    """train=True applies the config's dropout (reproducibly per key) and needs a dropout_rng.

    The key is an "rbg" key: threefry dropout masks take XLA:CPU several times longer to compile.
    """
    ids, mask, dec_ids, dec_mask = inputs("left")
    key = jax.random.key(0, impl="rbg")
    a = model(ids, mask, dec_ids, dec_mask, train=True, dropout_rng=key).logits
    b = model(ids, mask, dec_ids, dec_mask, train=True, dropout_rng=key).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    eval_logits = model(ids, mask, dec_ids, dec_mask, output_hidden_states=True).logits
    assert np.isfinite(np.asarray(a)).all() and max_diff(a, eval_logits) > 1e-3
    with pytest.raises(ValueError, match="dropout_rng"):
        model(ids, mask, dec_ids, dec_mask, train=True)


@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 16), (64, 256)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_transformers(num_buckets: int, max_distance: int,
                                                      bidirectional: bool) -> None:
    keys = 600
    rel = torch.arange(-(keys - 1), keys)
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(relative_position_buckets(keys, bidirectional, num_buckets, max_distance),
                                  ref.numpy())


def test_unsupported_configs_raise() -> None:
    umt5 = transformers.UMT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)
    with pytest.raises(UnsupportedModelError, match="'umt5' is not supported"):
        FlaxAutoModelForSeq2SeqLM.from_config(umt5)
    config = TINY_SEQ2SEQ["t5"]()
    config.dense_act_fn = "unknown_act"
    with pytest.raises(UnsupportedModelError, match="activation 'unknown_act'"):
        FlaxAutoModelForSeq2SeqLM.from_config(config)


# --- float16, as transformers runs it ----------------------------------------------------


@pytest.mark.parametrize("kind", ["t5", "t5-gated"])
def test_float16_keeps_wo_in_float32_and_clamps_overflow_as_transformers(kind: str, tmp_path: Path) -> None:
    """A float16 T5 in transformers keeps `wo` in float32 (the residual is float32 after it) and clamps a
    block's float16 output that overflowed. Weights scaled (all still within float16) so block 0's attention
    output and the feed-forward pass 65504: trlax gave NaN logits before."""
    pt = torch_model(TINY_SEQ2SEQ[kind](), untie=kind != "t5")
    with torch.no_grad():
        for name, weight in pt.named_parameters():
            if name.endswith("DenseReluDense.wo.weight"):
                weight.mul_(3e4)
            if name == "encoder.block.0.layer.0.SelfAttention.v.weight":
                weight.mul_(5e3)
            if name == "encoder.block.0.layer.0.SelfAttention.o.weight":
                weight.mul_(30.0)
    folder = save_torch(pt, tmp_path)
    ids, mask, dec_ids, dec_mask = inputs("right")
    full = torch_forward(pt, ids, mask, dec_ids, dec_mask)
    assert max(float(h.abs().max()) for h in full.encoder_hidden_states) > 65504  # past float16's range
    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float16).eval()
    expected = torch_forward(ref, ids, mask, dec_ids, dec_mask)
    model = FlaxAutoModelForSeq2SeqLM.from_pretrained(folder, dtype=jnp.float16, param_dtype=jnp.float16)
    ff = model.params["encoder"]["block"]["0"]["layer"]["1"]["DenseReluDense"]
    assert ff["wo"]["kernel"].dtype == jnp.float32
    assert ff["wi" if kind == "t5" else "wi_0"]["kernel"].dtype == jnp.float16
    out = model(ids, mask, dec_ids, dec_mask, output_hidden_states=True)
    dtypes = [str(h.dtype).removeprefix("torch.") for h in expected.encoder_hidden_states]
    assert [jnp.dtype(h.dtype).name for h in out.encoder_hidden_states] == dtypes == ["float16", "float32", "float16"]
    assert np.isfinite(np.asarray(out.logits)).all()
    # Tolerance: the float32 residual stream passes 65504 here, summed from float16 sub-layer outputs that each
    # framework rounds in its own order (2^-11 relative: 32 at 6e4); the final norm divides by the stream's
    # RMS, so every logit carries ~1e-3 of the largest entries' error. Measured: up to 0.5% of the largest
    # logit; 1% allowed. The float32 model (whose residual never overflows) is > 10x that away.
    atol = 0.01 * float(expected.logits.float().abs().max())
    assert max_diff(expected.logits.float(), out.logits, dec_mask) <= atol
    assert max_diff(full.logits, expected.logits.float(), dec_mask) > 10 * atol


def _file_dtypes(folder: Path) -> dict[str, str]:
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        return {key: str(f.get_tensor(key).dtype) for key in f.keys()}  # noqa: SIM118 - not a dict


def test_float16_saves_write_wo_in_float32_as_transformers(tmp_path: Path) -> None:
    """transformers saves a float16 T5's `wo` in float32 (as it holds it); trlax wrote it float16."""
    folder = save_torch(torch_model(TINY_SEQ2SEQ["t5"]()), tmp_path / "f32")
    transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float16).save_pretrained(tmp_path / "hf")
    want = _file_dtypes(tmp_path / "hf")
    assert {want[k] for k in want if ".wo." in k} == {"float32"} and want["shared.weight"] == "float16"
    loaded = FlaxAutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf", dtype="auto", param_dtype="auto")
    loaded.save_pretrained(tmp_path / "again")  # in the checkpoint's dtype, float16
    FlaxAutoModelForSeq2SeqLM.from_pretrained(folder).save_pretrained(tmp_path / "cast", dtype="float16")
    FlaxAutoModelForSeq2SeqLMWithValueHead.from_pretrained(folder).save_pretrained(tmp_path / "head", dtype="float16")
    for name in ("again", "cast", "head"):
        got = {k: v for k, v in _file_dtypes(tmp_path / name).items() if not k.startswith("v_head.")}
        assert got == want, name
    state = FlaxAutoModelForSeq2SeqLM.from_pretrained(folder).state_dict(dtype="float16")
    assert {k: str(v.dtype) for k, v in state.items()} == {k: v for k, v in want.items() if k in state}


def test_float16_overflow_clamp_is_transformers_formula() -> None:
    """`clamp_float16_overflow` against transformers' code (T5Block's; BartEncoderLayer's with on_nan).
    Compared exactly: clipping float16 values does no arithmetic, so no CPU rounds differently."""
    x = np.array([[1.0, -60000.0, 65504.0, 64600.0], [np.inf, -np.inf, 3.0, np.nan]], np.float16)
    rows = {"inf": x, "finite": x[:1], "nan only": np.array([65504.0, np.nan], np.float16)}
    for label, data in rows.items():
        h = torch.tensor(data)
        t5_limit = torch.where(torch.isinf(h).any(), torch.finfo(h.dtype).max - 1000, torch.finfo(h.dtype).max)
        t5 = torch.clamp(h, min=-t5_limit, max=t5_limit).numpy()
        limit = torch.finfo(h.dtype).max - 1000
        bart = (torch.clamp(h, min=-limit, max=limit) if not torch.isfinite(h).all() else h).numpy()
        np.testing.assert_array_equal(np.asarray(clamp_float16_overflow(jnp.asarray(data))), t5, err_msg=label)
        np.testing.assert_array_equal(np.asarray(clamp_float16_overflow(jnp.asarray(data), on_nan=True)), bart,
                                      err_msg=label)
    assert clamp_float16_overflow(jnp.full(3, jnp.inf, jnp.bfloat16)).dtype == jnp.bfloat16  # untouched
    assert np.isinf(np.asarray(clamp_float16_overflow(jnp.full(3, jnp.inf, jnp.bfloat16)), np.float32)).all()
