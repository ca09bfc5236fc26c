"""The error classes. Each also subclasses the builtin a caller would naturally catch."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error jaxckpt raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint at the path (absent, or a save that never committed)."""


class StructureMismatchError(CheckpointError, ValueError):
    """The target and the checkpoint differ in leaves, shapes or dtypes."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's bytes fail their checksum or its metadata cannot be parsed."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already exists where a save was asked to write."""


class StorageError(CheckpointError, OSError):
    """The local file system refused a write (read-only, permission denied, a path under a file,
    a name too long, a directory removed...); ``errno`` is the file system's error number."""


class UnsupportedLeafError(CheckpointError, TypeError):
    """A leaf of the tree cannot be saved."""


class FormatVersionError(CheckpointError):
    """The checkpoint was written by a newer jaxckpt format than this one reads."""


class CoordinationError(CheckpointError):
    """The processes of a multi-process save could not finish it together.

    A process failed, died or did not reach a barrier in time; nothing was committed.
    """
