"""create_reference_model: TRL's sharing rule, real buffer sharing, freezing, donation safety."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from jax.sharding import NamedSharding

from tests.helpers import batch, torch_random_init
from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ
from trlax import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
    create_reference_model,
    masked_optimizer,
    merge_trainable,
    split_trainable,
)
from trlax.errors import DeletedParamsError, TrlaxTypeError
from trlax.reference import (
    LAYER_PATTERNS,
    count_layers,
    parameter_names,
    resolve_layer_pattern,
    shared_parameter_names,
)
from trlax.sharding import make_mesh, shard_model
from trlax.trainable import jit_keeping_placement, tree_bytes, unique_buffer_bytes

# Families whose Flax setup() does not yet define submodules in PyTorch's __init__ order
# (within a layer only, so TRL's sharing rule is unaffected: see test_shared_split_follows_trl_rule).
_ALL = {**{k: (v, False) for k, v in TINY_CAUSAL.items()}, **{k: (v, True) for k, v in TINY_SEQ2SEQ.items()}}


def _abstract_lm(config, seq2seq=False):
    """An LM object without params: enough for parameter_names / key_table (nothing compiled)."""
    return (FlaxAutoModelForSeq2SeqLM if seq2seq else FlaxAutoModelForCausalLM).model_class(config)


@functools.cache
def _initial_params(name):
    config, seq2seq = _CONFIGS[name]()
    return (FlaxAutoModelForSeq2SeqLM if seq2seq else FlaxAutoModelForCausalLM).from_config(config).params


def _wrapper(name):
    """A fresh policy over its own copy of cached random params (init is compiled once per config)."""
    config, seq2seq = _CONFIGS[name]()
    lm = _abstract_lm(config, seq2seq)
    lm.params = jax.tree_util.tree_map(jnp.copy, _initial_params(name))
    wrapper_cls = FlaxAutoModelForSeq2SeqLMWithValueHead if seq2seq else FlaxAutoModelForCausalLMWithValueHead
    return wrapper_cls.from_pretrained(lm, summary_dropout_prob=0.0)


@functools.cache
def _torch_checkpoint_names(family: str) -> tuple[str, ...]:
    """transformers' named_parameters() order, in checkpoint key names: each param is matched to
    the saved tensor holding its values (v5 renames some modules on save, e.g. GPT-NeoX's
    `lm_head` is written as `embed_out`)."""
    import tempfile
    from pathlib import Path

    from safetensors.numpy import load_file

    factory, seq2seq = _ALL[family]
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    model = torch_random_init(auto.from_config(factory()))  # random values: every tensor is unique
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        saved = load_file(str(Path(folder) / "model.safetensors"))
    by_value = {array.tobytes(): key for key, array in saved.items()}
    return tuple(_saved_name(p.detach().numpy(), by_value) for _, p in model.named_parameters())


def _saved_name(array, by_value):
    """The saved key holding `array`. transformers 5 holds MoE experts stacked ([E, out, in], gate
    and up fused) but saves one Linear weight per expert: such a param is named by the tensor
    holding its first slice (expert 0; its gate half), as trlax names it."""
    for part in (array, *((array[0], array[0][: array.shape[1] // 2]) if array.ndim == 3 else ())):
        if part.tobytes() in by_value:
            return by_value[part.tobytes()]
    raise KeyError(f"no saved tensor holds a parameter of shape {array.shape}")


def _gpt2(n_layer=2, n_embd=32, vocab=101):
    return transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=vocab, n_positions=64,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


_CONFIGS = {
    "gpt2": lambda: (_gpt2(), False),
    "gpt2-shaped": lambda: (_gpt2(n_layer=4, n_embd=64, vocab=512), False),  # the memory figures
    "t5": lambda: (TINY_SEQ2SEQ["t5"](), True),
}


def _leaves_by_path(tree):
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- parameter order ------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(TINY_CAUSAL))
def test_parameter_names_follow_torch_order(family):
    lm = _abstract_lm(TINY_CAUSAL[family]())
    assert parameter_names(lm) == list(_torch_checkpoint_names(family))


@pytest.mark.parametrize("family", sorted(_ALL))
def test_shared_split_follows_trl_rule(family):
    """For every N, trlax shares exactly what TRL's rule shares on transformers' own parameter list."""
    factory, seq2seq = _ALL[family]
    lm = _abstract_lm(factory(), seq2seq)
    names = parameter_names(lm)
    torch_names = ["pretrained_model." + n for n in _torch_checkpoint_names(family)]  # as TRL sees them
    pattern = lm.spec.layer_pattern
    layers = count_layers(names, pattern)
    config = lm.config
    assert layers == (getattr(config, "num_decoder_layers", None) or config.decoder_layers if seq2seq
                      else config.num_hidden_layers)
    for n in range(layers):
        target = pattern.format(layer=n)
        trl = set(torch_names[: next(i for i, x in enumerate(torch_names) if target in x)])
        assert {"pretrained_model." + x for x in shared_parameter_names(names, n, pattern)} == trl


@pytest.mark.parametrize("family", sorted(_ALL))
def test_family_layer_pattern_is_the_one_trl_picks(family):
    """Each SPEC's layer_pattern is the first of TRL's LAYER_PATTERNS that matches the model (T5, which
    TRL has no pattern for, uses trlax's own), and it is what create_reference_model uses by default."""
    factory, seq2seq = _ALL[family]
    lm = _abstract_lm(factory(), seq2seq)
    names = parameter_names(lm)
    trl = next((p for p in LAYER_PATTERNS if any(p.format(layer=0) in name for name in names)), None)
    assert lm.spec.layer_pattern == (trl or "decoder.block.{layer}")
    assert resolve_layer_pattern(names, None, lm.spec.layer_pattern) == lm.spec.layer_pattern


# --- sharing and freezing -------------------------------------------------------------------
def test_full_copy_has_own_buffers_and_leaves_policy_trainable():
    policy = _wrapper("gpt2")
    ref = create_reference_model(policy)
    assert type(ref) is type(policy) and ref.frozen and not policy.frozen
    assert ref.pretrained_model is not policy.pretrained_model
    # its own module over its own config copy: a change to the policy's config never reaches the reference
    assert ref.pretrained_model.module.config is not policy.pretrained_model.module.config
    assert ref.pretrained_model.module.config.to_dict() == policy.config.to_dict()
    assert all(jax.tree_util.tree_leaves(policy.trainable_mask))
    assert not any(jax.tree_util.tree_leaves(ref.trainable_mask))
    for p, r in zip(jax.tree_util.tree_leaves(policy.params), jax.tree_util.tree_leaves(ref.params), strict=True):
        assert p is not r and p.unsafe_buffer_pointer() != r.unsafe_buffer_pointer()
        np.testing.assert_array_equal(p, r)


@pytest.mark.parametrize("num_shared", [None, 1])
def test_a_policy_holding_numpy_params_gets_a_reference(num_shared):
    """Params assigned from flax.serialization.from_bytes are NumPy arrays, which every call takes: the
    reference's copy read each leaf's `.sharding` and raised AttributeError."""
    policy = _wrapper("gpt2")
    ids, mask = batch(policy.config.vocab_size, "left")
    want = np.asarray(policy(ids, mask)[0])
    policy.params = jax.tree_util.tree_map(np.asarray, policy.params)
    ref = create_reference_model(policy, num_shared_layers=num_shared)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(ref.params["v_head"]))
    np.testing.assert_array_equal(np.asarray(ref(ids, mask)[0]), want)


