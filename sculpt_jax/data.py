"""Input pipelines: datasets, deterministic splits, static-shape batches, augmentation (layer 1).

One entry point, `load_dataset(name, data_dir=None, ...) -> DataSplits`, returns host-side numpy
train / val / test splits (images uint8 NHWC, labels int32) plus the normalisation constants:

* ``"digits"`` (the embedded offline default): scikit-learn's ``load_digits()``, 1,797 REAL 8x8
  handwritten digits (UCI optdigits) shipped inside the sklearn wheel: real data, 10 classes, no
  network, loads in well under a second. 16 grey levels are scaled to uint8 0..255. Fixed stratified
  split: test 297 (always the same examples), val 400 (seeded), train 1,100.
* ``"cifar10" | "cifar100" | "imagenet2012"`` without ``data_dir``: tensorflow-datasets WITHOUT
  TensorFlow, via ``tfds.data_source(..., download=False)`` (array_record, random access). A
  filesystem check runs first, so a missing dataset fails in well under a second with instructions;
  nothing here ever downloads. ImageNet is served lazily (`LazyImages`), decoded per batch.
* ``data_dir`` given: auto-detected CIFAR python-pickle batches, an image-folder tree
  ``ROOT/{train,test[,val]}/<class>/*.{jpg,jpeg,png}``, a ``.tar.gz`` of such a tree, or a prepared
  tfds data dir. Decoded image folders are cached as ``.npz`` (written atomically) in the cache dir
  (``cache_dir`` argument, else ``$SCULPT_JAX_CACHE``, else ``~/.cache/sculpt_jax``).
* ``"folder"``: any local dataset in one of those layouts (``data_dir`` required); normalisation
  statistics are computed on its train split.

The validation split is always carved from the training data (stratified, seeded, disjoint from
train, never from test): the reference selects pruned models on the test set (REFERENCE.md sec. 6,
defect 5); we never do.

Batching (`iterate_batches`, `eval_batches`) is host-only numpy with static shapes and an order
that is a pure function of (seed, epoch). Augmentation (`augment_cifar`, `augment_imagenet`,
`make_augment`) is pure jax.numpy with an explicit key: jittable and vmappable, meant to run on
device inside the train step (REFERENCE.md sec. 5: CIFAR crop 32 / padding 4 + flip; ImageNet
random-resized crop 224, scale 0.2..1, + flip; eval resize 256, centre crop 224).

Recommended use::

    splits = load_dataset("cifar10", data_dir)
    augment = make_augment(splits.name, splits.image_shape)
    for batch in iterate_batches(*splits.train.arrays, 128, seed=seed, epoch=epoch):
        # in the jitted step: x = normalize(augment(key, batch["image"]), splits.mean, splits.std)
    for batch in eval_batches(*splits.val.arrays, 256):  # batch["mask"]: 1 real, 0 padding
        # x = normalize(batch["image"], splits.mean, splits.std)

Only this module (with checkpoint, report and cli) touches the filesystem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import pickle
import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASET_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataSplits",
    "FolderImages",
    "LazyImages",
    "Split",
    "augment_cifar",
    "augment_imagenet",
    "batches_per_epoch",
    "center_crop_resize",
    "channel_stats",
    "default_cache_dir",
    "eval_batches",
    "input_path",
    "eval_images",
    "eval_split",
    "iterate_batches",
    "load_dataset",
    "make_augment",
    "normalize",
    "stratified_split",
]

# Normalisation constants (per channel, for images scaled to [0, 1]).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the reference's values (REFERENCE.md sec. 5)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TFDS_NAMES = ("cifar10", "cifar100", "imagenet2012")
DATASET_NAMES = ("digits", *TFDS_NAMES, "folder")

_NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}
_DEFAULT_VAL_SIZE: dict[str, int | float] = {
    "digits": 400,
    "cifar10": 5000,
    "cifar100": 5000,
    "imagenet2012": 10000,
    "folder": 0.1,
}
_DIGITS_TEST_SIZE = 297
_DIGITS_TEST_SEED = 0  # the digits TEST split never depends on the user's seed
_TFDS_TEST_SPLIT = {"cifar10": "test", "cifar100": "test", "imagenet2012": "validation"}
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_PIL_FORMATS = ("JPEG", "PNG")
_SPLIT_DIRS = ("train", "val", "test")
_CACHE_VERSION = "1"
# Image-folder trees whose files total more than this stream from disk (`FolderImages`, decoded per
# example by the input pipeline's workers) instead of being decoded into memory (npz cache).
STREAM_THRESHOLD_BYTES = 2 << 30
_FOLDER_MODES = ("auto", "memory", "stream")

_LAYOUTS_HELP = """Expected one of these layouts:
  * CIFAR-10 python batches: DIR/data_batch_1 .. DIR/data_batch_5 and DIR/test_batch
    (or their parent, holding cifar-10-batches-py/);
  * CIFAR-100 python pickles: DIR/train and DIR/test with 'fine_labels'
    (or their parent, holding cifar-100-python/);
  * an image folder: DIR/train/<class>/*.{jpg,jpeg,png} and DIR/test/<class>/*.{jpg,jpeg,png},
    optional DIR/val/<class>/...; class folders sorted alphabetically give the label ids; all
    images one size (DIR may also hold a single top folder containing train/ and test/);
  * a .tar.gz file of such an image folder, or the official cifar-10-python.tar.gz /
    cifar-100-python.tar.gz as downloaded (read as is, nothing extracted);
  * a prepared tensorflow-datasets dir (cifar10, cifar100, imagenet2012):
    DIR/<name>/<version>/dataset_info.json with array_record files."""


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset (host-only numpy).

    Attributes:
      images: uint8 [N, H, W, C] (a numpy array, or a `LazyImages` that decodes on indexing).
      labels: int32 [N], values in 0..num_classes-1.
      index: int64 [N], position of each example in the SOURCE split it was taken from (the official
        train split for train and a carved val, the official test split for test, the full
        ``load_digits()`` array for digits): provenance, and proof that splits are disjoint.
    """

    images: Any
    labels: np.ndarray
    index: np.ndarray

    @property
    def n(self) -> int:
        """Number of examples."""
        return int(self.labels.shape[0])

    @property
    def arrays(self) -> tuple[Any, np.ndarray]:
        """``(images, labels)``, for ``iterate_batches(*split.arrays, ...)``."""
        return self.images, self.labels

    def take(self, idx: np.ndarray) -> Split:
        """The sub-split at positions ``idx`` (int [M]) of this split."""
        idx = np.asarray(idx, dtype=np.int64)
        lazy = isinstance(self.images, LazyImages | FolderImages)
        images = self.images.take(idx) if lazy else self.images[idx]
        return Split(_readonly(images), _readonly(self.labels[idx]), _readonly(self.index[idx]))


@dataclasses.dataclass(frozen=True, eq=False)
class DataSplits:
    """A loaded dataset: three disjoint splits plus what a pipeline needs to know about them.

    Attributes:
      name: one of `DATASET_NAMES`.
      source: where the data came from (human-readable: package, path, cache file).
      train, val, test: the splits (`Split`); val is carved from the training data, never from test.
      num_classes: number of classes.
      image_shape: (H, W, C) of the MODEL INPUT. Equals the stored image shape except for
        imagenet2012, whose train images are stored larger (see `load_dataset`) and cropped on
        device.
      mean, std: per-channel normalisation constants for images scaled to [0, 1] (CIFAR / ImageNet
        constants, or statistics of the train split for digits and folder datasets).
      class_names: one name per label id.
    """

    name: str
    source: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    def summary(self) -> str:
        """One line: name, split sizes, shape, classes, source."""
        return (
            f"{self.name}: train {self.train.n}, val {self.val.n}, test {self.test.n}, "
            f"image {self.image_shape}, {self.num_classes} classes ({self.source})"
        )


def _readonly(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        x.flags.writeable = False
    return x


# ----------------------------------------------------------------------------------------------
# Splits and statistics (host-only)
# ----------------------------------------------------------------------------------------------


def stratified_split(labels: np.ndarray, sizes: Sequence[int], seed: int) -> tuple[np.ndarray, ...]:
    """Deterministic stratified partition of ``range(len(labels))`` (host-only numpy).

    Each requested part gets ``sizes[k]`` examples with per-class counts proportional to the class
    frequencies (largest-remainder rounding, capped by what a class has left); the remainder is
    returned last. Examples come from per-class permutations by ``np.random.default_rng(seed)``.

    Args:
      labels: int [N].
      sizes: requested part sizes, ``sum(sizes) <= N``.
      seed: non-negative int.
    Returns:
      ``len(sizes) + 1`` sorted int64 index arrays, pairwise disjoint, covering ``range(N)``.
    """
    labels = np.asarray(labels).reshape(-1)
    n = labels.shape[0]
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise ValueError(
            f"stratified_split: sizes {sizes} must be >= 0 and sum to at most {n} (the number of "
            "examples); ask for smaller splits."
        )
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    left = counts.astype(np.int64).copy()
    quotas = []
    for size in sizes:
        exact = size * counts / max(n, 1)
        q = np.minimum(np.floor(exact).astype(np.int64), left)
        order = np.argsort(-(exact - q), kind="stable")  # largest remainder first
        short = size - int(q.sum())
        while short > 0:  # hand out the rest one by one, in remainder order, where room is left
            for c in order:
                if short == 0:
                    break
                if q[c] < left[c]:
                    q[c] += 1
                    short -= 1
        left -= q
        quotas.append(q)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(sizes) + 1)]
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(inverse == c))
        start = 0
        for k, q in enumerate(quotas):
            parts[k].append(members[start : start + q[c]])
            start += int(q[c])
        parts[-1].append(members[start:])
    return tuple(
        np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts
    )


def _carve_val(train: Split, val_size: int | float, seed: int) -> tuple[Split, Split]:
    """Stratified, seeded (train, val) from a train split."""
    n_val = _resolve_size(val_size, train.n)
    val_idx, train_idx = stratified_split(train.labels, [n_val], seed)
    return train.take(train_idx), train.take(val_idx)


def _resolve_size(size: int | float, n: int) -> int:
    if isinstance(size, float) and not float(size).is_integer():
        if not 0.0 <= size < 1.0:
            raise ValueError(f"val_size={size}: a fraction must lie in [0, 1); or pass a count.")
        return int(round(size * n))
    size = int(size)
    if not 0 <= size < n:
        raise ValueError(
            f"val_size={size} must be in [0, {n}) (the training split has {n} examples); "
            "pass a smaller count or a fraction such as 0.1."
        )
    return size


def channel_stats(images: Any, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1] (host-only, float64 accumulation).

    Args:
      images: uint8 [N, H, W, C] (or anything indexable by slices giving that).
    Returns:
      (mean, std), each a tuple of C floats.
    """
    n = images.shape[0]
    c = images.shape[-1]
    s = np.zeros(c, np.float64)
    s2 = np.zeros(c, np.float64)
    count = 0
    for i in range(0, n, chunk):
        x = np.asarray(images[i : i + chunk], np.float64).reshape(-1, c) / 255.0
        s += x.sum(0)
        s2 += (x * x).sum(0)
        count += x.shape[0]
    mean = s / max(count, 1)
    std = np.sqrt(np.maximum(s2 / max(count, 1) - mean * mean, 0.0))
    std = np.where(std > 0, std, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def normalize(images: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """``(images / 255 - mean) / std`` per channel, as float32.

    Host numpy in -> numpy out; jax array in -> jax array out (jittable, use it inside the step).

    Args:
      images: [..., C] uint8 (or float in 0..255).
      mean, std: C floats, for images scaled to [0, 1].
    Returns:
      float32 [..., C].
    """
    xp = np if isinstance(images, np.ndarray) else jnp
    mean = xp.asarray(mean, xp.float32)
    std = xp.asarray(std, xp.float32)
    return (images.astype(xp.float32) / 255.0 - mean) / std


# ----------------------------------------------------------------------------------------------
# Batching (host-only, static shapes, deterministic)
# ----------------------------------------------------------------------------------------------


def _seed_words(seed: Any) -> list[int]:
    """An int seed or a JAX PRNG key (typed or raw uint32) -> non-negative ints for SeedSequence."""
    if isinstance(seed, int | np.integer):
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative.")
        return [int(seed)]
    arr = seed
    if hasattr(arr, "dtype") and jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
        arr = jax.random.key_data(arr)
    return [int(v) for v in np.asarray(arr, dtype=np.uint32).reshape(-1)]


def batches_per_epoch(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Number of batches `iterate_batches` yields for ``n`` examples."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


def iterate_batches(
    images: Any,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: Any = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    start_batch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of static-shape numpy batches (host-only).

    The order is a pure function of (seed, epoch): ``np.random.default_rng(SeedSequence([*seed,
    epoch])).permutation(N)``, so a resumed run sees the same batches; ``start_batch`` skips the
    first batches of the epoch (resume mid-epoch).

    Args:
      images: [N, H, W, C] array (uint8 normally) or `LazyImages`.
      labels: int [N].
      batch_size: B.
      seed: int or JAX PRNG key.
      epoch: epoch number, folded into the permutation.
      shuffle: permute (True) or keep dataset order.
      drop_remainder: True: ``N // B`` full batches, no "mask" key. False: ``ceil(N / B)`` batches,
        the last padded with zeros to B, and every batch carries "mask".
      start_batch: first batch to yield.
    Yields:
      {"image": [B, H, W, C] (images' dtype), "label": int32 [B]} plus "mask": float32 [B] (1 for
      real examples) when ``drop_remainder`` is False.
    """
    n = int(labels.shape[0])
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if drop_remainder and n < batch_size:
        raise ValueError(
            f"batch_size={batch_size} exceeds the split's {n} examples, so drop_remainder=True "
            "yields no batch; use a smaller batch_size or drop_remainder=False (padded, masked)."
        )
    if images.shape[0] != n:
        raise ValueError(f"images ({images.shape[0]}) and labels ({n}) differ in length.")
    if shuffle:
        rng = np.random.default_rng(np.random.SeedSequence([*_seed_words(seed), int(epoch)]))
        order = rng.permutation(n)
    else:
        order = np.arange(n)
    for b in range(start_batch, batches_per_epoch(n, batch_size, drop_remainder)):
        idx = order[b * batch_size : (b + 1) * batch_size]
        real = idx.shape[0]
        x = np.asarray(images[idx])
        y = np.asarray(labels[idx], np.int32)
        batch = {"image": x, "label": y}
        if not drop_remainder:
            if real < batch_size:
                pad = batch_size - real
                batch["image"] = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
                batch["label"] = np.concatenate([y, np.zeros(pad, np.int32)])
            mask = np.zeros(batch_size, np.float32)
            mask[:real] = 1.0
            batch["mask"] = mask
        yield batch


def eval_batches(
    images: Any, labels: np.ndarray, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in order, in static-shape batches (host-only).

    The last batch is zero-padded to ``batch_size``; weight per-example metrics by ``mask``.

    Yields:
      {"image": [B, H, W, C], "label": int32 [B], "mask": float32 [B] (1 real, 0 padding)}.
    """
    return iterate_batches(images, labels, batch_size, shuffle=False, drop_remainder=False)


# ----------------------------------------------------------------------------------------------
# Augmentation (jittable, vmappable, explicit key)
# ----------------------------------------------------------------------------------------------


def _crop_flip_one(key: jax.Array, image: jax.Array, padding: int, flip: bool, pad_value: Any):
    h, w, c = image.shape
    k_crop, k_flip = jax.random.split(key)
    fill = jnp.broadcast_to(
        jnp.asarray(pad_value, image.dtype), (h + 2 * padding, w + 2 * padding, c)
    )
    padded = jax.lax.dynamic_update_slice(fill, image, (padding, padding, 0))
    off = jax.random.randint(k_crop, (2,), 0, 2 * padding + 1)
    out = jax.lax.dynamic_slice(padded, (off[0], off[1], 0), (h, w, c))
    if flip:
        out = jnp.where(jax.random.bernoulli(k_flip), out[:, ::-1, :], out)
    return out


def augment_cifar(
    key: jax.Array,
    images: jax.Array,
    *,
    padding: int = 4,
    flip: bool = True,
    pad_value: Any = 0,
) -> jax.Array:
    """Random crop with constant padding plus random horizontal flip, per example (jittable).

    REFERENCE.md sec. 5: ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` applied to the raw
    image, i.e. padding with black. Pass uint8 images (pad_value 0), or normalised images with
    ``pad_value = -mean / std`` (per channel) for the same result.

    Args:
      key: PRNG key; example i uses ``jax.random.split(key, B)[i]``.
      images: [B, H, W, C], any dtype; output has the same shape and dtype.
      padding: pixels added on each side before the H x W crop (offsets uniform in 0..2*padding).
      flip: flip left-right with probability 1/2.
      pad_value: scalar or [C] fill value.
    Returns:
      [B, H, W, C], same dtype as ``images``.
    """
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: _crop_flip_one(k, x, padding, flip, pad_value))(keys, images)


def _rrc_one(key, image, size, scale, ratio, flip):
    h, w, c = image.shape
    k_s, k_r, k_y, k_x, k_f = jax.random.split(key, 5)
    area = h * w * jax.random.uniform(k_s, (), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(k_r, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    r = jnp.exp(log_r)
    cw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
    ch = jnp.clip(jnp.sqrt(area / r), 1.0, h)
    y0 = jax.random.uniform(k_y, ()) * (h - ch)
    x0 = jax.random.uniform(k_x, ()) * (w - cw)
    sy, sx = size / ch, size / cw
    out = jax.image.scale_and_translate(
        image.astype(jnp.float32),
        (size, size, c),
        (0, 1),
        jnp.stack([sy, sx]),
        jnp.stack([-y0 * sy, -x0 * sx]),
        method="linear",
        antialias=True,
    )
    if flip:
        out = jnp.where(jax.random.bernoulli(k_f), out[:, ::-1, :], out)
    return out


def augment_imagenet(
    key: jax.Array,
    images: jax.Array,
    size: int = 224,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    flip: bool = True,
) -> jax.Array:
    """Random-resized crop to ``size`` x ``size`` plus random horizontal flip (jittable).

    REFERENCE.md sec. 5 (``RandomResizedCrop(224, scale=(0.2, 1))`` + flip). Per example: area
    fraction ~ U(scale), log aspect ratio ~ U(log ratio), crop box clipped to the image (instead of
    torchvision's 10 rejection tries), top-left uniform; the box is resampled bilinearly with
    antialiasing by `jax.image.scale_and_translate` (sub-pixel boxes, no rounding).

    Args:
      key: PRNG key; example i uses ``jax.random.split(key, B)[i]``.
      images: [B, H, W, C], any dtype, values in any range (uint8 0..255 or normalised).
      size: output side.
    Returns:
      float32 [B, size, size, C], same value range as the input.
    """
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: _rrc_one(k, x, size, scale, ratio, flip))(keys, images)


def make_augment(
    dataset_name: str,
    image_shape: Sequence[int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
):
    """The training augmentation for a dataset, as a jitted ``fn(key, images) -> images``.

    * digits (8x8): crop with padding 1, NO flip (digits are not flip-invariant).
    * imagenet2012: `augment_imagenet` to ``image_shape[0]`` (float32 output).
    * cifar10 / cifar100 / folder: crop with padding ``max(1, H // 8)`` (4 at 32x32) + flip.

    Args:
      dataset_name: `DataSplits.name`.
      image_shape: `DataSplits.image_shape` (model input (H, W, C)).
      mean, std: give both when the images passed in are ALREADY normalised: padding then uses
        ``-mean / std`` (black, as in the reference). Leave None for uint8 input.
    Returns:
      jitted ``fn(key, images [B, H, W, C]) -> [B, H', W', C]``.
    """
    if dataset_name not in DATASET_NAMES:
        raise ValueError(f"make_augment: unknown dataset {dataset_name!r}; valid: {DATASET_NAMES}.")
    if (mean is None) != (std is None):
        raise ValueError("make_augment: give both mean and std (normalised input) or neither.")
    pad_value: Any = 0
    if mean is not None:
        pad_value = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    h = int(image_shape[0])
    if dataset_name == "imagenet2012":
        fn = lambda key, images: augment_imagenet(key, images, h)
    elif dataset_name == "digits":
        fn = lambda key, images: augment_cifar(
            key, images, padding=1, flip=False, pad_value=pad_value
        )
    else:
        p = max(1, h // 8)
        fn = lambda key, images: augment_cifar(
            key, images, padding=p, flip=True, pad_value=pad_value
        )
    return jax.jit(fn)


def center_crop_resize(image: Any, resize: int = 256, crop: int = 224) -> np.ndarray:
    """Resize the shorter side to ``resize`` (bilinear, antialiased), then centre-crop ``crop``.

    Host-only (Pillow). ImageNet evaluation transform of REFERENCE.md sec. 5 (torchvision
    ``Resize(256)`` + ``CenterCrop(224)``: crop offsets ``round((size - crop) / 2)``).

    Args:
      image: uint8 [H, W, C] (C = 1 or 3) array, or a PIL image.
    Returns:
      uint8 [crop, crop, C].
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        squeeze = image.ndim == 3 and image.shape[-1] == 1
        pil = Image.fromarray(image[..., 0] if squeeze else image)
    else:
        pil = image
        squeeze = pil.mode == "L"
    w, h = pil.size
    if min(w, h) != resize:
        if w <= h:
            nw, nh = resize, int(resize * h / w)
        else:
            nw, nh = int(resize * w / h), resize
        pil = pil.resize((nw, nh), Image.BILINEAR)
    w, h = pil.size
    if crop > min(w, h):
        raise ValueError(f"center_crop_resize: crop {crop} exceeds the resized image {h}x{w}.")
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    out = np.asarray(pil.crop((left, top, left + crop, top + crop)), np.uint8)
    return out[..., None] if squeeze or out.ndim == 2 else out


# ----------------------------------------------------------------------------------------------
# Cache helpers (filesystem)
# ----------------------------------------------------------------------------------------------


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$SCULPT_JAX_CACHE``, else ``~/.cache/sculpt_jax``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SCULPT_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sculpt_jax"


def _atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes an uncompressed .npz to a temp file in the same folder, then renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shared cache should stay readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _hash_strings(parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits()`` as (float64 [1797, 8, 8] in 0..16, int [1797]).

    Reads the CSV that ``load_digits`` reads, straight from the installed sklearn package (importing
    ``sklearn.datasets`` costs seconds); falls back to ``load_digits()`` if the file moved.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        csv = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            d = np.loadtxt(csv, delimiter=",", dtype=np.float64)
            if d.shape == (1797, 65):
                return d[:, :64].reshape(-1, 8, 8), d[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def _load_digits(val_size: int | float, seed: int) -> DataSplits:
    raw, target = _digits_arrays()
    images = np.rint(raw * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    labels = target.astype(np.int32)
    everything = Split(images, labels, np.arange(labels.shape[0], dtype=np.int64))
    test_idx, rest_idx = stratified_split(labels, [_DIGITS_TEST_SIZE], _DIGITS_TEST_SEED)
    train, val = _carve_val(everything.take(rest_idx), val_size, seed)
    mean, std = channel_stats(train.images)
    return DataSplits(
        name="digits",
        source="sklearn.datasets.load_digits (embedded UCI optdigits, 8x8, 16 grey levels)",
        train=train,
        val=val,
        test=everything.take(test_idx),
        num_classes=10,
        image_shape=(8, 8, 1),
        mean=mean,
        std=std,
        class_names=tuple(str(i) for i in range(10)),
    )


# -- CIFAR python pickles ----------------------------------------------------------------------


def _cifar_pickle_dir(root: Path) -> tuple[str, Path] | None:
    """("cifar10" | "cifar100", dir) when ``root`` (or a known child) holds CIFAR python pickles."""
    for d in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if not d.is_dir():
            continue
        if (
            all((d / f"data_batch_{i}").is_file() for i in range(1, 6))
            and (d / "test_batch").is_file()
        ):
            return "cifar10", d
        if (d / "train").is_file() and (d / "test").is_file():
            return "cifar100", d
    return None


def _unpickle(path: Path) -> dict:
    # CIFAR's official format is a pickle; only ever load files the user pointed us at.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_arrays(entry: dict | None, label_key: bytes, path: Any) -> tuple[np.ndarray, np.ndarray]:
    if entry is None:
        raise ValueError(f"{path}: a CIFAR python batch is missing. {_LAYOUTS_HELP}")
    if b"data" not in entry or label_key not in entry:
        raise ValueError(
            f"{path} is not a CIFAR python batch (needs keys b'data' and {label_key!r}). "
            + _LAYOUTS_HELP
        )
    data = np.asarray(entry[b"data"], np.uint8)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(entry[label_key], np.int32)


def _load_cifar_pickles(kind: str, d: Path, read: Callable[[str], dict | None] | None = None,
                        where: str | None = None) -> tuple[dict[str, Split], tuple[str, ...], str]:
    """CIFAR python batches from the folder `d`, or from `read(file name) -> unpickled dict or
    None` (the official archive, `_load_cifar_archive`)."""
    if read is None:
        read = lambda n: _unpickle(d / n) if (d / n).is_file() else None  # noqa: E731
    where = where or str(d)
    if kind == "cifar10":
        parts = [_cifar_arrays(read(f"data_batch_{i}"), b"labels", where) for i in range(1, 6)]
        train_x = np.concatenate([p[0] for p in parts])
        train_y = np.concatenate([p[1] for p in parts])
        test_x, test_y = _cifar_arrays(read("test_batch"), b"labels", where)
        meta_file, names_key, n_classes = "batches.meta", b"label_names", 10
    else:
        train_x, train_y = _cifar_arrays(read("train"), b"fine_labels", f"{where}/train")
        test_x, test_y = _cifar_arrays(read("test"), b"fine_labels", f"{where}/test")
        meta_file, names_key, n_classes = "meta", b"fine_label_names", 100
    names = tuple(str(i) for i in range(n_classes))
    meta = read(meta_file)
    if meta is not None:
        raw = meta.get(names_key)
        if raw is not None and len(raw) == n_classes:
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in raw)
    splits = {
        "train": Split(train_x, train_y, np.arange(train_y.shape[0], dtype=np.int64)),
        "test": Split(test_x, test_y, np.arange(test_y.shape[0], dtype=np.int64)),
    }
    return splits, names, f"CIFAR python pickles at {where}"


_CIFAR_ARCHIVE_DIRS = {"cifar-10-batches-py": "cifar10", "cifar-100-python": "cifar100"}


def _cifar_archive_kind(path: Path) -> str | None:
    """"cifar10" / "cifar100" when `path` is the official python archive (its first member is the
    batches folder), else None (an image-folder archive). Reads one header only."""
    try:
        with tarfile.open(path, "r:*") as tar:
            first = tar.next()
    except (tarfile.TarError, OSError, EOFError):
        return None
    top = first.name.lstrip("./").split("/")[0] if first is not None else ""
    return _CIFAR_ARCHIVE_DIRS.get(top)


def _load_cifar_archive(kind: str, path: Path):
    """The official ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, read as is (the
    pickles are unpickled from the archive's members: no extraction to disk)."""
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if m.isfile() and m.name.lstrip("./").split("/")[0] in _CIFAR_ARCHIVE_DIRS:
                    f = tar.extractfile(m)
                    blobs[m.name.rsplit("/", 1)[-1]] = f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read the archive ({e}). {_LAYOUTS_HELP}") from e

    def read(name: str) -> dict | None:
        # CIFAR's official format is a pickle; only ever load files the user pointed us at.
        return pickle.loads(blobs[name], encoding="bytes") if name in blobs else None

    return _load_cifar_pickles(kind, path, read, f"{path} (official archive)")


# -- image folders and tarballs ----------------------------------------------------------------


def _layout_error(root: Any, problem: str) -> ValueError:
    return ValueError(f"{root}: {problem}\n{_LAYOUTS_HELP}")


def _folder_root(root: Path) -> Path | None:
    """``root`` or its single child that holds train/ and test/ class folders."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    children = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")]
    if len(children) == 1 and (children[0] / "train").is_dir() and (children[0] / "test").is_dir():
        return children[0]
    return None


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(_IMAGE_EXTS)


def _scan_folder(root: Path) -> dict[str, dict[str, list[Path]]]:
    """{split: {class: sorted image paths}} for the splits present."""
    tree: dict[str, dict[str, list[Path]]] = {}
    for split in _SPLIT_DIRS:
        sd = root / split
        if not sd.is_dir():
            continue
        classes = {}
        for cd in sorted(c for c in sd.iterdir() if c.is_dir() and not c.name.startswith(".")):
            classes[cd.name] = sorted(p for p in cd.iterdir() if p.is_file() and _is_image(p.name))
        tree[split] = classes
    return tree


def _check_tree(where: Any, tree: dict[str, dict[str, list[Any]]]) -> tuple[str, ...]:
    """Validates a {split: {class: files}} tree; returns the sorted class names."""
    for split in ("train", "test"):
        if split not in tree:
            raise _layout_error(where, f"no '{split}/' folder found.")
    classes = sorted(tree["train"])
    if not classes:
        raise _layout_error(where, "train/ holds no class folders.")
    for split, by_class in tree.items():
        if not by_class:
            raise _layout_error(where, f"{split}/ holds no class folders.")
        empty = [c for c, files in by_class.items() if not files]
        if empty:
            raise _layout_error(
                where, f"{split}/ class folder(s) {empty[:5]} hold no .jpg/.jpeg/.png images."
            )
        unknown = sorted(set(by_class) - set(classes))
        if unknown:
            raise _layout_error(
                where, f"{split}/ has class folder(s) {unknown[:5]} that train/ does not have."
            )
    return tuple(classes)


class _Decoder:
    """Accumulates decoded images of one size; grey images kept as L, others as RGB."""

    def __init__(self, where: Any):
        self.where = where
        self.size: tuple[int, int] | None = None
        self.first: str = ""
        self.images: list[np.ndarray] = []
        self.all_grey = True

    def add(self, data: bytes | Path, name: str) -> None:
        from PIL import Image, UnidentifiedImageError

        try:
            src = io.BytesIO(data) if isinstance(data, bytes) else data
            with Image.open(src, formats=_PIL_FORMATS) as im:
                grey = im.mode in ("1", "L", "I", "I;16", "F")
                want = "L" if grey else "RGB"
                arr = np.asarray(im if im.mode == want else im.convert(want), np.uint8)
                if grey:
                    arr = arr[..., None]
                else:
                    self.all_grey = False
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(
                f"{self.where}: cannot decode image {name} ({e}); remove or re-encode it "
                "(JPEG or PNG)."
            ) from e
        hw = arr.shape[:2]
        if self.size is None:
            self.size, self.first = hw, name
        elif hw != self.size:
            raise ValueError(
                f"{self.where}: image {name} is {hw[0]}x{hw[1]} but {self.first} is "
                f"{self.size[0]}x{self.size[1]}; all images must share one size. Resize them "
                "first (e.g. with Pillow), or use the tfds path for variable-size datasets."
            )
        self.images.append(arr)

    def stack(self, idx: Sequence[int]) -> np.ndarray:
        channels = 1 if self.all_grey else 3
        h, w = self.size if self.size else (0, 0)
        out = np.empty((len(idx), h, w, channels), np.uint8)
        for j, i in enumerate(idx):
            out[j] = self.images[i]  # a grey [H, W, 1] broadcasts to RGB
        return out


def _decode_tree(
    where: Any,
    tree: dict[str, dict[str, list[Any]]],
    classes: tuple[str, ...],
    read: Any,
    progress: bool,
) -> dict[str, np.ndarray]:
    from tqdm import tqdm

    class_id = {c: i for i, c in enumerate(classes)}
    dec = _Decoder(where)
    spans: dict[str, tuple[int, list[int]]] = {}
    total = sum(len(f) for by_class in tree.values() for f in by_class.values())
    with tqdm(total=total, desc=f"decode {Path(str(where)).name}", disable=not progress) as bar:
        for split, by_class in tree.items():
            start = len(dec.images)
            labels = []
            for c, files in sorted(by_class.items()):
                for f in files:
                    dec.add(*read(f))
                    labels.append(class_id[c])
                    bar.update(1)
            spans[split] = (start, labels)
    out = {}
    for split, (start, labels) in spans.items():
        out[f"{split}_images"] = dec.stack(range(start, start + len(labels)))
        out[f"{split}_labels"] = np.asarray(labels, np.int32)
    out["class_names"] = np.asarray(classes)
    return out


def _load_folder(root: Path, cache_dir: Path, progress: bool) -> tuple[dict, str]:
    tree = _scan_folder(root)
    classes = _check_tree(root, tree)
    stat_parts = [_CACHE_VERSION, "folder", str(root.resolve())]
    for split, by_class in tree.items():
        for c, files in by_class.items():
            for f in files:
                st = f.stat()
                stat_parts.append(f"{split}/{c}/{f.name}:{st.st_size}:{st.st_mtime_ns}")
    cache = cache_dir / f"imagefolder-{_hash_strings(stat_parts)}.npz"
    if not cache.is_file():
        t0 = time.perf_counter()
        arrays = _decode_tree(root, tree, classes, lambda p: (p, str(p)), progress)
        _atomic_save_npz(cache, arrays)
        log.info("decoded %s in %.1f s -> %s", root, time.perf_counter() - t0, cache)
    return _read_cache(cache), f"image folder {root} (cache {cache})"


def _folder_bytes(tree: dict[str, dict[str, list[Path]]]) -> int:
    return sum(f.stat().st_size for by_class in tree.values() for fs in by_class.values() for f in fs)


def _stream_folder(
    root: Path, tree: dict, classes: tuple[str, ...], image_size: int, imagenet: bool
) -> tuple[dict[str, Split], tuple[str, ...], str]:
    """An image-folder tree as `FolderImages` splits (nothing decoded; file headers peeked).

    The first, middle and last files of every class folder are opened (headers only): if they all
    share one size the images keep it (as the in-memory path does); otherwise every image gets the ImageNet transform,
    `center_crop_resize(round(image_size * 256 / 224), image_size)`, except the train split of
    ``imagenet`` (name "imagenet2012"), stored at the resize side and cropped on device like tfds's.
    """
    from PIL import Image

    class_id = {c: i for i, c in enumerate(classes)}
    sizes, grey = set(), True
    for by_class in tree.values():
        for files in by_class.values():
            for f in {files[0], files[len(files) // 2], files[-1]}:
                try:
                    with Image.open(f, formats=_PIL_FORMATS) as im:
                        sizes.add((im.size[1], im.size[0]))
                        grey &= im.mode in ("1", "L", "I", "I;16", "F")
                except (OSError, SyntaxError) as e:
                    raise ValueError(f"cannot decode image {f} ({e}); remove or re-encode it.") from e
    variable = imagenet or len(sizes) > 1
    resize = int(round(image_size * 256 / 224))
    splits = {}
    for split, by_class in tree.items():
        paths, labels = [], []
        for c, files in sorted(by_class.items()):
            paths += [str(f) for f in files]
            labels += [class_id[c]] * len(files)
        if variable:
            side = resize if (imagenet and split == "train") else image_size
            images = FolderImages(paths, None, resize, (side, side), 3)
        else:
            images = FolderImages(paths, None, None, next(iter(sizes)), 1 if grey else 3)
        y = np.asarray(labels, np.int32)
        splits[split] = Split(images, y, np.arange(y.shape[0], dtype=np.int64))
    how = f"resized to {image_size}" if variable else "native size"
    return splits, classes, f"image folder {root} (streamed from disk, {how})"


_TAR_RE = re.compile(r"^(?:(.*)/)?(train|val|test)/([^/]+)/([^/]+)$")


def _load_tarball(path: Path, cache_dir: Path, progress: bool) -> tuple[dict, str]:
    """Decodes an image-folder .tar.gz by streaming its members (no extraction to disk)."""
    st = path.stat()
    key = _hash_strings(
        [_CACHE_VERSION, "tar", str(path.resolve()), str(st.st_size), str(st.st_mtime_ns)]
    )
    cache = cache_dir / f"imagefolder-{key}.npz"
    if not cache.is_file():
        t0 = time.perf_counter()
        blobs: dict[tuple[str, str, str], bytes] = {}
        prefixes = set()
        try:
            with tarfile.open(path, "r:*") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    hit = _TAR_RE.match(m.name.lstrip("./"))
                    if hit is None or not _is_image(hit.group(4)):
                        continue
                    prefixes.add(hit.group(1) or "")
                    f = tar.extractfile(m)
                    blobs[(hit.group(2), hit.group(3), hit.group(4))] = f.read() if f else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{path}: cannot read the archive ({e}). {_LAYOUTS_HELP}") from e
        if len(prefixes) > 1:
            raise _layout_error(
                path, f"several image-folder roots in one archive: {sorted(prefixes)}."
            )
        tree: dict[str, dict[str, list[Any]]] = {}
        for split, c, name in sorted(blobs):
            tree.setdefault(split, {}).setdefault(c, []).append((split, c, name))
        classes = _check_tree(path, tree)
        read = lambda k: (blobs[k], f"{path}:{'/'.join(k)}")
        arrays = _decode_tree(path, tree, classes, read, progress)
        del blobs
        _atomic_save_npz(cache, arrays)
        log.info("decoded %s in %.1f s -> %s", path, time.perf_counter() - t0, cache)
    return _read_cache(cache), f"image-folder archive {path} (cache {cache})"


def _read_cache(cache: Path) -> dict:
    try:
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:  # truncated / foreign file in the cache dir
        raise ValueError(
            f"cache file {cache} is unreadable ({e}); delete it and load again to rebuild it."
        ) from e


def _splits_from_arrays(arrays: dict) -> tuple[dict[str, Split], tuple[str, ...]]:
    splits = {}
    for split in _SPLIT_DIRS:
        if f"{split}_labels" in arrays:
            y = arrays[f"{split}_labels"]
            splits[split] = Split(
                arrays[f"{split}_images"], y, np.arange(y.shape[0], dtype=np.int64)
            )
    return splits, tuple(str(c) for c in arrays["class_names"])


# -- tensorflow-datasets -----------------------------------------------------------------------


def _tfds_missing(name: str, tfds_dir: Path, problem: str) -> FileNotFoundError:
    manual = (
        " (imagenet2012 needs the ILSVRC2012 tarballs first: add --manual_dir=DIR_WITH_THE_TARS)"
        if name == "imagenet2012"
        else ""
    )
    return FileNotFoundError(
        f"{name}: {problem} sculpt-jax never downloads data. To provide it:\n"
        f"  1. on a machine with network access: pip install tensorflow tensorflow-datasets, then\n"
        f"     `tfds build {name} --file_format=array_record`{manual}\n"
        f"     (or `python -m tensorflow_datasets.scripts.download_and_prepare --datasets={name} "
        f"--file_format=array_record`);\n"
        f"  2. copy the resulting ~/tensorflow_datasets/{name}/ folder to {tfds_dir}/ here "
        f"(~/tensorflow_datasets is the default), or pass --data-dir to its parent folder;\n"
        f"  3. or pass --data-dir to local files instead.\n{_LAYOUTS_HELP}"
    )


def _tfds_default_dir() -> Path:
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def _tfds_version_dir(name: str, tfds_dir: Path) -> Path | None:
    """The prepared ``tfds_dir/name/[config/]version`` folder, by filesystem only (no tfds call)."""
    base = tfds_dir / name
    if not base.is_dir():
        return None
    found = sorted(base.glob("*/dataset_info.json")) + sorted(base.glob("*/*/dataset_info.json"))
    return found[-1].parent if found else None


def _check_tfds_prepared(name: str, tfds_dir: Path) -> Path:
    vdir = _tfds_version_dir(name, tfds_dir)
    if vdir is None:
        raise _tfds_missing(
            name, tfds_dir, f"no prepared dataset at {tfds_dir}/{name}/<version>/dataset_info.json."
        )
    files = [p.name for p in vdir.iterdir()]
    if not any(".array_record" in f or ".parquet" in f for f in files):
        if any(".tfrecord" in f for f in files):
            raise FileNotFoundError(
                f"{name}: {vdir} was prepared as TFRecord, which tfds reads only with TensorFlow. "
                f"Convert it (on any machine with tensorflow-datasets): `tfds convert_format "
                f"--dataset_version_dir={vdir} --out_file_format=array_record`, or rebuild with "
                f"`tfds build {name} --file_format=array_record`."
            )
        raise _tfds_missing(name, tfds_dir, f"{vdir} holds no array_record files.")
    return vdir


def _read_records(source: Any, indices: Sequence[int]) -> list[dict]:
    indices = [int(i) for i in indices]
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:
        try:
            return list(getitems(indices))
        except TypeError:  # tfds.testing.mock_data's sources only support single-record reads
            pass
    return [source[i] for i in indices]


def _tfds_sources(name: str, tfds_dir: Path, splits: Sequence[str], decoders: Any = None) -> list:
    import tensorflow_datasets as tfds

    out = []
    for split in splits:
        try:
            out.append(
                tfds.data_source(
                    name, split=split, data_dir=str(tfds_dir), download=False, decoders=decoders
                )
            )
        except Exception as e:  # tfds raises assorted types for unreadable / mismatched data
            raise _tfds_missing(
                name, tfds_dir, f"tfds could not open split '{split}' in {tfds_dir} ({e})."
            ) from e
    return out


def _tfds_class_names(source: Any, n: int) -> tuple[str, ...]:
    try:
        names = source.dataset_info.features["label"].names
        if len(names) == n:
            return tuple(str(x) for x in names)
    except (AttributeError, KeyError, TypeError):
        pass
    return tuple(str(i) for i in range(n))


def _load_tfds_arrays(name: str, tfds_dir: Path, progress: bool) -> tuple[dict, tuple, str]:
    from tqdm import tqdm

    vdir = _check_tfds_prepared(name, tfds_dir)
    sources = _tfds_sources(name, tfds_dir, ["train", _TFDS_TEST_SPLIT[name]])
    splits = {}
    for split, src in zip(("train", "test"), sources, strict=True):
        n = len(src)
        images, labels = [], []
        for i in tqdm(range(0, n, 1024), desc=f"{name}/{split}", disable=not progress):
            for r in _read_records(src, range(i, min(i + 1024, n))):
                images.append(np.asarray(r["image"], np.uint8))
                labels.append(int(r["label"]))
        x = np.stack(images) if images else np.zeros((0, 32, 32, 3), np.uint8)
        splits[split] = Split(x, np.asarray(labels, np.int32), np.arange(n, dtype=np.int64))
    names = _tfds_class_names(sources[0], _NUM_CLASSES[name])
    return splits, names, f"tensorflow-datasets {name} (array_record) at {vdir}"


def _decode_into(out: np.ndarray, decode: Callable[[Any], np.ndarray], items: Sequence
                 ) -> np.ndarray:  # fmt: skip
    """``out[j] = decode(items[j])`` for every j (host-only), on up to `os.cpu_count()` threads
    when there are enough items: Pillow releases the GIL while it decodes and resizes, so the
    reward, held-out and BatchNorm sets of a streamed dataset (materialised once per search)
    decode on every core. Results land at their own index (the order never depends on the
    threads); the first error is raised as is."""
    threads = min(len(items) // 16, os.cpu_count() or 1)
    if threads <= 1:
        for j, item in enumerate(items):
            out[j] = decode(item)
        return out

    def one(j):
        out[j] = decode(items[j])

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(one, range(len(items))):
            pass
    return out


class LazyImages:
    """Random-access images decoded and resized on indexing (host-only; ImageNet).

    Behaves like a read-only uint8 array [N, size, size, 3] for ``x[int_array]``, ``len(x)``,
    ``x.shape``, ``x.dtype``: each access reads the records, decodes (Pillow, with JPEG draft mode)
    and applies `center_crop_resize(resize, size)`. Nothing is decoded up front.
    """

    def __init__(self, source: Any, indices: np.ndarray, resize: int, size: int):
        self.source = source
        self.indices = np.asarray(indices, np.int64)
        self.resize = int(resize)
        self.size = int(size)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.indices), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.indices)

    def _decode(self, img: Any) -> np.ndarray:
        from PIL import Image

        if isinstance(img, bytes | np.bytes_):
            pil = Image.open(io.BytesIO(bytes(img)), formats=_PIL_FORMATS)
            pil.draft(
                "RGB", (self.resize, self.resize)
            )  # JPEG: decode at a reduced scale >= resize
            pil = pil.convert("RGB")
        else:
            arr = np.asarray(img, np.uint8)
            pil = Image.fromarray(arr if arr.shape[-1] == 3 else np.repeat(arr[..., :1], 3, -1))
        return center_crop_resize(pil, self.resize, self.size)

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, int | np.integer):
            return self[np.asarray([idx])][0]
        sel = self.indices[idx]
        if isinstance(idx, slice | list) or (isinstance(idx, np.ndarray) and idx.ndim == 1):
            recs = _read_records(self.source, sel.reshape(-1))
            out = np.empty((len(recs), self.size, self.size, 3), np.uint8)
            return _decode_into(out, self._decode, [r["image"] for r in recs])
        raise TypeError(f"LazyImages: index with an int, slice or 1-D int array, not {type(idx)}.")

    def take(self, idx: np.ndarray) -> LazyImages:
        return LazyImages(self.source, self.indices[np.asarray(idx)], self.resize, self.size)

    def at_size(self, size: int) -> LazyImages:
        """The same records, centre-cropped to ``size`` after the same resize (a view; nothing
        is decoded). From a train split stored at ``resize`` this is the eval transform."""
        return LazyImages(self.source, self.indices, self.resize, size)


def eval_images(images: Any, image_shape: Sequence[int]) -> Any:
    """``images`` as the model sees them WITHOUT augmentation (host-only, lazy where they are).

    ImageNet train images are stored larger than the model input (`load_dataset`) for the
    on-device random-resized crop; anything else that feeds them to the model (a validation or
    reward set carved from train, BatchNorm recalibration batches, training with augmentation
    off) must take the eval transform instead: resize 256, centre-crop 224 (scaled with the
    image size). Every other dataset is stored at the model input size and is returned as is.

    Args:
      images: uint8 [N, H, W, C] array, `LazyImages` or `FolderImages`.
      image_shape: `DataSplits.image_shape` (model input (H, W, C)).
    Returns:
      images of shape [N, *image_shape].
    """
    size = int(image_shape[0])
    if isinstance(images, LazyImages) and images.size != size:
        return images.at_size(size)
    if isinstance(images, FolderImages) and images.resize is not None and images.size[0] != size:
        return images.at_size(size)
    return images


def eval_split(split: Split, image_shape: Sequence[int]) -> Split:
    """`split` with `eval_images` applied to its images (labels and index unchanged)."""
    images = eval_images(split.images, image_shape)
    return split if images is split.images else Split(images, split.labels, split.index)


def _open_rgb(data: Any, name: str, resize: int | None):
    """A PIL RGB/L image from bytes or a path; ValueError naming ``name`` when undecodable."""
    from PIL import Image, UnidentifiedImageError

    try:
        src = io.BytesIO(bytes(data)) if isinstance(data, bytes | np.bytes_) else data
        pil = Image.open(src, formats=_PIL_FORMATS)
        if resize is not None:
            pil.draft("RGB", (resize, resize))  # JPEG: decode at a reduced scale >= resize
        pil.load()
        return pil
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(
            f"cannot decode image {name} ({type(e).__name__}: {e}); remove or re-encode it "
            "(JPEG or PNG)."
        ) from e


class FolderImages:
    """Image files decoded on indexing: a streaming image folder (host-only).

    Behaves like a read-only uint8 array [N, H, W, C] for ``x[int]``, ``x[int_array]``, ``x[slice]``,
    ``len(x)``, ``x.shape``, ``x.dtype`` and ``x.take(idx)``, as `LazyImages` does; nothing is decoded
    up front. Each access opens the files (Pillow, JPEG draft mode) and either

    * ``resize`` None: keeps the native size, which must be ``shape[1:3]`` (the fixed-size folders of
      the in-memory path; grey files stay 1-channel when ``channels`` is 1, else become RGB), or
    * ``resize`` R: `center_crop_resize(R, size)` (variable-size JPEGs, ImageNet layout), RGB.

    A file that cannot be decoded (or has the wrong size) raises ValueError naming it: corrupt files
    FAIL the job, they are never skipped silently (skipping would change the epoch's static length).

    Attributes:
      paths: tuple of N file paths (str); ``index`` selects a subset without copying them.
    """

    def __init__(self, paths: Sequence[str], index: np.ndarray | None, resize: int | None,
                 size: tuple[int, int], channels: int = 3):  # fmt: skip
        self.paths = tuple(str(p) for p in paths)
        self.index = np.arange(len(self.paths)) if index is None else np.asarray(index, np.int64)
        self.resize = None if resize is None else int(resize)
        self.size = (int(size[0]), int(size[1]))
        self.channels = int(channels)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.index), *self.size, self.channels)

    def __len__(self) -> int:
        return len(self.index)

    def decode(self, path: str) -> np.ndarray:
        """One file -> uint8 [H, W, C] (see the class docstring)."""
        pil = _open_rgb(path, path, self.resize)
        if self.resize is not None:
            return center_crop_resize(pil.convert("RGB"), self.resize, self.size[0])
        want = "L" if self.channels == 1 else "RGB"
        arr = np.asarray(pil if pil.mode == want else pil.convert(want), np.uint8)
        arr = arr[..., None] if arr.ndim == 2 else arr
        if arr.shape[:2] != self.size:
            raise ValueError(
                f"image {path} is {arr.shape[0]}x{arr.shape[1]} but the folder's images are "
                f"{self.size[0]}x{self.size[1]}; resize it, or load the folder with resizing "
                "(variable-size folders are resized automatically)."
            )
        return arr

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, int | np.integer):
            return self.decode(self.paths[self.index[idx]])
        sel = self.index[idx]
        if isinstance(idx, slice | list) or (isinstance(idx, np.ndarray) and idx.ndim == 1):
            out = np.empty((len(sel), *self.size, self.channels), np.uint8)
            paths = [self.paths[i] for i in np.asarray(sel).reshape(-1)]
            return _decode_into(out, self.decode, paths)
        raise TypeError(f"FolderImages: index with an int, slice or 1-D int array, not {type(idx)}.")

    def take(self, idx: np.ndarray) -> FolderImages:
        return FolderImages(self.paths, self.index[np.asarray(idx)], self.resize, self.size,
                            self.channels)  # fmt: skip

    def at_size(self, size: int) -> FolderImages:
        """The same files, centre-cropped to ``size`` after the same resize (see
        `LazyImages.at_size`); only for a resizing folder (``resize`` set)."""
        if self.resize is None:
            raise ValueError("FolderImages.at_size: this folder keeps its images' native size.")
        return FolderImages(self.paths, self.index, self.resize, (size, size), self.channels)


def input_path(images: Any) -> str:
    """Which input path a split's images take: "memory" (a numpy array, batched by
    `iterate_batches`) or "stream" (`LazyImages` / `FolderImages`, decoded per example by the grain
    pipeline of `sculpt_jax.input_pipeline`)."""
    return "stream" if isinstance(images, LazyImages | FolderImages) else "memory"


def _load_tfds_imagenet(
    tfds_dir: Path, image_size: int, cache_dir: Path, progress: bool
) -> tuple[dict, tuple, str]:
    import tensorflow_datasets as tfds
    from tqdm import tqdm

    name = "imagenet2012"
    vdir = _check_tfds_prepared(name, tfds_dir)
    try:  # undecoded bytes: we decode with JPEG draft mode; labels read without decoding images
        sources = _tfds_sources(
            name, tfds_dir, ["train", "validation"], decoders={"image": tfds.decode.SkipDecoding()}
        )
        _read_records(sources[0], [0])
    except ModuleNotFoundError:  # tfds.testing.mock_data needs TensorFlow to serve raw bytes
        sources = _tfds_sources(name, tfds_dir, ["train", "validation"])
    train_size = int(round(image_size * 256 / 224))  # 256 for 224: the standard resize
    splits = {}
    for split, src, store in zip(("train", "test"), sources, (train_size, image_size), strict=True):
        n = len(src)
        key = _hash_strings([_CACHE_VERSION, "tfds-labels", str(vdir.resolve()), split, str(n)])
        cache = cache_dir / f"labels-{name}-{key}.npz"
        if cache.is_file():
            labels = _read_cache(cache)["labels"]
        else:
            labels = np.empty(n, np.int32)
            for i in tqdm(range(0, n, 1024), desc=f"{name}/{split} labels", disable=not progress):
                recs = _read_records(src, range(i, min(i + 1024, n)))
                labels[i : i + len(recs)] = [int(r["label"]) for r in recs]
            _atomic_save_npz(cache, {"labels": labels})
        idx = np.arange(n, dtype=np.int64)
        splits[split] = Split(LazyImages(src, idx, train_size, store), labels, idx)
    names = _tfds_class_names(sources[0], 1000)
    return splits, names, f"tensorflow-datasets {name} (array_record, lazy) at {vdir}"


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _detect_local(
    name: str, data_dir: Path, cache_dir: Path, progress: bool, folder_mode: str = "auto",
    image_size: int = 224,
) -> tuple[dict[str, Split], tuple[str, ...], str]:
    """Auto-detects the layout of ``data_dir`` and loads it (see `_LAYOUTS_HELP`)."""
    if not data_dir.exists():
        raise FileNotFoundError(
            f"data_dir {data_dir} does not exist; pass an existing path.\n{_LAYOUTS_HELP}"
        )
    if data_dir.is_file():
        if data_dir.name.endswith((".tar.gz", ".tgz", ".tar")):
            kind = _cifar_archive_kind(data_dir)
            if kind is not None:
                return _load_cifar_archive(kind, data_dir)
            arrays, source = _load_tarball(data_dir, cache_dir, progress)
            splits, names = _splits_from_arrays(arrays)
            return splits, names, source
        raise _layout_error(data_dir, "is a file but not a .tar.gz / .tgz / .tar archive.")
    hit = _cifar_pickle_dir(data_dir)
    if hit is not None:
        return _load_cifar_pickles(*hit)
    root = _folder_root(data_dir)
    if root is not None:
        tree = _scan_folder(root)
        classes = _check_tree(root, tree)
        stream = folder_mode == "stream" or name == "imagenet2012"
        if folder_mode == "auto" and not stream:
            n_bytes = _folder_bytes(tree)
            stream = n_bytes > STREAM_THRESHOLD_BYTES
            log.info("%s: %.2f GB of images, %s the %.1f GB threshold", root, n_bytes / 1e9,
                     "over" if stream else "under", STREAM_THRESHOLD_BYTES / 1e9)  # fmt: skip
        if stream:
            return _stream_folder(root, tree, classes, image_size, name == "imagenet2012")
        arrays, source = _load_folder(root, cache_dir, progress)
        splits, names = _splits_from_arrays(arrays)
        return splits, names, source
    if name in TFDS_NAMES:  # a tensorflow-datasets data dir (or nothing usable: tfds says how)
        return _load_tfds_arrays(name, data_dir, progress)
    raise _layout_error(data_dir, "no recognised dataset layout.")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int | float | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    progress: bool = False,
    folder_mode: str = "auto",
) -> DataSplits:
    """Loads a dataset as deterministic train / val / test splits (host-only; see module doc).

    Args:
      name: one of `DATASET_NAMES`: "digits" (embedded default), "cifar10", "cifar100",
        "imagenet2012" (tensorflow-datasets, or local files for the CIFARs), "folder" (local files).
      data_dir: None / "" for digits and tfds's default dir ($TFDS_DATA_DIR or
        ~/tensorflow_datasets); else a CIFAR pickle dir, an image-folder tree, a .tar.gz of one, or
        a tfds data dir (layouts auto-detected; see `_LAYOUTS_HELP`).
      val_size: examples carved (stratified, seeded) from train for validation: an int count or a
        float fraction; None or negative -> the dataset default (digits 400, CIFAR 5,000, ImageNet
        10,000, folder 10%). Ignored when an image folder has its own val/.
      seed: seeds the validation carve (the digits test split is fixed independently of it).
      cache_dir: where decoded image folders / label indexes are cached (see `default_cache_dir`).
      image_size: ImageNet model input side; train images are stored at round(size * 256 / 224)
        (shorter side resized, centre square) and cropped on device by `augment_imagenet`; the
        test split AND the validation split carved from train get the eval transform
        `center_crop_resize(256, 224)` (scaled likewise), so val and test always have the model
        input shape (`eval_images` gives train images that shape too). Other datasets are
        stored at one size for every split (image folders must share one size).
      progress: tqdm bars while decoding.
      folder_mode: image-folder trees only: "memory" (decode everything once, npz cache), "stream"
        (`FolderImages`: decoded per example by the input pipeline; variable-size images resized as
        ImageNet's), "auto" (stream when the files total more than `STREAM_THRESHOLD_BYTES`).
        imagenet2012 given an image-folder tree always streams. The path taken is logged.
    Returns:
      `DataSplits` with uint8 images and int32 labels.
    Raises:
      ValueError: unknown name, unrecognised layout, bad val_size, images of different sizes.
      FileNotFoundError: missing data_dir, or a tfds dataset that is not prepared (fast, offline,
        with instructions).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}.")
    if folder_mode not in _FOLDER_MODES:
        raise ValueError(f"folder_mode={folder_mode!r}; use one of {', '.join(_FOLDER_MODES)}.")
    data_dir = Path(data_dir).expanduser() if data_dir not in (None, "") else None
    if val_size is None or (isinstance(val_size, int | float) and val_size < 0):
        val_size = _DEFAULT_VAL_SIZE[name]
    if name == "digits":
        if data_dir is not None:
            raise ValueError(
                f"digits is embedded in scikit-learn and takes no data_dir (got {data_dir}); "
                "drop data_dir, or use name='folder' for local files."
            )
        return _load_digits(val_size, seed)
    if name == "folder" and data_dir is None:
        raise ValueError(f"name='folder' needs data_dir.\n{_LAYOUTS_HELP}")
    cache = default_cache_dir(cache_dir)

    if name == "imagenet2012" and data_dir is not None and data_dir.is_dir() and _folder_root(
        data_dir
    ):
        splits, names, source = _detect_local(name, data_dir, cache, progress, "stream", image_size)
    elif name == "imagenet2012":
        tfds_dir = data_dir if data_dir is not None else _tfds_default_dir()
        splits, names, source = _load_tfds_imagenet(tfds_dir, image_size, cache, progress)
    elif data_dir is None:
        splits, names, source = _load_tfds_arrays(name, _tfds_default_dir(), progress)
    else:
        splits, names, source = _detect_local(
            name, data_dir, cache, progress, folder_mode, image_size
        )

    num_classes = len(names)
    if name in _NUM_CLASSES and num_classes != _NUM_CLASSES[name]:
        raise ValueError(
            f"{source} holds {num_classes} classes but name={name!r} expects "
            f"{_NUM_CLASSES[name]}; pass the matching name, or name='folder'."
        )
    for split in splits.values():
        bad = (split.labels < 0) | (split.labels >= num_classes)
        if bad.any():
            raise ValueError(f"{source}: labels outside 0..{num_classes - 1}; the data is corrupt.")
    train, test = splits["train"], splits["test"]
    if "val" in splits:
        log.info("%s: using its own val/ split; val_size ignored", source)
        val = splits["val"]
    else:
        train, val = _carve_val(train, val_size, seed)
    if name == "imagenet2012":
        image_shape = (image_size, image_size, 3)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        val = eval_split(val, image_shape)  # carved from train (stored larger): eval transform
    else:
        image_shape = tuple(int(s) for s in train.images.shape[1:])
        if name in ("cifar10", "cifar100"):
            if image_shape[-1] != 3:
                raise ValueError(f"{source}: {name} images must be RGB, got shape {image_shape}.")
            mean, std = CIFAR_MEAN, CIFAR_STD
        elif isinstance(train.images, FolderImages):  # statistics of a fixed, spread-out subset
            sub = np.linspace(0, train.n - 1, min(train.n, 1024)).astype(np.int64)
            mean, std = channel_stats(train.images.take(np.unique(sub)))
        else:
            mean, std = channel_stats(train.images)
    log.info("%s: train input path %s (%s)", name, input_path(train.images), source)
    for split_name, split in (("val", val), ("test", test)):  # what validation and test feed
        if tuple(split.images.shape[1:]) != tuple(image_shape):  # the model: its input size
            raise ValueError(
                f"{source}: {split_name} images are {tuple(split.images.shape[1:])} but the "
                f"model input is {tuple(image_shape)}; all splits must share one image size."
            )
    for s in (train, val, test):
        _readonly(s.images)
        _readonly(s.labels)
        _readonly(s.index)
    return DataSplits(
        name=name,
        source=source,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        image_shape=image_shape,  # type: ignore[arg-type]
        mean=tuple(mean),
        std=tuple(std),
        class_names=names,
    )
