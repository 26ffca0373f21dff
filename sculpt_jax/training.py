"""Training, evaluation and masked fine-tuning of a Flax model given as an apply function (layer 3).

AutoSculpt's last stage (REFERENCE.md section 5): fine-tune the pruned model with the masks held
fixed, SGD + momentum 0.9, weight decay 4e-5, lr 1e-3 divided by 10 at 50%, 75% and 90% of the steps
(pretraining: the same recipe with lr 0.01). Unlike the reference, pruned weights stay EXACTLY zero
(`masking.masked` holds the masks in the optimizer state) and selection uses the validation split;
the test split is evaluated once, at the end, on the best-by-validation parameters.

The apply function contract (DESIGN.md principle 1) is Linen's `Module.apply`:
``apply_fn(variables, x, train=False)`` -> logits ``[B, C]``, and in training
``apply_fn(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})`` ->
``(logits, {"batch_stats": ...})``. Models without BatchNorm simply return no "batch_stats".
This module never imports `sculpt_jax.models`.

Batches are dicts of arrays: ``"image"`` float ``[B, ...]``, ``"label"`` int ``[B]`` and optionally
``"mask"`` ``[B]`` (1 = real example, 0 = padding; padded examples count nowhere).

Pieces:
  * `TrainState`, `make_optimizer`, `make_lr_schedule`, `create_train_state`;
  * `make_train_step` / `make_eval_step` (jitted; sharded over a 1-D "data" mesh when given one);
    `evaluate` (host loop over padded batches);
  * `make_candidate_eval` (K stacked masks vs shared params on one batch, `lax.map` or `vmap`) and
    `make_topk_train_step` / `create_topk_train_state` (K masked models, one compiled step);
  * `fit`: the resumable host loop (checkpoint every epoch and optionally every N steps,
    bit-identical resume mid-epoch, best-by-val; in-memory numpy batches or the grain pipeline).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm import tqdm

from sculpt_jax import checkpoint as ckpt_lib
from sculpt_jax import data as data_lib
from sculpt_jax import input_pipeline as input_lib
from sculpt_jax import masking
from sculpt_jax import paths as paths_lib
from sculpt_jax import sharding as shd
from sculpt_jax.tree_util import flatten_with_paths, path_str

log = logging.getLogger(__name__)

ApplyFn = Callable[..., Any]
Batch = Mapping[str, Any]

__all__ = [
    "FitResult",
    "TrainState",
    "create_topk_train_state",
    "create_train_state",
    "evaluate",
    "fit",
    "make_candidate_eval",
    "make_eval_step",
    "make_lr_schedule",
    "make_optimizer",
    "make_topk_train_step",
    "make_train_step",
    "stack_trees",
    "unstack_tree",
]


# ----------------------------------------------------------------------------------------------
# State and optimizer.


@struct.dataclass
class TrainState:
    """Everything a train step updates (a pytree; the apply function is NOT part of it).

    Attributes:
      step: int32 scalar, number of optimizer steps taken.
      params: the "params" collection.
      batch_stats: the "batch_stats" collection ({} for models without BatchNorm).
      opt_state: optax state; for a masked optimizer it holds the masks (`masking.MaskedState`).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict:
        """``{"params": ..., "batch_stats": ...}`` as `apply_fn` wants them."""
        return _variables(self.params, self.batch_stats)


def _variables(params: Any, batch_stats: Any) -> dict:
    if jax.tree.leaves(batch_stats):
        return {"params": params, "batch_stats": batch_stats}
    return {"params": params}


def make_lr_schedule(
    lr: float,
    schedule: str = "multistep",
    total_steps: int | None = None,
    boundaries_fractions: Sequence[float] = (0.5, 0.75, 0.9),
    decay: float = 0.1,
) -> optax.Schedule | float:
    """The learning rate as a function of the step (jittable schedule).

    Args:
      lr: initial learning rate.
      schedule: "multistep" (lr * decay at each fraction of `total_steps`, REFERENCE.md section 5:
        /10 at 50%, 75%, 90%), "cosine" (to 0 at `total_steps`) or "constant".
      total_steps: number of optimizer steps of the run (needed by multistep and cosine).
      boundaries_fractions: fractions of `total_steps` where multistep decays.
      decay: multistep factor.
    """
    if schedule == "constant":
        return float(lr)
    if total_steps is None or int(total_steps) <= 0:
        raise ValueError(
            f"schedule {schedule!r} needs total_steps > 0 (got {total_steps}); pass "
            "total_steps=epochs * steps_per_epoch or use schedule='constant'."
        )
    total_steps = int(total_steps)
    if schedule == "multistep":
        scales: dict[int, float] = {}
        for f in boundaries_fractions:
            if not 0.0 < float(f) < 1.0:
                raise ValueError(f"boundaries_fractions must lie in (0, 1), got {f}.")
            b = max(1, int(round(float(f) * total_steps)))
            scales[b] = scales.get(b, 1.0) * float(decay)
        return optax.piecewise_constant_schedule(float(lr), scales)
    if schedule == "cosine":
        return optax.cosine_decay_schedule(float(lr), total_steps)
    raise ValueError(f"unknown schedule {schedule!r}; use 'multistep', 'cosine' or 'constant'.")