@pytest.mark.parametrize("num_shared", [None, 1])
def test_reference_keeps_generation_settings_and_storage_dtype(num_shared):
    """TRL's reference is a deepcopy: it generates with the checkpoint's generation_config.json and
    saves in the checkpoint's dtype, as the policy does."""
    policy = _wrapper("gpt2")
    policy.pretrained_model.generation_config = transformers.GenerationConfig(max_new_tokens=3, eos_token_id=1,
                                                                              pad_token_id=1)
    policy.pretrained_model.storage_dtype = np.dtype(jnp.bfloat16)
    ref = create_reference_model(policy, num_shared_layers=num_shared)
    assert ref.pretrained_model.storage_dtype == np.dtype(jnp.bfloat16)
    assert ref.pretrained_model.generation_config.max_new_tokens == 3
    assert ref.pretrained_model.generation_config is not policy.pretrained_model.generation_config
    ids = np.array([[5, 6, 7]])
    assert ref.generate(ids).sequences.shape == policy.generate(ids).sequences.shape == (1, 6)


@pytest.mark.parametrize("num_shared", [0, 1])
def test_shared_layers_are_the_same_arrays(num_shared):
    policy = _wrapper("gpt2")
    ref = create_reference_model(policy, num_shared_layers=num_shared)
    want_shared = {"transformer.wte.weight", "transformer.wpe.weight"} | {
        n for n in parameter_names(policy.pretrained_model) if n.startswith("transformer.h.0.") and num_shared == 1}
    table = policy.pretrained_model.key_table()
    shared_paths = {("pretrained_model", *table[n].path) for n in want_shared}
    pol, rf = _leaves_by_path(policy.params), _leaves_by_path(ref.params)
    mask = _leaves_by_path(policy.trainable_mask)
    for path, leaf in pol.items():
        if path in shared_paths:
            assert rf[path] is leaf and not mask[path], path
        else:
            assert rf[path] is not leaf and rf[path].unsafe_buffer_pointer() != leaf.unsafe_buffer_pointer(), path
            assert mask[path], path
    assert mask[("v_head", "summary", "kernel")] and mask[("v_head", "summary", "bias")]
    assert not any(jax.tree_util.tree_leaves(ref.trainable_mask))


