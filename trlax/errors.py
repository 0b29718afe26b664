"""Exceptions trlax raises for bad input; each message says what is wrong and what to do."""


class TrlaxError(ValueError):
    """Base class: every trlax input error is also a ValueError."""


class CheckpointError(TrlaxError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model."""


class UnsupportedModelError(TrlaxError):
    """A config asks for an architecture or option trlax does not implement."""


class MultiHostError(TrlaxError):
    """A host-only operation met an array that spans devices of other processes (multi-host)."""