def make_optimizer(
    kind: str = "sgd",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 4e-5,
    schedule: str = "multistep",
    total_steps: int | None = None,
    boundaries_fractions: Sequence[float] = (0.5, 0.75, 0.9),
    decay: float = 0.1,
    nesterov: bool = False,
    masks: Any = None,
) -> optax.GradientTransformation:
    """The optimizer of the reference recipe, optionally masked (REFERENCE.md section 5).

    "sgd" has torch.optim.SGD semantics: ``g += weight_decay * p`` for EVERY param (BN and biases
    included), then heavy-ball momentum ``buf = momentum * buf + g`` (Nesterov if asked), then
    ``p -= lr_t * buf``. "adam" adds the same L2 term before Adam; "adamw" decays decoupled.
    Defaults are the reference's pretraining recipe (lr 0.01); its fine-tune uses lr 1e-3.

    Args:
      masks: if given (float 0/1 pytree mirroring the params), the optimizer is wrapped by
        `masking.masked`, which keeps the masks in its state and pruned weights exactly zero.
      others: see `make_lr_schedule`.
    """
    lr_t = make_lr_schedule(lr, schedule, total_steps, boundaries_fractions, decay)
    if kind == "sgd":
        tx = optax.sgd(lr_t, momentum=momentum or None, nesterov=nesterov)
        if weight_decay:
            tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    elif kind == "adam":
        tx = optax.adam(lr_t)
        if weight_decay:
            tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    elif kind == "adamw":
        tx = optax.adamw(lr_t, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer kind {kind!r}; use 'sgd', 'adam' or 'adamw'.")
    if masks is not None:
        tx = masking.masked(tx, masks)
    return tx


def create_train_state(
    apply_fn: ApplyFn | None,
    variables: Mapping[str, Any],
    tx: optax.GradientTransformation,
    *,
    masks: Any = None,
) -> TrainState:
    """A fresh `TrainState` from Flax variables (jittable).

    The state holds COPIES of the variables: train steps donate their state, and donating must
    never delete the caller's arrays.

    Args:
      apply_fn: accepted for symmetry with flax's TrainState.create; not stored (may be None).
      variables: ``{"params": ..., "batch_stats": ...}`` ("batch_stats" optional).
      tx: the optimizer (from `make_optimizer`).
      masks: optional masks mirroring the params: the params are multiplied by them and, `tx` being
        a `masking.masked` optimizer, its state's masks are set to them (ValueError otherwise).
    """
    del apply_fn
    if "params" not in variables:
        raise ValueError(
            "create_train_state: variables have no 'params' collection; pass model.init(...)."
        )
    params = variables["params"]
    if masks is not None:
        params = masking.apply_masks(params, masks)
    opt_state = tx.init(params)
    if masks is not None:
        opt_state = masking.update_masks(opt_state, masks)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=opt_state,
    )
    return jax.tree.map(jnp.copy, state)


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks same-structured pytrees on a new leading axis K (for top-K states or masks)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree: Any, k: int) -> Any:
    """The k-th slice of a stacked pytree."""
    return jax.tree.map(lambda x: x[k], tree)


# ----------------------------------------------------------------------------------------------
# Steps.


def _labels_weights(batch: Batch):
    labels = jnp.asarray(batch["label"]).astype(jnp.int32)
    if "mask" in batch:
        weights = jnp.asarray(batch["mask"]).astype(jnp.float32)
    else:
        weights = jnp.ones(labels.shape, jnp.float32)
    return labels, weights