@pytest.mark.parametrize("policy_first", [True, False])
@pytest.mark.parametrize("lora", [False, True])
def test_sharding_a_policy_and_its_reference_keeps_the_shared_arrays_shared(policy_first, lora):
    """`shard_model` of the policy gave it new arrays, and of the reference other new ones: the shared layers
    were held twice from then on (README's "shard first, then create the reference")."""
    if lora:
        lm = _abstract_lm(_CONFIGS["gpt2"]()[0])
        lm.params = jax.tree_util.tree_map(jnp.copy, _initial_params("gpt2"))
        policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm, peft_config={"target_modules": ["c_attn"]})
        ref = create_reference_model(policy)
    else:
        policy = _wrapper("gpt2")
        ref = create_reference_model(policy, num_shared_layers=1)
    ids, mask = batch(policy.config.vocab_size, "left")
    want_policy, want_ref = np.asarray(policy(ids, mask)[2]), np.asarray(ref(ids, mask)[2])
    rf = _leaves_by_path(ref.params)
    shared = {path for path, leaf in _leaves_by_path(policy.params).items() if leaf is rf.get(path)}
    # the LoRA policy's whole base; else the embeddings (wte, wpe) and layer 0's 12 params
    assert len(shared) == (len(_leaves_by_path(policy.params["pretrained_model"])) if lora else 14)
    mesh = make_mesh()
    for model in (policy, ref) if policy_first else (ref, policy):
        shard_model(model, mesh)
    pol, rf = _leaves_by_path(policy.params), _leaves_by_path(ref.params)
    assert all(isinstance(leaf.sharding, NamedSharding) for leaf in (*pol.values(), *rf.values()))
    assert {path for path, leaf in pol.items() if leaf is rf.get(path)} == shared
    np.testing.assert_array_equal(np.asarray(policy(ids, mask)[2]), want_policy)
    np.testing.assert_array_equal(np.asarray(ref(ids, mask)[2]), want_ref)


