"""Checkpoint I/O: HF <-> Flax names, safetensors and .bin reading, atomic writing, the hub."""

from trlax.checkpoint.hub import HubOptions, resolve_checkpoint
from trlax.checkpoint.writer import write_checkpoint_dir

__all__ = ["HubOptions", "resolve_checkpoint", "write_checkpoint_dir"]
