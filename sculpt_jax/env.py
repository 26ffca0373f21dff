"""The pure pruning environment of AutoSculpt (layer 4; REFERENCE.md section 5).

Each step prunes a fresh copy of the ORIGINAL model with the proposed per-filter pattern ids (steps
are independent proposals, not cumulative), counts its exact FLOPs, scores it on a device-resident
validation reward set and returns a reward:

* ``reward="paper"`` (the reference's band rule): if ``|reduction - target| <= band`` the episode ends
  with reward ``100 * accuracy``; otherwise the reward is ``accuracy - 1`` and the episode goes on;
  after ``max_episode_steps`` the episode is forced to end with reward -100.
* ``reward="gated"``: FLOPs are computed first and the forward pass runs only for in-band candidates
  (the only ones whose accuracy changes a decision); out-of-band candidates get
  ``-1 - |reduction - target|`` (no accuracy needed, and a shaped pull towards the band). The saving
  is real under ``eval_mode="map"`` (a `lax.cond` per candidate); under "vmap" both branches run.

The FLOPs reduction is the exact one of `flops.count` (``flops_kind="true"``) or, labelled, the
reference's channel-pruning formula (``flops_kind="reference"``). Accuracy is measured after optional
BatchNorm recalibration of the masked candidate on a few training batches (adaptive BN, EagleEye,
ECCV 2020), which makes the reward rank candidates (without it, pruned candidates of a CIFAR ResNet
score near chance; ENVIRONMENT.md).

`make_env` closes over everything static (apply function, LayerGraph, GraphSpec, library, reward set)
and returns pure functions; `step` takes N environments' states and proposals at once so that the N
candidate evaluations happen in one compiled call (`lax.map` on CPU, `vmap` on accelerators).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sculpt_jax import flops as flops_lib
from sculpt_jax import graph as graph_lib
from sculpt_jax import masking
from sculpt_jax import patterns as pat
from sculpt_jax import sharding as shd


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Static environment settings (see module docstring)."""

    target: float = 0.5
    band: float = 0.05
    flops_kind: str = "true"  # true | reference
    reward: str = "paper"  # paper | gated
    max_episode_steps: int = 500
    eval_mode: str = "auto"  # auto | map | vmap
    eval_batch_size: int = 256
    halving_images: int = 0  # > 0: successive halving, first stage on this many reward images
    halving_keep: float = 0.25  # fraction of a call's candidates promoted to the full reward set

    def __post_init__(self):
        if not 0.0 < self.target < 1.0:
            raise ValueError(
                f"target FLOPs reduction must be in (0, 1), got {self.target}; e.g. 0.5 removes "
                "half of the FLOPs"
            )
        if not 0.0 < self.band < 1.0:
            raise ValueError(f"band must be in (0, 1), got {self.band}")
        if self.flops_kind not in ("true", "reference"):
            raise ValueError(f"flops_kind must be 'true' or 'reference', got {self.flops_kind!r}")
        if self.reward not in ("paper", "gated"):
            raise ValueError(f"reward must be 'paper' or 'gated', got {self.reward!r}")
        if self.max_episode_steps < 1:
            raise ValueError("max_episode_steps must be >= 1")
        if self.eval_mode not in ("auto", "map", "vmap"):
            raise ValueError(f"eval_mode must be auto, map or vmap, got {self.eval_mode!r}")
        if self.halving_images < 0 or not 0.0 < self.halving_keep <= 1.0:
            raise ValueError(
                f"successive halving needs halving_images >= 0 (0 = off) and halving_keep in "
                f"(0, 1], got {self.halving_images} and {self.halving_keep}"
            )

    @property
    def resolved_eval_mode(self) -> str:
        if self.eval_mode != "auto":
            return self.eval_mode
        return "map" if jax.default_backend() == "cpu" else "vmap"


@flax.struct.dataclass
class EnvState:
    """State of one environment (all leaves jnp; batched [N] by the caller).

    t: int32 [] steps taken in the current episode; pattern_ids: int32 [n_nodes] the last proposal
    (shown in the observation); episode: int32 [] finished episodes.
    """

    t: jax.Array
    pattern_ids: jax.Array
    episode: jax.Array


