"""What a reader of a foreign checkpoint format provides: its leaves, and their bytes on demand.

A source lists its leaves once (from the format's metadata, reading no array data) and then
reads any leaf, or any slice of one, reading only the bytes that slice needs where the format
allows it (safetensors and Orbax do). Paths are tuples of keys: a ``str`` is a dict key, an
``int`` a sequence index, as ``jax.tree_util`` flattens them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

Keys = tuple[str | int, ...]
Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of a foreign checkpoint.

    ``shape``/``dtype`` describe the stored array (for a typed PRNG key, its key data:
    ``uint32[..., 2]`` for threefry). ``key_impl`` names a typed key's implementation
    (``"threefry2x32"``), None otherwise. ``value`` holds a leaf kept in the metadata itself
    (a Python scalar or string), None for an array.
    """

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    key_impl: str | None = None
    value: Any = None


class Source(Protocol):
    """A foreign checkpoint opened for reading."""

    path: str  # the location as the user gave it (normalized)
    format: str  # "orbax", "flax-msgpack", "safetensors": named in messages
    step: int | None  # the training step, where the format records one

    def leaves(self) -> Mapping[Keys, Leaf]:
        """Every leaf, in the order the format lists them."""
        ...

    # Optional: ``nodes() -> Mapping[Keys, str]``, the parts of the tree that hold no leaf
    # (``"none"`` for None, ``"dict"``/``"list"``/``"tuple"`` for an empty container), so a
    # restore without a target rebuilds them too.

    def read(self, keys: Keys, index: Index | None = None) -> np.ndarray:
        """The leaf at ``keys`` (its key data for a typed key), or the slice ``index`` of it."""
        ...

    def close(self) -> None:
        """Releases open files and handles."""
        ...
