"""Input-pipeline throughput: the ImageNet-style grain train iterator and the CIFAR path.

ImageNet-style: full-size JPEGs (500x375 and 375x500, photo-like content) are written to a temporary
ROOT/train/<class>/*.jpg tree and streamed by `input_pipeline.train_iterator` over
`data.FolderImages` with the imagenet2012 train transform (JPEG draft decode, shorter side 256,
centre square 256; the random-resized crop runs on device), for each ``--workers`` count (worker
processes; 0 = in the main process with reader threads). CIFAR: 32x32x3 uint8 arrays in memory,
batched by `data.iterate_batches` (numpy, what `fit` uses for CIFAR) and by the grain iterator with
0 workers. Images/s count batches after the first (worker start-up is reported apart).

    python benchmarks/input_pipeline.py --workers 1 2 4 --json /tmp/input.json

The JSON is a list of {"pipeline": "imagenet" | "cifar", "workers": int, "img_per_s": float,
"impl": "grain" | "numpy", "startup_s": float}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import header  # noqa: E402
from sculpt_jax import data  # noqa: E402
from sculpt_jax import input_pipeline as ip  # noqa: E402


def write_jpegs(root: Path, n: int, n_classes: int = 10, seed: int = 0) -> tuple[list, np.ndarray]:
    """n photo-like JPEGs (quality 90) under root/train/<class>/; returns (paths, labels)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for i in range(n):
        w, h = (500, 375) if i % 2 == 0 else (375, 500)
        coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)  # smooth, like a photo
        arr = np.asarray(img, np.int16) + rng.integers(-12, 13, (h, w, 3))
        c = i % n_classes
        d = root / "train" / f"c{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:06d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(str(p))
        labels.append(c)
    return paths, np.asarray(labels, np.int32)


def measure(make_iter, batch: int) -> tuple[float, float]:
    """(images/s after the first batch, seconds to the first batch) over one epoch."""
    t0 = time.perf_counter()
    it = make_iter()
    try:
        next(it)
        t1 = time.perf_counter()
        n = sum(1 for _ in it)
        t2 = time.perf_counter()
    finally:
        ip.close(it)
    return n * batch / max(t2 - t1, 1e-9), t1 - t0


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--n-images", type=int, default=768, help="generated JPEGs (ImageNet-style)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="reader threads per process")
    ap.add_argument("--cifar-n", type=int, default=50000, help="CIFAR-shaped arrays in memory")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)
    header("input pipeline: images/s of the train iterators")
    print(f"# note: os.cpu_count()={os.cpu_count()}; other jobs may share these cores")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths, labels = write_jpegs(Path(tmp), args.n_images)
        mb = sum(os.path.getsize(p) for p in paths) / 1e6
        print(f"# wrote {len(paths)} JPEGs ({mb:.1f} MB, 500x375 / 375x500) in "
              f"{time.perf_counter() - t:.1f} s")  # fmt: skip
        images = data.FolderImages(paths, None, 256, (256, 256), 3)  # imagenet2012 train transform
        for w in args.workers:
            ips, start = measure(lambda w=w: ip.train_iterator(
                images, labels, args.batch, seed=0, workers=w, threads=args.threads), args.batch)
            rows.append({"pipeline": "imagenet", "workers": w, "img_per_s": ips, "impl": "grain",
                         "startup_s": start})  # fmt: skip
            print(f"imagenet grain workers={w}: {ips:8.1f} img/s (first batch after {start:.1f} s)")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.cifar_n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, args.cifar_n).astype(np.int32)
    for impl, make in (
        ("numpy", lambda: iter(data.iterate_batches(x, y, args.batch, seed=0))),
        ("grain", lambda: ip.train_iterator(x, y, args.batch, seed=0, threads=args.threads)),
    ):
        ips, start = measure(make, args.batch)
        rows.append({"pipeline": "cifar", "workers": 0, "img_per_s": ips, "impl": impl,
                     "startup_s": start})  # fmt: skip
        print(f"cifar {impl} (in memory, workers=0): {ips:10.1f} img/s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"# wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
