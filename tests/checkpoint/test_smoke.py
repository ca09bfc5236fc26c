import jax.numpy as jnp
import numpy as np

import jaxckpt as jc


def test_save_restore_list_variables(tmp_path):
    tree = {"params": {"l1": {"kernel": jnp.ones((1, 5)), "bias": jnp.zeros(5)}}, "step": 3}
    path = jc.save(tmp_path / "ckpt", tree)
    assert jc.list_variables(path) == [
        ("params/l1/bias", (5,), "float32"),
        ("params/l1/kernel", (1, 5), "float32"),
        ("step", (), "int"),
    ]
    out = jc.restore(path, tree)
    np.testing.assert_array_equal(out["params"]["l1"]["kernel"], tree["params"]["l1"]["kernel"])
    assert out["step"] == 3
