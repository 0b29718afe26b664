"""trlax.generation: greedy parity with transformers' PyTorch generate, sampling, caching, errors."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from benchmarks import hlo_report
from tests.helpers import save_torch, torch_generation_init
from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ
from trlax import FlaxAutoModelForCausalLM, FlaxAutoModelForSeq2SeqLM
from trlax.errors import InputError, TrlaxTypeError
from trlax.generation import GenerateOutput, GenerationSettings, filtered_logits, generate

NEW = 8  # new tokens per parity run
LEFT_PADS = (0, 2, 5, 0, 8, 1)  # one row per prompt; 8 of 9 tokens padded in row 4
SEQ = 9


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """model_type -> (transformers model, trlax model on the same weights), built once each."""
    cache: dict[str, tuple[Any, Any]] = {}

    def get(model_type: str) -> tuple[Any, Any]:
        if model_type not in cache:
            seq2seq = model_type in TINY_SEQ2SEQ
            config = (TINY_SEQ2SEQ if seq2seq else TINY_CAUSAL)[model_type]()
            torch_auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
            pt = torch_generation_init(torch_auto.from_config(config, dtype=torch.float32))
            folder = save_torch(pt, tmp_path_factory.mktemp(model_type))
            auto = FlaxAutoModelForSeq2SeqLM if seq2seq else FlaxAutoModelForCausalLM
            cache[model_type] = pt, auto.from_pretrained(folder)
        return cache[model_type]

    return get


def _prompts(config: Any, seq2seq: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[6, 9] ids and mask: left-padded prompts (causal) or right-padded encoder inputs (seq2seq)."""
    ids = np.random.RandomState(seed).randint(3, config.vocab_size, (len(LEFT_PADS), SEQ))
    mask = np.ones_like(ids)
    for row, pads in enumerate(LEFT_PADS):
        mask[row, :pads] = 0
        ids[row, :pads] = config.pad_token_id
    if seq2seq:
        ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()
    return ids, mask


def _torch_generate(pt: Any, ids: np.ndarray, mask: np.ndarray, eos: int | list[int], width: int) -> np.ndarray:
    """transformers' greedy output, padded on the right to trlax's static width."""
    config = pt.config
    gen_config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=NEW, pad_token_id=config.pad_token_id, eos_token_id=eos,
        decoder_start_token_id=getattr(config, "decoder_start_token_id", None),
        # transformers 5.24's T5 cache assumes as many decoder as encoder blocks; the tiny
        # T5 configs have 3 vs 2, so its seq2seq reference runs without a cache.
        use_cache=not config.is_encoder_decoder,
    )
    with torch.no_grad():
        out = pt.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), generation_config=gen_config).numpy()
    padded = np.full((out.shape[0], width), config.pad_token_id)
    padded[:, : out.shape[1]] = out  # transformers stops early once every row has finished
    return padded


@pytest.mark.parametrize("model_type", [*TINY_CAUSAL, *TINY_SEQ2SEQ])
def test_greedy_matches_transformers_token_for_token(pairs, model_type):
    pt, model = pairs(model_type)
    seq2seq = model_type in TINY_SEQ2SEQ
    ids, mask = _prompts(model.config, seq2seq)
    width = (1 if seq2seq else SEQ) + NEW
    never = model.config.vocab_size  # an eos no row can emit: all NEW tokens are compared
    out = generate(model, ids, mask, max_new_tokens=NEW, pad_token_id=model.config.pad_token_id, eos_token_id=never)
    assert isinstance(out, GenerateOutput)
    assert out.sequences.shape == (len(ids), width) and out.sequences.dtype == np.int32
    ref = _torch_generate(pt, ids, mask, never, width)
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)
    assert len(np.unique(ref[:, -NEW:])) > 2, "degenerate reference: the test would be weak"

    # Now an eos that fires: row 0's third new token. Rows emit pad after their eos.
    eos = int(ref[0, width - NEW + 2])
    out = generate(model, ids, mask, max_new_tokens=NEW, pad_token_id=model.config.pad_token_id, eos_token_id=eos)
    ref = _torch_generate(pt, ids, mask, eos, width)
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)
    assert (ref[0, width - NEW + 3:] == model.config.pad_token_id).all()


