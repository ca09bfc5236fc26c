"""TensorFlow's "Training checkpoints" guide, in JAX with jaxckpt (run it: ``make demo``).

Each section below is a section of the guide (see SEED_GUIDE.md). The demo writes
``ROOT/tf_ckpts`` and ``ROOT/tf_list_example`` (ROOT defaults to ``.``; both are removed first,
so that every run starts from scratch): ``python examples/seed_guide.py --root /tmp/demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxckpt as jc

# --------------------------------------------------------------------------- the toy setup


class Net(nn.Module):
    """A simple linear model: the guide's ``Dense(5)`` layer, named ``l1``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(5, name="l1")(x)


class ToyIterator:
    """``x = 0..9``, ``y = 5x + [0, 1, 2, 3, 4]``, in batches of 2, repeated forever.

    Its state is its position (examples read so far); jaxckpt saves it with the tree through
    ``get_state()`` and gives it back through ``set_state()`` on restore.
    """

    def __init__(self) -> None:
        self.position = 0

    def __iter__(self) -> ToyIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        x = (np.arange(self.position, self.position + 2) % 10).astype(np.float32)[:, None]
        self.position += 2
        return {"x": x, "y": x * 5 + np.arange(5, dtype=np.float32)}

    def get_state(self) -> dict[str, int]:
        return {"position": self.position}

    def set_state(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


net = Net()
opt = optax.adam(0.1)


@jax.jit
def train_step(
    params: Any, opt_state: Any, example: dict[str, jax.Array]
) -> tuple[Any, Any, jax.Array]:
    """One step of the guide's training: L1 loss, Adam(0.1)."""

    def loss_fn(p: Any) -> jax.Array:
        return jnp.mean(jnp.abs(net.apply({"params": p}, example["x"]) - example["y"]))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@jax.jit
def init(seed: jax.Array) -> tuple[Any, Any]:
    params = net.init(jax.random.key(seed), jnp.zeros((1, 1)))["params"]
    return params, opt.init(params)


def new_state(seed: int = 0) -> dict[str, Any]:
    """A fresh model, optimizer and iterator: what the guide gathers in ``tf.train.Checkpoint``."""
    params, opt_state = init(np.int32(seed))
    return {"step": 0, "net": params, "optimizer": opt_state, "iterator": ToyIterator()}


def new_manager(directory: str) -> jc.CheckpointManager:
    return jc.CheckpointManager(directory, max_to_keep=3, save_interval_steps=10)


def train_and_checkpoint(
    state: dict[str, Any],
    mngr: jc.CheckpointManager,
    steps: int = 50,
    say: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[jax.Array]]:
    """The guide's ``train_and_checkpoint``: restore if there is a checkpoint, train, save."""
    if mngr.latest_step is not None:
        state = mngr.restore(target=state)  # also moves state["iterator"] to its saved position
        say(f"Restored from {mngr.latest_checkpoint}")
    else:
        say("Initializing from scratch.")
    losses = []
    for _ in range(steps):
        example = next(state["iterator"])
        state["net"], state["optimizer"], loss = train_step(
            state["net"], state["optimizer"], example
        )
        state["step"] += 1
        losses.append(loss)
        if mngr.save(state["step"], state, metrics={"loss": loss}):  # every 10th step
            say(f"Saved checkpoint for step {state['step']}: {mngr.directory}/ckpt-{state['step']}")
            say(f"loss {float(loss):1.2f}")
    return state, losses


# --------------------------------------------------------------------------- the guide


def main(root: str = ".") -> None:
    directory = f"{root}/tf_ckpts"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(f"{root}/tf_list_example", ignore_errors=True)

    print("== Train and checkpoint")
    with new_manager(directory) as mngr:
        train_and_checkpoint(new_state(), mngr)

    print("\n== Restore and continue training (a fresh model, optimizer, iterator and manager)")
    with new_manager(directory) as mngr:
        state, _ = train_and_checkpoint(new_state(seed=1), mngr)
    print(f"step {state['step']}, the iterator at position {state['iterator'].position}")

    print("\n== The manager keeps the newest three checkpoints")
    print(mngr.checkpoints)
    print(sorted(n for n in os.listdir(directory) if n[0] != "."))  # as `ls` shows it
    with open(f"{directory}/checkpoint") as f:
        index = json.load(f)
    print(
        "checkpoint:", [(c["path"], round(c["metrics"]["loss"], 2)) for c in index["checkpoints"]]
    )

    print("\n== Inspect a checkpoint: jc.list_variables")
    path = jc.latest_checkpoint(directory)
    assert path is not None
    for name, shape, dtype in jc.list_variables(path):
        print(f"  {name:<28} {str(list(shape)):<7} {dtype}")

    print("\n== Restore only the bias, into a tiny target")
    to_restore = jnp.zeros(5)
    print(to_restore)
    tiny = {"net": {"l1": {"bias": to_restore}}}
    status = jc.match(path, tiny)  # reads no array
    status.assert_existing_objects_matched()
    print("status.assert_existing_objects_matched(): passed")
    try:
        status.assert_consumed()
    except jc.StructureMismatchError as e:
        print(f"status.assert_consumed() raised StructureMismatchError:\n{e}")
    print(jc.restore(path, tiny, partial=True)["net"]["l1"]["bias"])

    print("\n== Delayed restoration: restore into shapes, no initialised model needed")
    shapes, _ = jax.eval_shape(init, np.int32(0))
    print(jc.restore(path, {"net": shapes}, partial=True)["net"]["l1"]["kernel"])

    print("\n== Read one array lazily: jc.open")
    reader = jc.open(path)  # reads the metadata only
    print(f"{len(reader.paths)} leaves; reading one: net/l1/kernel =", reader["net/l1/kernel"])
    print(
        "optimizer/0/mu/l1/kernel[0, :2] =",
        reader.read("optimizer/0/mu/l1/kernel", (0, slice(0, 2))),
    )

    print("\n== Lists and dicts in the tree")
    listed = [jnp.array(1.0), jnp.array(2.0)]
    mapped = {"one": listed[0], "two": listed[1]}
    save_path = jc.save(f"{root}/tf_list_example", {"listed": listed, "mapped": mapped})
    v2 = jc.restore(save_path, {"mapped": {"two": jnp.array(0.0)}}, partial=True)["mapped"]["two"]
    print("mapped['two'] =", v2)
    v1 = jc.restore(save_path, {"listed": [jnp.array(0.0)]}, partial=True)["listed"][0]
    print("listed[0] =", v1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="where tf_ckpts and tf_list_example go")
    main(parser.parse_args().root)
