"""Checks on what callers pass to a model: token ids, masks, positions and params, before any compute.

Eager calls (`model(...)`, `wrapper(...)`, `generate`, `save_pretrained`) check concrete
inputs on the host: a token id outside [0, vocab), a position past a learned position
table, or params of another model raise an `InputError` naming the problem, where JAX
would silently give NaN logits or read the wrong row (PyTorch raises an IndexError).

Under `jax.jit` the ids are tracers and their values unknown, so the range checks are
skipped (shapes are still checked: a sequence longer than a learned position table, and
params of the wrong structure, fail at trace time). For range checks inside a jitted
step, call `apply(..., check_inputs=True)` in a function wrapped with `checked`, which
compiles the checks in with `jax.experimental.checkify` and raises an `InputError`
after the call when one fails:

    step = trlax.inputs.checked(lambda p, ids, m: model.apply(p, ids, m, check_inputs=True))
    step(params, ids, mask)   # InputError if an id is outside the vocabulary

`check_inputs=True` outside `checked` is an error from JAX ("checkify.check which was
not functionalized"): the check has nowhere to report to.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from trlax.errors import DeletedParamsError, InputError, TrlaxError, TrlaxTypeError

# The label the language-modelling losses skip (transformers' and PyTorch's ignore_index).
IGNORE_INDEX = -100


def is_concrete(x: Any) -> bool:
    """Whether this host can read `x`'s values: numpy, a list, a jax.Array whose shards are all here
    (even while a jit traces around it); not a tracer, nor a multi-host array."""
    if isinstance(x, jax.core.Tracer):
        return False
    return not isinstance(x, jax.Array) or x.is_fully_addressable


INT32 = np.iinfo(np.int32)


def _bounds(x: Any, where: Any = None) -> tuple[int, int] | None:
    """(min, max) of a concrete integer array over the entries where `where` is true; None if none.

    Read on the host with numpy (ids are small), so it also works while a jit is tracing; fetched by an explicit
    `jax.device_get`, which `jax.transfer_guard("disallow")` allows.
    """
    values = np.asarray(jax.device_get(x))
    if where is not None:
        values = values[np.asarray(jax.device_get(where)).astype(bool)]
    return None if values.size == 0 else (int(values.min()), int(values.max()))


def token_ids(name: str, ids: Any, vocab_size: int | None = None, *, traced: bool = False) -> jax.Array:
    """input_ids-like arguments: an integer array [B, T], returned as int32.

    With `vocab_size`, every id must be in [0, vocab_size): checked on the host when the
    ids are concrete, with `checkify` when they are traced and `traced` is set (see the
    module docstring), else not at all.
    """
    if not isinstance(ids, (np.ndarray, jax.Array)):
        try:
            ids = np.asarray(ids)
        except ValueError:  # rows of different lengths
            raise InputError(f"{name} must be a [batch, seq_len] array of token ids; its rows have different "
                             "lengths: pad them to one length and mask the padding") from None
    if ids.ndim != 2:
        raise InputError(f"{name} must be a 2-D [batch, seq_len] array of token ids; got shape {ids.shape}")
    if 0 in ids.shape:
        raise InputError(f"{name} has shape {ids.shape}: it needs at least one row and one token per row")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise InputError(f"{name} must hold integer token ids; got dtype {ids.dtype}")
    if vocab_size is not None:
        check_token_range(name, ids, vocab_size, traced=traced)
    elif ids.dtype != np.int32 and is_concrete(ids):  # before the cast, which would wrap an id past int32
        bounds = _bounds(ids)
        if bounds is not None and not INT32.min <= bounds[0] <= bounds[1] <= INT32.max:
            bad = bounds[0] if bounds[0] < INT32.min else bounds[1]
            raise InputError(f"{name} holds token id {bad}, which no vocabulary reaches (trlax's ids are int32); "
                             "ids must come from this model's tokenizer")
    return jnp.asarray(ids).astype(jnp.int32)


def check_token_range(name: str, ids: Any, vocab_size: int, *, traced: bool = False) -> None:
    """Every id of `ids` (any shape, int) in [0, vocab_size), as PyTorch's embedding requires.

    JAX's lookup gives NaN for ids >= vocab_size and wraps negative ones to the end of the
    table, so a bad id would otherwise pass silently.
    """
    fix = "ids must come from this model's tokenizer; pad with a real id (e.g. pad_token_id) and mask it"
    if is_concrete(ids):
        bounds = _bounds(ids)
        if bounds is not None and (bounds[0] < 0 or bounds[1] >= vocab_size):
            bad = bounds[0] if bounds[0] < 0 else bounds[1]
            raise InputError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size}); {fix}")
    elif traced:
        checkify.check(jnp.all((ids >= 0) & (ids < vocab_size)),
                       f"{name} holds token ids outside the vocabulary [0, {vocab_size}) (min {{lo}}, max {{hi}}); "
                       f"{fix}", lo=jnp.min(ids), hi=jnp.max(ids))


def check_labels(name: str, labels: Any, vocab_size: int, *, traced: bool = False) -> None:
    """Every label of `labels` (any shape, int) in [0, vocab_size) or IGNORE_INDEX (-100), as PyTorch's
    cross-entropy requires.

    JAX would give a NaN loss for a label >= vocab_size and read another negative one from the end of
    the vocabulary; concrete labels are checked here, traced ones with `traced=True` (checkify).
    """
    fix = f"labels must be token ids in [0, {vocab_size}), or {IGNORE_INDEX} where the loss ignores a position"
    if is_concrete(labels):
        bounds = _bounds(labels, np.asarray(labels) != IGNORE_INDEX)
        if bounds is not None and (bounds[0] < 0 or bounds[1] >= vocab_size):
            bad = bounds[0] if bounds[0] < 0 else bounds[1]
            raise InputError(f"{name} holds {bad}; {fix}")
    elif traced:
        scored = labels != IGNORE_INDEX
        checkify.check(jnp.all(~scored | ((labels >= 0) & (labels < vocab_size))),
                       f"{name} holds labels outside the vocabulary; {fix}")


def check_positions(name: str, length: int, position_ids: Any, mask: Any, limit: int | None, *,
                    model: str = "the model", past_length: int = 0, traced: bool = False) -> None:
    """Positions must fit a learned position table of `limit` rows (None: no table, nothing to check).

    length: the sequence length T (default positions run 0..T-1, so T must be <= limit), `past_length` cached
    tokens included; model: its name in messages. position_ids [B, T] or None: every entry must be < limit, and
    the entries of real tokens (mask 1) >= 0 (a negative position at a padded slot reads a finite row and is
    masked out); T itself is then free (a padded batch wider than the table, whose rows fit it).
    """
    if limit is None:
        return
    if position_ids is None and length > limit:
        counted = f" ({past_length} cached + {length - past_length} new)" if past_length else ""
        raise InputError(f"{name}: {model} has {limit} positions; got a sequence of {length} tokens{counted}. "
                         f"Truncate it to at most {limit} tokens")
    if position_ids is None:
        return
    fix = f"positions must lie in [0, {limit}) (the model's learned position table)"
    if is_concrete(position_ids) and is_concrete(mask):
        everywhere, real = _bounds(position_ids), _bounds(position_ids, mask)
        if everywhere is not None and everywhere[1] >= limit:
            raise InputError(f"position_ids holds position {everywhere[1]}; {fix}")
        if real is not None and real[0] < 0:
            raise InputError(f"position_ids holds position {real[0]} at a real (unmasked) token; {fix}")
    elif traced:
        ok = jnp.all(position_ids < limit) & jnp.all((position_ids >= 0) | (mask == 0))
        checkify.check(ok, f"position_ids out of range (min {{lo}}, max {{hi}}); {fix}",
                       lo=jnp.min(position_ids), hi=jnp.max(position_ids))


# transformers' forward arguments no trlax forward takes, with what to do instead.
UNSUPPORTED_FORWARD_ARGUMENTS = {
    "inputs_embeds": "pass input_ids",
    "decoder_inputs_embeds": "pass decoder_input_ids",
    "encoder_outputs": "pass input_ids and attention_mask: the encoder runs inside the forward",
    "output_attentions": "attention weights are not returned",
    "return_dict": "trlax returns an output object: read its fields, e.g. out.logits",
    "head_mask": "heads cannot be masked",
    "token_type_ids": "no supported family uses them",
}


# transformers' forward arguments whose value here changes nothing (trlax returns output objects without
# attention weights): accepted, as the old transformers Flax API and TRL's callers pass them.
NEUTRAL_FORWARD_ARGUMENTS = {"return_dict": (None, True), "output_attentions": (None, False)}


def refuse_unsupported_arguments(arguments: dict[str, Any], where: str) -> None:
    """TrlaxTypeError naming keyword arguments a forward does not take (a transformers-only one with its
    alternative), where Python would raise a bare TypeError; `NEUTRAL_FORWARD_ARGUMENTS` at a neutral value pass."""
    refused = sorted(name for name, value in arguments.items()
                     if not any(value is neutral for neutral in NEUTRAL_FORWARD_ARGUMENTS.get(name, ())))
    if refused:
        shown = {name: f"{name}={arguments[name]!r}" if name in NEUTRAL_FORWARD_ARGUMENTS else name for name in refused}
        named = [f"{shown[name]} ({UNSUPPORTED_FORWARD_ARGUMENTS[name]})" if name in UNSUPPORTED_FORWARD_ARGUMENTS
                 else shown[name] for name in refused]
        raise TrlaxTypeError(f"{where} takes no {', '.join(named)}")


def check_forward_flags(where: str, **flags: Any) -> None:
    """TrlaxTypeError unless each flag (`train`, `output_hidden_states`, ...) is a bool or None: they pick the
    compiled program, and another value (an old positional call passing a key as `train`) failed inside jit."""
    for name, value in flags.items():
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise TrlaxTypeError(f"{where}: {name} must be True or False; got {type(value).__name__} (pass the "
                                 "forward's arguments after attention_mask by keyword)")


def check_dropout_rng(train: bool, dropout_rng: Any) -> None:
    """With `train=True`, `dropout_rng` must be a jax.random key (typed, or raw uint32 key data): TrlaxError
    without one, TrlaxTypeError for another value (an int seed failed deep inside JAX)."""
    if not train:
        return
    if dropout_rng is None:
        raise TrlaxError("train=True needs dropout_rng (a jax.random key) for dropout")
    if not (isinstance(dropout_rng, (jax.Array, np.ndarray)) and (
            jax.dtypes.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key) or dropout_rng.dtype == np.uint32)):
        kind = f"a {dropout_rng.dtype} array" if hasattr(dropout_rng, "dtype") else type(dropout_rng).__name__
        raise TrlaxTypeError(f"dropout_rng must be a jax.random key (jax.random.key(seed)); got {kind}")


def check_shape(name: str, value: Any, shape: tuple[int, ...]) -> None:
    """InputError unless `value` (a mask, positions or labels; concrete or traced: shapes are static, so
    this costs nothing under jit) has the shape of its ids; None passes."""
    if value is not None and tuple(np.shape(value)) != tuple(shape):
        raise InputError(f"{name} must have the shape of its ids {tuple(shape)}; got {tuple(np.shape(value))}")


def same_shape(name: str, value: Any, shape: tuple[int, ...], *, integers: bool = True) -> jax.Array:
    """A position (or label, or, `integers=False`, mask) array with the shape of its ids, returned as int32.
    Positions and labels must be integers: a float position 0.7 was truncated to 0, where torch's embedding
    raises."""
    value = jnp.asarray(value)
    check_shape(name, value, shape)
    if integers and not jnp.issubdtype(value.dtype, jnp.integer):
        raise InputError(f"{name} must hold integers; got dtype {value.dtype}")
    return value.astype(jnp.int32)


def mask_for(name: str, mask: Any, ids: jax.Array, past_length: int = 0) -> jax.Array:
    """The attention mask [B, P + T] int32 of `ids` [B, T] after P cached tokens (`past_length`): the given one
    (checked: its shape, and when concrete that it holds only 0 and 1, in any dtype) or all ones."""
    shape = (ids.shape[0], past_length + ids.shape[1])
    if mask is None:
        return jax.device_put(np.ones(shape, np.int32))  # explicitly: jax.transfer_guard allows it
    if is_concrete(mask) and not np.isin(host_mask := np.asarray(jax.device_get(mask)), (0, 1)).all():
        values = np.unique(host_mask)
        raise InputError(f"{name} must hold only 1 (a token) and 0 (padding); got the values {values[:8].tolist()}")
    value = jnp.asarray(mask)
    if past_length and tuple(value.shape) != shape:
        raise InputError(f"{name} must cover the {past_length} cached tokens and the {ids.shape[1]} new ones, "
                         f"{shape}; got {tuple(value.shape)}")
    return same_shape(name, value, shape, integers=False)  # float and bool 0/1 masks are fine


def checked(fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """`fn` jit-compiled with its `checkify` input checks: a failed check raises InputError after the call.

    Inside `fn`, call `apply(..., check_inputs=True)` (or `check_token_range(...,
    traced=True)`) for the checks to be compiled in; `jit_kwargs` go to `jax.jit`
    (donate_argnums, static_argnums, ...).
    """
    run = jax.jit(checkify.checkify(fn, errors=checkify.user_checks), **jit_kwargs)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        error, out = run(*args, **kwargs)
        message = error.get()
        if message is not None:
            raise InputError(message)
        return out

    return call


# --- params -------------------------------------------------------------------------------


def dtype_kind(dtype: Any) -> str:
    """What a param's dtype may vary in: any float for a float param (param_dtype), any int for an int."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):  # a typed jax.random key: its own kind
        return str(dtype)
    dtype = jnp.dtype(dtype)
    for kind in (jnp.floating, jnp.integer, jnp.bool_):
        if jnp.issubdtype(dtype, kind):
            return kind.__name__
    return dtype.name