class Env(NamedTuple):
    """Pure functions of one pruning environment (closures; all jittable).

    consts: the arrays the functions read (pretrained variables, reward set, calibration batches),
      passed explicitly so that jitted callers take them as arguments instead of baking them into
      the compiled program as constants.
    reset() -> EnvState (unbatched).
    observe(consts, state) -> jraph.GraphsTuple observation (unbatched).
    evaluate(consts, pattern_ids [K, n_nodes], gate [K] bool or None) -> info dict of [K] arrays:
      flops_reduction (true), reference_reduction (reference formula), params_reduction,
      reduction (the one the target refers to), accuracy (reward set; NaN where gated off),
      evaluated (bool).
    step(consts, states [N], pattern_ids [N, n_nodes]) -> (states, reward [N], done [N], info [N]).
    masks_of(pattern_ids [n_nodes]) -> mask pytree mirroring params (reads shapes only).
    evaluate_staged(consts, pattern_ids [K, n_nodes]) -> info like `evaluate` plus promoted (bool
      [K]) and images (int32 [K], reward images scored): successive halving (`EnvConfig.
      halving_images` > 0): every candidate is scored on the first reward chunks (at least
      halving_images images), the best ceil(halving_keep K) of them on the rest too; accuracy is
      the full-set accuracy of promoted candidates, the first stage's of the others (both
      unbiased estimates of the same number). With halving off it is `evaluate`, all promoted.
    """

    spec: Any
    config: EnvConfig
    consts: Any
    reset: Callable
    observe: Callable
    evaluate: Callable
    step: Callable
    masks_of: Callable
    evaluate_staged: Callable = None
    mesh: Any = None  # the 1-D ("data",) mesh the candidates are split over, or None


def _chunk(images: np.ndarray, labels: np.ndarray, batch: int):
    """[R, ...] -> ([C, batch, ...], labels [C, batch], weights [C, batch]) padded with zeros."""
    n = images.shape[0]
    c = -(-n // batch)
    pad = c * batch - n
    imgs = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labs = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
    w = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
    return (
        imgs.reshape(c, batch, *images.shape[1:]),
        labs.reshape(c, batch).astype(np.int32),
        w.reshape(c, batch),
    )


def _run(mode: str) -> Callable:
    """``run(fn, xs)``: `fn` over the leading axis of `xs`, by `lax.map` ("map") or `vmap`."""
    if mode == "map":
        return jax.lax.map
    return lambda fn, xs: jax.vmap(fn)(xs)


def candidate_runner(mode: str, mesh=None) -> Callable:
    """``run(fn, xs)`` over K candidates (leading axis of the `xs` pytree), split over `mesh`.

    Without a mesh (or on one device) it is `_run(mode)`. With D > 1 devices, `xs` is padded to a
    multiple of D (copies of its first row, dropped from the output), and `jax.shard_map` gives
    each device its K / D candidates, which it scores as one device would (`lax.map` or `vmap`);
    `fn`'s closed-over arrays (params, reward set) are read whole on every device, so no device
    talks to another and each candidate's numbers are those of the unsharded run. Sharding
    propagation alone cannot split a `lax.map` (a sequential loop), and vmapping a device axis
    would turn each candidate's masked convs into grouped convs (slow on XLA:CPU, ENVIRONMENT.md).
    """
    run = _run(mode)
    if mesh is None or shd.n_devices(mesh) == 1:
        return run
    d = shd.n_devices(mesh)
    spec = jax.sharding.PartitionSpec(shd.DATA_AXIS)

    def sharded(fn, xs):
        k = jax.tree.leaves(xs)[0].shape[0]
        pad = -k % d
        if pad:
            xs = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, 0)]), xs)
        # check_vma off: the scans inside (reward chunks, BN recalibration) start their carries
        # from replicated zeros; no collective is used, so the per-device values are exact.
        out = jax.shard_map(lambda x: run(fn, x), mesh=mesh, in_specs=spec, out_specs=spec,
                            check_vma=False)(xs)  # fmt: skip
        return jax.tree.map(lambda a: a[:k], out) if pad else out

    return sharded