def _greedy(model: Any, ids: np.ndarray, mask: np.ndarray, **kwargs: Any) -> np.ndarray:
    """Greedy NEW tokens with an eos that never fires: the parity test's compiled function."""
    kwargs = {"pad_token_id": model.config.pad_token_id, "eos_token_id": model.config.vocab_size, **kwargs}
    return np.asarray(generate(model, ids, mask, max_new_tokens=NEW, **kwargs).sequences)


def test_eos_list_and_all_rows_done_early(pairs):
    pt, model = pairs("gpt2")
    ids, mask = _prompts(model.config, False)
    first = _greedy(model, ids, mask)[:, SEQ]
    eos = [int(first[0]), int(first[1])]  # rows 0 and 1 stop after one token
    out = np.asarray(generate(model, ids, mask, max_new_tokens=NEW, pad_token_id=model.config.pad_token_id,
                              eos_token_id=eos).sequences)
    np.testing.assert_array_equal(out, _torch_generate(pt, ids, mask, eos, SEQ + NEW))
    # Identical rows whose first token is an eos: all rows finish at once, the loop stops
    # and the rest is pad (same shapes and eos count: the same compiled function).
    same = np.repeat(ids[:1], len(ids), 0), np.repeat(mask[:1], len(ids), 0)
    out = np.asarray(generate(model, *same, max_new_tokens=NEW, pad_token_id=0,
                              eos_token_id=[int(first[0]), model.config.vocab_size]).sequences)
    assert (out[:, SEQ] == first[0]).all() and (out[:, SEQ + 1:] == 0).all()


def test_pad_and_eos_default_to_the_config(pairs):
    _, model = pairs("gpt2")
    ids, mask = _prompts(model.config, False)
    first = _greedy(model, ids, mask)[0, SEQ]
    saved = model.config.pad_token_id, model.config.eos_token_id, model.generation_config
    try:
        # Without a generation_config.json (which would take precedence), the config's ids apply.
        model.config.pad_token_id, model.config.eos_token_id = None, int(first)  # pad falls back to eos
        model.generation_config = None
        out = np.asarray(model.generate(ids, mask, max_new_tokens=NEW).sequences)
    finally:
        model.config.pad_token_id, model.config.eos_token_id, model.generation_config = saved
    assert (out[0, SEQ:] == first).all()  # the eos, then eos as pad
    assert len(model.generation_cache) >= 1 and out.shape == (len(ids), SEQ + NEW)


def test_seq2seq_starts_with_the_decoder_start_token(pairs):
    _, model = pairs("t5")
    ids, mask = _prompts(model.config, True)
    out = _greedy(model, ids, mask, decoder_start_token_id=5)
    assert out.shape == (len(ids), 1 + NEW) and (out[:, 0] == 5).all()


@pytest.mark.parametrize("model_type", ["llama", "t5"])
def test_top_k_1_sampling_is_greedy(pairs, model_type):
    _, model = pairs(model_type)
    ids, mask = _prompts(model.config, model_type in TINY_SEQ2SEQ)
    sampled = generate(model, ids, mask, max_new_tokens=NEW, do_sample=True, top_k=1, temperature=0.7,
                       pad_token_id=model.config.pad_token_id, eos_token_id=model.config.vocab_size,
                       prng_key=jax.random.key(3)).sequences
    np.testing.assert_array_equal(np.asarray(sampled), _greedy(model, ids, mask))


def _sample(model: Any, ids: np.ndarray, mask: np.ndarray, key: int, temperature: float, top_k: int,
            top_p: float | jax.Array) -> np.ndarray:
    """NEW sampled tokens with an eos that never fires (one eos id, like the greedy runs)."""
    return np.asarray(generate(model, ids, mask, max_new_tokens=NEW, do_sample=True, temperature=temperature,
                               top_k=top_k, top_p=top_p, eos_token_id=model.config.vocab_size,
                               prng_key=jax.random.key(key)).sequences)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 0.6)])
