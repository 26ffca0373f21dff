"""Shared fixtures: a tiny traced CNN, its observation graph and a pruning environment."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning, module="tensorflow_probability")

from sculpt_jax.config import use_fast_prng  # noqa: E402

use_fast_prng()  # see its docstring: random ops otherwise compile for seconds each on XLA:CPU


def traced_model(name: str, shape: tuple[int, ...], seed: int = 0) -> dict:
    """A zoo model with random weights (init key `seed`) on `shape` inputs, traced, with its
    filter-level GraphSpec over the reference6 library: {model, variables, graph, spec, library}."""
    import jax
    import jax.numpy as jnp

    from sculpt_jax import graph, patterns, trace
    from sculpt_jax.models import get_model, init_model

    model = get_model(name, num_classes=10)
    variables = init_model(model, jax.random.PRNGKey(seed), shape)
    lg = trace.trace_model(model.apply, variables, jnp.zeros((1, *shape)))
    lib = patterns.get_library("reference6")
    valid = np.stack([patterns.valid_patterns(layer, lib) for layer in lg.layers])
    spec = graph.build_graph_spec(lg, n_patterns=lib.n_patterns, valid=valid)
    return dict(model=model, variables=variables, graph=lg, spec=spec, library=lib)


@pytest.fixture(scope="session")
def tiny_setup():
    """resnet8_tiny on 8x8x1 inputs with random weights, traced, with a filter-level GraphSpec."""
    t = traced_model("resnet8_tiny", (8, 8, 1))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(96, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, size=(96,)).astype(np.int32)
    calib = rng.normal(size=(2, 32, 8, 8, 1)).astype(np.float32)
    return dict(t, images=images, labels=labels, calib=calib)


# The smoke main job of the multi-device and multi-process tests: one pretrain epoch on 256 digits
# images, one random-search step of 3 candidates, one fine-tune epoch (same flags for both, so their
# one-device / one-process references stay comparable).
SMOKE_MAIN_JOB = [
    "--model", "resnet8_tiny", "--config.max_train_examples=256",
    "--config.pretrain.epochs=1", "--config.pretrain.batch_size=32",
    "--config.search.method=random", "--config.search.iterations=1",
    "--config.search.n_envs=3", "--config.search.n_steps=1",
    "--config.search.target_flops=0.5", "--config.search.tolerance=0.05",
    "--config.search.top_k=1", "--config.search.reward_set_size=64",
    "--config.search.heldout_size=0", "--config.search.bn_recalib_batches=1",
    "--config.search.bn_recalib_batch_size=32", "--config.finetune.epochs=1",
    "--config.finetune.batch_size=32", "--config.report.latency=False",
    "--config.report.plots=False", "--config.tensorboard=False", "--quiet",
]  # fmt: skip


def shared_data_file(name: str) -> str | None:
    """Path of ../shared/data/<name> beside the repository, or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "..", "shared", "data", name)
    return path if os.path.exists(path) else None