def probe_bn_momentum(apply_fn, variables, x) -> Any:
    """Per-leaf running-average momentum m of the model's BatchNorm stats (host, once).

    Flax BatchNorm updates ``ra = m * ra + (1 - m) * batch_stat``; running the train-mode forward from
    all-zero and all-one stats gives ``m = new(ones) - new(zeros)``. Returns a pytree of floats
    mirroring ``variables["batch_stats"]``.
    """
    stats = variables["batch_stats"]

    def run(fill):
        v = dict(variables, batch_stats=jax.tree.map(lambda s: jnp.full_like(s, fill), stats))
        _, upd = apply_fn(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": _dropout_key()})
        return upd["batch_stats"]

    new0, new1 = run(0.0), run(1.0)
    return jax.tree.map(lambda a, b: float(np.mean(np.asarray(b) - np.asarray(a))), new0, new1)


def _dropout_key() -> jax.Array:
    """The fixed dropout key of the train-mode BatchNorm passes, made on call: a key made at import
    would start a JAX backend before `sharding.initialize_distributed` could join a cluster."""
    return jax.random.key(0)


def make_bn_recalibrate(apply_fn, variables, calib_images: np.ndarray | None):
    """``recal(params, calib) -> batch_stats`` re-estimating BN statistics on calibration batches.

    Adaptive BN (EagleEye, ECCV 2020): the masked candidate's running mean/var are replaced by the
    average of its batch statistics over ``calib`` ([B, batch, H, W, C], normalised). Jittable and
    vmappable over params. Returns None when the model has no batch_stats or no calibration data.
    """
    if calib_images is None or "batch_stats" not in variables or not variables["batch_stats"]:
        return None
    momentum = probe_bn_momentum(apply_fn, variables, jnp.asarray(calib_images[0]))
    zeros_like_stats = lambda: jax.tree.map(jnp.zeros_like, variables["batch_stats"])

    def recal(params, calib):
        zeros = zeros_like_stats()

        def one(acc, x):
            v = {"params": params, "batch_stats": zeros}
            _, upd = apply_fn(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": _dropout_key()})
            batch = jax.tree.map(lambda s, m: s / (1.0 - m), upd["batch_stats"], momentum)
            return jax.tree.map(jnp.add, acc, batch), None

        total, _ = jax.lax.scan(one, zeros, calib)
        return jax.tree.map(lambda s: s / calib.shape[0], total)

    return recal


def band_reward(reduction, accuracy, t, config: EnvConfig):
    """The reward rule (REFERENCE.md section 5), elementwise over any batch shape (jittable).

    Args:
      reduction: FLOPs reduction of the proposal (the kind the target refers to).
      accuracy: its reward-set accuracy in [0, 1]; NaN where it was not measured (gated).
      t: steps taken in the episode BEFORE this one.
      config: `EnvConfig` (target, band, reward kind, max_episode_steps).
    Returns:
      (reward f32, done bool, in_band bool). "paper": in band -> done, 100 * acc; else acc - 1.
      "gated": in band -> done, 100 * acc; else -1 - |reduction - target|. Either way, the step
      that reaches max_episode_steps out of band ends the episode with -100.
    """
    band = jnp.abs(reduction - config.target) <= config.band
    if config.reward == "paper":
        reward = jnp.where(band, 100.0 * accuracy, accuracy - 1.0)
    else:
        off = -1.0 - jnp.abs(reduction - config.target)
        reward = jnp.where(band, 100.0 * jnp.nan_to_num(accuracy), off)
    timeout = (t + 1 >= config.max_episode_steps) & ~band
    reward = jnp.where(timeout, -100.0, reward).astype(jnp.float32)
    return reward, band | timeout, band


def make_env(
    apply_fn: Callable,
    variables: Any,
    spec: graph_lib.GraphSpec,
    reward_images: np.ndarray,
    reward_labels: np.ndarray,
    *,
    library: str | pat.PatternLibrary = "reference6",
    calib_images: np.ndarray | None = None,
    config: EnvConfig | None = None,
    node_features: np.ndarray | None = None,
    mesh: Any = None,
) -> Env:
    """Builds the pruning environment of one pretrained model (host-side, once).

    Args:
      apply_fn: pure ``apply_fn(variables, x, train=False, **kw)`` (Linen: ``model.apply``).
      variables: the pretrained variables ({"params", "batch_stats"?}).
      spec: `graph.build_graph_spec` of the model's LayerGraph.
      reward_images / reward_labels: the validation reward set, normalised float32 [R, H, W, C] /
        int [R]; kept on device. Never the test set.
      library: pattern library.
      calib_images: float32 [B, batch, H, W, C] training batches for BN recalibration, or None.
      config: `EnvConfig`.
      node_features: optional float32 [n_nodes, k] appended to every observation's node features
        (e.g. `sensitivity_features`).
      mesh: a 1-D ("data",) mesh (`sharding.make_mesh`): every call's K candidates are split over
        its devices (`candidate_runner`; any K) and `consts` are replicated on it. None: one device.
    Returns: `Env`.
    """
    config = config or EnvConfig()
    lib = pat.get_library(library)
    lg = spec.layer_graph
    if lg.n_layers == 0:
        raise ValueError(
            "the model has no prunable layers (no conv or dense op with a parameter kernel was "
            "traced); nothing to search"
        )
    if len(reward_images) == 0 or len(reward_images) != len(reward_labels):
        raise ValueError(
            f"reward set: {len(reward_images)} images and {len(reward_labels)} labels; give a "
            "non-empty validation subset with one label per image"
        )
    params_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    has_bn = bool(variables.get("batch_stats", None))
    bs = min(config.eval_batch_size, len(reward_images))
    r_imgs, r_labs, r_w = (jnp.asarray(a) for a in _chunk(reward_images, reward_labels, bs))
    n_reward = float(len(reward_images))
    recal = make_bn_recalibrate(apply_fn, variables, calib_images)
    consts = {
        "variables": variables,
        "reward": (r_imgs, r_labs, r_w),
        "calib": None if recal is None else jnp.asarray(calib_images),
        "node_features": None if node_features is None else jnp.asarray(node_features, jnp.float32),
    }
    if mesh is not None:
        consts = shd.replicate(consts, mesh)
    if node_features is not None and np.shape(node_features)[:1] != (spec.n_nodes,):
        raise ValueError(f"node_features must be [n_nodes={spec.n_nodes}, k], got "
                         f"{np.shape(node_features)}")  # fmt: skip
    n_chunks = int(r_imgs.shape[0])
    n_first = n_chunks if config.halving_images <= 0 else -(-config.halving_images // bs)
    n_first = min(n_chunks, n_first)  # successive halving: reward chunks of the first stage
    if config.halving_images > 0 and n_first >= n_chunks:
        raise ValueError(
            f"successive halving: the first stage (halving_images={config.halving_images}, in "
            f"whole reward batches of {bs}) covers the whole reward set of {len(reward_images)} "
            "images, so halving would change nothing; lower search.halving_images (or the reward "
            "batch, EnvConfig.eval_batch_size) or set it to 0"
        )
    mode = config.resolved_eval_mode
    run = candidate_runner(mode, mesh)
    init_ids = jnp.asarray(graph_lib.initial_pattern_ids(spec))

    def masks_of(pattern_ids):
        per_layer = graph_lib.layer_pattern_ids(spec, pattern_ids)
        return masking.pattern_ids_to_masks(lg, params_shapes, per_layer, lib)

    def measure(pattern_ids):
        masks = masks_of(pattern_ids)
        c = flops_lib.count(lg, masks)
        ref = flops_lib.reference_flops_reduction(
            lg, graph_lib.layer_pattern_ids(spec, pattern_ids), lib
        )
        red = c["flops_reduction"] if config.flops_kind == "true" else ref
        return masks, {
            "flops_reduction": c["flops_reduction"],
            "reference_reduction": ref,
            "params_reduction": c["params_reduction"],
            "reduction": red,
        }

    def candidate_variables(consts, masks, stats=None):
        """The masked candidate's variables; BatchNorm statistics recalibrated (or `stats`)."""
        variables = consts["variables"]
        v = {"params": masking.apply_masks(variables["params"], masks)}
        if has_bn:
            if stats is None:
                stats = (recal(v["params"], consts["calib"]) if recal is not None
                         else variables["batch_stats"])  # fmt: skip
            v["batch_stats"] = stats
        return v

    def count_correct(consts, v, lo, hi):
        """Correct predictions of variables `v` on the reward chunks [lo, hi) (static bounds)."""

        def chunk(carry, xs):
            x, y, w = xs
            logits = apply_fn(v, x, train=False)
            return carry + jnp.sum((jnp.argmax(logits, -1) == y) * w), None

        part = jax.tree.map(lambda a: a[lo:hi], consts["reward"])
        correct, _ = jax.lax.scan(chunk, jnp.float32(0.0), part)
        return correct

    def accuracy(consts, masks):
        return count_correct(consts, candidate_variables(consts, masks), 0, n_chunks) / n_reward

    def evaluate_one(consts, pattern_ids, gate):
        masks, info = measure(pattern_ids)
        acc = jax.lax.cond(
            gate, lambda m: accuracy(consts, m), lambda m: jnp.float32(jnp.nan), masks
        )
        return dict(info, accuracy=acc, evaluated=gate)

    def evaluate(consts, pattern_ids, gate=None):
        pattern_ids = jnp.asarray(pattern_ids, jnp.int32)
        k = pattern_ids.shape[0]
        gate = jnp.ones((k,), bool) if gate is None else jnp.asarray(gate, bool)
        if mode == "map":
            return run(lambda a: evaluate_one(consts, *a), (pattern_ids, gate))
        # vmap: lax.cond becomes a select, so every candidate runs the forward pass.
        out = run(lambda ids: dict(measure(ids)[1], accuracy=accuracy(consts, masks_of(ids))),
                  pattern_ids)  # fmt: skip
        out["accuracy"] = jnp.where(gate, out["accuracy"], jnp.nan)
        out["evaluated"] = gate
        return out

    weights_np = np.asarray(r_w)
    n_first_images = float(weights_np[:n_first].sum())

    def evaluate_staged(consts, pattern_ids):
        pattern_ids = jnp.asarray(pattern_ids, jnp.int32)
        k = pattern_ids.shape[0]
        if n_first >= n_chunks:
            info = evaluate(consts, pattern_ids)
            return dict(info, promoted=jnp.ones((k,), bool),
                        images=jnp.full((k,), int(n_reward), jnp.int32))  # fmt: skip

        def first(ids):
            masks, info = measure(ids)
            v = candidate_variables(consts, masks)
            return dict(info, correct=count_correct(consts, v, 0, n_first)), v.get("batch_stats")

        def second(args):
            ids, stats = args
            v = candidate_variables(consts, masks_of(ids), stats)
            return count_correct(consts, v, n_first, n_chunks)

        info, stats = run(first, pattern_ids)
        n_keep = max(1, min(k, int(np.ceil(config.halving_keep * k))))
        _, top = jax.lax.top_k(info["correct"], n_keep)
        rest = run(second, (pattern_ids[top], jax.tree.map(lambda a: a[top], stats)))
        promoted = jnp.zeros((k,), bool).at[top].set(True)
        acc = info.pop("correct") / n_first_images
        acc = acc.at[top].set((acc[top] * n_first_images + rest) / n_reward)
        images = jnp.where(promoted, int(n_reward), int(n_first_images)).astype(jnp.int32)
        return dict(info, accuracy=acc, evaluated=jnp.ones((k,), bool), promoted=promoted,
                    images=images)  # fmt: skip

    def reset():
        return EnvState(t=jnp.int32(0), pattern_ids=init_ids, episode=jnp.int32(0))

    def observe(consts, state):
        obs = graph_lib.make_observation(spec, consts["variables"], state.pattern_ids)
        extra = consts.get("node_features")
        if extra is None:
            return obs
        return obs._replace(nodes={"feat": jnp.concatenate([obs.nodes["feat"], extra], axis=1)})

    def step(consts, states, pattern_ids):
        pattern_ids = jnp.where(jnp.asarray(spec.action_mask)[None], pattern_ids, -1)
        if config.reward == "gated":
            reductions = jax.vmap(lambda ids: measure(ids)[1]["reduction"])(pattern_ids)
            gate = jnp.abs(reductions - config.target) <= config.band
        else:
            gate = None
        info = evaluate(consts, pattern_ids, gate)
        reward, done, band = band_reward(info["reduction"], info["accuracy"], states.t, config)
        t = states.t + 1
        new = EnvState(
            t=jnp.where(done, 0, t),
            pattern_ids=pattern_ids,
            episode=states.episode + done.astype(jnp.int32),
        )
        info = dict(info, in_band=band)
        return new, reward, done, info

    return Env(spec, config, consts, reset, observe, evaluate, step, masks_of, evaluate_staged,
               mesh)
