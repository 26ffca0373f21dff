"""The README's "pruned weights at zero in your own Flax loop" example runs as written and keeps
pruned weights exactly zero while the others move."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text()
    section = text.split("## Keeping pruned weights at zero", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_masked_training_example():
    from sculpt_jax.models import get_model, init_model

    model = get_model("resnet8_tiny", num_classes=10)
    variables = init_model(model, jax.random.PRNGKey(0), (8, 8, 1))
    key = jax.random.PRNGKey(1)
    masks = jax.tree.map(
        lambda p: (jax.random.uniform(key, p.shape) > 0.5).astype(jnp.float32),
        variables["params"],
    )
    ns = {"model": model, "variables": variables, "masks": masks}
    exec(_snippet(), ns)  # noqa: S102 - the documented example itself
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 16))
    params, batch_stats, opt_state = ns["params"], variables["batch_stats"], ns["opt_state"]
    start = params
    for _ in range(3):
        params, batch_stats, opt_state, loss = ns["train_step"](
            params, batch_stats, opt_state, x, y
        )
    for p, p0, m in zip(jax.tree.leaves(params), jax.tree.leaves(start), jax.tree.leaves(masks),
                        strict=True):  # fmt: skip
        p, p0, m = np.asarray(p), np.asarray(p0), np.asarray(m)
        assert np.all(p[m == 0] == 0.0)
        if (m == 1).any():
            assert np.any(p[m == 1] != p0[m == 1])
    assert np.isfinite(float(loss))