def test_sampling_is_reproducible_and_depends_on_the_key(pairs, top_k, top_p):
    _, model = pairs("llama")
    ids, mask = _prompts(model.config, False)
    a = _sample(model, ids, mask, 0, 2.0, top_k, top_p)
    np.testing.assert_array_equal(a, _sample(model, ids, mask, 0, 2.0, top_k, top_p))
    assert (a != _sample(model, ids, mask, 1, 2.0, top_k, top_p)).any()


def _teacher_forced_logits(model: Any, sequences: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits [B, T + new - 1, V] that predicted each generated token (full forward, HF positions)."""
    full_mask = np.concatenate([mask, np.ones((len(mask), sequences.shape[1] - mask.shape[1]), mask.dtype)], 1)
    positions = np.maximum(full_mask.cumsum(-1) - 1, 0)
    return np.asarray(model(sequences, full_mask, position_ids=positions).logits)[:, mask.shape[1] - 1:-1]


# A traced top_p of 1.0 keeps the top-p code path (and the compiled function of (3, 0.6))
# while filtering nothing: a pure top-k check.
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.5, 3, jnp.float32(1.0)), (1.0, 0, 0.3), (0.5, 3, 0.6)])
def test_sampled_tokens_stay_in_the_top_k_top_p_support(pairs, temperature, top_k, top_p):
    _, model = pairs("llama")
    ids, mask = _prompts(model.config, False, seed=1)
    seqs = _sample(model, ids, mask, 7, temperature, top_k, top_p)
    logits = _teacher_forced_logits(model, seqs, mask) / temperature  # [B, NEW, V]
    chosen = np.take_along_axis(logits, seqs[:, SEQ:, None], -1)[..., 0]  # [B, NEW]
    tol = 1e-4  # cached decode vs full forward: float noise
    if top_k:
        kth = np.sort(logits, -1)[..., -top_k]
        assert (chosen >= kth - tol).all()
        logits = np.where(logits >= kth[..., None] - tol, logits, -np.inf)  # top-p sees the top-k
    if top_p < 1.0:  # [B, NEW] probabilities, after top-k
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        p_chosen = np.take_along_axis(probs, seqs[:, SEQ:, None], -1)
        mass_above = np.where(probs > p_chosen + 1e-6, probs, 0.0).sum(-1)
        assert (mass_above < top_p + 1e-4).all()  # transformers keeps a token iff this mass < top_p


@pytest.mark.parametrize("top_k", [0, 7])
@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.9, 1.0])
def test_top_k_top_p_filters_match_transformers_warpers(top_k, top_p):
    logits = np.random.RandomState(0).randn(16, 101).astype(np.float32) * 3  # [B, V]
    scores = torch.tensor(logits)
    if top_k:
        scores = transformers.TopKLogitsWarper(top_k)(None, scores)
    ref = np.isfinite(transformers.TopPLogitsWarper(top_p)(None, scores).numpy())
    keep = np.isfinite(np.asarray(filtered_logits(jnp.asarray(logits), top_k, jnp.float32(top_p))))
    np.testing.assert_array_equal(keep, ref)


@pytest.mark.parametrize("top_k", [1, 7])
def test_top_k_keeps_the_ties_of_the_kth_logit_as_transformers(top_k):
    """Logits rounded to integers tie at the k-th value: transformers keeps every tie (trlax drew from exactly k
    candidates: a token tied with the most likely one was never sampled at top_k=1). Ties at a top-p cut go
    together in trlax, where transformers' sort order splits them (see `_top_p_mask`): not compared here."""
    logits = np.round(np.random.RandomState(0).randn(16, 101).astype(np.float32) * 3)
    ref = np.isfinite(transformers.TopKLogitsWarper(top_k)(None, torch.tensor(logits)).numpy())
    keep = np.isfinite(np.asarray(filtered_logits(jnp.asarray(logits), top_k, None)))
    np.testing.assert_array_equal(keep, ref)
    assert (ref.sum(-1) > top_k).any()  # rows with ties at their k-th value are among them


def test_a_tiny_temperature_samples_the_argmax(pairs):
    """temperature 1e-10 with top_p: XLA:CPU's fused softmax of the scaled logits (~1e10 apart) gave NaN, and the
    top-p mask kept nothing (token 0) or everything; transformers samples the argmax."""
    _, model = pairs("gpt2")
    ids, mask = _prompts(model.config, False)
    greedy = np.asarray(generate(model, ids, mask, max_new_tokens=3, eos_token_id=[]).sequences)
    for top_p in (0.9, 1.0):
        out = generate(model, ids, mask, max_new_tokens=3, eos_token_id=[], do_sample=True, temperature=1e-10,
                       top_p=top_p, prng_key=jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(out.sequences), greedy)


def test_second_call_does_not_recompile(pairs):
    _, model = pairs("llama")
    ids, mask = _prompts(model.config, False)
    kwargs = {"max_new_tokens": NEW, "do_sample": True, "top_k": 3}
    generate(model, ids, mask, temperature=1.0, top_p=0.9, prng_key=jax.random.key(0), eos_token_id=1, **kwargs)
    compilations, settings = model.generation_cache.compilations, len(model.generation_cache)
    # New ids, temperature, top_p, key, pad and eos values: all traced, nothing recompiles.
    generate(model, ids[::-1], mask[::-1], temperature=0.5, top_p=0.8, prng_key=jax.random.key(1),
             pad_token_id=3, eos_token_id=2, **kwargs)
    assert model.generation_cache.compilations == compilations and len(model.generation_cache) == settings
    # A new static setting compiles once more, and only once.
    generate(model, ids, mask, max_new_tokens=NEW - 1, do_sample=False)
    generate(model, ids, mask, max_new_tokens=NEW - 1, do_sample=False)
    assert model.generation_cache.compilations == compilations + 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
        ({"max_new_tokens": -3}, "max_new_tokens must be a positive int"),
        ({"max_new_tokens": 57}, "exceeds the model's 64 positions"),  # 9 + 57 - 1 fed: one too many
        ({"do_sample": True}, "do_sample=True needs prng_key"),
        ({"do_sample": True, "prng_key": jax.random.key(0), "temperature": 0.0}, "temperature must be > 0"),
        ({"do_sample": True, "prng_key": jax.random.key(0), "top_p": 1.5}, r"top_p must be in \[0, 1\]"),
        ({"top_k": -1}, "top_k must be a Python int >= 0"),
        ({"input_ids": np.zeros((2, 3, 4), np.int32)}, "must be a 2-D"),
        ({"input_ids": np.zeros((2, 9), np.float32)}, "must hold integer token ids"),
        ({"attention_mask": np.ones((6, 8), np.int32)}, "attention_mask must have the shape"),
        ({"attention_mask": np.tril(np.ones((6, 9), np.int32))}, "needs left-padded prompts"),
        ({"rollout_dtype": jnp.int32}, "rollout_dtype must be a floating dtype"),
        ({"rollout_dtype": "fp8"}, "rollout_dtype must be a floating dtype"),
        # Arrays were broadcast against the logits past the range checks ([0.0]: the ids in order, silently).
        ({"do_sample": True, "prng_key": jax.random.key(0), "temperature": np.array([0.0])},
         "temperature must be one number for every row"),
        ({"do_sample": True, "prng_key": jax.random.key(0), "top_p": np.array([2.0])}, "top_p must be one number"),
        ({"repetition_penalty": np.array([-2.0])}, "repetition_penalty must be one number"),
        ({"do_sample": True, "prng_key": jax.random.key(0), "temperature": "hot"}, "temperature must be one number"),
        ({"do_sample": True, "prng_key": 0}, "prng_key must be one jax.random key"),
        ({"do_sample": True, "prng_key": jax.random.split(jax.random.key(0), 3)}, "prng_key must be one jax.random"),
        ({"eos_token_id": [[13, 2]]}, "an int or a flat list of ints"),
        ({"max_new_tokens": True}, "max_new_tokens must be a positive int"),  # generated one token
        ({"do_sample": "no"}, "do_sample must be True or False"),  # sampled
    ],
)
def test_bad_input_raises_a_clear_error(pairs, kwargs, message):
    _, model = pairs("gpt2")
    ids, mask = _prompts(model.config, False)
    args = {"input_ids": ids, "attention_mask": mask, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, args.pop("input_ids"), args.pop("attention_mask"), **args)