def test_custom_pattern_uses_trl_order_rule():
    policy = _wrapper("gpt2")
    create_reference_model(policy, num_shared_layers=1, pattern="transformer.h.{layer}.attn")
    frozen = {n for n, m in _leaves_by_path(policy.trainable_mask).items() if not m}
    # Everything before h.1.attn: embeddings, block 0, and block 1's first layer norm.
    assert ("pretrained_model", "transformer", "h", "1", "ln_1", "scale") in frozen
    assert ("pretrained_model", "transformer", "h", "1", "attn", "c_attn", "kernel") not in frozen
    assert len(frozen) == 2 + 12 + 2


@pytest.mark.parametrize("kwargs", [{"pattern": "pretrained_model.transformer.h.{layer}"},
                                    {"pattern": "model.transformer.h.{layer}"}, {"pattern": "transformer.h.{layer}"},
                                    {"num_shared_layers": np.int64(1)}])
def test_patterns_match_the_wrappers_names_and_numpy_ints_count(kwargs):
    """TRL matches the pattern against the wrapper's `named_parameters()` ("pretrained_model.transformer.h.0...") and
    takes any integer; trlax matched the LM's names only (refusing the first two patterns, with a message saying TRL
    would freeze everything) and refused np.int64."""
    policy = _wrapper("gpt2")
    create_reference_model(policy, **{"num_shared_layers": 1, **kwargs})
    frozen = {n for n, m in _leaves_by_path(policy.trainable_mask).items() if not m}
    assert len(frozen) == 2 + 12  # the embeddings and block 0, as TRL freezes them
    assert ("pretrained_model", "transformer", "h", "0", "mlp", "c_proj", "bias") in frozen


def test_reference_forward_stops_gradients():
    policy = _wrapper("gpt2")
    ref = create_reference_model(policy, num_shared_layers=1)
    ids, mask = (jnp.asarray(a) for a in batch(101, "right"))

    def total(model, params):
        logits, _, values = model.apply(params, ids, mask)
        return logits.sum() + values.sum()

    ref_grads = jax.jit(jax.grad(lambda p: total(ref, p)))(ref.params)
    pol_grads = jax.jit(jax.grad(lambda p: total(policy, p)))(policy.params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(ref_grads))
    assert float(jnp.abs(pol_grads["pretrained_model"]["transformer"]["wte"]["embedding"]).max()) > 0


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"num_shared_layers": -1}, ValueError, r"num_shared_layers=-1 is out of range: the model has 2 layers"),
    ({"num_shared_layers": 2}, ValueError, r"must be in \[0, 1\]"),
    ({"num_shared_layers": 1.0}, TypeError, "must be an int or None"),
    ({"num_shared_layers": 1, "pattern": "decoder.block.{layer}"}, ValueError, "matches no parameter"),
    ({"num_shared_layers": 1, "pattern": "transformer.h.1"}, ValueError, "must contain '{layer}'"),
    ({"pattern": "transformer.h.{layer}"}, ValueError, "only used with num_shared_layers"),
])
def test_bad_arguments_raise(kwargs, error, message):
    policy = _wrapper("gpt2")
    before = policy.trainable_mask
    with pytest.raises(error, match=message):
        create_reference_model(policy, **kwargs)
    assert policy.trainable_mask is before  # nothing frozen by a failed call


def test_non_wrappers_raise():
    with pytest.raises(TypeError, match="PreTrainedModelWrapper"):
        create_reference_model(_abstract_lm(_gpt2()))


# --- donation -------------------------------------------------------------------------------
def _sgd_step(params, grads_like):
    return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads_like)


