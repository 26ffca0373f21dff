"""Data-parallel steps over a 4-device CPU mesh equal single-device steps (DESIGN.md principle 7).

JAX fixes its device count when it starts, so the check runs in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from sculpt_jax import sharding as shd

CHILD = textwrap.dedent(
    """
    import json, sys, tempfile
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from sculpt_jax import training as ft, masking, sharding as shd

    assert jax.device_count() == 4, jax.devices()

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(4, (3, 3), use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
            return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))

    model = Net()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 16).astype(np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), x[:2])
    masks = masking.ones_masks(variables)
    masks["Conv_0"]["kernel"] = masks["Conv_0"]["kernel"].at[1, :, :, 0].set(0.0)
    tx = ft.make_optimizer(lr=0.1, weight_decay=1e-3, schedule="constant", masks=masks)
    key = jax.random.key(1)
    flip = lambda k, im: jnp.where(jax.random.bernoulli(k, 0.5, (im.shape[0], 1, 1, 1)),
                                   im[:, :, ::-1], im)

    def run(mesh):
        state = ft.create_train_state(None, variables, tx, masks=masks)
        step = ft.make_train_step(model.apply, tx, augment_fn=flip, mesh=mesh)
        ev = ft.make_eval_step(model.apply, mesh=mesh)
        if mesh is not None:
            state = shd.replicate(state, mesh)
        losses = []
        for i in range(4):
            batch = {"image": x[(4 * i) % 16:][:8], "label": y[(4 * i) % 16:][:8]}
            if mesh is not None:
                batch = shd.shard_batch(batch, mesh)
            state, m = step(state, batch, key)
            losses.append(float(m["loss"]))
        ev_out = ft.evaluate(ev, state, x[:14], y[:14], batch_size=8)  # padded last batch
        return state, losses, ev_out

    mesh = shd.make_mesh()
    s1, l1, e1 = run(None)
    s4, l4, e4 = run(mesh)
    sharding = s4.params["Conv_0"]["kernel"].sharding
    assert sharding.is_fully_replicated and len(sharding.device_set) == 4, sharding

    worst = 0.0
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s4), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12)))
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    assert e1["n"] == e4["n"] == 14
    np.testing.assert_allclose(e4["accuracy"], e1["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(e4["loss"], e1["loss"], rtol=1e-5)
    assert np.all(np.asarray(s4.params["Conv_0"]["kernel"])[1, :, :, 0] == 0.0)

    errors = []
    for fn in (lambda: shd.shard_batch({"image": x[:6]}, mesh),
               lambda: ft.make_train_step(model.apply, tx, mesh=mesh)(
                   shd.replicate(ft.create_train_state(None, variables, tx, masks=masks), mesh),
                   {"image": x[:6], "label": y[:6]}, key)):
        try:
            fn()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))

    with tempfile.TemporaryDirectory() as wd:
        splits = {"train": (x, y), "val": (x[:8], y[:8])}
        kw = dict(epochs=1, batch_size=8, workdir=wd, optimizer={"lr": 0.1}, progress=False)
        r = ft.fit(model.apply, variables, splits, mesh=mesh, **kw)
        try:
            ft.fit(model.apply, variables, splits, mesh=mesh, **{**kw, "batch_size": 6,
                                                                  "overwrite": True})
            fit_error = None
        except ValueError as e:
            fit_error = str(e)
    print(json.dumps({"devices": jax.device_count(), "worst_rel": worst, "errors": errors,
                      "fit_val": r.best_val_accuracy, "fit_error": fit_error}))
    """
)


@pytest.fixture(scope="module")
def child_result():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_steps_equal_single_device(child_result):
    assert child_result["devices"] == 4
    assert child_result["worst_rel"] < 1e-5
    assert 0.0 <= child_result["fit_val"] <= 1.0


def test_indivisible_batch_gives_clear_error(child_result):
    for msg in child_result["errors"]:
        assert msg is not None, "a batch of 6 on 4 devices must raise"
        assert "batch size 6" in msg and "4 devices" in msg and "multiple of 4" in msg
    assert "not divisible by the 4 devices" in child_result["fit_error"]


def test_single_device_mesh_in_process():
    mesh = shd.make_mesh()
    assert mesh.axis_names == ("data",) and shd.n_devices(mesh) == len(jax.devices())
    out = shd.shard_batch({"image": np.ones((2, 3), np.float32)}, mesh)
    assert out["image"].sharding == shd.data_sharding(mesh)
    with pytest.raises(ValueError, match="leading batch axis"):
        shd.check_batch({"x": 1.0}, mesh)
