"""transformers / TRL `from_pretrained` keywords that mean something else, or nothing, in trlax.

TRL scripts pass PyTorch loading options. trlax reads `torch_dtype` as `dtype` (with the
deprecation warning transformers itself now gives), accepts the placement/attention/
memory options with a one-line warning saying what trlax does instead, and refuses the
options whose meaning it cannot honour (quantisation, remote code) with an error naming
them, rather than loading something different from what was asked for.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np

from trlax.checkpoint.dtypes import held_dtype
from trlax.errors import UnsupportedModelError

AUTO = "auto"

# Accepted, ignored, and what trlax does instead.
IGNORED_ARGS = {
    "device_map": "trlax places params with mesh= / sharding_rules= (jax.sharding), not a device map",
    "attn_implementation": "trlax always uses its own XLA attention (fused by the compiler)",
    "low_cpu_mem_usage": "trlax always reads tensors one at a time from memory-mapped files",
}
# Refused when set: what they ask for cannot be honoured.
REFUSED_ARGS = {
    "quantization_config": "trlax does not load quantised weights; load the full-precision checkpoint "
                           "(param_dtype=jnp.bfloat16 halves its memory)",
    "load_in_8bit": "trlax has no 8-bit (bitsandbytes) loading; use param_dtype=jnp.bfloat16",
    "load_in_4bit": "trlax has no 4-bit (bitsandbytes) loading; use param_dtype=jnp.bfloat16",
    "trust_remote_code": "trlax runs only its own model implementations, never a checkpoint's code; "
                         "use a model_type trlax supports",
    "subfolder": "trlax reads a checkpoint from the top of a folder or repo; download the repo "
                 "(huggingface_hub.snapshot_download) and pass its subfolder's local path",
}


def translate_loading_args(kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """`kwargs` with transformers' loading keywords translated: a new dict, the rest untouched.

    torch_dtype -> dtype (FutureWarning); device_map / attn_implementation /
    low_cpu_mem_usage dropped with a UserWarning; quantization_config, load_in_8bit=True,
    load_in_4bit=True, trust_remote_code=True, subfolder="..." raise UnsupportedModelError (their
    falsy values are dropped quietly). `where` names the caller in messages.
    """
    kwargs = dict(kwargs)
    if "torch_dtype" in kwargs:
        torch_dtype = kwargs.pop("torch_dtype")
        if kwargs.get("dtype") is not None:
            raise UnsupportedModelError(f"{where}: pass dtype or torch_dtype, not both (torch_dtype is the old name)")
        warnings.warn(f"{where}: `torch_dtype` is deprecated, use `dtype` (read as dtype={torch_dtype!r})",
                      FutureWarning, stacklevel=3)
        kwargs["dtype"] = torch_dtype
    for name, instead in IGNORED_ARGS.items():
        if name in kwargs:
            value = kwargs.pop(name)
            warnings.warn(f"{where}: {name}={value!r} is ignored: {instead}", UserWarning, stacklevel=3)
    for name, why in REFUSED_ARGS.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if value:
                raise UnsupportedModelError(f"{where}: {name}={value!r} is not supported: {why}")
    return kwargs


def as_dtype(value: Any) -> Any:
    """A jnp dtype from a jnp/numpy dtype, a name ("bfloat16") or a torch.dtype; "auto" stays "auto"."""
    if isinstance(value, str) and value == AUTO:
        return AUTO
    if value is None:
        return None
    name = str(value).removeprefix("torch.") if type(value).__module__ == "torch" else value
    try:
        return jnp.dtype(name)
    except TypeError:
        raise UnsupportedModelError(f"{value!r} is not a dtype; use e.g. jnp.bfloat16, 'float32' or 'auto'") from None


def auto_dtype(config: Any, stored: np.dtype | None) -> np.dtype | None:
    """What "auto" loads a model as, in transformers' order: config.json's `dtype` when it names one (a non-float
    one is returned too, for `resolve_dtype` to refuse, as transformers refuses it), else `stored` (the float
    dtype holding most of the checkpoint's bytes; transformers takes the first float tensor's, the same for any
    checkpoint stored in one dtype); float64 as JAX holds it (`held_dtype`: float32 without x64)."""
    declared = getattr(config, "dtype", None)
    if declared is not None and not (isinstance(declared, str) and declared == AUTO):
        return held_dtype(as_dtype(declared))
    return None if stored is None else held_dtype(stored)


def resolve_dtype(value: Any, checkpoint_dtype: np.dtype | None) -> Any:
    """`value` as a jnp dtype, with "auto" meaning `checkpoint_dtype` (float32 when None); UnsupportedModelError
    when "auto" meets a checkpoint that declares a non-float dtype."""
    value = as_dtype(value)
    if not isinstance(value, str):
        return value
    if checkpoint_dtype is None:
        return jnp.dtype(jnp.float32)
    if not jnp.issubdtype(checkpoint_dtype, jnp.floating):
        raise UnsupportedModelError(f'dtype="auto" reads the checkpoint\'s dtype, and its config.json declares '
                                    f"{np.dtype(checkpoint_dtype).name}, not a float dtype; pass dtype=jnp.float32 (or "
                                    "bfloat16), or fix config.json's dtype")
    return jnp.dtype(checkpoint_dtype)