def _per_example_loss(logits, labels, label_smoothing: float):
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _make_step_fn(apply_fn: ApplyFn, tx, augment_fn, label_smoothing: float):
    """The unjitted single-model train step (shared by `make_train_step` and the top-K step)."""

    def step(state: TrainState, batch: Batch, key: jax.Array):
        key = jax.random.fold_in(key, state.step)
        aug_key, dropout_key = jax.random.split(key)
        images = jnp.asarray(batch["image"])
        if augment_fn is not None:
            images = augment_fn(aug_key, images)
        labels, weights = _labels_weights(batch)
        denom = jnp.maximum(jnp.sum(weights), 1.0)
        has_bs = bool(jax.tree.leaves(state.batch_stats))

        def loss_fn(params):
            logits, updates = apply_fn(
                _variables(params, state.batch_stats),
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_key},
            )
            loss = jnp.sum(_per_example_loss(logits, labels, label_smoothing) * weights) / denom
            new_bs = updates.get("batch_stats", state.batch_stats) if has_bs else state.batch_stats
            return loss, (logits, new_bs)

        (loss, (logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        metrics = {"loss": loss, "accuracy": jnp.sum(correct * weights) / denom}
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_bs, opt_state=opt_state
        )
        return new_state, metrics

    return step


def _with_batch_check(jitted, mesh, batch_argnum: int):
    """Wraps a mesh-sharded jitted function with the clear batch-divisibility error."""

    many_hosts = not shd.data_sharding(mesh).is_fully_addressable

    @functools.wraps(jitted)
    def wrapper(*args):
        shd.check_batch(args[batch_argnum], mesh)
        if many_hosts:  # numpy / one-process arrays cannot enter a multi-process program as is
            args = tuple(shd.shard_batch(a, mesh) if i == batch_argnum else shd.replicate(a, mesh)
                         for i, a in enumerate(args))  # fmt: skip
        return jitted(*args)

    wrapper.jitted = jitted
    return wrapper


def make_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    label_smoothing: float = 0.0,
    mesh: jax.sharding.Mesh | None = None,
):
    """A jitted, donated train step ``step(state, batch, key) -> (state, metrics)``.

    Cross-entropy (optax, integer labels; label smoothing optional) averaged over the batch's real
    examples, BatchNorm statistics updated through ``mutable=["batch_stats"]``, one optax update.
    The key is folded with ``state.step`` and split into an augmentation key (``augment_fn(key,
    images [B, H, W, C]) -> images``, jittable) and a "dropout" key, so a host loop passes the SAME
    key every step and a resumed run is bit-identical. A masked optimizer keeps pruned weights
    exactly zero.

    Args:
      mesh: a 1-D ("data",) mesh: the batch is sharded over it, state and key replicated (jit
        in/out shardings; the returned wrapper raises ValueError for a batch size not divisible by
        the device count).
    Returns: jitted step; ``state`` is DONATED (do not reuse it); metrics ``{"loss", "accuracy"}``
      are float32 scalars.
    """
    step = _make_step_fn(apply_fn, tx, augment_fn, label_smoothing)
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    repl, data = shd.replicated(mesh), shd.data_sharding(mesh)
    jitted = jax.jit(
        step, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=(0,)
    )
    return _with_batch_check(jitted, mesh, 1)


def make_eval_step(apply_fn: ApplyFn, mesh: jax.sharding.Mesh | None = None):
    """A jitted ``eval(params, batch_stats, batch) -> (sum_correct, sum_loss, count)``.

    Inference mode (``train=False``, running BatchNorm statistics). Sums run over the examples with
    ``batch["mask"] == 1`` (all when absent); float32 scalars. With a mesh the batch is sharded over
    "data" and the result replicated.
    """

    def eval_step(params, batch_stats, batch):
        logits = apply_fn(_variables(params, batch_stats), jnp.asarray(batch["image"]), train=False)
        labels, weights = _labels_weights(batch)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        loss = _per_example_loss(logits, labels, 0.0)
        return jnp.sum(correct * weights), jnp.sum(loss * weights), jnp.sum(weights)

    if mesh is None:
        return jax.jit(eval_step)
    repl, data = shd.replicated(mesh), shd.data_sharding(mesh)
    jitted = jax.jit(eval_step, in_shardings=(repl, repl, data), out_shardings=repl)
    return _with_batch_check(jitted, mesh, 2)


def _params_and_stats(state_or_vars: Any):
    if isinstance(state_or_vars, TrainState):
        return state_or_vars.params, state_or_vars.batch_stats
    if isinstance(state_or_vars, Mapping) and "params" in state_or_vars:
        return state_or_vars["params"], state_or_vars.get("batch_stats", {})
    raise ValueError(
        "evaluate: pass a TrainState or a variables dict {'params': ..., 'batch_stats': ...}, got "
        f"{type(state_or_vars).__name__}."
    )


def evaluate(
    eval_step,
    state_or_vars: Any,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    workers: int = 0,
) -> dict[str, float]:
    """Accuracy and mean loss over a whole split (host loop over `data.eval_batches`; lazy images,
    `data.LazyImages` / `data.FolderImages`, are decoded by `input_pipeline.eval_iterator` with
    ``workers`` processes, the same batches).

    Every example counts once: the last batch is zero-padded to `batch_size` and masked.

    Args:
      eval_step: from `make_eval_step`.
      state_or_vars: a `TrainState` or a variables dict.
      images / labels: ``[N, ...]`` array (or `data.LazyImages`) / int ``[N]``.
      batch_size: static eval batch size (a multiple of the device count under a mesh).
    Returns: ``{"accuracy", "loss", "n"}`` (Python floats / int).
    """
    labels = np.asarray(labels)
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"evaluate: got {len(images)} images and {len(labels)} labels; pass equal, non-zero "
            "numbers of each."
        )
    params, batch_stats = _params_and_stats(state_or_vars)
    tot = jnp.zeros((3,), jnp.float32)
    if data_lib.input_path(images) == "stream":
        batches = input_lib.eval_iterator(images, labels, batch_size, workers=workers)
    else:
        batches = data_lib.eval_batches(images, labels, batch_size)
    for batch in batches:
        c, loss, n = eval_step(params, batch_stats, batch)
        tot = tot + jnp.stack([c, loss, n])
    c, loss, n = (float(v) for v in jax.device_get(tot))
    return {"accuracy": c / n, "loss": loss / n, "n": int(n)}


# ----------------------------------------------------------------------------------------------
# K candidates at once.


def _resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    if mode not in ("map", "vmap"):
        raise ValueError(f"mode must be 'map', 'vmap' or 'auto', got {mode!r}.")
    return mode


