"""Fine-tuning pretrained weights written by other libraries: one `jc.restore` call each.

A pretrained encoder (two Dense layers and a 10-class head) is written first as a safetensors
file (as the Hugging Face hub holds weights) and as an Orbax checkpoint (as JAX training
frameworks write them). A classifier with the same encoder and a *3-class* head of the same
name restores the encoder from either, keeping its own new head:

- ``mismatched="keep"``: the saved head is 10 classes wide, the new one 3: keep the new one;
- ``missing="keep"``: leaves the pretrained weights lack (a new layer) keep their own value;
- ``partial=True``: saved leaves the classifier does not ask for are never read.

Run: ``python examples/fine_tune_pretrained.py [WORKDIR]``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxckpt as jc


class Classifier(nn.Module):
    classes: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="encoder_0")(x))
        x = nn.relu(nn.Dense(16, name="encoder_1")(x))
        x = nn.LayerNorm(name="adapter")(x)  # new in the fine-tuned model
        return nn.Dense(self.classes, name="head")(x)


def pretrained_params() -> dict:
    """The pretrained model: the same encoder, a 10-class head and no adapter."""
    params = Classifier(10).init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    return {k: v for k, v in params.items() if k != "adapter"}


def new_classifier() -> dict:
    return Classifier(3).init(jax.random.key(1), jnp.ones((1, 8)))["params"]


def check(tuned: dict, pretrained: dict, fresh: dict) -> None:
    for layer in ("encoder_0", "encoder_1"):  # the pretrained encoder, bit for bit
        for name in ("kernel", "bias"):
            np.testing.assert_array_equal(tuned[layer][name], pretrained[layer][name])
    np.testing.assert_array_equal(tuned["head"]["kernel"], fresh["head"]["kernel"])  # 3 classes
    np.testing.assert_array_equal(tuned["adapter"]["scale"], fresh["adapter"]["scale"])
    logits = Classifier(3).apply({"params": tuned}, jnp.ones((2, 8)))
    assert logits.shape == (2, 3)


def from_safetensors(workdir: str) -> None:
    """Weights in a safetensors file, named with dots as Hugging Face names them."""
    import safetensors.flax

    pretrained = pretrained_params()
    flat = {
        ".".join(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(pretrained)[0]
    }  # encoder_0.kernel, encoder_0.bias, ..., head.kernel
    path = os.path.join(workdir, "model.safetensors")
    safetensors.flax.save_file(flat, path)

    fresh = new_classifier()
    tuned = jc.restore(path, fresh, partial=True, missing="keep", mismatched="keep")
    check(tuned, pretrained, fresh)
    print(f"safetensors: restored the encoder from {path}; the 3-class head and adapter are new")


def from_orbax(workdir: str) -> None:
    """Weights in an Orbax checkpoint, saved as a training framework saves them."""
    import orbax.checkpoint as ocp

    pretrained = pretrained_params()
    path = os.path.join(workdir, "orbax", "1000")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"params": pretrained, "step": 1000})

    fresh = new_classifier()
    tuned = jc.restore(
        path, fresh, prefix="params", partial=True, missing="keep", mismatched="keep"
    )
    check(tuned, pretrained, fresh)
    print(f"Orbax: restored the encoder from {path}; the 3-class head and adapter are new")


def main(workdir: str) -> None:
    from_safetensors(workdir)
    from_orbax(workdir)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="fine_tune_"))