def _leaves(tree: Any) -> Iterable[tuple[str, Any]]:
    """("a/b/kernel", leaf) pairs of a params tree."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path), leaf


def deleted_params_error(leaves: list[Any], what: str) -> DeletedParamsError | None:
    """The DeletedParamsError (an InputError) naming `what` when a concrete array among `leaves` was deleted (donated
    to a jitted step), else None; traced ones pass."""
    if any(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted() for x in leaves):
        return DeletedParamsError(
            f"{what} hold deleted arrays: a jitted step donated them (e.g. a PPO update). A model wrapped by a "
            "value-head model shares its arrays with the wrapper: call `wrapper.pretrained_model`, which follows "
            "the wrapper's params, or pass the params the step returned")
    return None


def check_not_deleted(leaves: list[Any], what: str) -> None:
    """Raise `deleted_params_error(leaves, what)` if there is one."""
    error = deleted_params_error(leaves, what)
    if error is not None:
        raise error


@contextlib.contextmanager
def live_params(params: Any, what: str) -> Iterator[None]:
    """Around a jitted call: a DeletedParamsError naming `what` when `params` hold arrays a donating step deleted,
    where JAX raises its bare "Array has been deleted" or XLA's "Buffer has been deleted or donated". Checked before
    the call and again when it fails with one of those: another thread's donating step can delete them in between.
    Any other failure is raised as it is, although a donating call that failed may have deleted its inputs too."""
    leaves = jax.tree_util.tree_leaves(params)
    check_not_deleted(leaves, what)
    try:
        yield
    except (RuntimeError, ValueError) as e:
        deleted = not isinstance(e, TrlaxError) and "has been deleted" in str(e)
        error = deleted_params_error(leaves, what) if deleted else None
        if error is None:
            raise
        raise error from e


def with_live_params(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
    """`fn(params, ...)` inside `live_params` (a DeletedParamsError naming `what` for params a donating step deleted)
    and `explained_device_mismatch`."""

    def call(params: Any, *args: Any, **kwargs: Any) -> Any:
        with explained_device_mismatch(what), live_params(params, f"the params of {what}"):
            return fn(params, *args, **kwargs)

    return call


@contextlib.contextmanager
def explained_device_mismatch(what: str) -> Iterator[None]:
    """Around a jitted call: JAX's "Received incompatible devices" ValueError (params on one device passed to a
    model on a mesh, or the reverse) becomes an InputError saying how to place them."""
    try:
        yield
    except ValueError as e:
        if isinstance(e, TrlaxError) or "incompatible devices" not in str(e):
            raise
        raise InputError(
            f"the params or inputs of {what} are on other devices than the model (one device vs its mesh, or another "
            "mesh): place them as the model's with trlax.sharding.shard_model(model, mesh) after assigning them, or "
            "restore a state with target={'params': model.params} (or target_sharding=the model's mesh); JAX says: "
            f"{str(e).splitlines()[0][:300]}") from e


class ParamsCheck:
    """Checks that params have a model's structure: same paths, shapes and dtype kinds.

    `expected` builds the model's abstract params (ShapeDtypeStructs) when first needed.
    A structure that passed is remembered (by treedef, shapes and dtype kinds), so a
    repeated check costs one tree flatten, and a check at jit trace time costs nothing
    per call.
    """

    def __init__(self, expected: Callable[[], Any], what: str) -> None:
        self._expected = expected
        self._want: dict[str, tuple[tuple[int, ...], str]] | None = None
        self._passed: set[Any] = set()
        self.what = what

    def __call__(self, params: Any, name: str = "params") -> None:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        check_not_deleted(leaves, f"{name} of {self.what}")
        key = (treedef, tuple((tuple(np.shape(x)), dtype_kind(x.dtype)) for x in leaves))
        if key in self._passed:
            return
        if self._want is None:
            self._want = {path: (tuple(x.shape), dtype_kind(x.dtype)) for path, x in _leaves(self._expected())}
        got = {path: (tuple(np.shape(x)), dtype_kind(x.dtype)) for path, x in _leaves(params)}
        problems = []
        for path, (shape, kind) in self._want.items():
            if path not in got:
                problems.append(f"'{path}' is missing")
            elif got[path][0] != shape:
                problems.append(f"'{path}' has shape {got[path][0]} where {self.what} needs {shape}")
            elif got[path][1] != kind:
                problems.append(f"'{path}' holds {got[path][1]} values where {self.what} needs {kind}")
        problems += [f"'{path}' is not a param of {self.what}" for path in got if path not in self._want]
        if problems:
            more = f" (and {len(problems) - 1} more mismatch(es))" if len(problems) > 1 else ""
            raise InputError(f"{name} do not fit {self.what}: {problems[0]}{more}. Pass the params of this "
                             "model (same config), e.g. model.params or what its train step returned")
        self._passed.add(key)