def make_candidate_eval(
    apply_fn: ApplyFn, mode: str = "map", *, per_candidate_batch_stats: bool = False
):
    """Jitted ``cand_eval(variables, masks, batch) -> accuracies float32 [K]`` (DESIGN.md sec. 4).

    Each candidate k runs the shared params multiplied by ``masks[k]`` (a stacked mask pytree, leaf
    ``[K, *param.shape]``) in inference mode on the same batch; accuracy counts examples with
    ``batch["mask"] == 1``. `mode` "map" uses `lax.map` (sequential, fastest on XLA:CPU), "vmap"
    batches the K forwards (expected faster on GPU/TPU), "auto" picks by backend. Both give the
    same numbers up to float rounding. With `per_candidate_batch_stats`,
    ``variables["batch_stats"]`` is stacked ``[K, ...]`` too (e.g. after per-candidate BatchNorm
    recalibration).
    """
    mode = _resolve_mode(mode)

    def one(params, batch_stats, mask, batch):
        logits = apply_fn(
            _variables(masking.apply_masks(params, mask), batch_stats),
            jnp.asarray(batch["image"]),
            train=False,
        )
        labels, weights = _labels_weights(batch)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def cand_eval(variables, masks, batch):
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        if per_candidate_batch_stats:
            xs = (masks, batch_stats)
            fn = lambda mb: one(params, mb[1], mb[0], batch)
        else:
            xs = masks
            fn = lambda m: one(params, batch_stats, m, batch)
        if mode == "map":
            return jax.lax.map(fn, xs)
        return jax.vmap(fn)(xs)

    return jax.jit(cand_eval)


def create_topk_train_state(
    variables: Mapping[str, Any], tx: optax.GradientTransformation, masks: Any
) -> TrainState:
    """K masked train states stacked on a leading axis, one per mask (jittable).

    Args:
      variables: the shared starting variables.
      tx: a `masking.masked` optimizer (e.g. ``make_optimizer(..., masks=ones_masks(params))``);
        its update reads each model's masks from that model's opt_state, so one tx serves all K.
      masks: stacked masks, leaves ``[K, *param.shape]``.
    Returns: a `TrainState` whose leaves have a leading K axis (params pre-masked).
    """
    return jax.jit(jax.vmap(lambda v, m: create_train_state(None, v, tx, masks=m), (None, 0)))(
        variables, masks
    )


def make_topk_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    label_smoothing: float = 0.0,
    mode: str = "vmap",
):
    """Jitted, donated ``step(states, batch, key) -> (states, metrics)`` for K stacked models.

    Every model takes the same batch and key (folded with its own step count, equal for all), so
    the result equals K independent `make_train_step` steps (up to float rounding under "vmap").
    `mode`: "vmap" (one batched program) or "map" (`lax.map`, sequential). "auto" is "vmap" on
    every backend: unlike forwards (`make_candidate_eval`), a `lax.map` of whole train steps ran
    ~25x slower than K separate steps on XLA:CPU, and vmap 1.7x slower (benchmarks/finetune.py);
    on CPU the fastest is K separate `make_train_step` calls, which is what `pipeline` does.
    Metrics leaves are ``[K]``.
    """
    mode = "vmap" if mode == "auto" else _resolve_mode(mode)
    step = _make_step_fn(apply_fn, tx, augment_fn, label_smoothing)

    def topk_step(states, batch, key):
        if mode == "vmap":
            return jax.vmap(step, in_axes=(0, None, None))(states, batch, key)
        return jax.lax.map(lambda s: step(s, batch, key), states)

    return jax.jit(topk_step, donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# The resumable host loop.


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      params / batch_stats: the best-by-validation variables.
      state: the final `TrainState` (last epoch, not necessarily the best).
      best_epoch: 1-based epoch of the best validation accuracy (0 if no epoch ran).
      best_val_accuracy: its validation accuracy.
      test_accuracy / test_loss: of the best params on the test split (None without one, or when
        the run stopped early).
      history: one record per epoch (also in ``workdir/metrics.jsonl``).
      completed: False when `stop_after_epochs` stopped the run before the last epoch.
      resumed_from_epoch: epochs already done in the workdir when this call started.
    """

    params: Any
    batch_stats: Any
    state: TrainState
    best_epoch: int
    best_val_accuracy: float
    test_accuracy: float | None
    test_loss: float | None
    history: list[dict]
    completed: bool
    resumed_from_epoch: int

    @property
    def variables(self) -> dict:
        return _variables(self.params, self.batch_stats)


def _split_xy(split: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A split given as (images, labels), a mapping with image(s)/label(s), or an object."""
    if isinstance(split, (tuple, list)) and len(split) == 2:
        x, y = split
    elif isinstance(split, Mapping):
        kx = next((k for k in ("image", "images", "x") if k in split), None)
        ky = next((k for k in ("label", "labels", "y") if k in split), None)
        if kx is None or ky is None:
            raise ValueError(
                f"split {name!r}: mapping needs 'image'/'label' keys, has {sorted(split)}."
            )
        x, y = split[kx], split[ky]
    elif hasattr(split, "images") and hasattr(split, "labels"):
        x, y = split.images, split.labels
    else:
        raise ValueError(
            f"split {name!r}: expected (images, labels), a dict with 'image' and 'label', or an "
            f"object with .images/.labels; got {type(split).__name__}."
        )
    x = x if hasattr(x, "shape") else np.asarray(x)  # keeps data.LazyImages lazy
    y = np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"split {name!r}: {len(x)} images but {len(y)} labels.")
    return x, y