def test_generate_settings_of_the_wrong_type_are_refused_and_generate_still_traces(pairs):
    """max_new_tokens="3" raised UnsupportedModelError ("not implemented") for a value of the wrong type; do_sample=1
    and min_new_tokens=-1 (nothing, in transformers 5.25) are taken as transformers takes them. generate inside
    jax.jit keeps working (the non-finite-logits check needs concrete logits)."""
    _, model = pairs("gpt2")
    ids, mask = _prompts(model.config, False)
    with pytest.raises(TrlaxTypeError, match="max_new_tokens must be an integer; got '3'"):
        model.generate(ids, attention_mask=mask, max_new_tokens="3")
    greedy = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=3).sequences)
    np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=-1,
                                                 do_sample=0).sequences, greedy)
    traced = jax.jit(lambda p, i, m: model.generate(i, attention_mask=m, params=p, max_new_tokens=3).sequences)
    np.testing.assert_array_equal(traced(model.params, ids, mask), greedy)


def test_generate_under_jit_with_concrete_arrays_closed_over(pairs):
    """A jax.Array prompt or mask closed over by a jitted function raised TracerBoolConversionError: the prompt
    checks ran jnp on it, which a trace stages even for concrete arrays."""
    _, model = pairs("gpt2")
    ids, mask = (jnp.asarray(x) for x in _prompts(model.config, False))
    greedy = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=3).sequences)
    closed = jax.jit(lambda p: model.generate(ids, attention_mask=mask, params=p, max_new_tokens=3).sequences)
    np.testing.assert_array_equal(closed(model.params), greedy)
    _, t5 = pairs("t5")
    enc, enc_mask = (jnp.asarray(x) for x in _prompts(t5.config, True))
    prompt = jnp.asarray([[5, 6]] * enc.shape[0], jnp.int32)  # no start token: generate puts it in front
    eager = np.asarray(t5.generate(enc, enc_mask, decoder_input_ids=prompt, max_new_tokens=3).sequences)
    decoded = jax.jit(lambda p: t5.generate(enc, enc_mask, decoder_input_ids=prompt, params=p,
                                            max_new_tokens=3).sequences)
    np.testing.assert_array_equal(decoded(t5.params), eager)
    numpy_prompt = np.asarray(prompt)  # converted inside the trace, it was taken as traced: no start token
    decoded = jax.jit(lambda p: t5.generate(enc, enc_mask, decoder_input_ids=numpy_prompt, params=p,
                                            max_new_tokens=3).sequences)
    np.testing.assert_array_equal(decoded(t5.params), eager)