def test_donating_the_trainable_part_keeps_the_reference_valid():
    policy = _wrapper("gpt2")
    ref = create_reference_model(policy, num_shared_layers=1)
    ids, mask = (jnp.asarray(a) for a in batch(101, "left"))
    ref_forward = jax.jit(lambda p: ref.apply(p, ids, mask)[::2])  # (logits, values)
    ref_before = ref_forward(ref.params)
    trainable, frozen = split_trainable(policy.params, policy.trainable_mask)
    donated = jax.tree_util.tree_leaves(trainable)
    # (a jax copy: on CPU a live NumPy view of a buffer silently blocks its donation)
    kernel_before = policy.params["v_head"]["summary"]["kernel"] + 0

    @functools.partial(jax.jit, donate_argnums=0)
    def update(trainable, frozen):
        def loss(t):
            logits, _, values = policy.apply(merge_trainable(t, frozen), ids, mask)
            return jnp.mean(logits**2) + jnp.mean(values**2)
        return _sgd_step(trainable, jax.grad(loss)(trainable))

    trainable = update(trainable, frozen)
    assert all(leaf.is_deleted() for leaf in donated)  # really donated
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(frozen))
    policy.params = merge_trainable(trainable, frozen)
    for before, after in zip(ref_before, ref_forward(ref.params), strict=True):
        np.testing.assert_array_equal(before, after)
    assert not np.allclose(policy.params["v_head"]["summary"]["kernel"], kernel_before)  # the policy did move


def test_donating_the_whole_policy_is_refused_by_the_ppo_step():
    from trlax.ppo import make_ppo_update

    policy = _wrapper("gpt2")
    create_reference_model(policy, num_shared_layers=1)
    tx = optax.sgd(0.1)
    update = make_ppo_update(policy, tx)
    with pytest.raises(ValueError, match="donating leaves that are frozen"):
        update(policy.params, None, tx.init(policy.params), {})


def test_donating_the_whole_policy_deletes_the_references_shared_arrays():
    """Documents the hazard that split_trainable avoids: never donate a tree that holds shared leaves."""
    policy = _wrapper("gpt2")
    ref = create_reference_model(policy, num_shared_layers=1)
    jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x + 1, p), donate_argnums=0)(policy.params)
    wte = ref.params["pretrained_model"]["transformer"]["wte"]["embedding"]
    assert wte.is_deleted()
    with pytest.raises(RuntimeError, match="deleted"):
        ref(*batch(101, "none"))
    with pytest.raises(DeletedParamsError, match="the params of the model to copy hold deleted arrays"):
        create_reference_model(policy)  # was JAX's bare "Array has been deleted with shape=float32[96]"


# --- split / merge / optimizer --------------------------------------------------------------
def test_split_merge_round_trip_and_errors():
    policy = _wrapper("gpt2")
    create_reference_model(policy, num_shared_layers=0)
    trainable, frozen = split_trainable(policy.params, policy.trainable_mask)
    merged = merge_trainable(trainable, frozen)
    for a, b in zip(jax.tree_util.tree_leaves(policy.params), jax.tree_util.tree_leaves(merged), strict=True):
        assert a is b
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(policy.params)
    assert len(jax.tree_util.tree_leaves(frozen)) == 2  # wte, wpe
    with pytest.raises(ValueError, match="tree structure"):
        split_trainable(policy.params, {"pretrained_model": True, "v_head": True})
    with pytest.raises(ValueError, match="in both halves"):
        merge_trainable(policy.params, frozen)


def test_a_step_keeping_its_placement_runs_as_jit_and_refuses_wrong_positions():
    def step(params, grads):
        return jax.tree_util.tree_map(lambda p, g: p - g, params, grads), jnp.float32(1)

    params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
    kept = jit_keeping_placement(step, kept=(0,), outputs=2, donate_argnums=(0,))
    new, loss = kept(params, {"w": jnp.ones((3,)), "b": jnp.ones(())})
    np.testing.assert_array_equal(new["w"], np.zeros(3))
    assert float(loss) == 1 and params["w"].is_deleted()  # donated, as with jax.jit
    with pytest.raises(TrlaxTypeError, match=r"got 1 positional argument\(s\); .* arguments \(0, 1\)"):
        jit_keeping_placement(step, kept=(0, 1), outputs=2)(new)
    with pytest.raises(TrlaxTypeError, match=r"positional arguments only; got \['grads'\] as keywords"):
        jit_keeping_placement(step, kept=(0,), outputs=2)(new, grads=new)
    for bad in ({"kept": (), "outputs": 1}, {"kept": (-1,), "outputs": 1}, {"kept": (0, 1), "outputs": 1}):
        with pytest.raises(TrlaxTypeError, match="needs kept: argument positions"):
            jit_keeping_placement(step, **bad)