def _get_split(splits: Any, name: str):
    if isinstance(splits, Mapping):
        return splits.get(name)
    return getattr(splits, name, None)


def _tree_signature(tree: Any) -> list:
    return [
        [path_str(p), list(np.shape(x)), str(jnp.result_type(x))]
        for p, x in flatten_with_paths(tree).items()
    ]


def _digest(tree: Any) -> str:
    h = hashlib.sha256()
    for p, x in flatten_with_paths(tree).items():
        h.update(path_str(p).encode())
        h.update(np.ascontiguousarray(jax.device_get(x)).tobytes())
    return h.hexdigest()[:16]


def _fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _config_diff(old: Mapping, new: Mapping, prefix: str = "") -> str:
    """The first 5 differing entries, nested mappings compared key by key ("a.b: 1 -> 2")."""
    diffs = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs.append(_config_diff(a, b, f"{prefix}{k}."))
        else:
            diffs.append(f"{prefix}{k}: {a!r:.60} -> {b!r:.60}")
    return ", ".join(diffs[:5])


@dataclasses.dataclass(frozen=True)
class _FitFunctions:
    init: Callable  # jitted (variables, masks) -> TrainState
    train_step: Callable
    eval_step: Callable


_FIT_CACHE: collections.OrderedDict = collections.OrderedDict()
_FIT_CACHE_SIZE = 8


def _fit_functions(apply_fn, opt_kwargs, total_steps, masks, augment_fn, label_smoothing, mesh):
    """The jitted functions of a `fit` call, cached across calls with the same static setup.

    Fine-tuning K candidates one after another, or resuming, then compiles once. The masks are not
    part of the key: a `masking.masked` optimizer reads them from its state (set at init).
    """

    def build() -> _FitFunctions:
        tx = make_optimizer(**opt_kwargs, total_steps=total_steps, masks=masks)
        return _FitFunctions(
            init=jax.jit(lambda v, m: create_train_state(None, v, tx, masks=m)),
            train_step=make_train_step(
                apply_fn, tx, augment_fn=augment_fn, label_smoothing=label_smoothing, mesh=mesh
            ),
            eval_step=make_eval_step(apply_fn, mesh=mesh),
        )

    frozen = tuple(
        sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in opt_kwargs.items())
    )
    masks_sig = None if masks is None else json.dumps(_tree_signature(masks))
    key = (apply_fn, frozen, total_steps, masks_sig, augment_fn, float(label_smoothing), mesh)
    try:
        hash(key)
    except TypeError:
        return build()
    if key not in _FIT_CACHE:
        _FIT_CACHE[key] = build()
        while len(_FIT_CACHE) > _FIT_CACHE_SIZE:
            _FIT_CACHE.popitem(last=False)
    _FIT_CACHE.move_to_end(key)
    return _FIT_CACHE[key]


def _flush(step_metrics: list, losses: list, accs: list) -> None:
    """Moves pending device step metrics to the host lists (float32 values as Python floats)."""
    for m in jax.device_get(step_metrics):
        losses.append(float(m["loss"]))
        accs.append(float(m["accuracy"]))
    step_metrics.clear()


def _grain_epoch(ckpt, restored_step, images, labels, batch_size, seed, epoch, workers, b0):
    """One epoch's grain iterator, set to the saved position when resuming mid-epoch (``b0`` > 0):
    from the checkpoint's iterator state when it has one that fits (same worker count), else by
    skipping the first ``b0`` batches (the same batches either way)."""
    make = lambda start: input_lib.train_iterator(  # noqa: E731
        images, labels, batch_size, seed=seed, epoch=epoch, workers=workers, start_batch=start
    )
    if b0 and restored_step is not None and ckpt.has_data(restored_step):
        it = make(0)
        try:
            return ckpt.restore_data(restored_step, it)
        except ckpt_lib.CorruptCheckpointError as e:
            input_lib.close(it)
            log.warning("fit: %s; skipping %d batches instead", e, b0)
    return make(b0)


