"""AutoCompress driver: progressive rounds of annealing + ADMM + purification (layer 4).

AutoCompress (arXiv 1907.03141, AAAI 2020; REFERENCE.md section 7), per round r = 1..R:

1. simulated annealing (`anneal.anneal`) over per-layer pruning rates, under the hard constraint
   that the EXACT cumulative reduction (`flops.count`, FLOPs or params, vs the dense model) reaches
   ``1 - (1 - s)^(r / R)``: each round removes ``1 - (1 - s)^(1/R)`` of what is left, compounding
   to the final target s (`round_targets`); energy = -100 * validation accuracy of the masked
   model, measured by a compiled evaluator over masks (`make_mask_evaluator`, optional BN
   recalibration);
2. ADMM structured pruning at the best rates (`admm.run_admm`), then hard pruning to Z's support;
3. purification (`purify`): removal of weights that provably cannot change the network function.

Purification rule (output-preserving by construction, checked in tests):
  (a) kernel entries that read a DEAD input feature (`flops.alive_features`: fed by no alive
      channel and exactly zero in the masked forward; a removed channel that reaches the layer
      through an op with f(0) != 0, such as a sigmoid or ``relu(x) + 1``, counts as alive there,
      `Layer.nonzero_dead_sources`) are removed -- except when that would
      empty a filter that has affine entries (an all-zero kernel still outputs BN's bias, so such
      a filter is left as it is);
  (b) a filter whose output channel no consumer reads (every consumer's kernel entries on every
      input feature fed by that channel are zero -- through residual adds too, since `sources` list
      every addend -- and the channel feeds no leaf of the model output) is removed with its affine
      entries.
      Rule (b) is skipped when a layer below the input (depth > 0) has an always-alive source
      (a channel-mixing op hides who reads the channel).
  Both are iterated to a fixed point.

`run_autocompress` returns candidates best-first (the pipeline consumes ``cand["masks"]``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sculpt_jax import env as env_lib
from sculpt_jax import flops as flops_lib
from sculpt_jax import masking
from sculpt_jax import patterns as pat
from sculpt_jax.search import admm, anneal
from sculpt_jax.tree_util import get_at, set_at
from sculpt_jax.types import ALWAYS_ALIVE, LayerGraph

# ----------------------------------------------------------------------------------------------
# Progressive targets.


def per_round_target(target: float, rounds: int) -> float:
    """Fraction of what is left removed by each round: ``1 - (1 - s)^(1/R)`` (host-only)."""
    if not 0.0 < target < 1.0 or rounds < 1:
        raise ValueError(f"target must be in (0, 1) and rounds >= 1, got {target}, {rounds}.")
    return 1.0 - (1.0 - target) ** (1.0 / rounds)


def round_targets(target: float, rounds: int) -> tuple[float, ...]:
    """Cumulative reduction after each round: ``1 - (1 - s)^(r/R)``, r = 1..R; the last is s."""
    p = per_round_target(target, rounds)
    return tuple(1.0 - (1.0 - p) ** r for r in range(1, rounds + 1))


# ----------------------------------------------------------------------------------------------
# The compiled evaluator over masks.


def make_mask_evaluator(
    apply_fn: Callable,
    variables: Mapping[str, Any],
    reward_images: np.ndarray,
    reward_labels: np.ndarray,
    *,
    calib_images: np.ndarray | None = None,
    batch_size: int = 256,
):
    """``(evaluate, consts)``: jitted ``evaluate(consts, variables, masks) -> accuracy`` (float32).

    The masked model ``variables * masks`` is scored on the reward set (validation, never test),
    chunked as in `env.make_env`; with `calib_images` ([B, batch, H, W, C]) its BatchNorm
    statistics are first re-estimated (`env.make_bn_recalibrate`). `variables` (weights) are an
    argument so that progressive rounds reuse one compilation.
    """
    if len(reward_images) == 0 or len(reward_images) != len(reward_labels):
        raise ValueError(
            f"reward set: {len(reward_images)} images and {len(reward_labels)} labels; give a "
            "non-empty validation subset with one label per image."
        )
    bs = min(batch_size, len(reward_images))
    chunks = tuple(jnp.asarray(a) for a in env_lib._chunk(reward_images, reward_labels, bs))
    recal = env_lib.make_bn_recalibrate(apply_fn, variables, calib_images)
    consts = {"reward": chunks, "calib": None if recal is None else jnp.asarray(calib_images)}
    n = float(len(reward_images))

    def evaluate(consts, variables, masks):
        p = masking.apply_masks(variables["params"], masks)
        v = {"params": p}
        if variables.get("batch_stats"):
            v["batch_stats"] = (
                recal(p, consts["calib"]) if recal is not None else variables["batch_stats"]
            )

        def chunk(carry, xs):
            x, y, w = xs
            logits = apply_fn(v, x, train=False)
            return carry + jnp.sum((jnp.argmax(logits, -1) == y) * w), None

        correct, _ = jax.lax.scan(chunk, jnp.float32(0.0), consts["reward"])
        return correct / n

    return jax.jit(evaluate), consts


# ----------------------------------------------------------------------------------------------
# Purification.


def _per_feature(layer, nonzero_ki_f):
    """bool [K, I, F] -> bool [in_features]: some filter reads the feature through a kept entry."""
    _, i, f = nonzero_ki_f.shape
    g = layer.groups
    read = jnp.any(nonzero_ki_f, axis=0).reshape(i, g, f // g).any(axis=2)  # [I, g]
    return read.T.reshape(g * i)


def _alive_matrix(layer, alive_in, i, f):
    g = layer.groups
    return jnp.repeat(alive_in.reshape(g, i).T, f // g, axis=1)  # [I, F]


def _purify_pass(graph: LayerGraph, masks: Any) -> Any:
    canon = [
        pat.kernel_to_canonical(jnp.asarray(get_at(masks, pat.resolve_path(masks, ly.kernel_path)),
                                            jnp.float32), ly)
        for ly in graph.layers
    ]  # fmt: skip
    old_alive = [jnp.any(c != 0, axis=(0, 1)) for c in canon]
    _, input_alive = flops_lib.alive_features(graph, masks)
    new = []
    for layer, c, a_in, alive in zip(graph.layers, canon, input_alive, old_alive, strict=True):
        _, i, f = c.shape
        cut = c * _alive_matrix(layer, a_in, i, f)[None].astype(jnp.float32)  # rule (a)
        if layer.zeroed_affine_paths:
            emptied = alive & ~jnp.any(cut != 0, axis=(0, 1))
            cut = jnp.where(emptied[None, None, :], c, cut)
        new.append(cut)
    # rule (b): filters nobody reads.
    hidden = any(
        src.producer == ALWAYS_ALIVE for ly in graph.layers if ly.depth > 0 for src in ly.sources
    )
    if not hidden:
        read = [jnp.zeros((ly.out_features,), jnp.int32) for ly in graph.layers]

        def mark(srcs, feat_read):
            for src in srcs:
                if src.producer == ALWAYS_ALIVE:
                    continue
                ch = np.asarray(src.channels, np.int64)
                fed = np.nonzero(ch >= 0)[0]
                read[src.producer] = (
                    read[src.producer].at[ch[fed]].max(feat_read[fed].astype(jnp.int32))
                )

        for layer, c in zip(graph.layers, new, strict=True):
            mark(layer.sources, _per_feature(layer, c != 0))
        for src in graph.output_sources:
            mark((src,), jnp.ones((len(src.channels),), bool))
        new = [
            c * (r > 0)[None, None, :].astype(jnp.float32) for c, r in zip(new, read, strict=True)
        ]
    out = masks
    for layer, c, alive in zip(graph.layers, new, old_alive, strict=True):
        rel = pat.resolve_path(out, layer.kernel_path)
        out = set_at(out, rel, pat.canonical_to_kernel(c, layer).astype(jnp.float32))
        removed = alive & ~jnp.any(c != 0, axis=(0, 1))
        for ap in layer.zeroed_affine_paths:
            rel = pat.resolve_path(out, ap)
            leaf = jnp.asarray(get_at(out, rel), jnp.float32)
            keep = jnp.where(removed, 0.0, 1.0).reshape(leaf.shape)
            out = set_at(out, rel, leaf * keep)
    return out


_purify_pass_jit = jax.jit(_purify_pass, static_argnames=("graph",))
_nonzeros = jax.jit(lambda t: sum(jnp.sum(m != 0) for m in jax.tree.leaves(t)))


def purify(graph: LayerGraph, masks: Any, max_passes: int | None = None) -> Any:
    """Masks with provably redundant weights removed (see the module docstring; host loop of
    jitted passes until nothing changes). The masked model's outputs are unchanged."""
    max_passes = max_passes or graph.n_layers + 1
    n_prev = None
    for _ in range(max_passes):
        masks = _purify_pass_jit(graph, masks)
        n = int(_nonzeros(masks))
        if n == n_prev:
            break
        n_prev = n
    return masks


