"""Checkpoint I/O: HF <-> Flax names, safetensors and .bin reading, atomic writing, the hub, Orbax states."""

from typing import Any

from trlax.checkpoint.hub import HubOptions, resolve_checkpoint
from trlax.checkpoint.writer import write_checkpoint_dir

# trlax.checkpoint.state imports Orbax (seconds); load it on first use, not with trlax.
_STATE_NAMES = ("RestoredState", "StateCheckpointer", "restore_state", "save_state", "wait_until_finished")


def __getattr__(name: str) -> Any:
    if name in _STATE_NAMES:
        from trlax.checkpoint import state

        return getattr(state, name)
    raise AttributeError(f"module 'trlax.checkpoint' has no attribute {name!r}")


__all__ = ["HubOptions", "resolve_checkpoint", "write_checkpoint_dir", *_STATE_NAMES]
