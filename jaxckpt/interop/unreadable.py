"""Checkpoints of formats jaxckpt does not read, recognised so that the error says what a
file is and what to do, instead of "no checkpoint here"."""

from __future__ import annotations

import os
import zipfile

from jaxckpt.errors import CheckpointError

_SAFETENSORS_FIX = (
    "Fix: load it with its own library and save the arrays as safetensors "
    "(safetensors.numpy.save_file(arrays, 'model.safetensors')), which jc.restore reads, or "
    "save the tree with jc.save."
)


def _torch_zip(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def describe(path: str) -> str | None:
    """What the local file ``path`` is, when it is a checkpoint format jaxckpt cannot read."""
    if not os.path.isfile(path):
        if os.path.isfile(path + ".index") or os.path.isfile(path + ".meta"):
            return "a TensorFlow checkpoint (tf.train.Checkpoint)"
        return None
    try:
        with open(path, "rb", buffering=0) as f:
            head = f.read(8)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04") and _torch_zip(path):
        return "a PyTorch checkpoint (torch.save)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (torch.save of PyTorch before 1.6, or pickle.dump)"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (Keras .h5 weights)"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file"
    return None


def check(path: str) -> None:
    """Raises ``CheckpointError`` naming the format when ``path`` is one jaxckpt cannot read."""
    what = describe(path)
    if what is None:
        return
    if "pickle" in what or "PyTorch" in what:
        fix = (
            " A pickle runs code when it is loaded: load it only if you trust its source. Fix: "
            "save its tensors as safetensors with PyTorch, e.g. safetensors.torch.save_file("
            f"torch.load({path!r}, weights_only=True), 'model.safetensors') for a state dict, "
            "then jc.restore('model.safetensors', target)."
        )
    else:
        fix = " " + _SAFETENSORS_FIX
    raise CheckpointError(
        f"{path} is {what}, which jaxckpt does not read: it reads jaxckpt, Orbax, Flax msgpack "
        f"and safetensors checkpoints.{fix}"
    )
