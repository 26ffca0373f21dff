"""The public API (layer 5b): prune, fine-tune and compact ANY Flax model in three calls.

    import sculpt_jax
    pruned = sculpt_jax.prune(model, variables, (x_train, y_train), (x_val, y_val),
                              target_flops=0.5, budget=128)        # GNN policy + bandit PPO
    tuned = sculpt_jax.finetune(pruned, (x_train, y_train), (x_val, y_val), epochs=5)
    fast_apply, fast_vars, info = sculpt_jax.compact(tuned)       # physically smaller, same outputs

`model` is a Linen module (with `variables` from ``model.init``), an NNX module (``variables=None``:
it carries its own state) or a pure ``apply_fn(variables, x, train=False)`` following the Linen
contract of `sculpt_jax.training`. Data are ``(images, labels)`` arrays, a dict with "image" and
"label", or an iterable of such batches (read once into host memory: the search scores every
candidate on the same validation images). Images go to the model as given (normalise them, or
normalise inside the model); labels are class ids.

These calls run the same stages as the command line (`sculpt_jax.pipeline`): the budget-exact
decoder (every candidate within `tolerance` of the target), validation split into a reward set
and a held-out half that re-scores the top candidates, masked fine-tuning with pruned weights held
at exactly zero, selection on validation only. With a `workdir` every stage checkpoints and a
second call resumes; without one they run in a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sculpt_jax import compaction, masking, pipeline
from sculpt_jax import config as config_lib
from sculpt_jax import data as data_lib
from sculpt_jax import flops as flops_lib
from sculpt_jax import graph as graph_lib
from sculpt_jax import paths as paths_lib
from sculpt_jax import trace as trace_lib
from sculpt_jax import training as ft

__all__ = ["FinetuneResult", "PruneResult", "as_apply_fn", "compact", "finetune", "prune"]

METHODS = ("ppo", "random", "uniform", "cem", "anneal", "magnitude", "autocompress")


@dataclasses.dataclass
class PruneResult:
    """What `prune` returns (host numpy / jax arrays).

    Attributes:
      masks: float 0/1 pytree mirroring ``variables["params"]``: the best candidate (by held-out
        accuracy; by search accuracy when there is no held-out part).
      pattern_ids: one int array per traced layer (``[out_features]``, ids into `library`).
      counts: exact counts of the masked model (`flops.count_exact`: dense/masked MACs, FLOPs,
        params and their reductions) plus ``reference_formula_reduction``, the reference code's
        FLOPs formula, for comparison only.
      candidates: the kept candidates, best first: each the record of best.json (search and
        held-out accuracy, exact counts) plus its ``masks`` and ``pattern_ids``.
      history: one dict per search iteration (mean / max reward, on-budget rate, ...).
      summary: the search summary (best.json): evaluations spent, on-budget rate, sizes, ...
      variables: the model's variables the search ran on (NNX: the `trace.nnx_split` state).
      apply_fn: the Linen-style apply function used (`as_apply_fn`).
      graph: the traced `trace.LayerGraph`.
      sample_input: ``[1, ...]`` array of the input shape and dtype (for `compact`).
      nnx: the NNX graphdef and non-trainable state (None for Linen modules and apply functions).
    """

    masks: Any
    pattern_ids: list[np.ndarray] | None
    counts: dict
    candidates: list[dict]
    history: list[dict]
    summary: dict
    variables: Any
    apply_fn: Callable
    graph: Any
    sample_input: np.ndarray
    nnx: Any = None

    def module(self) -> Any:
        """The NNX module with `variables` (masked) merged in (NNX models only)."""
        return _merge_nnx(self.nnx, masking.apply_masks(self.variables, self.masks))


@dataclasses.dataclass
class FinetuneResult:
    """What `finetune` returns.

    Attributes:
      variables: the best-by-validation fine-tuned variables; pruned weights are exactly zero.
      masks: the masks held during fine-tuning (those of the chosen candidate).
      val_accuracy: its validation accuracy; ``best_epoch`` the epoch it came from.
      history: one record per epoch (loss, accuracy, val accuracy, seconds).
      counts: exact counts of the masked model (as `PruneResult.counts`).
      pruned_weights_exactly_zero: checked on the returned variables (always True, or it raises).
      apply_fn, graph, sample_input, nnx: as in `PruneResult` (for `compact`).
    """

    variables: Any
    masks: Any
    val_accuracy: float
    best_epoch: int
    history: list[dict]
    counts: dict
    pruned_weights_exactly_zero: bool
    apply_fn: Callable
    graph: Any
    sample_input: np.ndarray
    nnx: Any = None

    def module(self) -> Any:
        """The fine-tuned NNX module (NNX models only)."""
        return _merge_nnx(self.nnx, self.variables)


# ----------------------------------------------------------------------------------------------
# Models and data.


class _Nnx(NamedTuple):
    graphdef: Any
    other: dict  # the state that is neither Param nor BatchStat (RNG keys and counts)


def _merge_nnx(held: _Nnx | None, variables: dict):
    if held is None:
        raise ValueError("module() is for NNX models; a Linen model's result has .variables")
    from flax import nnx

    state = [variables[k] for k in ("params", "batch_stats") if jax.tree.leaves(variables.get(k))]
    return nnx.merge(held.graphdef, *state, *([held.other] if held.other else []))


def _nnx_apply(module) -> tuple[Callable, dict, _Nnx]:
    """Linen-style apply of an NNX module over ``{"params", "batch_stats"}``; the rest of its
    state (RNG streams) is held in the function, as training and evaluation carry only those two."""
    graphdef, state = trace_lib.nnx_split(module)
    other = state.pop("other", {})
    base = trace_lib.nnx_apply_fn(graphdef)

    def apply(v, x, train=False, **kwargs):
        full = {k: v[k] for k in ("params", "batch_stats") if jax.tree.leaves(v.get(k))}
        return base(dict(full, **({"other": other} if other else {})), x, train=train, **kwargs)

    return apply, state, _Nnx(graphdef, other)


def _takes_train(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return "train" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def as_apply_fn(model_or_apply_fn: Any, variables: Any) -> tuple[Callable, Any, Any]:
    """``(apply_fn, variables, nnx)`` with the Linen-style contract of `sculpt_jax.training`.

    A Linen module gives ``model.apply`` (a ``__call__`` without a ``train`` argument is called
    without it); an NNX module gives `trace.nnx_apply_fn` over the ``{"params", "batch_stats"}``
    of its `trace.nnx_split` state (then `variables` must be None; ``nnx`` holds the rest); any
    other callable is taken as the apply function itself.
    """
    import flax.linen as nn
    from flax import nnx

    if isinstance(model_or_apply_fn, nnx.Module):
        if variables is not None:
            raise ValueError("an NNX module carries its own state: pass variables=None")
        return _nnx_apply(model_or_apply_fn)
    if variables is None or "params" not in variables:
        raise ValueError("variables must be the model's variables dict with a 'params' collection "
                         "(Linen: variables = model.init(key, x))")  # fmt: skip
    if isinstance(model_or_apply_fn, nn.Module):
        module = model_or_apply_fn
        if _takes_train(type(module).__call__):
            return module.apply, variables, None

        def apply(v, x, train=False, **kwargs):  # __call__(x) without a train flag
            return module.apply(v, x, **kwargs)

        return apply, variables, None
    if not callable(model_or_apply_fn):
        raise TypeError(f"expected a Linen or NNX module or an apply function, got "
                        f"{type(model_or_apply_fn).__name__}")  # fmt: skip
    return model_or_apply_fn, variables, None


def _is_xy_pair(data: Any) -> bool:
    """True for ``(images, labels)``: an array first, or labels (a sequence of scalars) second.

    A list of two batches (``[(x, y), (x, y)]``) is not a pair: its second entry's first element
    is an array of images, not a scalar label."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        return False
    if hasattr(data[0], "shape"):
        return True
    second = data[1]
    return (isinstance(second, (tuple, list)) or hasattr(second, "shape")) and len(second) > 0 \
        and not isinstance(second[0], (tuple, list, Mapping)) and np.ndim(second[0]) == 0


