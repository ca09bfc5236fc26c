"""Fine-tuning from a pretrained subtree in one call: a head of the same name and a new shape,
prefixes as key tuples and their suggestions, NNX modules and states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxckpt as jc


def pretrained():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "encoder": {
                "kernel": rng.standard_normal((4, 8)).astype(np.float32),
                "bias": rng.standard_normal(8).astype(np.float32),
            },
            "head": {"kernel": np.ones((8, 10), np.float32), "bias": np.ones(10, np.float32)},
        },
        "opt_state": {"count": np.int32(100)},
    }


def new_params():
    return {
        "encoder": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)},
        "head": {"kernel": jnp.full((8, 3), 0.5), "bias": jnp.zeros(3)},
        "extra": jnp.ones(2),
    }


def test_a_head_with_a_new_shape_keeps_its_own_value(tmp_path, caplog):
    saved = pretrained()
    path = jc.save(tmp_path / "c", saved)
    target = new_params()
    # Without the option: the error names the option that would have worked.
    with pytest.raises(jc.StructureMismatchError) as e:
        jc.restore(path, target, prefix="params", partial=True, missing="keep")
    msg = str(e.value)
    assert (
        "['head']['kernel']: the target expects float32[8, 3], the checkpoint has float32[8, 10]"
        in msg
    )
    assert 'Fix: pass mismatched="keep" to keep the target\'s own value for these' in msg
    assert "pass partial=True" not in msg  # it was passed
    out = jc.restore(path, target, prefix="params", partial=True, missing="keep", mismatched="keep")
    np.testing.assert_array_equal(out["encoder"]["kernel"], saved["params"]["encoder"]["kernel"])
    np.testing.assert_array_equal(out["head"]["kernel"], jnp.full((8, 3), 0.5))
    np.testing.assert_array_equal(out["extra"], jnp.ones(2))
    assert "kept the target's own value for 2 leaves whose saved shape or dtype" in caplog.text
    # jc.match reports the same leaves, from the metadata alone.
    status = jc.match(path, target, prefix="params")
    assert sorted(m.path for m in status.mismatched) == ["params/head/bias", "params/head/kernel"]
    assert status.missing == ["params/extra"]
    with pytest.raises(ValueError, match='mismatched must be "error" or "keep", not \'skip\''):
        jc.restore(path, target, mismatched="skip")


def test_prefix_as_a_tuple_of_keys_and_its_suggestions(tmp_path):
    saved = pretrained()
    path = jc.save(tmp_path / "c", saved)
    enc = {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}
    out = jc.restore(path, enc, prefix=("params", "encoder"))
    np.testing.assert_array_equal(out["bias"], saved["params"]["encoder"]["bias"])
    assert not jc.match(path, enc, prefix=("params", "encoder")).mismatched
    with pytest.raises(jc.StructureMismatchError) as e:
        jc.restore(path, enc, prefix="encoder")
    assert str(e.value) == (
        f"prefix='encoder' is not a path in the checkpoint {path}. Did you mean params/encoder? "
        "Fix: pick a prefix among the leading parts of jc.list_variables(path)."
    )
    with pytest.raises(jc.StructureMismatchError, match="Did you mean params/encoder\\?"):
        jc.restore(path, enc, prefix=("params", "encodr"))
    with pytest.raises(TypeError, match="or a tuple of keys such as \\('params', 'backbone'\\)"):
        jc.restore(path, enc, prefix=3)


class Classifier(nnx.Module):
    def __init__(self, classes, rngs):
        self.encoder = nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs))
        self.drop = nnx.Dropout(0.1, rngs=rngs)  # its state holds a typed PRNG key
        self.head = nnx.Linear(8, classes, rngs=rngs)


def test_nnx_state_without_target_is_what_nnx_update_takes(tmp_path):
    """Was {"kernel": {"value": x}}: nnx.update put the dict in the Variable (KeyError: Ellipsis
    when NNX then read it with v[...])."""
    model = Classifier(10, nnx.Rngs(0))
    path = jc.save(tmp_path / "c", nnx.state(model))
    raw = jc.restore(path)
    assert isinstance(raw["head"]["kernel"], np.ndarray)
    fresh = Classifier(10, nnx.Rngs(1))
    nnx.update(fresh, raw)
    np.testing.assert_array_equal(fresh.head.kernel[...], model.head.kernel[...])
    np.testing.assert_array_equal(
        fresh.encoder.layers[1].bias[...], model.encoder.layers[1].bias[...]
    )
    key = fresh.drop.rngs.key[...]
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(key), jax.random.key_data(model.drop.rngs.key[...])
    )
    assert fresh.head(jnp.ones((1, 8))).shape == (1, 10)  # the values are arrays again


def test_an_nnx_module_target_is_restored_in_place(tmp_path):
    pre = Classifier(10, nnx.Rngs(0))
    path = jc.save(tmp_path / "c", nnx.state(pre))
    model = Classifier(3, nnx.Rngs(1))
    head = np.asarray(model.head.kernel[...])
    got = jc.restore(path, model, mismatched="keep")
    assert got is model
    np.testing.assert_array_equal(
        model.encoder.layers[0].kernel[...], pre.encoder.layers[0].kernel[...]
    )
    np.testing.assert_array_equal(model.head.kernel[...], head)  # 10 -> 3 classes: its own