def test_optimizer_state_only_for_trainable_leaves():
    policy = _wrapper("gpt2-shaped")
    create_reference_model(policy, num_shared_layers=2)
    trainable, frozen = split_trainable(policy.params, policy.trainable_mask)
    adam = optax.adam(1e-3)
    full = tree_bytes(jax.jit(adam.init)(policy.params))
    split = tree_bytes(jax.jit(adam.init)(trainable))
    tx = masked_optimizer(adam, policy.trainable_mask)
    masked = tree_bytes(jax.jit(tx.init)(policy.params))
    saved = full - split
    print(f"\nadam state: all params {full} B, trainable only {split} B, saved {saved} B "
          f"(= 2 x frozen {tree_bytes(frozen)} B)")
    assert saved == 2 * tree_bytes(frozen)  # mu and nu for every frozen leaf
    assert masked == split
    # The masked optimizer leaves frozen leaves exactly as they are.
    grads = jax.tree_util.tree_map(jnp.ones_like, policy.params)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(policy.params), policy.params)
    for u, m in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(policy.trainable_mask), strict=True):
        assert bool(jnp.any(u != 0)) == m


# --- memory ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_shared", [None, 0, 2, 3])
def test_policy_plus_reference_memory(num_shared):
    """GPT-2-shaped (4 layers, 64 wide, 512 tokens): unique buffers = policy + the unshared part only."""
    policy = _wrapper("gpt2-shaped")
    ref = create_reference_model(policy, num_shared_layers=num_shared)
    policy_bytes = tree_bytes(policy.params)
    _, frozen = split_trainable(policy.params, policy.trainable_mask)
    unshared = policy_bytes - tree_bytes(frozen)
    held = unique_buffer_bytes(policy.params, ref.params)
    print(f"\nnum_shared_layers={num_shared}: policy {policy_bytes} B, policy+ref {held} B, "
          f"unshared {unshared} B ({unshared / policy_bytes:.1%} of the policy)")
    assert held == policy_bytes + unshared
    if num_shared is None:
        assert held == 2 * policy_bytes


# --- seq2seq --------------------------------------------------------------------------------
def test_t5_reference_shares_encoder_and_first_decoder_blocks():
    policy = _wrapper("t5")
    ref = create_reference_model(policy, num_shared_layers=1)
    names = parameter_names(policy.pretrained_model)
    shared = set(shared_parameter_names(names, 1, "decoder.block.{layer}"))
    assert shared == {n for n in names if n == "shared.weight" or n.startswith(("encoder.", "decoder.block.0."))}
    table = policy.pretrained_model.key_table()
    pol, rf = _leaves_by_path(policy.params), _leaves_by_path(ref.params)
    for name in names:
        path = ("pretrained_model", *table[name].path)
        assert (rf[path] is pol[path]) == (name in shared), name
    ids, mask = (jnp.asarray(a) for a in batch(101, "right", low=2))
    dec, dmask = (jnp.asarray(a) for a in batch(101, "right", seq_len=6, seed=1, low=2))

    def total(model, params):
        return model.apply(params, ids, mask, dec, dmask)[2].sum()

    grads = jax.jit(jax.grad(lambda p: total(ref, p)))(ref.params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads))


def test_t5_encoder_pattern():
    policy = _wrapper("t5")
    create_reference_model(policy, num_shared_layers=1, pattern="encoder.block.{layer}")
    frozen = {n for n, m in _leaves_by_path(policy.trainable_mask).items() if not m}
    assert {p[1] for p in frozen} == {"shared", "encoder"}
    assert all(p[2:4] == ("block", "0") for p in frozen if p[1] == "encoder")
