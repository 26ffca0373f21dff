"""The grain input pipeline: random-access sources -> static-shape batches, resumable (layer 1).

`data.py` loads datasets; this module turns a split's ``(images, labels)`` into batches with
`grain <https://github.com/google/grain>`_ (0.2.18): a ``grain.MapDataset`` over the records, sharded
by JAX process, shuffled per epoch from the seed, batched (drop remainder for train), read by
threads and, with ``workers > 0``, decoded in worker processes (``mp_prefetch``). Any random-access
``images`` works: a numpy array, `data.LazyImages` (tfds array_record, ImageNet) or
`data.FolderImages` (image files streamed from disk): decoding and resizing run per example in the
workers. Batches have the dict interface of `data.iterate_batches`: ``{"image": uint8 [B, H, W, C],
"label": int32 [B]}`` plus ``"mask"`` float32 [B] for evaluation.

Determinism: the order of epoch ``e`` is a pure function of (seed, epoch, shard), independent of
the worker and thread counts (grain's mp_prefetch keeps the order). Iterators expose grain's
``get_state()`` / ``set_state()``; `checkpoint.Checkpointer` saves that state with grain's orbax
handler (one JSON file per process) so `training.fit` resumes mid-epoch exactly.

Host-only; this module never touches the filesystem itself (the sources do).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from sculpt_jax import data as data_lib

log = logging.getLogger(__name__)

__all__ = [
    "EvalRecords",
    "Records",
    "close",
    "epoch_seed",
    "eval_iterator",
    "shard_of",
    "train_dataset",
    "train_iterator",
]


class Records:
    """A grain random-access source over ``(images, labels)`` (host-only, picklable).

    ``records[i]`` is ``{"image": uint8 [H, W, C], "label": int32 []}``; ``images[i]`` decodes the
    example when ``images`` is lazy (`data.LazyImages`, `data.FolderImages`).
    """

    def __init__(self, images: Any, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"Records: {len(images)} images but {len(labels)} labels.")
        self.images = images
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        return {"image": np.asarray(self.images[i]), "label": self.labels[i]}

    def __repr__(self) -> str:
        return f"Records(n={len(self)}, images={type(self.images).__name__})"


class EvalRecords:
    """`Records` padded with zero examples to ``n_padded``, each record with a "mask" (1 real, 0 pad)."""

    def __init__(self, images: Any, labels: np.ndarray, n_padded: int):
        self.records = Records(images, labels)
        self.n_padded = int(n_padded)
        self.shape = tuple(int(s) for s in images.shape[1:])
        self.dtype = np.dtype(getattr(images, "dtype", np.uint8))

    def __len__(self) -> int:
        return self.n_padded

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if i < len(self.records):
            return {**self.records[i], "mask": np.float32(1.0)}
        zero = np.zeros(self.shape, self.dtype)
        return {"image": zero, "label": np.int32(0), "mask": np.float32(0.0)}


def epoch_seed(seed: Any, epoch: int) -> int:
    """The grain shuffle seed of one epoch: a pure function of (seed, epoch).

    Args:
      seed: non-negative int or a JAX PRNG key (as `data.iterate_batches` takes).
      epoch: epoch number.
    Returns: a non-negative int below 2**31.
    """
    words = data_lib._seed_words(seed)  # noqa: SLF001 - the shared seed convention of data.py
    state = np.random.SeedSequence([*words, int(epoch), 0x6772_6169]).generate_state(1)[0]
    return int(state) & 0x7FFF_FFFF


def shard_of(n: int, shard_index: int | None = None, shard_count: int | None = None) -> slice:
    """The examples of one process: ``slice(shard_index, n_per * shard_count, shard_count)``.

    Shards are disjoint, equal-sized (``n_per = n // shard_count``, so every process takes the same
    number of steps) and together cover all but the last ``n % shard_count`` examples. Defaults are
    ``jax.process_index()`` and ``jax.process_count()``.
    """
    index = jax.process_index() if shard_index is None else int(shard_index)
    count = jax.process_count() if shard_count is None else int(shard_count)
    if not 0 <= index < count:
        raise ValueError(f"shard_index {index} must lie in [0, shard_count={count}).")
    n_per = int(n) // count
    return slice(index, n_per * count, count)


def train_dataset(
    images: Any,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: Any = 0,
    epoch: int = 0,
    shuffle: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
):
    """One epoch of one process's train batches as a ``grain.MapDataset`` (random access by batch).

    Records -> this process's shard (`shard_of`) -> shuffled by `epoch_seed(seed, epoch)` ->
    batches of ``batch_size`` (the per-process batch), last partial batch dropped.

    Args:
      images: [N, H, W, C] array-like (numpy, `data.LazyImages`, `data.FolderImages`).
      labels: int [N].
      batch_size: B, examples per batch of this process.
    Returns: a ``grain.MapDataset`` of ``len = (N // shard_count) // B`` batches
      ``{"image": uint8 [B, H, W, C], "label": int32 [B]}``.
    """
    import grain

    ds = grain.MapDataset.source(Records(images, labels))
    ds = ds[shard_of(len(labels), shard_index, shard_count)]
    if len(ds) < batch_size:
        raise ValueError(
            f"batch_size={batch_size} exceeds this process's {len(ds)} training examples, so no "
            "full batch exists; use a smaller batch size."
        )
    if shuffle:
        ds = ds.shuffle(seed=epoch_seed(seed, epoch))
    return ds.batch(int(batch_size), drop_remainder=True)


def _parse_flags() -> None:
    # grain's worker processes read absl flags; a library caller (tests, notebooks) never parsed
    # them. The CLI parses its own flags before this runs.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _to_iterator(ds, workers: int, threads: int, prefetch: int, start_batch: int):
    import grain

    if start_batch:
        ds = ds[int(start_batch) :]
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, int(threads)), prefetch_buffer_size=max(1, prefetch))
    )
    if workers > 0:
        _parse_flags()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=int(workers), per_worker_buffer_size=prefetch)
        )
    return iter(it_ds)


def train_iterator(
    images: Any,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: Any = 0,
    epoch: int = 0,
    workers: int = 0,
    threads: int = 2,
    prefetch: int = 2,
    start_batch: int = 0,
    shuffle: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
):
    """One epoch of train batches from grain: a ``grain.DatasetIterator`` (host-only).

    The batches equal `train_dataset` ``[start_batch:]`` whatever ``workers`` / ``threads`` are.
    ``it.get_state()`` / ``it.set_state(state)`` save and restore the position (mid-epoch resume);
    call `close` (or ``it.close()``) when done to stop the worker processes.

    Args:
      workers: worker processes decoding and batching (0: in this process).
      threads: reader threads per process (Pillow decodes with the GIL released).
      prefetch: batches buffered per reader / worker.
      start_batch: skip the epoch's first batches (resume without a saved state).
      others: see `train_dataset`.
    Yields: ``{"image": uint8 [B, H, W, C], "label": int32 [B]}``.
    """
    ds = train_dataset(images, labels, batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                       shard_index=shard_index, shard_count=shard_count)  # fmt: skip
    return _to_iterator(ds, int(workers), threads, int(prefetch), start_batch)


def eval_iterator(
    images: Any,
    labels: np.ndarray,
    batch_size: int,
    *,
    workers: int = 0,
    threads: int = 2,
    prefetch: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, in static-shape batches (the last zero-padded), from grain.

    Equals `data.eval_batches` batch for batch. Not sharded by process (each process evaluates
    everything).

    Yields: ``{"image": [B, H, W, C], "label": int32 [B], "mask": float32 [B]}``.
    """
    import grain

    n = len(labels)
    n_padded = -(-n // int(batch_size)) * int(batch_size)
    ds = grain.MapDataset.source(EvalRecords(images, labels, n_padded)).batch(int(batch_size))
    it = _to_iterator(ds, int(workers), threads, int(prefetch), 0)
    try:
        yield from it
    finally:
        close(it)


def close(it: Any) -> None:
    """Stops an iterator's worker processes and threads (no-op for plain iterators)."""
    fn = getattr(it, "close", None)
    if fn is not None:
        fn()