def _as_arrays(data: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, ...], labels int32 [N])`` of arrays, a dict or an iterable of batches."""
    if isinstance(data, Mapping) or _is_xy_pair(data):
        images, labels = ft._split_xy(data, name)
    elif isinstance(data, Iterable):
        parts = [_as_arrays(b, name) for b in data]
        if not parts:
            raise ValueError(f"{name}: the iterable yielded no batch")
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    else:
        raise ValueError(f"{name} must be (images, labels), a dict with 'image' and 'label', or an "
                        f"iterable of those; got {type(data).__name__}")  # fmt: skip
    images, labels = np.asarray(images), np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images) or not len(labels):
        raise ValueError(f"{name}: labels must be one class id per image (int [N]), got images "
                         f"{images.shape} and labels {labels.shape}")  # fmt: skip
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"{name}: labels must be class ids (ints >= 0), got {labels.dtype} "
                         f"with minimum {labels.min()}")  # fmt: skip
    return images, labels.astype(np.int32)


def _model_name(model: Any) -> str:
    """What messages and fingerprints call a user model: its class (or function) name."""
    return getattr(model, "__name__", None) or type(model).__name__


def _digest(*trees: Any) -> str:
    """sha1 of the shapes, dtypes and bytes of array pytrees (what a resumed run must match)."""
    h = hashlib.sha1()
    for leaf in jax.tree.leaves(trees):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _num_classes(apply_fn, variables, images, labels, name) -> int:
    try:
        out = jax.eval_shape(lambda v, x: apply_fn(v, x, train=False), variables, images[:1])
    except Exception as e:  # noqa: BLE001 - re-raised with what to check
        raise ValueError(f"the model cannot take {name} images of shape {images.shape[1:]} "
                         f"{images.dtype}: {type(e).__name__}: {e}") from e
    if not hasattr(out, "shape") or len(out.shape) != 2:
        raise ValueError(f"the model must return logits [B, classes]; it returned {out}")
    n = int(out.shape[-1])
    if int(labels.max()) >= n:
        raise ValueError(f"{name} has label {int(labels.max())} but the model has {n} logits")
    return n


def _splits(train, val, num_classes: int) -> data_lib.DataSplits:
    def split(xy):
        return data_lib.Split(xy[0], xy[1], np.arange(len(xy[1]), dtype=np.int64))

    c = train[0].shape[-1] if train[0].ndim == 4 else 1
    return data_lib.DataSplits(
        name="user", source="arrays given to sculpt_jax.prune", train=split(train),
        val=split(val), test=split(val), num_classes=num_classes,
        image_shape=tuple(train[0].shape[1:]), mean=(0.0,) * c, std=(1.0,) * c,
        class_names=tuple(str(i) for i in range(num_classes)),
    )  # fmt: skip


@contextlib.contextmanager
def _workdir(workdir: str | os.PathLike | None):
    if workdir is not None:
        yield paths_lib.check_workdir(workdir)  # before any long work
        return
    with tempfile.TemporaryDirectory(prefix="sculpt_jax_") as d:
        yield d


# ----------------------------------------------------------------------------------------------
# prune


def _prune_config(name, method, target_flops, budget, seed, workdir, *, n_train, has_bn, digest,
                  tolerance, library, top_k, progress, overrides):  # fmt: skip
    """The pipeline config of one `prune` call (the CLI's defaults otherwise), validated."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a number of evaluations >= 1, got {budget!r}")
    cfg = config_lib.get_default_config()
    cfg.model, cfg.dataset, cfg.seed, cfg.workdir = name, "user", int(seed), workdir
    cfg.progress, cfg.data_digest = bool(progress), digest
    sc = cfg.search
    sc.method, sc.target_flops, sc.tolerance = method, float(target_flops), float(tolerance)
    sc.library, sc.top_k = library, int(top_k)
    sc.n_envs = min(16, budget)
    sc.iterations = math.ceil(budget / sc.n_envs)
    sc.bn_recalib_batch_size = min(128, n_train)
    sc.bn_recalib_batches = min(4, n_train // sc.bn_recalib_batch_size) if has_bn else 0
    config_lib.apply_overrides(cfg, {k: str(v) for k, v in overrides.items()})
    return pipeline.validate_config(cfg)


def _best_fields(ss, best: list[dict]) -> tuple[list[dict], Any, Any]:
    """Candidates with their masks and per-layer pattern ids; the first one's masks and ids."""
    out = []
    for c in best:
        masks = pipeline.candidate_masks(ss, c)
        ids = None
        if "pattern_ids" in c:
            ids = [np.asarray(i) for i in graph_lib.layer_pattern_ids(
                ss.spec, jnp.asarray(c["pattern_ids"]))]  # fmt: skip
        out.append(dict(c, masks=masks, layer_pattern_ids=ids))
    return out, out[0]["masks"], out[0]["layer_pattern_ids"]


def prune(
    model_or_apply_fn: Any,
    variables: Any,
    train_data: Any,
    val_data: Any,
    *,
    target_flops: float = 0.5,
    method: str = "ppo",
    budget: int = 128,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
    tolerance: float = 0.005,
    library: str = "reference6",
    top_k: int = 3,
    progress: bool = False,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> PruneResult:
    """Searches pruning patterns for a (pretrained) model: AutoSculpt's GNN policy by default.

    Args:
      model_or_apply_fn: a Linen module, an NNX module or an apply function (`as_apply_fn`).
      variables: its variables (``model.init`` / your checkpoint); None for an NNX module.
      train_data: training data; only BatchNorm recalibration batches are drawn from it here (and
        AutoCompress's ADMM training).
      val_data: validation data: half scores the candidates, half re-scores the top `top_k`.
      target_flops: FLOPs reduction to reach, in (0, 1): every candidate lands within `tolerance`.
      method: "ppo" (AutoSculpt: GNN policy trained by bandit PPO), the baselines "random",
        "uniform", "cem", "anneal", "magnitude", or "autocompress".
      budget: candidate evaluations (rounded up to a multiple of 16).
      seed: every random choice derives from it.
      workdir: checkpoint and resume here (None: a temporary folder).
      tolerance, library, top_k: `sculpt_jax.config` search fields.
      progress: progress bars.
      overrides: any other config field, dotted (``{"search.heldout_size": 0}``).
      overwrite: discard a `workdir` search of other settings (else it is refused).
    Returns:
      a `PruneResult`. Raises ValueError (naming the argument) before any evaluation on bad input:
      an unreachable target, a model the tracer cannot prune, data that do not fit the model.
    """
    apply_fn, variables, held = as_apply_fn(model_or_apply_fn, variables)
    train = _as_arrays(train_data, "train_data")
    val = _as_arrays(val_data, "val_data")
    if train[0].shape[1:] != val[0].shape[1:]:
        raise ValueError(f"train_data images {train[0].shape[1:]} and val_data images "
                         f"{val[0].shape[1:]} differ in shape")  # fmt: skip
    n_cls = _num_classes(apply_fn, variables, *val, "val_data")
    _num_classes(apply_fn, variables, *train, "train_data")
    has_bn = bool(jax.tree.leaves(variables.get("batch_stats", {})))
    with _workdir(workdir) as wd:
        cfg = _prune_config(_model_name(model_or_apply_fn), method, target_flops, budget, seed, wd, n_train=len(train[1]),
                            has_bn=has_bn, digest=_digest(variables, train, val),
                            tolerance=tolerance, library=library, top_k=top_k, progress=progress,
                            overrides=dict(overrides or {}))  # fmt: skip
        s = pipeline.Setup(cfg, _splits(train, val, n_cls), None, apply_fn, variables,
                           tuple(train[0].shape[1:]), n_cls, train[0].dtype,
                           mesh=pipeline.make_mesh(cfg))  # fmt: skip
        out = pipeline.prune(cfg, s=s, variables=variables, overwrite=overwrite)
    ss, summary = out["search_setup"], out["summary"]
    if not out["best"]:
        raise pipeline.PipelineError("the search kept no candidate on budget; raise budget or "
                                     "tolerance")  # fmt: skip
    cands, masks, ids = _best_fields(ss, out["best"])
    for c, rec in zip(cands, summary["candidates"], strict=True):
        c.update(rec)
    counts = dict(flops_lib.count_exact(ss.graph, masks),
                  reference_formula_reduction=float(out["best"][0]["reference_reduction"]))
    return PruneResult(masks, ids, counts, cands, out["history"], summary, variables, apply_fn,
                       ss.graph, np.asarray(train[0][:1]), held)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# finetune + compact


def finetune(
    result: PruneResult,
    train_data: Any,
    val_data: Any,
    *,
    candidate: int = 0,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    schedule: str | None = None,
    augment_fn: Callable | None = None,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
    progress: bool = False,
    overwrite: bool = False,
    devices: int = 0,
) -> FinetuneResult:
    """Fine-tunes one candidate of `result` with its masks held: pruned weights stay exactly zero.

    Args:
      result: what `prune` returned.
      train_data / val_data: as in `prune`; the best epoch is chosen on `val_data`.
      candidate: index into ``result.candidates`` (0: the best).
      epochs, batch_size, lr, momentum, weight_decay, schedule: SGD settings; None takes the
        config defaults (`sculpt_jax.config`, section finetune).
      augment_fn: jittable ``(key, images) -> images`` applied to training batches (None: none;
        `data.make_augment` gives the CIFAR / ImageNet ones).
      seed: shuffling and step keys.
      workdir: checkpoint every epoch and resume here (None: a temporary folder).
      progress: progress bars.
      overwrite: discard a `workdir` run of other settings (else it is refused).
      devices: train data parallel over the first N local devices (0 = all; the batch size must
        be a multiple of the count, else ValueError before any training).
    """
    if not 0 <= candidate < len(result.candidates):
        raise ValueError(f"candidate={candidate}: the result has {len(result.candidates)}")
    f = config_lib.get_default_config().finetune
    pick = lambda v, d: d if v is None else v  # noqa: E731
    opt = dict(kind="sgd", lr=pick(lr, f.lr), momentum=pick(momentum, f.momentum),
               weight_decay=pick(weight_decay, f.weight_decay), schedule=pick(schedule, f.schedule))
    cand = result.candidates[candidate]
    n_dev = pipeline.device_count(devices)
    pipeline.check_batches(n_dev, {"batch_size": pick(batch_size, f.batch_size)})
    mesh = pipeline.mesh_of(n_dev)
    masks, start = cand["masks"], cand.get("variables", result.variables)  # AutoCompress: ADMM's
    with _workdir(workdir) as wd:
        res = ft.fit(
            result.apply_fn, start, {"train": _as_arrays(train_data, "train_data"),
                                     "val": _as_arrays(val_data, "val_data")},
            epochs=pick(epochs, f.epochs), batch_size=pick(batch_size, f.batch_size), workdir=wd,
            seed=seed, masks=masks, optimizer=opt, augment_fn=augment_fn, mesh=mesh,
            progress=progress,
            overwrite=overwrite,
            config_extra={"digest": _digest(start, masks), "candidate": candidate},
        )  # fmt: skip
    final = res.variables
    if not masking.pruned_exactly_zero(final["params"], masks):
        raise pipeline.PipelineError("internal error: a pruned weight is nonzero after fine-tuning")
    return FinetuneResult(final, masks, res.best_val_accuracy, res.best_epoch, res.history,
                          flops_lib.count_exact(result.graph, masks), True, result.apply_fn,
                          result.graph, result.sample_input, result.nnx)  # fmt: skip


def compact(result: PruneResult | FinetuneResult, sample_input: Any = None, *, align: int = 1,
            crop: bool = True, lowering: str = "filters", auto_batch: int | None = None,
            layer_lowerings: dict[str, str] | None = None) -> tuple[Callable, dict, dict]:  # fmt: skip
    """The physically smaller model of a result: ``(compact_apply_fn, compact_variables, info)``.

    ``compact_apply_fn(compact_variables, x)`` is jitted and equals the masked model's output for
    any batch (`compaction.compact`: removed filters and channels gone, kernels cropped; `align`
    pads stored widths to a multiple; ``lowering="grouped"`` runs one cropped conv per pattern
    group, ``"taps"`` one matmul per kernel tap; both slower than "filters" on XLA:CPU for
    CIFAR-width layers; ``"auto"`` times each conv in every lowering at batch `auto_batch` and
    keeps the fastest, ``info["auto_lowering"]`` says what was measured; `layer_lowerings`
    pins single convs by layer name). `sample_input` defaults to the shape the model was
    pruned on.
    """
    x = result.sample_input if sample_input is None else sample_input
    return compaction.compact(result.apply_fn, result.variables, result.graph, result.masks, x,
                              crop=crop, align=align, lowering=lowering, auto_batch=auto_batch,
                              layer_lowerings=layer_lowerings)  # fmt: skip
