"""Tests for sculpt_jax.data: splits, loaders, batching, augmentation, offline failures."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sculpt_jax import data

KEY = jax.random.key(0)
# Jitted once per test module: eager (op-by-op) vmapped augmentation is several times slower on CPU.
aug_cifar = jax.jit(data.augment_cifar, static_argnames=("padding", "flip"))
aug_imagenet = jax.jit(
    data.augment_imagenet, static_argnums=2, static_argnames=("scale", "ratio", "flip")
)


def shared_cifar10_path() -> Path:
    """``<repo>/../shared/data/cifar10-jpeg.tar.gz`` (found from this file), else skip."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
    if not path.is_file():
        pytest.skip(f"real CIFAR-10 JPEG archive not present at {path}")
    return path


# ------------------------------------------------------------------------------------------------
# digits (embedded default)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def test_digits_sizes_dtypes(digits):
    assert (digits.train.n, digits.val.n, digits.test.n) == (1100, 400, 297)
    assert digits.num_classes == 10 and digits.image_shape == (8, 8, 1)
    for s in (digits.train, digits.val, digits.test):
        assert s.images.dtype == np.uint8 and s.images.shape[1:] == (8, 8, 1)
        assert s.labels.dtype == np.int32 and s.labels.shape == (s.n,)
    assert digits.train.images.max() == 255 and digits.train.images.min() == 0


def test_digits_are_sklearn_digits(digits):
    from sklearn.datasets import load_digits

    d = load_digits()
    for s in (digits.train, digits.val, digits.test):
        want = np.rint(d.images[s.index] * 255 / 16).astype(np.uint8)[..., None]
        np.testing.assert_array_equal(s.images, want)
        np.testing.assert_array_equal(s.labels, d.target[s.index])


def test_digits_disjoint_and_complete(digits):
    tr, va, te = (set(s.index.tolist()) for s in (digits.train, digits.val, digits.test))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te == set(range(1797))


def test_digits_deterministic_and_test_split_fixed(digits):
    again = data.load_dataset("digits")
    ours, theirs = (digits.train, digits.val, digits.test), (again.train, again.val, again.test)
    pairs = zip(ours, theirs, strict=True)
    for a, b in pairs:
        np.testing.assert_array_equal(a.index, b.index)
        np.testing.assert_array_equal(a.images, b.images)
    other = data.load_dataset("digits", seed=1)
    np.testing.assert_array_equal(other.test.index, digits.test.index)  # test never moves
    assert not np.array_equal(other.val.index, digits.val.index)  # val follows the seed
    assert not set(other.val.index.tolist()) & set(digits.test.index.tolist())


def test_digits_stratified(digits):
    full = np.bincount(np.concatenate([s.labels for s in (digits.train, digits.val, digits.test)]))
    for s in (digits.val, digits.test):
        want = s.n * full / full.sum()
        assert np.all(np.abs(np.bincount(s.labels, minlength=10) - want) < 1.0 + 1e-9)


def test_digits_val_size_options():
    assert data.load_dataset("digits", val_size=0.1).val.n == 150  # 10% of the 1,500 left
    assert data.load_dataset("digits", val_size=50).val.n == 50
    assert data.load_dataset("digits", val_size=-1).val.n == 400  # config's "-1: default"
    with pytest.raises(ValueError, match="val_size"):
        data.load_dataset("digits", val_size=1500)
    with pytest.raises(ValueError, match="fraction"):
        data.load_dataset("digits", val_size=1.5)


def test_digits_normalisation_uses_train_stats(digits):
    x = data.normalize(digits.train.images, digits.mean, digits.std)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-5)


def test_readonly_arrays(digits):
    with pytest.raises(ValueError):
        digits.train.images[0, 0, 0, 0] = 1


# ------------------------------------------------------------------------------------------------
# splits and normalisation
# ------------------------------------------------------------------------------------------------


def test_stratified_split_golden():
    labels = np.array([0] * 6 + [1] * 4)
    a, b, rest = data.stratified_split(labels, [5, 3], seed=3)
    assert np.bincount(labels[a], minlength=2).tolist() == [3, 2]
    assert len(b) == 3 and len(rest) == 2
    assert sorted(np.concatenate([a, b, rest]).tolist()) == list(range(10))
    again = data.stratified_split(labels, [5, 3], seed=3)
    for x, y in zip((a, b, rest), again, strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="sum to at most"):
        data.stratified_split(labels, [8, 3], seed=0)