def test_raw_keys_of_the_default_prng_are_accepted(pairs):
    """Under jax_default_prng_impl="rbg" jax.random.PRNGKey(0) is uint32[4]: generate said it was no key."""
    _, model = pairs("gpt2")
    ids, mask = _prompts(model.config, False)
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        raw, typed = jax.random.PRNGKey(0), jax.random.key(0)
        assert raw.shape == (4,)
        sampled = [np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=True,
                                             prng_key=key).sequences) for key in (raw, typed)]
        with pytest.raises(InputError, match="prng_key must be one jax.random key"):
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=True, prng_key=raw[:2])
    finally:
        jax.config.update("jax_default_prng_impl", previous)
    np.testing.assert_array_equal(*sampled)


@pytest.mark.parametrize("name", ["pad_token_id", "eos_token_id", "decoder_start_token_id", "forced_eos_token_id"])
def test_traced_token_ids_are_refused_by_name(pairs, name):
    """The docstring called every other value traced; traced ids failed with raw JAX errors deep inside."""
    _, model = pairs("gpt2")
    ids, mask = _prompts(model.config, False)
    call = jax.jit(lambda token: model.generate(ids, attention_mask=mask, max_new_tokens=2, **{name: token}))
    with pytest.raises(TrlaxTypeError, match=f"{name} must be Python ints.*traced value"):
        call(jnp.int32(2))
    with pytest.raises(TrlaxTypeError, match=f"{name} must be Python ints"):
        jax.jit(lambda token: generate(model, ids, mask, max_new_tokens=2, **{name: token}))(jnp.int32(2))


