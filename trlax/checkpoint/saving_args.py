"""transformers / TRL `save_pretrained` keywords that mean something else, or nothing, in trlax.

TRL and accelerate scripts pass PyTorch saving options. trlax always writes safetensors, so
`safe_serialization=True` is what it does anyway; `is_main_process` is accepted with a warning
saying what trlax does instead; options it cannot honour are refused with an error naming them,
rather than writing something other than what was asked for.
"""

from __future__ import annotations

import warnings
from typing import Any

from trlax.errors import TrlaxTypeError, UnsupportedModelError

# Accepted, ignored, and what trlax does instead.
IGNORED_ARGS = {
    "is_main_process": "call save_pretrained on every process: process 0 writes while the others help "
                       "gather sharded tensors (trlax.checkpoint.gather)",
}
# Refused when set (a falsy value is what trlax does anyway).
REFUSED_ARGS = {
    "state_dict": "pass params= (a param tree of this model) to save other weights",
    "push_to_hub": "call push_to_hub(repo_id, ...) after or instead of save_pretrained",
    "save_function": "trlax writes with its own atomic safetensors writer",
    "variant": "trlax writes the standard file names only",
}


def check_saving_args(kwargs: dict[str, Any], where: str) -> None:
    """Accept transformers' saving keywords that change nothing here, refuse the rest naming them.

    safe_serialization=False raises UnsupportedModelError (trlax writes safetensors only);
    is_main_process gives a UserWarning; state_dict / push_to_hub / save_function / variant,
    when set, raise UnsupportedModelError; any other keyword is a TrlaxTypeError. `where`
    names the caller in messages.
    """
    for name, value in kwargs.items():
        if name == "safe_serialization":
            if not value:
                raise UnsupportedModelError(f"{where}: safe_serialization=False is not supported: trlax writes "
                                            "model.safetensors only (pytorch_model.bin is a pickle)")
        elif name in IGNORED_ARGS:
            warnings.warn(f"{where}: {name}={value!r} is ignored: {IGNORED_ARGS[name]}", UserWarning, stacklevel=3)
        elif name in REFUSED_ARGS:
            if value is not None and value is not False:  # an empty state_dict asks for something too
                raise UnsupportedModelError(f"{where}: {name} is not supported: {REFUSED_ARGS[name]}")
        else:
            raise TrlaxTypeError(f"{where} got an unexpected keyword argument {name!r}")