def test_normalize_golden_numpy_and_jit():
    x = np.array([[[[0, 255, 51]]]], np.uint8)
    want = np.array([[[[-1.0, 1.0, (0.2 - 0.2) / 0.1]]]], np.float32)
    got = data.normalize(x, (0.5, 0.5, 0.2), (0.5, 0.5, 0.1))
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    jitted = jax.jit(lambda v: data.normalize(v, (0.5, 0.5, 0.2), (0.5, 0.5, 0.1)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(jitted), want, atol=1e-6)


def test_channel_stats_golden():
    x = np.zeros((2, 1, 1, 2), np.uint8)
    x[0, ..., 0], x[1, ..., 0] = 0, 255  # channel 0: mean 0.5, std 0.5; channel 1: constant
    mean, std = data.channel_stats(x)
    np.testing.assert_allclose(mean, (0.5, 0.0))
    np.testing.assert_allclose(std, (0.5, 1.0))  # zero std replaced by 1


# ------------------------------------------------------------------------------------------------
# batching
# ------------------------------------------------------------------------------------------------


def _toy(n=10):
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 1), np.uint8)
    return images, np.arange(n, dtype=np.int32)


def test_iterate_batches_static_shapes_no_repeats():
    images, labels = _toy(10)
    batches = list(data.iterate_batches(images, labels, 4, seed=0, epoch=0))
    assert len(batches) == 2 == data.batches_per_epoch(10, 4)
    seen = []
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (4, 2, 2, 1) and b["image"].dtype == np.uint8
        assert b["label"].dtype == np.int32
        np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"])  # pairs stay together
        seen += b["label"].tolist()
    assert len(set(seen)) == 8


def test_iterate_batches_deterministic_and_resumable():
    images, labels = _toy(64)
    run = lambda **kw: [b["label"].tolist() for b in data.iterate_batches(images, labels, 8, **kw)]
    assert run(seed=3, epoch=2) == run(seed=3, epoch=2)
    assert run(seed=3, epoch=2) != run(seed=3, epoch=1)
    assert run(seed=3, epoch=2) != run(seed=4, epoch=2)
    assert run(seed=3, epoch=2, start_batch=5) == run(seed=3, epoch=2)[5:]
    assert run(seed=KEY, epoch=0) == run(seed=jax.random.key(0), epoch=0)
    assert run(seed=KEY, epoch=0) != run(seed=jax.random.key(1), epoch=0)
    assert sum(run(shuffle=False), []) == list(range(64))


def test_eval_batches_cover_every_example_once():
    images, labels = _toy(10)
    batches = list(data.eval_batches(images, labels, 4))
    assert len(batches) == 3
    real = []
    for b in batches:
        assert b["image"].shape == (4, 2, 2, 1) and b["mask"].dtype == np.float32
        real += b["label"][b["mask"] == 1].tolist()
    assert real == list(range(10))
    last = batches[-1]
    np.testing.assert_array_equal(last["mask"], [1, 1, 0, 0])
    assert not last["image"][2:].any() and not last["label"][2:].any()


def test_batch_size_larger_than_split_errors():
    images, labels = _toy(3)
    with pytest.raises(ValueError, match="drop_remainder=False"):
        list(data.iterate_batches(images, labels, 4))


# ------------------------------------------------------------------------------------------------
# augmentation
# ------------------------------------------------------------------------------------------------


def _match_window(out, image, padding):
    """(dy, dx, flipped) such that out is that window of the zero-padded image, else None."""
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            win = padded[dy : dy + h, dx : dx + w]
            if np.array_equal(out, win):
                return dy, dx, False
            if np.array_equal(out, win[:, ::-1]):
                return dy, dx, True
    return None


def test_augment_cifar_crops_and_flips_real_windows():
    image = (np.arange(32 * 32 * 3).reshape(32, 32, 3) % 251 + 1).astype(np.uint8)  # no zeros
    images = np.broadcast_to(image, (16, 32, 32, 3))
    out = np.asarray(aug_cifar(KEY, images))
    assert out.shape == images.shape and out.dtype == np.uint8
    found = [_match_window(o, image, 4) for o in out]
    assert all(f is not None for f in found)
    assert any(f[:2] != (4, 4) for f in found)  # content really shifts
    assert any(f[2] for f in found) and not all(f[2] for f in found)
    np.testing.assert_array_equal(out, np.asarray(aug_cifar(KEY, images)))
    assert not np.array_equal(out, np.asarray(aug_cifar(jax.random.key(1), images)))


def test_make_augment_digits_never_flips_and_pads_by_one():
    image = (np.arange(64).reshape(8, 8, 1) + 1).astype(np.uint8)
    fn = data.make_augment("digits", (8, 8, 1))
    out = np.asarray(fn(KEY, np.broadcast_to(image, (64, 8, 8, 1))))
    found = [_match_window(o, image, 1) for o in out]
    assert all(f is not None and not f[2] for f in found)
    assert {f[:2] for f in found} == {(dy, dx) for dy in range(3) for dx in range(3)}


