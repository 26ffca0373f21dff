"""Tests of sculpt_jax.training: optimizer, masked steps, evaluation, top-K, resumable fit."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sculpt_jax import checkpoint as ck
from sculpt_jax import masking
from sculpt_jax import training as ft


class TinyCNN(nn.Module):
    """conv-BN-relu-conv-relu-pool-dropout-dense on [B, 8, 8, 1] -> [B, 3]."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
        x = nn.relu(x)
        x = nn.relu(nn.Conv(4, (3, 3), name="conv2")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(3, name="head")(x)


MODEL = TinyCNN()


def _data(n, seed):
    """Learnable synthetic 3-class images: the class shifts the mean of one image half."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32) * 0.5
    x[:, :4] += (y[:, None, None, None] - 1.0) * 1.5
    return x, y


@pytest.fixture(scope="module")
def variables():
    return jax.jit(MODEL.init)(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))


@pytest.fixture(scope="module")
def masks(variables):
    """Random 0/1 kernel masks, conv1 filter 0 removed entirely (with its BN scale and bias)."""
    rng = np.random.default_rng(1)
    out = jax.tree.map(lambda x: np.ones(x.shape, np.float32), variables["params"])
    k = (rng.random(out["conv1"]["kernel"].shape) > 0.5).astype(np.float32)
    k[..., 0] = 0.0
    out["conv1"]["kernel"] = k
    out["bn1"]["scale"][0] = out["bn1"]["bias"][0] = 0.0
    out["conv2"]["kernel"] = (rng.random(out["conv2"]["kernel"].shape) > 0.3).astype(np.float32)
    return jax.tree.map(jnp.asarray, out)


def _flip(key, images):
    """A jittable augmentation: random horizontal flip per image."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1], images)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule.


def test_sgd_has_torch_semantics():
    """torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01) on loss 0.5 p^2 from p=2, by hand:
    g1 = 2 + 0.02 = 2.02, buf = 2.02, p = 1.798; g2 = 1.798 * 1.01 = 1.81598,
    buf = 0.9 * 2.02 + 1.81598 = 3.63398, p = 1.798 - 0.363398 = 1.434602."""
    tx = ft.make_optimizer(lr=0.1, momentum=0.9, weight_decay=0.01, schedule="constant")
    params = {"w": jnp.float32(2.0)}
    state = tx.init(params)
    got = []
    for _ in range(2):
        updates, state = tx.update(params, state, params)  # grad of 0.5 p^2 is p
        params = optax.apply_updates(params, updates)
        got.append(float(params["w"]))
    np.testing.assert_allclose(got, [1.798, 1.434602], rtol=1e-6)


def test_multistep_schedule_divides_by_ten_at_50_75_90_percent():
    sched = ft.make_lr_schedule(1e-3, "multistep", total_steps=200)
    got = [float(sched(s)) for s in (0, 99, 100, 149, 150, 179, 180, 199)]
    want = [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    cos = ft.make_lr_schedule(0.1, "cosine", total_steps=10)
    np.testing.assert_allclose([float(cos(0)), float(cos(5)), float(cos(10))], [0.1, 0.05, 0.0])
    with pytest.raises(ValueError, match="total_steps"):
        ft.make_lr_schedule(0.1, "multistep")
    with pytest.raises(ValueError, match="unknown schedule"):
        ft.make_lr_schedule(0.1, "linear", 10)


# ----------------------------------------------------------------------------------------------
# Train and eval steps.


def test_masked_train_step_keeps_pruned_weights_exactly_zero(variables, masks):
    n_traces = []

    def apply_fn(*args, **kwargs):
        n_traces.append(1)  # runs only while tracing
        return MODEL.apply(*args, **kwargs)

    tx = ft.make_optimizer(lr=0.05, weight_decay=1e-3, schedule="constant", masks=masks)
    state = ft.create_train_state(apply_fn, variables, tx, masks=masks)
    step = ft.make_train_step(apply_fn, tx, augment_fn=_flip)
    x, y = _data(16, seed=2)
    key = jax.random.key(3)
    for _ in range(6):
        state, metrics = step(state, {"image": x, "label": y}, key)
    assert len(n_traces) == 1  # one trace for six calls: no retrace
    assert int(state.step) == 6 and np.isfinite(float(metrics["loss"]))

    p0, p = variables["params"], state.params
    for path, m in [(("conv1", "kernel"), None), (("conv2", "kernel"), None)]:
        m = np.asarray(masks[path[0]][path[1]])
        w, w0 = np.asarray(p[path[0]][path[1]]), np.asarray(p0[path[0]][path[1]])
        assert np.all(w[m == 0] == 0.0)  # exactly zero, not just small
        assert np.all(w[m == 1] != w0[m == 1])  # every kept weight moved
    assert float(p["bn1"]["scale"][0]) == 0.0 and float(p["bn1"]["bias"][0]) == 0.0
    _assert_trees_equal(masking.masks_from_state(state.opt_state), masks)
    bs0, bs = variables["batch_stats"]["bn1"]["mean"], state.batch_stats["bn1"]["mean"]
    assert not np.allclose(bs0, bs)  # BatchNorm statistics were updated


def test_unmasked_step_moves_all_weights_and_loss_drops(variables):
    tx = ft.make_optimizer(lr=0.1, schedule="constant")
    state = ft.create_train_state(None, _copy(variables), tx)
    step = ft.make_train_step(MODEL.apply, tx, label_smoothing=0.1)
    x, y = _data(32, seed=4)
    losses = []
    for _ in range(15):
        state, m = step(state, {"image": x, "label": y}, jax.random.key(0))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] * 0.8
    k = np.asarray(state.params["conv1"]["kernel"])
    assert np.all(k != np.asarray(variables["params"]["conv1"]["kernel"]))


def test_create_train_state_with_masks_needs_masked_optimizer(variables, masks):
    with pytest.raises(ValueError, match="masking.masked"):
        ft.create_train_state(None, variables, ft.make_optimizer(schedule="constant"), masks=masks)


def test_eval_step_honours_mask_and_evaluate_matches_hand_count(variables):
    x, y = _data(10, seed=5)
    logits = MODEL.apply(variables, x)
    correct = np.asarray(jnp.argmax(logits, -1)) == y
    losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    eval_step = ft.make_eval_step(MODEL.apply)

    # A padded batch of 8: 5 real examples, 3 padding rows holding other (garbage) examples.
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 0], np.float32)
    c, loss, n = eval_step(
        variables["params"],
        variables["batch_stats"],
        {"image": x[:8], "label": y[:8], "mask": mask},
    )
    real = mask == 1
    assert float(n) == 5.0
    assert float(c) == float(np.sum(correct[:8][real]))
    np.testing.assert_allclose(float(loss), np.sum(losses[:8][real]), rtol=1e-5)

    out = ft.evaluate(eval_step, variables, x, y, batch_size=4)  # batches 4 + 4 + 2(padded)
    assert out["n"] == 10
    assert out["accuracy"] == pytest.approx(correct.mean())
    assert out["loss"] == pytest.approx(losses.mean(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# K candidates.


def _stacked_masks(variables, masks):
    """Three candidates: all-ones, the fixture masks, and a conv2-only pruning."""
    ones = masking.ones_masks(variables["params"])
    third = jax.tree.map(jnp.copy, ones)
    third["conv2"]["kernel"] = third["conv2"]["kernel"].at[:, :, :, :2].set(0.0)
    return ft.stack_trees([ones, masks, third])


def test_candidate_eval_map_and_vmap_agree_with_direct(variables, masks):
    stacked = _stacked_masks(variables, masks)
    x, y = _data(24, seed=6)
    batch = {"image": x, "label": y, "mask": (np.arange(24) < 20).astype(np.float32)}
    acc_map = ft.make_candidate_eval(MODEL.apply, "map")(variables, stacked, batch)
    acc_vmap = ft.make_candidate_eval(MODEL.apply, "vmap")(variables, stacked, batch)
    assert acc_map.shape == (3,)
    want = []
    for k in range(3):
        v = masking.apply_masks(variables, ft.unstack_tree(stacked, k))
        pred = np.asarray(jnp.argmax(MODEL.apply(v, x[:20]), -1))
        want.append(np.mean(pred == y[:20]))
    np.testing.assert_allclose(acc_map, want, rtol=1e-6)
    np.testing.assert_allclose(acc_vmap, want, rtol=1e-6)


def test_topk_step_equals_k_independent_steps(variables, masks):
    stacked = _stacked_masks(variables, masks)
    tx = ft.make_optimizer(lr=0.05, schedule="constant", masks=masking.ones_masks(variables))
    single = ft.make_train_step(MODEL.apply, tx, augment_fn=_flip)
    x, y = _data(16, seed=7)
    batch, key = {"image": x, "label": y}, jax.random.key(8)
    make_one = jax.jit(lambda m: ft.create_train_state(None, variables, tx, masks=m))
    refs = [make_one(ft.unstack_tree(stacked, k)) for k in range(3)]
    ref_metrics = []
    for _ in range(3):
        outs = [single(r, batch, key) for r in refs]
        refs, ref_metrics = [o[0] for o in outs], [o[1] for o in outs]

    for mode in ("vmap", "map"):
        states = ft.create_topk_train_state(variables, tx, stacked)
        topk = ft.make_topk_train_step(MODEL.apply, tx, augment_fn=_flip, mode=mode)
        for _ in range(3):
            states, metrics = topk(states, batch, key)
        assert metrics["loss"].shape == (3,)
        for k in range(3):
            got = ft.unstack_tree(states, k)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(refs[k]), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(metrics["loss"][k], ref_metrics[k]["loss"], rtol=1e-5)
            m = np.asarray(stacked["conv1"]["kernel"][k])
            assert np.all(np.asarray(got.params["conv1"]["kernel"])[m == 0] == 0.0)


# ----------------------------------------------------------------------------------------------
# The resumable host loop.


SPLITS = {"train": _data(96, 10), "val": _data(32, 11), "test": _data(32, 12)}
FIT_KW = dict(
    epochs=2, batch_size=16, seed=3, optimizer={"lr": 0.05}, augment_fn=_flip, progress=False
)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax noise
def test_fit_resume_is_bit_identical_and_corruption_falls_back(variables, tmp_path):
    full = ft.fit(MODEL.apply, variables, SPLITS, workdir=tmp_path / "full", **FIT_KW)
    assert full.completed and full.resumed_from_epoch == 0 and len(full.history) == 2
    assert full.test_accuracy is not None and 0.0 <= full.test_accuracy <= 1.0
    assert full.best_val_accuracy == max(h["val_accuracy"] for h in full.history)
    assert full.history[-1]["lr"] == pytest.approx(0.05 * 0.1**3)  # last step after 90%

    # "Killed" after one epoch, then resumed.
    part = ft.fit(
        MODEL.apply, variables, SPLITS, workdir=tmp_path / "killed", stop_after_epochs=1, **FIT_KW
    )
    assert not part.completed and part.test_accuracy is None
    resumed = ft.fit(MODEL.apply, variables, SPLITS, workdir=tmp_path / "killed", **FIT_KW)
    assert resumed.resumed_from_epoch == 1 and resumed.completed
    _assert_trees_equal(resumed.state, full.state)  # bit-for-bit: params, BN stats, optimizer
    _assert_trees_equal((resumed.params, resumed.batch_stats), (full.params, full.batch_stats))
    assert [h["val_accuracy"] for h in resumed.history] == [h["val_accuracy"] for h in full.history]
    assert resumed.test_accuracy == full.test_accuracy

    records = ck.read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r.get("epoch") for r in records] == [1, 2, None] and records[-1]["final"]
    result = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert result["test_accuracy"] == full.test_accuracy

    # The newest checkpoint of the full run is damaged: fit falls back to epoch 1, redoes epoch 2.
    shutil.rmtree(tmp_path / "full" / "checkpoints" / "2" / "state" / "d")
    again = ft.fit(MODEL.apply, variables, SPLITS, workdir=tmp_path / "full", **FIT_KW)
    assert again.resumed_from_epoch == 1
    _assert_trees_equal(again.state, full.state)
    assert any(d.startswith("corrupt-2-") for d in os.listdir(tmp_path / "full" / "checkpoints"))


def test_fit_refuses_another_runs_workdir_unless_overwrite(variables, tmp_path):
    kw = {**FIT_KW, "epochs": 1}
    ft.fit(MODEL.apply, variables, SPLITS, workdir=tmp_path, **kw)
    with pytest.raises(ValueError, match=r"different run.*lr.*new --workdir or pass --overwrite"):
        ft.fit(MODEL.apply, variables, SPLITS, workdir=tmp_path, **{**kw, "optimizer": {"lr": 0.1}})
    other = jax.tree.map(lambda v: v + 1.0, variables)
    with pytest.raises(ValueError, match="init_digest"):
        ft.fit(MODEL.apply, other, SPLITS, workdir=tmp_path, **kw)
    out = ft.fit(
        MODEL.apply, variables, SPLITS, workdir=tmp_path, overwrite=True, **{**kw, "seed": 9}
    )
    assert out.resumed_from_epoch == 0
    assert len(ck.read_jsonl(tmp_path / "metrics.jsonl")) == 2  # epoch 1 + final, old lines gone


def test_masked_fit_keeps_zeros_and_selects_on_val(variables, masks, tmp_path):
    out = ft.fit(
        MODEL.apply,
        variables,
        SPLITS,
        workdir=tmp_path,
        masks=masks,
        **{**FIT_KW, "optimizer": {"lr": 0.05, "weight_decay": 1e-3}},
    )
    for params in (out.params, out.state.params):
        for leaf, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True):
            assert np.all(np.asarray(leaf)[np.asarray(m) == 0] == 0.0)
    best = max(range(2), key=lambda i: out.history[i]["val_accuracy"])
    assert out.best_epoch == best + 1
    # The caller's variables are not consumed by the donated steps.
    assert np.isfinite(np.asarray(variables["params"]["conv1"]["kernel"])).all()


