"""Tests of sculpt_jax.input_pipeline (grain) and the streaming image folders of sculpt_jax.data."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sculpt_jax import checkpoint as ck
from sculpt_jax import data
from sculpt_jax import input_pipeline as ip
from sculpt_jax import training as ft

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

N = 50
X = np.arange(N * 4, dtype=np.int64).reshape(N, 2, 2, 1).astype(np.uint8)
Y = np.arange(N, dtype=np.int32)  # label == example id: batches show the order


def _labels(it):
    return [b["label"].tolist() for b in it]


def test_order_is_deterministic_static_and_covers_the_epoch():
    a = _labels(ip.train_iterator(X, Y, 8, seed=1, epoch=0))
    assert a == _labels(ip.train_iterator(X, Y, 8, seed=1, epoch=0, threads=1, prefetch=1))
    assert a != _labels(ip.train_iterator(X, Y, 8, seed=2, epoch=0))  # another seed
    assert a != _labels(ip.train_iterator(X, Y, 8, seed=1, epoch=1))  # another epoch
    assert len(a) == N // 8 and all(len(b) == 8 for b in a)  # static shapes, remainder dropped
    flat = sum(a, [])
    assert len(set(flat)) == len(flat) == 48 and sorted(flat) != flat  # each once, shuffled
    b = next(ip.train_iterator(X, Y, 8, seed=jax.random.key(1)))
    assert b["image"].dtype == np.uint8 and b["image"].shape == (8, 2, 2, 1)
    assert b["label"].dtype == np.int32 and "mask" not in b
    np.testing.assert_array_equal(b["image"], X[b["label"]])


def test_eval_iterator_equals_eval_batches():
    got = list(ip.eval_iterator(X, Y, 16))
    want = list(data.eval_batches(X, Y, 16))
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w) == {"image", "label", "mask"}
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])
            assert g[k].dtype == w[k].dtype


def test_mid_epoch_resume_from_state_and_from_checkpoint(tmp_path):
    it = ip.train_iterator(X, Y, 4, seed=5, epoch=2)
    head = [next(it)["label"].tolist() for _ in range(3)]
    state = it.get_state()
    with ck.Checkpointer(tmp_path / "c") as c:
        c.save(3, {"x": np.zeros(2)}, {"m": 1}, data_iterator=it)
        tail = _labels(it)
        assert head + tail == _labels(ip.train_iterator(X, Y, 4, seed=5, epoch=2))
        again = ip.train_iterator(X, Y, 4, seed=5, epoch=2)
        again.set_state(state)
        assert _labels(again) == tail
        assert c.has_data(3)
        restored = c.restore_data(3, ip.train_iterator(X, Y, 4, seed=5, epoch=2))
        assert _labels(restored) == tail
        skipped = ip.train_iterator(X, Y, 4, seed=5, epoch=2, start_batch=3)
        assert _labels(skipped) == tail


def test_worker_processes_give_the_same_batches_and_resume():
    want = _labels(ip.train_iterator(X, Y, 4, seed=3))
    it = ip.train_iterator(X, Y, 4, seed=3, workers=2)
    try:
        head = [next(it)["label"].tolist() for _ in range(5)]
        state = it.get_state()
        tail = _labels(it)
    finally:
        ip.close(it)
    assert head + tail == want
    it = ip.train_iterator(X, Y, 4, seed=3, workers=2)
    try:
        it.set_state(state)
        assert _labels(it) == tail
    finally:
        ip.close(it)


def test_process_shards_are_disjoint_equal_and_cover():
    shards = []
    for k in range(3):
        labels = sum(_labels(ip.train_iterator(X, Y, 4, seed=0, shard_index=k, shard_count=3)), [])
        assert len(labels) == (N // 3) // 4 * 4
        full = Y[ip.shard_of(N, k, 3)].tolist()
        assert set(labels) <= set(full) and len(full) == N // 3
        shards.append(set(full))
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert set().union(*shards) == set(range(N // 3 * 3))  # all but the N % 3 tail
    assert ip.shard_of(N) == slice(0, N, 1)  # one JAX process here
    with pytest.raises(ValueError, match="shard_index"):
        ip.shard_of(N, 3, 3)


# -- fit mid-epoch resume ------------------------------------------------------------------------


def _data(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = rng.normal(size=(n, 4, 4, 1)).astype(np.float32) * 0.5
    x[:, :2] += (y[:, None, None, None] - 1.0) * 1.5
    return x, y


def _apply(variables, x, train=False, mutable=None, rngs=None):
    logits = jnp.mean(x, axis=(1, 2)) @ variables["params"]["w"] + variables["params"]["b"]
    return (logits, {}) if mutable else logits


VARS = {"params": {"w": jnp.ones((1, 3)) * 0.1, "b": jnp.zeros(3)}}
SPLITS = {"train": _data(48, 1), "val": _data(16, 2), "test": _data(16, 3)}
KW = dict(epochs=2, batch_size=8, seed=4, optimizer={"lr": 0.1}, progress=False,
          tensorboard=False, checkpoint_every_steps=4)  # fmt: skip


@pytest.mark.parametrize("pipeline", ["grain", "numpy"])
def test_fit_resumes_mid_epoch_bit_identically(tmp_path, pipeline):
    kw = dict(KW, input_pipeline=pipeline)
    full = ft.fit(_apply, VARS, SPLITS, workdir=tmp_path / "full", **kw)
    # 6 steps per epoch; checkpoints at steps 4, 6 (epoch end), 8, 12; killed after step 9.
    part = ft.fit(_apply, VARS, SPLITS, workdir=tmp_path / "cut", stop_after_steps=9, **kw)
    assert not part.completed
    c = ck.Checkpointer(tmp_path / "cut" / "checkpoints")
    assert c.all_steps() == [4, 6, 8] and c.has_data(8) == (pipeline == "grain")
    assert c.read_meta(8)["batch_in_epoch"] == 2
    c.close()
    resumed = ft.fit(_apply, VARS, SPLITS, workdir=tmp_path / "cut", **kw)
    assert resumed.completed and resumed.resumed_from_epoch == 1
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k}
                       for r in h]  # fmt: skip
    assert strip(resumed.history) == strip(full.history)
    result = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert result["input_pipeline"] == pipeline and result["train_input_path"] == "memory"


# -- streaming image folders ---------------------------------------------------------------------


def _write_tree(root: Path, size=(6, 5), n=(4, 2), variable=False, fmt="png"):
    rng = np.random.default_rng(0)
    for split, count in (("train", n[0]), ("test", n[1])):
        for c in ("ant", "bee", "cat"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                h, w = (size[0] + 7 * k, size[1] + 3 * k) if variable else size
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{k:02d}.{fmt}")


def test_streaming_folder_equals_the_in_memory_folder(tmp_path):
    _write_tree(tmp_path / "ds")
    mem = data.load_dataset("folder", tmp_path / "ds", val_size=3, cache_dir=tmp_path / "cache",
                            folder_mode="memory")  # fmt: skip
    st = data.load_dataset("folder", tmp_path / "ds", val_size=3, cache_dir=tmp_path / "cache",
                           folder_mode="stream")  # fmt: skip
    assert data.input_path(mem.train.images) == "memory"
    assert data.input_path(st.train.images) == "stream" and "streamed" in st.source
    assert st.image_shape == mem.image_shape == (6, 5, 3) and st.mean == mem.mean
    for a, b in ((mem.train, st.train), (mem.val, st.val), (mem.test, st.test)):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.images, b.images[np.arange(b.n)])
    want = [(b["image"], b["label"]) for b in ip.train_iterator(*mem.train.arrays, 3, seed=0)]
    got = [(b["image"], b["label"]) for b in ip.train_iterator(*st.train.arrays, 3, seed=0)]
    assert len(got) == len(want) == 3
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)


def test_auto_mode_streams_above_the_size_threshold(tmp_path, monkeypatch):
    _write_tree(tmp_path / "ds")
    kw = dict(val_size=3, cache_dir=tmp_path / "cache")
    assert data.input_path(data.load_dataset("folder", tmp_path / "ds", **kw).train.images) == (
        "memory"
    )
    monkeypatch.setattr(data, "STREAM_THRESHOLD_BYTES", 10)
    assert data.input_path(data.load_dataset("folder", tmp_path / "ds", **kw).train.images) == (
        "stream"
    )
    with pytest.raises(ValueError, match="folder_mode"):
        data.load_dataset("folder", tmp_path / "ds", folder_mode="disk")


def test_variable_size_jpegs_are_resized_per_example(tmp_path):
    _write_tree(tmp_path / "ds", size=(40, 30), variable=True, fmt="jpg")
    s = data.load_dataset("folder", tmp_path / "ds", val_size=3, folder_mode="stream",
                          image_size=16)  # fmt: skip
    assert s.image_shape == (16, 16, 3) and s.train.images.shape == (9, 16, 16, 3)
    b = next(ip.train_iterator(*s.train.arrays, 4, seed=0))
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.uint8
    path = s.test.images.paths[s.test.images.index[0]]
    want = data.center_crop_resize(np.asarray(Image.open(path).convert("RGB")), 18, 16)
    assert np.abs(s.test.images[0].astype(int) - want.astype(int)).max() <= 2  # JPEG draft scale


def test_a_corrupt_jpeg_fails_naming_the_file(tmp_path):
    _write_tree(tmp_path / "ds", n=(5, 2), fmt="jpg")  # headers of 00, 02, 04 are peeked at load
    s = data.load_dataset("folder", tmp_path / "ds", val_size=0, folder_mode="stream")
    bad = tmp_path / "ds" / "train" / "bee" / "01.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # damaged after loading: found when read
    for workers in (0, 1):  # a worker process's error reaches the main process as it is
        with pytest.raises(ValueError, match=r"cannot decode image .*bee/01\.jpg"):
            it = ip.train_iterator(*s.train.arrays, 4, seed=0, shuffle=False, workers=workers)
            try:
                for _ in it:
                    pass
            finally:
                ip.close(it)
    with pytest.raises(ValueError, match=r"cannot decode image .*bee/01\.jpg"):  # stats read it
        data.load_dataset("folder", tmp_path / "ds", val_size=0, folder_mode="stream")
    with pytest.raises(ValueError, match=r"cannot decode image .*bee/01\.jpg"):
        data.load_dataset("folder", tmp_path / "ds", val_size=0, folder_mode="memory",
                          cache_dir=tmp_path / "cache")  # fmt: skip


def test_config_fields_are_validated():
    from sculpt_jax import config

    cfg = config.get_default_config()
    assert cfg.checkpoint_every_steps == 0 and cfg.input.pipeline == "auto"
    config.validate(cfg)
    for key, value, message in (("checkpoint_every_steps", -1, "checkpoint_every_steps"),
                                ("input.pipeline", "tf", "input.pipeline"),
                                ("input.folder_mode", "disk", "input.folder_mode"),
                                ("input.workers", -2, "input.workers")):  # fmt: skip
        bad = config.get_default_config()
        section, _, name = key.rpartition(".")
        (bad[section] if section else bad)[name] = value
        with pytest.raises(ValueError, match=message):
            config.validate(bad)