def test_make_augment_normalised_input_pads_black():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    raw = data.make_augment("cifar10", (32, 32, 3))
    normed = data.make_augment("cifar10", (32, 32, 3), mean=data.CIFAR_MEAN, std=data.CIFAR_STD)
    a = data.normalize(np.asarray(raw(KEY, x)), data.CIFAR_MEAN, data.CIFAR_STD)
    b = np.asarray(normed(KEY, data.normalize(x, data.CIFAR_MEAN, data.CIFAR_STD)))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_make_augment_no_retrace_and_vmappable():
    fn = data.make_augment("cifar10", (32, 32, 3))
    x = np.zeros((4, 32, 32, 3), np.float32)
    fn(KEY, x)
    fn(jax.random.key(5), x + 1)
    assert fn._cache_size() == 1
    keys = jax.random.split(KEY, 3)
    xs = np.random.default_rng(0).random((3, 4, 32, 32, 3)).astype(np.float32)
    batched = jax.jit(jax.vmap(data.augment_cifar))(keys, xs)
    for k in range(3):
        np.testing.assert_array_equal(batched[k], fn(keys[k], xs[k]))
    with pytest.raises(ValueError, match="unknown dataset"):
        data.make_augment("mnist", (28, 28, 1))


def test_augment_imagenet_shapes_and_full_crop_is_resize():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    out = aug_imagenet(KEY, x, 24)
    assert out.shape == (2, 24, 24, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, aug_imagenet(KEY, x, 24))
    assert not np.allclose(out, aug_imagenet(jax.random.key(1), x, 24))
    assert float(out.min()) >= -1e-3 and float(out.max()) <= 255 + 1e-3
    const = aug_imagenet(KEY, np.full((2, 40, 40, 3), 7, np.uint8), 24)
    np.testing.assert_allclose(const, 7.0, atol=1e-4)
    full = aug_imagenet(KEY, x, 24, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    want = jax.image.resize(x.astype(np.float32), (2, 24, 24, 3), "linear", antialias=True)
    np.testing.assert_allclose(full, want, atol=1e-3)


def test_center_crop_resize_golden():
    rng = np.random.default_rng(0)
    sq = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(data.center_crop_resize(sq), sq[16:240, 16:240])
    tall = rng.integers(0, 256, (512, 256, 3), dtype=np.uint8)  # shorter side already 256
    np.testing.assert_array_equal(data.center_crop_resize(tall), tall[144:368, 16:240])
    assert data.center_crop_resize(rng.integers(0, 256, (300, 400, 3), np.uint8)).shape == (
        224,
        224,
        3,
    )
    grey = rng.integers(0, 256, (100, 80, 1), dtype=np.uint8)
    assert data.center_crop_resize(grey, 64, 56).shape == (56, 56, 1)


# ------------------------------------------------------------------------------------------------
# CIFAR python pickles
# ------------------------------------------------------------------------------------------------


def _write_cifar10_pickles(d: Path, per_batch=20):
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_images = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        all_images.append(imgs)
        entry = {
            b"data": imgs.transpose(0, 3, 1, 2).reshape(per_batch, 3072),
            b"labels": [i % 10 for i in range(per_batch)],
        }
        (d / name).write_bytes(pickle.dumps(entry))
    names = [f"c{i}".encode() for i in range(10)]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return np.concatenate(all_images[:5]), all_images[5]


def test_cifar10_pickles(tmp_path):
    train_x, test_x = _write_cifar10_pickles(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path / "cifar-10-batches-py", tmp_path):  # the batch dir or its parent
        s = data.load_dataset("cifar10", root, val_size=10, cache_dir=tmp_path / "cache")
        assert (s.train.n, s.val.n, s.test.n) == (90, 10, 20)
        assert np.bincount(s.val.labels).tolist() == [1] * 10
        np.testing.assert_array_equal(s.train.images, train_x[s.train.index])
        np.testing.assert_array_equal(s.val.images, train_x[s.val.index])
        np.testing.assert_array_equal(s.test.images, test_x)
        assert not set(s.train.index.tolist()) & set(s.val.index.tolist())
        assert s.mean == data.CIFAR_MEAN and s.std == data.CIFAR_STD
        assert s.class_names == tuple(f"c{i}" for i in range(10)) and s.image_shape == (32, 32, 3)
    with pytest.raises(ValueError, match="expects 100"):
        data.load_dataset("cifar100", tmp_path, val_size=10)


def test_official_cifar10_archive_as_downloaded(tmp_path):
    # cifar-10-python.tar.gz from the CIFAR site: cifar-10-batches-py/ first, pickles inside
    train_x, test_x = _write_cifar10_pickles(tmp_path / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    s = data.load_dataset("cifar10", archive, val_size=10, cache_dir=tmp_path / "cache")
    assert (s.train.n, s.val.n, s.test.n) == (90, 10, 20) and "official archive" in s.source
    np.testing.assert_array_equal(s.train.images, train_x[s.train.index])
    np.testing.assert_array_equal(s.test.images, test_x)
    assert s.class_names == tuple(f"c{i}" for i in range(10))
    broken = tmp_path / "broken.tar.gz"
    with tarfile.open(broken, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py" / "data_batch_1",
                arcname="cifar-10-batches-py/data_batch_1")  # fmt: skip
    with pytest.raises(ValueError, match="a CIFAR python batch is missing"):
        data.load_dataset("cifar10", broken, val_size=10)


def test_cifar100_pickles(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 300), ("test", 100)):
        imgs = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        entry = {b"data": imgs, b"fine_labels": [i % 100 for i in range(n)], b"coarse_labels": []}
        (d / name).write_bytes(pickle.dumps(entry))
    s = data.load_dataset("cifar100", tmp_path, val_size=100)
    assert (s.train.n, s.val.n, s.test.n, s.num_classes) == (200, 100, 100, 100)
    assert np.bincount(s.val.labels).tolist() == [1] * 100


# ------------------------------------------------------------------------------------------------
# image folders and archives
# ------------------------------------------------------------------------------------------------


def _pixel(split, c, k):
    return [10 * c + k, {"train": 1, "test": 2, "val": 3}[split], 200]


def _write_folder(root: Path, classes=("cat", "ant", "bee"), n=None, mode="RGB", size=(5, 6)):
    n = n or {"train": 4, "test": 2}
    for split, count in n.items():
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                px = _pixel(split, sorted(classes).index(c), k)
                arr = np.full((*size, 3), px, np.uint8)
                img = Image.fromarray(arr).convert(mode)
                img.save(root / split / c / f"{k:02d}.png")
    (root / "train" / "ant" / "notes.txt").write_text("ignored")


def test_image_folder_loader_and_cache(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    _write_folder(root)
    cache = tmp_path / "cache"
    s = data.load_dataset("folder", root, val_size=3, cache_dir=cache)
    assert s.class_names == ("ant", "bee", "cat")  # alphabetical label ids
    assert (s.train.n, s.val.n, s.test.n) == (9, 3, 6) and s.image_shape == (5, 6, 3)
    assert np.bincount(s.val.labels).tolist() == [1, 1, 1]
    for split in (s.train, s.val, s.test):
        for img, y in zip(split.images, split.labels, strict=True):
            assert img[0, 0, 0] // 10 == y  # the pixel encodes the class it was saved under
    np.testing.assert_array_equal(s.test.images[:, 0, 0, 0], [0, 1, 10, 11, 20, 21])
    assert s.test.images[0, 0, 0, 1] == 2
    mean, std = data.channel_stats(s.train.images)
    assert s.mean == mean and s.std == std
    files = list(cache.glob("imagefolder-*.npz"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    def boom(*a, **k):
        raise AssertionError("decoded again although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(data._Decoder, "add", boom)
        again = data.load_dataset("folder", root, val_size=3, cache_dir=cache)
    np.testing.assert_array_equal(again.train.images, s.train.images)
    # Changing a file changes the cache key.
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(root / "test" / "ant" / "00.png")
    os.utime(root / "test" / "ant" / "00.png", ns=(1, 1))
    changed = data.load_dataset("folder", root, val_size=3, cache_dir=cache)
    assert changed.test.images[0].max() == 0 and len(list(cache.glob("imagefolder-*.npz"))) == 2
    for f in cache.glob("imagefolder-*.npz"):
        f.write_bytes(b"garbage")  # a foreign / truncated cache entry
    with pytest.raises(ValueError, match="delete it"):
        data.load_dataset("folder", root, val_size=3, cache_dir=cache)


def test_image_folder_grey_val_and_wrapper(tmp_path, monkeypatch):
    root = tmp_path / "wrap" / "inner"  # a single top folder around train/ test/ val/
    _write_folder(root, n={"train": 3, "val": 1, "test": 1}, mode="L")
    monkeypatch.setenv("SCULPT_JAX_CACHE", str(tmp_path / "envcache"))
    s = data.load_dataset("folder", tmp_path / "wrap")
    assert s.image_shape == (5, 6, 1)  # all grey: one channel
    assert (s.train.n, s.val.n, s.test.n) == (9, 3, 3)  # its own val/ is used
    assert len(list((tmp_path / "envcache").glob("*.npz"))) == 1
    # One RGB image among grey ones: everything becomes RGB, grey replicated.
    Image.fromarray(np.full((5, 6, 3), (1, 2, 3), np.uint8)).save(root / "test" / "ant" / "00.png")
    mixed = data.load_dataset("folder", tmp_path / "wrap", cache_dir=tmp_path / "c2")
    assert mixed.image_shape == (5, 6, 3)
    np.testing.assert_array_equal(mixed.test.images[0, 0, 0], [1, 2, 3])
    px = mixed.train.images[0, 0, 0]
    assert px[0] == px[1] == px[2]


def test_tarball_equals_folder(tmp_path):
    root = tmp_path / "tree" / "mini"
    _write_folder(root)
    tar_path = tmp_path / "mini.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(root, arcname="mini")
    a = data.load_dataset("folder", tar_path, val_size=3, cache_dir=tmp_path / "c")
    b = data.load_dataset("folder", root, val_size=3, cache_dir=tmp_path / "c")
    for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test), strict=True):
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.labels, y.labels)
    assert "archive" in a.source and a.class_names == b.class_names


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="valid names: digits, cifar10"):
        data.load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_dataset("folder", tmp_path / "nope")
    with pytest.raises(ValueError, match="needs data_dir"):
        data.load_dataset("folder")
    with pytest.raises(ValueError, match="takes no data_dir"):
        data.load_dataset("digits", tmp_path)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="Expected one of these layouts"):
        data.load_dataset("folder", junk)
    with pytest.raises(ValueError, match="not a .tar.gz"):
        data.load_dataset("folder", junk / "a.txt")
    empty = tmp_path / "empty"
    _write_folder(empty)
    (empty / "train" / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        data.load_dataset("folder", empty, cache_dir=tmp_path / "c")
    sizes = tmp_path / "sizes"
    _write_folder(sizes)
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(sizes / "test" / "bee" / "09.png")
    with pytest.raises(ValueError, match="share one size"):
        data.load_dataset("folder", sizes, cache_dir=tmp_path / "c")
    noimg = tmp_path / "noimg"
    (noimg / "train" / "a").mkdir(parents=True)
    (noimg / "test" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="hold no .jpg"):
        data.load_dataset("folder", noimg, cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------------------------
# tensorflow-datasets (offline)
# ------------------------------------------------------------------------------------------------


def test_tfds_missing_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_default"))
    for kwargs in ({"data_dir": tmp_path}, {}):
        t0 = time.perf_counter()
        with pytest.raises(FileNotFoundError) as err:
            data.load_dataset("cifar10", **kwargs)
        assert time.perf_counter() - t0 < 5.0
        msg = str(err.value)
        assert "tfds build cifar10 --file_format=array_record" in msg
        assert "~/tensorflow_datasets" in msg and "--data-dir" in msg
        assert "never downloads" in msg
    assert not (tmp_path / "cifar10").exists()  # nothing was created
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="manual_dir"):
        data.load_dataset("imagenet2012", tmp_path)
    assert time.perf_counter() - t0 < 5.0
    vdir = tmp_path / "cifar100" / "3.0.2"
    vdir.mkdir(parents=True)
    (vdir / "dataset_info.json").write_text("{}")
    (vdir / "cifar100-train.tfrecord-00000-of-00001").write_text("")
    with pytest.raises(FileNotFoundError, match="convert_format"):
        data.load_dataset("cifar100", tmp_path)


def _fake_prepared(root: Path, name: str, version: str) -> Path:
    """What a prepared dataset looks like on disk; tfds.testing.mock_data serves the records."""
    vdir = root / name / version
    vdir.mkdir(parents=True)
    (vdir / "dataset_info.json").write_text("{}")
    (vdir / f"{name}-train.array_record-00000-of-00001").write_text("")
    return root


def test_tfds_cifar10_mock(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    root = _fake_prepared(tmp_path, "cifar10", "3.0.2")
    with tfds.testing.mock_data(num_examples=40):
        s = data.load_dataset("cifar10", root, val_size=10, cache_dir=tmp_path / "c")
        s2 = data.load_dataset("cifar10", root, val_size=10, cache_dir=tmp_path / "c")
    assert (s.train.n, s.val.n, s.test.n) == (30, 10, 40)
    assert s.train.images.dtype == np.uint8 and s.train.images.shape[1:] == (32, 32, 3)
    assert s.train.labels.dtype == np.int32 and s.num_classes == 10
    assert s.mean == data.CIFAR_MEAN and "tensorflow-datasets" in s.source
    assert not set(s.train.index.tolist()) & set(s.val.index.tolist())
    np.testing.assert_array_equal(s.val.index, s2.val.index)


def test_tfds_imagenet_mock_lazy(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    root = _fake_prepared(tmp_path, "imagenet2012", "5.1.0")
    with tfds.testing.mock_data(num_examples=24):
        s = data.load_dataset("imagenet2012", root, val_size=4, image_size=32, cache_dir=tmp_path)
        assert isinstance(s.train.images, data.LazyImages)
        assert s.image_shape == (32, 32, 3) and s.mean == data.IMAGENET_MEAN
        assert (s.train.n, s.val.n, s.test.n, s.num_classes) == (20, 4, 24, 1000)
        b = next(data.iterate_batches(*s.train.arrays, 8, seed=0))
        assert b["image"].shape == (8, 37, 37, 3) and b["image"].dtype == np.uint8
        e = list(data.eval_batches(*s.test.arrays, 16))
        assert [x["image"].shape for x in e] == [(16, 32, 32, 3)] * 2
        assert sum(float(x["mask"].sum()) for x in e) == 24
        np.testing.assert_array_equal(s.val.images[np.arange(2)], s.val.images[np.arange(2)])
    assert len(list(tmp_path.glob("labels-imagenet2012-*.npz"))) == 2
    aug = data.make_augment(s.name, s.image_shape)
    assert aug(KEY, b["image"]).shape == (8, 32, 32, 3)


# ------------------------------------------------------------------------------------------------
# the real CIFAR-10 (JPEG) archive, when present
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cifar10_jpeg(tmp_path_factory):
    path = shared_cifar10_path()
    env = os.environ.get("SCULPT_JAX_CACHE")
    cache = Path(env) if env else tmp_path_factory.getbasetemp() / "sculpt_jax_cache"
    t0 = time.perf_counter()
    first = data.load_dataset("cifar10", path, cache_dir=cache)
    t1 = time.perf_counter()
    second = data.load_dataset("cifar10", path, cache_dir=cache)
    t2 = time.perf_counter()
    print(f"\nCIFAR-10 JPEG: first load {t1 - t0:.1f} s, cached load {t2 - t1:.2f} s ({cache})")
    return path, first, second, t2 - t1


def test_real_cifar10_jpeg(cifar10_jpeg):
    path, s, again, cached_s = cifar10_jpeg
    assert s.class_names == (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )
    assert s.train.n + s.val.n == 50_000 and s.test.n == 10_000 and s.val.n == 5_000
    assert s.image_shape == (32, 32, 3) and s.num_classes == 10
    assert np.bincount(s.train.labels).tolist() == [4500] * 10
    assert np.bincount(s.val.labels).tolist() == [500] * 10
    assert np.bincount(s.test.labels).tolist() == [1000] * 10
    assert not set(s.train.index.tolist()) & set(s.val.index.tolist())
    assert set(s.train.index.tolist()) | set(s.val.index.tolist()) == set(range(50_000))
    np.testing.assert_array_equal(again.val.images, s.val.images)
    np.testing.assert_array_equal(again.test.images, s.test.images)
    assert cached_s < 15.0
    # Real natural images: per-channel means close to the published CIFAR-10 constants.
    mean, _ = data.channel_stats(s.test.images)
    np.testing.assert_allclose(mean, data.CIFAR_MEAN, atol=0.01)
    # Test example 0 is test/airplane/0000.jpg, decoded the same way.
    with tarfile.open(path, "r:gz") as tar:
        member = next(m for m in tar if m.name.endswith("test/airplane/0000.jpg"))
        raw = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    np.testing.assert_array_equal(s.test.images[0], np.asarray(raw))
    assert s.test.labels[0] == 0 and s.test.labels[-1] == 9


# ------------------------------------------------------------------------------------------------
# every split of every dataset path has the shape the model is traced at
# ------------------------------------------------------------------------------------------------


def _assert_model_shapes(s: data.DataSplits, stored_train: tuple[int, ...]) -> None:
    """val / test (what validation, the search's reward and held-out sets, and test feed the model)
    have ``s.image_shape``; train is stored at ``stored_train`` and reaches ``s.image_shape``
    through the train augmentation and through `data.eval_images` (no-augment / BN batches)."""
    shape = tuple(s.image_shape)
    for name in ("val", "test"):
        split = getattr(s, name)
        assert tuple(split.images.shape[1:]) == shape, name
        batch = next(data.eval_batches(*split.arrays, 3))
        assert batch["image"].shape == (3, *shape), name
    assert tuple(s.train.images.shape[1:]) == stored_train
    batch = next(data.iterate_batches(*s.train.arrays, 3, seed=0))
    assert batch["image"].shape == (3, *stored_train)
    assert data.make_augment(s.name, shape)(KEY, batch["image"]).shape == (3, *shape)
    plain = data.eval_images(s.train.images, shape)
    assert tuple(plain.shape[1:]) == shape and plain[np.arange(2)].shape == (2, *shape)
    sub = data.eval_split(s.train.take(np.arange(3)), shape)  # e.g. BN recalibration batches
    assert sub.images[np.arange(3)].shape == (3, *shape)


@pytest.mark.parametrize("size", [32, 64])
def test_every_split_of_every_path_has_the_model_input_shape(tmp_path, size):
    tfds = pytest.importorskip("tensorflow_datasets")
    c = tmp_path / "cache"
    _assert_model_shapes(data.load_dataset("digits"), (8, 8, 1))
    _write_cifar10_pickles(tmp_path / "cifar-10-batches-py")
    s = data.load_dataset("cifar10", tmp_path, val_size=10, cache_dir=c, image_size=size)
    _assert_model_shapes(s, (32, 32, 3))  # image_size is for ImageNet only
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    _assert_model_shapes(data.load_dataset("cifar10", archive, val_size=10), (32, 32, 3))
    for n in ({"train": 4, "test": 2}, {"train": 3, "val": 1, "test": 1}):  # carved / own val/
        root = tmp_path / f"folder{len(n)}" / "ds"
        _write_folder(root, n=n, size=(size, size))
        s = data.load_dataset("folder", root, val_size=3, cache_dir=c)
        _assert_model_shapes(s, (size, size, 3))
        tar_path = tmp_path / f"folder{len(n)}.tar.gz"
        with tarfile.open(tar_path, "w:gz") as tar:
            tar.add(root, arcname="ds")
        _assert_model_shapes(data.load_dataset("folder", tar_path, val_size=3, cache_dir=c),
                             (size, size, 3))  # fmt: skip
    _fake_prepared(tmp_path / "tfds", "cifar10", "3.0.2")
    _fake_prepared(tmp_path / "tfds", "imagenet2012", "5.1.0")
    with tfds.testing.mock_data(num_examples=24):
        s = data.load_dataset("cifar10", tmp_path / "tfds", val_size=6, cache_dir=c)
        _assert_model_shapes(s, (32, 32, 3))
        s = data.load_dataset("imagenet2012", tmp_path / "tfds", val_size=6, image_size=size,
                              cache_dir=c)  # fmt: skip
        stored = round(size * 256 / 224)
        assert s.image_shape == (size, size, 3) and isinstance(s.val.images, data.LazyImages)
        _assert_model_shapes(s, (stored, stored, 3))
        # The carved val takes the eval transform (resize, centre crop) of the same records.
        x = s.val.images.source[int(s.val.index[0])]["image"]
        np.testing.assert_array_equal(
            s.val.images[np.arange(1)][0],
            data.center_crop_resize(np.asarray(x, np.uint8), stored, size),
        )


def _write_imagenet_tree(root: Path, n_classes: int) -> None:
    """An ILSVRC-style folder tree: ``n_classes`` synset folders, variable-size RGB JPEGs (train: a
    landscape and a portrait image per class; test: one)."""
    rng = np.random.default_rng(0)
    for split, sizes in (("train", ((30, 40), (44, 28))), ("test", ((36, 36),))):
        for c in range(n_classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for k, (h, w) in enumerate(sizes):
                px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(px).save(d / f"n{c:08d}_{k}.JPEG", quality=90)


def test_imagenet2012_folder_tree_streams_with_the_imagenet_transforms(tmp_path):
    """`imagenet2012` given a 1,000-class folder tree (the ILSVRC train/val layout) always streams
    (nothing decoded up front), stores train at the resize side for the random-resized crop, gives
    val (carved from train) and test the eval transform of the same files, and the ImageNet
    normalisation; the wrong number of classes is one clear error."""
    _write_imagenet_tree(tmp_path / "few", 999)
    with pytest.raises(ValueError, match="999 classes but name='imagenet2012' expects 1000"):
        data.load_dataset("imagenet2012", tmp_path / "few", val_size=10, cache_dir=tmp_path / "c")
    root = tmp_path / "ilsvrc"
    _write_imagenet_tree(root, 1000)
    size = 32
    s = data.load_dataset("imagenet2012", root, val_size=100, image_size=size,
                          cache_dir=tmp_path / "c")  # fmt: skip
    stored = round(size * 256 / 224)
    assert s.num_classes == 1000 and (s.mean, s.std) == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert (s.train.n, s.val.n, s.test.n) == (1900, 100, 1000)
    for split in (s.train, s.val, s.test):
        assert isinstance(split.images, data.FolderImages)
    assert "streamed" in s.source
    _assert_model_shapes(s, (stored, stored, 3))
    for split in (s.val, s.test):  # resize 256 (scaled) + centre crop 224 (scaled) of the file
        path = split.images.paths[int(split.images.index[0])]
        with Image.open(path) as im:
            want = data.center_crop_resize(np.asarray(im.convert("RGB")), stored, size)
        np.testing.assert_array_equal(split.images[np.arange(1)][0], want)


def test_streamed_sets_decode_on_threads_in_order_and_fail_naming_a_corrupt_file(tmp_path):
    """Materialising a streamed set (the search's reward / held-out / BatchNorm sets) decodes on
    a thread pool: the result equals decoding one file at a time, in order; a corrupt JPEG among
    them fails naming that file."""
    rng = np.random.default_rng(1)
    paths = []
    for k in range(48):
        h, w = (30, 40) if k % 2 else (44, 28)
        paths.append(str(tmp_path / f"{k:02d}.jpg"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    images = data.FolderImages(paths, None, 37, (32, 32), 3)
    idx = rng.permutation(48)
    want = np.stack([images[int(i)] for i in idx])
    np.testing.assert_array_equal(images[idx], want)
    (tmp_path / "33.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="33.jpg"):
        images[np.arange(48)]


def _vgg_imagenet_head_tiny(num_classes: int):
    from sculpt_jax.models import vgg

    return vgg.VGG(cfg=vgg.VGG_TINY_CFG, num_classes=num_classes, head_type="imagenet", hidden=16)


@pytest.mark.parametrize(
    "model, size",
    [("resnet50_tiny", 32), ("mobilenet_v2_tiny", 32), ("vit_tiny", 64),
     ("vgg_imagenet_head_tiny", 64)],
)  # fmt: skip
def test_imagenet_zoo_tiny_search_and_finetune_on_mock_imagenet(tmp_path, model, size):
    """The pipeline on mock ImageNet: every set the model sees (reward, held-out, BN batches,
    validation, test) has the traced input size. ViT's position embedding and VGG's flatten head
    (ViT-B/16 / VGG-16 at 224) fail on a validation split left at the train storage size."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from sculpt_jax import config as config_lib
    from sculpt_jax import models, pipeline

    if model == "vgg_imagenet_head_tiny":
        models.register_model(model, _vgg_imagenet_head_tiny, input_shape=(size, size, 3),
                              num_classes=1000)  # fmt: skip
    root = _fake_prepared(tmp_path / "tfds", "imagenet2012", "5.1.0")
    cfg = config_lib.get_default_config()
    cfg.update(dict(model=model, dataset="imagenet2012", data_dir=str(root), image_size=size,
                    val_size=16, workdir=str(tmp_path / "run"), progress=False,
                    tensorboard=False))  # fmt: skip
    cfg.search.update(dict(method="random", iterations=1, n_envs=1, n_steps=1, top_k=1,
                           target_flops=0.3, tolerance=0.05, bn_recalib_batches=1,
                           bn_recalib_batch_size=4, heldout_size=4))  # fmt: skip
    cfg.finetune.update(dict(epochs=1, batch_size=8))
    shape = (size, size, 3)
    try:
        with tfds.testing.mock_data(num_examples=32):
            s = pipeline.setup(cfg)
            assert s.input_shape == shape and s.splits.val.images.shape[1:] == shape
            searched = pipeline.prune(cfg, s=s, variables=s.init_variables)
            ss = searched["search_setup"]
            assert ss.reward[0][np.arange(2)].shape == (2, *shape)
            assert ss.heldout[0][np.arange(2)].shape == (2, *shape)
            assert ss.calib.shape == (1, 4, *shape)
            assert searched["best"] and "heldout_accuracy" in searched["best"][0]
            out = pipeline.finetune(cfg, s=s, variables=s.init_variables, searched=searched)
    finally:
        models._REGISTRY.pop("vgg_imagenet_head_tiny", None)
    row = out["summary"]
    assert abs(row["flops_reduction"] - 0.3) <= 0.05 + 1e-6
    assert row["pruned_weights_exactly_zero"] and 0.0 <= row["test_accuracy"] <= 1.0