def test_fit_input_errors(variables, tmp_path):
    with pytest.raises(ValueError, match="no 'val'"):
        ft.fit(MODEL.apply, variables, {"train": SPLITS["train"]}, workdir=tmp_path, **FIT_KW)
    with pytest.raises(ValueError, match="exceeds the 96 training examples"):
        ft.fit(MODEL.apply, variables, SPLITS, workdir=tmp_path, **{**FIT_KW, "batch_size": 128})
    with pytest.raises(ValueError, match="bad optimizer options"):
        ft.fit(
            MODEL.apply, variables, SPLITS, workdir=tmp_path, **{**FIT_KW, "optimizer": {"lrr": 1}}
        )


def test_config_diff_names_the_nested_key():
    """A resume refused for a changed config names the key that changed, inside nested dicts."""
    old = {"model": "resnet20", "opt": {"lr": 0.1, "momentum": 0.9, "schedule": "cosine"}}
    new = {"model": "resnet20", "opt": {"lr": 0.05, "momentum": 0.9, "schedule": "cosine"}}
    assert ft._config_diff(old, new) == "opt.lr: 0.1 -> 0.05"
    assert ft._config_diff(old, {**new, "seed": 1}) == "opt.lr: 0.1 -> 0.05, seed: None -> 1"
    assert ft._config_diff(old, old) == ""