# ----------------------------------------------------------------------------------------------
# The driver.


def _split_arrays(splits_or_arrays: Any, name: str):
    if isinstance(splits_or_arrays, (tuple, list)) and len(splits_or_arrays) == 2:
        return splits_or_arrays if name == "train" else None
    split = getattr(splits_or_arrays, name, None)
    return None if split is None else split.arrays


def _check_reachable(constrain, variables, n_layers, target, kind, max_rate, scheme) -> None:
    """ValueError, before any work, when every pruned layer at `max_rate` misses the target (the
    hard constraint would otherwise return a model short of it)."""
    full = jnp.full((n_layers,), max_rate, jnp.float32)
    ones = masking.ones_masks(variables)
    best = float(constrain(variables, ones, full, full, jnp.float32(target))[1])
    if best < target:
        raise ValueError(
            f"AutoCompress cannot reach a {kind} reduction of {target}: every pruned layer at "
            f"max_rate {max_rate} with scheme {scheme!r} gives {best:.4f}. Lower the target, raise "
            "max_rate, or prune more layers / another scheme."
        )


def run_autocompress(
    apply_fn: Callable,
    variables: Mapping[str, Any],
    graph: LayerGraph,
    splits_or_arrays: Any,
    *,
    target: float,
    target_kind: str = "flops",
    scheme: str = "filter+column",
    rounds: int = 3,
    layers: Sequence[int] | None = None,
    library: str | pat.PatternLibrary = "reference6",
    t0: float = 100.0,
    t_stop: float = 20.0,
    cooling: float = 0.9,
    perturbation: float = 0.35,
    moves_per_temperature: int = 1,
    max_rate: float = 0.95,
    admm_iterations: int = 3,
    admm_steps: int = 10,
    rho: float = 1e-4,
    admm_lr: float = 1e-3,
    batch_size: int = 32,
    reward_images: np.ndarray | None = None,
    reward_labels: np.ndarray | None = None,
    calib_images: np.ndarray | None = None,
    eval_batch_size: int = 256,
    top_k: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """AutoCompress: R progressive rounds of annealing + ADMM + purification (host loop).

    Args:
      apply_fn / variables / graph: the pretrained model, its variables and `LayerGraph`.
      splits_or_arrays: `data.DataSplits` (train for ADMM, val for the reward set) or a tuple
        (train_images, train_labels) (then `reward_images`/`reward_labels` are required).
      target: final reduction s in (0, 1); target_kind: "flops" or "params" (exact counts).
      scheme: one of `admm.SCHEMES`; layers: pruned layer indices (default: convs below the input).
      t0, t_stop, cooling, perturbation, moves_per_temperature: annealing (`anneal.anneal`).
      admm_iterations, admm_steps (W-steps per iteration), rho, admm_lr, batch_size: ADMM;
        ``admm_iterations=0`` hard-prunes the annealed masks directly (weights unchanged).
      calib_images: [B, batch, H, W, C] training batches for BN recalibration in the evaluator.
    Returns: candidates best-first (validation accuracy), each a dict: masks, variables (the
      weights the masks were scored on: ADMM-trained for the final candidate), accuracy,
      flops_reduction, params_reduction (exact), reference_reduction (reference formula, labelled),
      rates (float [n_layers], 0 where not pruned), seed, round_targets, n_evals, admm_residuals.
    """
    admm.check_scheme(scheme)
    layers = admm._resolve_layers(graph, layers)
    targets = round_targets(target, rounds)
    train = _split_arrays(splits_or_arrays, "train")
    if train is None:
        raise ValueError("splits_or_arrays: pass data.DataSplits or (train_images, train_labels).")
    if reward_images is None:
        val = _split_arrays(splits_or_arrays, "val")
        if val is None:
            raise ValueError(
                "no reward set: pass reward_images/reward_labels (validation, never test) or "
                "DataSplits with a val split."
            )
        reward_images, reward_labels = val
    evaluate, consts = make_mask_evaluator(
        apply_fn, variables, reward_images, reward_labels, calib_images=calib_images,
        batch_size=eval_batch_size,
    )  # fmt: skip
    constrain = anneal.make_constraint(
        graph, scheme=scheme, layers=layers, target_kind=target_kind, max_rate=max_rate,
        library=library,
    )  # fmt: skip
    weight_counts = [graph.layers[i].params for i in layers]
    _check_reachable(constrain, variables, len(layers), target, target_kind, max_rate, scheme)

    @jax.jit
    def score(cur, prev_masks, rates):
        masks = admm.scheme_masks(graph, cur, rates, scheme, layers, library, prev_masks)
        return evaluate(consts, cur, masks)

    key = jax.random.PRNGKey(seed)
    cur = dict(variables)
    prev_masks = masking.ones_masks(variables)  # not None: one trace for every round
    lower = jnp.zeros((len(layers),), jnp.float32)
    rates = np.full((len(layers),), targets[0], np.float32)
    n_evals = 0
    residuals: list = []
    result = None
    for r, tgt in enumerate(targets):
        lower_r = lower

        def project(rts, cur=cur, pm=prev_masks, lo=lower_r, tgt=tgt):
            return constrain(cur, pm, rts, lo, jnp.float32(tgt))[0]

        def energy(rts, cur=cur, pm=prev_masks):
            acc = float(score(cur, pm, jnp.asarray(rts)))
            return -100.0 * acc, {"accuracy": acc}

        result = anneal.anneal(
            jax.random.fold_in(key, r), energy, project, np.maximum(rates, np.asarray(lower)),
            weight_counts, t0=t0, t_stop=t_stop, cooling=cooling, perturbation=perturbation,
            moves_per_temperature=moves_per_temperature, top_k=top_k, progress=progress,
        )  # fmt: skip
        n_evals += result["n_evals"]
        rates = result["best"][0]["rates"]
        round_start = (cur, prev_masks)
        if admm_iterations > 0:
            out = admm.run_admm(
                apply_fn, cur, graph, rates, *train, scheme=scheme, layers=layers,
                prev_masks=prev_masks, rho=rho, iterations=admm_iterations,
                steps_per_iteration=admm_steps, lr=admm_lr, batch_size=batch_size,
                seed=seed + 1000 * r, library=library,
            )  # fmt: skip
            new_vars, masks = out["variables"], out["masks"]
            residuals.append(out["residuals"])
        else:
            masks = admm.scheme_masks_jit(graph, cur, rates, scheme, layers, library, prev_masks)
            new_vars = cur
        masks = purify(graph, masks)
        cur = dict(new_vars, params=admm._apply_masks_jit(new_vars["params"], masks))
        prev_masks = masks
        lower = jnp.asarray(rates)

    def record(vars_, masks, rts, acc=None):
        exact = flops_lib.count_exact(graph, masks)
        full = np.zeros((graph.n_layers,), np.float32)
        full[list(layers)] = np.asarray(rts)
        return {
            "masks": masks,
            "variables": dict(vars_, params=admm._apply_masks_jit(vars_["params"], masks)),
            "accuracy": float(evaluate(consts, vars_, masks)) if acc is None else acc,
            "flops_reduction": exact["flops_reduction"],
            "params_reduction": exact["params_reduction"],
            "reference_reduction": float(flops_lib.reference_flops_reduction(graph, masks)),
            "rates": full,
            "seed": seed,
            "round_targets": targets,
            "n_evals": n_evals,
            "admm_residuals": residuals,
        }

    cands = [record(cur, prev_masks, rates)]
    start_vars, start_masks = round_start
    for b in result["best"][1:]:
        m = purify(graph, admm.scheme_masks_jit(graph, start_vars, jnp.asarray(b["rates"]), scheme,
                                                 layers, library, start_masks))  # fmt: skip
        cands.append(record(start_vars, m, b["rates"]))
    cands.sort(key=lambda c: -c["accuracy"])
    return cands