# --- the compiled decode loop --------------------------------------------------------------


def _compiled_loop(model: Any, **kwargs: Any) -> tuple[Any, Any, set[str]]:
    """Greedy generate (eos off), then its optimised HLO: (module, the decode while, its computations)."""
    ids, mask = _prompts(model.config, False)
    generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[], **kwargs)
    rollout = kwargs.get("rollout_dtype")
    settings = GenerationSettings(NEW, False, 0, False, 0,
                                  rollout_dtype=None if rollout is None else jnp.dtype(rollout))
    module = hlo_report.parse(model.generation_cache.compiled_text(settings))
    loop = hlo_report.decode_loop(module)
    return module, loop, module.scheduled(loop.body)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_decode_loop_updates_the_cache_in_place_and_copies_no_cache_or_weight(pairs, model_type):
    _, model = pairs(model_type)
    module, loop, in_loop = _compiled_loop(model)
    geometry = model.spec.cache_geometry(model.config)
    batch, slots = len(LEFT_PADS), SEQ + NEW
    leaf = f"f32[{batch},{geometry.num_kv_heads},{slots},{geometry.head_dim}]"  # [B, Hkv, S, D]
    leaf_bytes = batch * geometry.num_kv_heads * slots * geometry.head_dim * 4
    assert loop.shape.count(leaf) == 2 * geometry.num_layers  # every K and V is carried through the loop
    writes = [i for c in in_loop for i in module.computations[c]
              if i.shape == leaf and "dynamic-update-slice" in hlo_report.fused_ops(module, i)]
    assert len(writes) == 2 * geometry.num_layers  # one in-place write per K and V per step
    smallest_weight = min(x.size for x in jax.tree_util.tree_leaves(model.params) if x.ndim >= 2) * 4
    moves = hlo_report.large_moves(module, in_loop, min(leaf_bytes, smallest_weight))
    assert [(i.name, i.shape) for i in moves] == []


def test_bf16_rollout_carries_bf16_weights_into_the_loop(pairs):
    _, model = pairs("gpt2")
    module, loop, in_loop = _compiled_loop(model, rollout_dtype=jnp.bfloat16)
    c = model.config
    head_dim = c.n_embd // c.n_head
    # On CPU the cache stays float32: XLA:CPU's batched dots would convert a bf16 cache every step.
    assert loop.shape.count(f"f32[{len(LEFT_PADS)},{c.n_head},{SEQ + NEW},{head_dim}]") == 2 * c.n_layer
    weights = {",".join(map(str, leaf.shape)) for leaf in jax.tree_util.tree_leaves(model.params) if leaf.ndim >= 2}
    for dims in weights:  # weight matrices enter the loop cast once, only as bf16 (tables: their uint16 bits)
        assert f"16[{dims}]" in loop.shape and f"f32[{dims}]" not in loop.shape, dims
    moved = [i.shape for i in hlo_report.large_moves(module, in_loop, 0) if i.shape.split("[")[1][:-1] in weights]
    assert moved == []  # no per-step copy or cast of a weight


def test_bf16_rollout_agrees_with_float32_and_compiles_its_own_function(pairs):
    _, model = pairs("gpt2")
    ids, mask = _prompts(model.config, False)
    f32 = np.asarray(generate(model, ids, mask, max_new_tokens=NEW).sequences)
    before = model.generation_cache.compilations
    same = np.asarray(generate(model, ids, mask, max_new_tokens=NEW, rollout_dtype=jnp.float32).sequences)
    np.testing.assert_array_equal(same, f32)  # the model's own dtype: the same function, no compile
    assert model.generation_cache.compilations == before
    bf16 = np.asarray(generate(model, ids, mask, max_new_tokens=NEW, rollout_dtype=jnp.bfloat16).sequences)
    assert model.generation_cache.compilations == before + 1
    np.testing.assert_array_equal(bf16[:, :SEQ], ids)
    # The first new token: top-2 logit gaps of these weights are far above bf16 rounding.
    np.testing.assert_array_equal(bf16[:, SEQ], f32[:, SEQ])
