"""Shared helpers of the benchmark scripts: machine description and timing."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time


def setup_jax() -> None:
    """The same JAX settings as the CLI (see `sculpt_jax.config.use_fast_prng`)."""
    from sculpt_jax.config import use_fast_prng

    use_fast_prng()


def machine() -> str:
    """One line naming the machine: backend, devices, CPU model and cores, library versions."""
    import flax
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devs = jax.devices()
    return (f"backend={jax.default_backend()} devices={len(devs)}x{devs[0].device_kind} "
            f"cpu='{cpu}' cores={os.cpu_count()} jax={jax.__version__} flax={flax.__version__} "
            f"python={platform.python_version()}")  # fmt: skip


def header(title: str) -> None:
    setup_jax()
    print(f"# {title}")
    print(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"# machine: {machine()}")
    print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def time_fn(fn, *, warmup: int = 2, repeats: int = 10) -> float:
    """Median seconds of `fn()` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
