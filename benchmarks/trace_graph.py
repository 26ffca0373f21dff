"""Tracing and observation-graph build time for every zoo model, and exact FLOPs vs XLA.

    python benchmarks/trace_graph.py [--models resnet50 vit_b16 ...] [--xla]

Prints the command, the machine and one line per model: trace seconds (`trace.trace_model` on
abstract variables, no weights materialised), graph-spec seconds (filter level up to 50,000 filters,
layer level above), layers, graph nodes/edges, and with --xla the ratio of our exact dense FLOPs to
XLA's cost analysis of the compiled forward (compiles each model: slow for the big ones).
The issue's goal: ResNet-50 traced and its graph built in under 10 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import header  # noqa: E402

from sculpt_jax import graph, patterns, trace  # noqa: E402
from sculpt_jax.models import get_model, init_model, list_models, model_spec  # noqa: E402


def bench(name: str, xla: bool) -> str:
    spec = model_spec(name)
    model = get_model(name)
    variables = jax.eval_shape(
        lambda k: init_model(model, k, spec.input_shape), jax.random.PRNGKey(0)
    )
    x = jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32)
    t = time.perf_counter()
    lg = trace.trace_model(model.apply, variables, x)
    t_trace = time.perf_counter() - t
    lib = patterns.get_library("reference6")
    valid = np.stack([patterns.valid_patterns(layer, lib) for layer in lg.layers])
    level = "filter" if sum(la.out_features for la in lg.layers) <= 50_000 else "layer"
    t = time.perf_counter()
    gs = graph.build_graph_spec(lg, n_patterns=lib.n_patterns, valid=valid, level=level)
    t_graph = time.perf_counter() - t
    line = (
        f"{name:>22}: trace {t_trace:6.2f}s  graph({level}) {t_graph:6.2f}s  "
        f"total {t_trace + t_graph:6.2f}s  layers {lg.n_layers:4d}  nodes {gs.n_real_nodes:7d}  "
        f"edges {gs.n_real_edges:8d}"
    )
    if xla:
        cost = (
            jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
        ).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        line += f"  ours/XLA FLOPs {lg.dense_flops / cost['flops']:.4f}"
    return line


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=None, help="default: every zoo model")
    p.add_argument("--xla", action="store_true", help="also compare with XLA's cost analysis")
    args = p.parse_args(argv)
    header("trace + graph build time")
    for name in args.models or list_models():
        print(bench(name, args.xla), flush=True)


if __name__ == "__main__":
    main()