def fit(
    apply_fn: ApplyFn,
    variables: Mapping[str, Any],
    splits: Any,
    *,
    epochs: int,
    batch_size: int,
    workdir: str | os.PathLike,
    seed: int = 0,
    optimizer: Mapping[str, Any] | None = None,
    masks: Any = None,
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    label_smoothing: float = 0.0,
    eval_batch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    overwrite: bool = False,
    max_to_keep: int = 3,
    stop_after_epochs: int | None = None,
    config_extra: Mapping[str, Any] | None = None,
    tensorboard: bool = True,
    checkpoint_every_steps: int = 0,
    input_pipeline: str = "auto",
    data_workers: int = 0,
    stop_after_steps: int | None = None,
) -> FitResult:
    """Trains (or masked-fine-tunes) a model, checkpointing every epoch, resuming exactly (host).

    Per epoch: `data.iterate_batches` (order a pure function of (seed, epoch), last partial batch
    dropped), one jitted donated step per batch, evaluate on "val", keep the
    best-by-val variables, checkpoint (state, best variables, rng, history) to
    ``workdir/checkpoints`` and append a record to ``workdir/metrics.jsonl``. If the workdir already
    has a checkpoint of the SAME run (config fingerprint), training resumes after its last epoch and
    ends bit-identical to an uninterrupted run; a different run's checkpoint is refused (ValueError)
    unless `overwrite`. Unreadable newest checkpoints are skipped (warning) for older ones. At the
    end, the best variables are evaluated once on "test" (if present) and ``workdir/result.json`` is
    written. AutoSculpt's fine-tune stage (REFERENCE.md section 5) is ``fit(..., masks=masks,
    optimizer={"lr": 1e-3})``: pruned weights stay exactly zero, selection is on validation.

    Args:
      apply_fn: Linen-style apply (see module docstring).
      variables: starting ``{"params", "batch_stats"}`` (pretrained or freshly initialised).
      splits: mapping (or object) with "train", "val" and optionally "test"; each split is
        ``(images, labels)``, a dict with "image"/"label", or has ``.images``/``.labels``.
      epochs / batch_size: training length and static batch size.
      workdir: run folder (checkpoints, metrics.jsonl, result.json).
      seed: shuffling and step keys derive from it.
      optimizer: keyword arguments of `make_optimizer` (total_steps and masks are filled in).
      masks: fine-tune with these masks held (params pre-masked, optimizer masked).
      augment_fn: jittable ``(key, images) -> images`` applied in the train step.
      eval_batch_size: default `batch_size`.
      mesh: shard batches over this 1-D mesh (batch sizes must divide by its device count).
      progress: tqdm bars (stderr).
      overwrite: discard the workdir's checkpoints and metrics first.
      stop_after_epochs: stop (as if killed, resumable) after this many epochs in this call.
      config_extra: JSON-able facts added to the fingerprint (model name, dataset, ...).
      tensorboard: also write each epoch's metrics as TensorBoard scalars under
        ``workdir/tensorboard`` (`checkpoint.log_scalars`; needs tensorboardX, else skipped).
      checkpoint_every_steps: N > 0: also checkpoint every N optimizer steps inside epochs (with
        the partial epoch's metrics and, on the grain path, the iterator state), so a killed run
        resumes mid-epoch and still ends bit-identical to an uninterrupted one. 0: epoch ends only.
        Checkpoints are then numbered by optimizer step (a workdir keeps the numbering it started
        with); without, by epoch as before.
      input_pipeline: "numpy" (`data.iterate_batches`, in memory), "grain"
        (`input_pipeline.train_iterator`: sharded by JAX process, decoded in ``data_workers``
        processes), or "auto": grain when the train images are lazy (`data.input_path` "stream"),
        numpy otherwise. The two give different (each deterministic) orders; the path is logged
        and recorded in result.json.
      data_workers: grain worker processes (0: decode in this process, with reader threads).
      stop_after_steps: stop (as if killed, resumable) after this many optimizer steps in this call.
    Raises:
      ValueError: bad sizes, a workdir holding another run's checkpoint, missing splits.
    """
    train_x, train_y = _split_xy(_get_split(splits, "train"), "train")
    val_split = _get_split(splits, "val")
    if val_split is None:
        raise ValueError("fit: splits have no 'val'; carve a validation split from the train data.")
    val_x, val_y = _split_xy(val_split, "val")
    test_split = _get_split(splits, "test")
    test_xy = _split_xy(test_split, "test") if test_split is not None else None
    eval_bs = int(eval_batch_size or batch_size)
    steps_per_epoch = len(train_x) // int(batch_size)
    if steps_per_epoch == 0:
        raise ValueError(
            f"fit: batch_size {batch_size} exceeds the {len(train_x)} training examples; use a "
            "smaller --batch-size."
        )
    if input_pipeline not in ("auto", "numpy", "grain"):
        raise ValueError(f"fit: input_pipeline={input_pipeline!r}; use 'auto', 'numpy' or 'grain'.")
    if int(checkpoint_every_steps) < 0 or int(data_workers) < 0:
        raise ValueError(
            f"fit: checkpoint_every_steps ({checkpoint_every_steps}) and data_workers "
            f"({data_workers}) must be >= 0."
        )
    use_grain = input_pipeline == "grain" or (
        input_pipeline == "auto" and data_lib.input_path(train_x) == "stream"
    )
    n_proc = jax.process_count()
    if use_grain:
        if batch_size % n_proc:
            raise ValueError(
                f"fit: batch_size {batch_size} is not divisible by the {n_proc} JAX processes."
            )
        steps_per_epoch = (len(train_x) // n_proc) // (int(batch_size) // n_proc)
    pipeline_name = "grain" if use_grain else "numpy"
    log.info("fit: train input pipeline %s (%s images%s)", pipeline_name,
             data_lib.input_path(train_x), f", {data_workers} workers" if use_grain else "")  # fmt: skip
    if mesh is not None:
        n_dev = shd.n_devices(mesh)
        for name, bs in (("batch_size", batch_size), ("eval_batch_size", eval_bs)):
            if bs % n_dev:
                raise ValueError(
                    f"fit: {name} {bs} is not divisible by the {n_dev} devices of the mesh; use a "
                    f"multiple of {n_dev}."
                )
    total_steps = int(epochs) * steps_per_epoch
    opt_kwargs = dict(optimizer or {})
    for k in ("total_steps", "masks"):
        if k in opt_kwargs:
            raise ValueError(f"fit: do not pass {k!r} in optimizer; fit computes it.")
    try:
        fns = _fit_functions(
            apply_fn, opt_kwargs, total_steps, masks, augment_fn, label_smoothing, mesh
        )
    except TypeError as e:
        raise ValueError(f"fit: bad optimizer options {sorted(opt_kwargs)} ({e}).") from e
    schedule = make_lr_schedule(
        opt_kwargs.get("lr", 0.01),
        opt_kwargs.get("schedule", "multistep"),
        total_steps,
        opt_kwargs.get("boundaries_fractions", (0.5, 0.75, 0.9)),
        opt_kwargs.get("decay", 0.1),
    )

    run_config = ckpt_lib.to_jsonable(
        {
            "optimizer": opt_kwargs,
            "epochs": int(epochs),
            "batch_size": int(batch_size),
            "seed": int(seed),
            "label_smoothing": float(label_smoothing),
            "augment": getattr(augment_fn, "__name__", repr(augment_fn)) if augment_fn else None,
            "n_train": len(train_x),
            "n_val": len(val_x),
            "variables": _tree_signature(variables),
            "init_digest": _digest(variables),
            "masks_digest": _digest(masks) if masks is not None else None,
            "extra": dict(config_extra or {}),
            # only on the grain path, so numpy-path fingerprints stay those of earlier versions
            **({"input_pipeline": "grain"} if use_grain else {}),
        }
    )
    fingerprint = _fingerprint(run_config)
    summary = {k: v for k, v in run_config.items() if k != "variables"}

    workdir = paths_lib.resolve(workdir)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=max_to_keep, overwrite=overwrite
    )
    if overwrite:
        ckpt_lib.write_jsonl(metrics_path, [])

    state = fns.init(variables, masks)
    train_key = jax.random.fold_in(jax.random.key(seed), 1)
    best = jax.tree.map(jnp.copy, {"params": state.params, "batch_stats": state.batch_stats})
    best_val, best_epoch, history, start_epoch = -1.0, 0, [], 0
    start_batch, restored_step = 0, None
    by_step = int(checkpoint_every_steps) > 0  # checkpoint numbering: optimizer step, else epoch
    partial: dict[str, list] = {"loss": [], "accuracy": []}

    try:
        if ckpt.latest_step() is not None:
            try:
                meta0 = ckpt.read_meta()
            except ckpt_lib.CorruptCheckpointError:
                meta0 = None
            if meta0 is not None and meta0.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"workdir {workdir!r} holds a checkpoint of a different run (model/config "
                    f"differs: {_config_diff(meta0.get('config', {}), summary) or 'fingerprint'}); "
                    "use a new --workdir or pass --overwrite (Python: overwrite=True) to discard it."
                )
            target = {
                "train_state": state,
                "best": best,
                "rng": jax.random.key_data(train_key),
            }
            restored = ckpt.restore_latest_valid(target)
            if restored is not None:
                step, tree, meta = restored
                if meta.get("fingerprint") != fingerprint:
                    raise ValueError(
                        f"workdir {workdir!r}: checkpoint step {step} belongs to a different run; "
                        "use a new --workdir or pass --overwrite (Python: overwrite=True) to discard it."
                    )
                state, best = tree["train_state"], tree["best"]
                train_key = jax.random.wrap_key_data(tree["rng"])
                best_val, best_epoch = float(meta["best_val_accuracy"]), int(meta["best_epoch"])
                history = list(meta["history"])
                start_epoch = int(meta["epoch"])
                start_batch, restored_step = int(meta.get("batch_in_epoch", 0)), step
                by_step = bool(meta.get("numbered_by_step", False)) or by_step
                partial = {k: list(v) for k, v in meta.get("partial", partial).items()}
                ckpt_lib.write_jsonl(metrics_path, history)
                if start_batch:
                    log.info("fit: resumed %s at epoch %d, batch %d", workdir, start_epoch,
                             start_batch)  # fmt: skip
                else:
                    log.info("fit: resumed %s at epoch %d", workdir, start_epoch)

        if mesh is not None:
            state, best = shd.replicate(state, mesh), shd.replicate(best, mesh)
        train_step, eval_step = fns.train_step, fns.eval_step

        completed = True
        steps_this_call = 0
        every = int(checkpoint_every_steps)

        def save(step_now: int, meta_extra: dict, iterator: Any = None) -> None:
            ckpt.save(
                step_now,
                {"train_state": state, "best": best, "rng": jax.random.key_data(train_key)},
                {
                    "best_val_accuracy": best_val,
                    "best_epoch": best_epoch,
                    "history": history,
                    "fingerprint": fingerprint,
                    "config": summary,
                    "numbered_by_step": by_step,
                    **meta_extra,
                },
                data_iterator=iterator,
            )

        for epoch in range(start_epoch, int(epochs)):
            if stop_after_epochs is not None and epoch - start_epoch >= stop_after_epochs:
                completed = False
                break
            t0 = time.perf_counter()
            b0 = start_batch if epoch == start_epoch else 0
            if use_grain:
                batches = _grain_epoch(
                    ckpt, restored_step if b0 else None, train_x, train_y,
                    int(batch_size) // n_proc, int(seed), epoch, int(data_workers), b0,
                )  # fmt: skip
            else:
                batches = data_lib.iterate_batches(
                    train_x, train_y, int(batch_size), seed=int(seed), epoch=epoch, start_batch=b0
                )
            losses, accs = (partial["loss"], partial["accuracy"]) if b0 else ([], [])
            step_metrics = []

            bar = tqdm(
                batches,
                total=steps_per_epoch,
                initial=b0,
                desc=f"epoch {epoch + 1}/{epochs}",
                disable=not progress,
                leave=False,
                dynamic_ncols=True,
            )
            try:
                for i, batch in enumerate(bar, start=b0):
                    if mesh is not None:  # grain: each process iterates only its own rows
                        put = shd.shard_local_batch if use_grain else shd.shard_batch
                        batch = put(batch, mesh)
                    state, m = train_step(state, batch, train_key)
                    step_metrics.append(m)
                    steps_this_call += 1
                    step_now = epoch * steps_per_epoch + i + 1
                    if progress and (i + 1) % 10 == 0:
                        bar.set_postfix(loss=f"{float(m['loss']):.3f}")
                    if every and step_now % every == 0 and i + 1 < steps_per_epoch:
                        _flush(step_metrics, losses, accs)
                        save(step_now, {"epoch": epoch, "batch_in_epoch": i + 1,
                                        "partial": {"loss": losses, "accuracy": accs}},
                             batches if use_grain else None)  # fmt: skip
                    if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                        completed = False
                        break
            finally:
                bar.close()
                input_lib.close(batches)
            if not completed:
                break
            _flush(step_metrics, losses, accs)
            train_m = [{"loss": np.float32(a), "accuracy": np.float32(b)}
                       for a, b in zip(losses, accs, strict=True)]  # fmt: skip
            train_time = time.perf_counter() - t0
            val = evaluate(eval_step, state, val_x, val_y, eval_bs, workers=int(data_workers))
            if val["accuracy"] > best_val:
                best_val, best_epoch = val["accuracy"], epoch + 1
                best = jax.tree.map(
                    jnp.copy, {"params": state.params, "batch_stats": state.batch_stats}
                )
            step_now = int(state.step)
            record = {
                "epoch": epoch + 1,
                "step": step_now,
                "lr": float(schedule(step_now - 1) if callable(schedule) else schedule),
                "train_loss": float(np.mean([x["loss"] for x in train_m])),
                "train_accuracy": float(np.mean([x["accuracy"] for x in train_m])),
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "best_val_accuracy": best_val,
                "best_epoch": best_epoch,
                "train_images_per_s": steps_per_epoch * batch_size / train_time,
                "epoch_time_s": time.perf_counter() - t0,
            }
            history.append(record)
            save((epoch + 1) * steps_per_epoch if by_step else epoch + 1, {"epoch": epoch + 1})
            ckpt_lib.append_jsonl(metrics_path, record)
            if tensorboard:
                ckpt_lib.log_scalars(os.path.join(workdir, "tensorboard"), record, epoch + 1)
            if progress:
                tqdm.write(
                    f"epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f} acc "
                    f"{record['train_accuracy']:.4f} | val acc {val['accuracy']:.4f} (best "
                    f"{best_val:.4f} @ {best_epoch}) | {record['epoch_time_s']:.1f}s"
                )
    finally:
        ckpt.close()

    test_acc = test_loss = None
    if completed and test_xy is not None:
        test = evaluate(eval_step, best, test_xy[0], test_xy[1], eval_bs,
                        workers=int(data_workers))  # fmt: skip
        test_acc, test_loss = test["accuracy"], test["loss"]
    if completed:
        final = {
            "final": True,
            "best_epoch": best_epoch,
            "best_val_accuracy": best_val,
            "test_accuracy": test_acc,
            "test_loss": test_loss,
        }
        ckpt_lib.append_jsonl(metrics_path, final)
        ckpt_lib.save_json(
            os.path.join(workdir, "result.json"),
            {**final, "fingerprint": fingerprint, "config": summary, "history": history,
             "input_pipeline": pipeline_name, "train_input_path": data_lib.input_path(train_x),
             "data_workers": int(data_workers) if use_grain else 0},  # fmt: skip
        )
    return FitResult(
        params=best["params"],
        batch_stats=best["batch_stats"],
        state=state,
        best_epoch=best_epoch,
        best_val_accuracy=best_val,
        test_accuracy=test_acc,
        test_loss=test_loss,
        history=history,
        completed=completed,
        resumed_from_epoch=start_epoch,
    )
