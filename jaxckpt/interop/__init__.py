"""Readers of checkpoint formats other libraries write (Orbax, Flax msgpack, safetensors).

Each reader is a :class:`~jaxckpt.interop.source.Source`: the leaves it holds and their bytes.
The rest of jaxckpt (restore, open, match, the CLI) reads a source as it reads a jaxckpt
checkpoint.
"""
