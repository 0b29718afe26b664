"""Exceptions trlax raises for bad input; each message says what is wrong and what to do.

Every one is a `TrlaxError`, and keeps the standard base the same mistake raised before
(`ValueError` for all; `TypeError` too for an argument of the wrong kind), so
`except ValueError` / `except TypeError` code keeps working.
"""


class TrlaxError(ValueError):
    """Base class: every trlax input error is also a ValueError."""


class TrlaxTypeError(TrlaxError, TypeError):
    """An argument of the wrong kind (a type, or an option that does not apply): also a TypeError."""


class InputError(TrlaxError):
    """Model inputs of the wrong shape, dtype or range, or params that do not fit the model."""


class DeletedParamsError(InputError, RuntimeError):
    """Params whose arrays a donating jitted step deleted: also the RuntimeError JAX raises for them."""


class CheckpointError(TrlaxError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (a full disk, a file size limit): also the OSError the write raised."""


class UnsupportedModelError(TrlaxError):
    """A config asks for an architecture or option trlax does not implement."""


class MultiHostError(TrlaxError):
    """A host-only operation met an array that spans devices of other processes (multi-host)."""
