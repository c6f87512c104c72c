"""Errors raised by torchslim. Each names the offending thing and, where possible, the fix."""


class TorchslimError(Exception):
    """Base class of every error torchslim raises on purpose."""


class ConfigError(TorchslimError, ValueError):
    """A config field is missing, of the wrong type or out of range."""


class UnsupportedModelError(TorchslimError):
    """The model (or one of its layers) cannot be handled by the requested technique."""


class DataError(TorchslimError, ValueError):
    """A data set is missing, empty or malformed."""


class CheckpointError(TorchslimError):
    """A checkpoint is corrupt, truncated, tampered with or of an unknown format."""


class WriteError(CheckpointError, OSError):
    """A checkpoint, report or output folder cannot be written (permissions, a read-only or full disk). Also an
    OSError, so that code catching those keeps working."""
