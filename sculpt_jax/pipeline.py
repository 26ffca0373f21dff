"""The main job's stages, driven by one config (layer 5; the CLI calls these).

Workdir layout (every stage resumable; a finished stage is reused, not redone):

    <workdir>/config.json              the config of the last command run here (`save_config`)
    <workdir>/pretrain/                checkpoints, metrics.jsonl, result.json, best_variables/
    <workdir>/search/                  checkpoints, metrics.jsonl, candidates.jsonl, best.json
    <workdir>/finetune/cand<k>/        one masked fine-tune per kept candidate
    <workdir>/export/                  pruned params + masks + pattern ids + summary.json
    <workdir>/report/                  report.md, results.{csv,json}, plots (PNG)

Images stay uint8 on the host; normalisation is part of the apply function (`make_apply_fn`), so
augmentation pads with black as the reference does and the reward set costs 4x less memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sculpt_jax import bandit, masking
from sculpt_jax import checkpoint as ckpt
from sculpt_jax import config as config_lib
from sculpt_jax import data as data_lib
from sculpt_jax import decode as decode_lib
from sculpt_jax import env as env_lib
from sculpt_jax import flops as flops_lib
from sculpt_jax import graph as graph_lib
from sculpt_jax import latency as latency_lib
from sculpt_jax import paths as paths_lib
from sculpt_jax import patterns as pat
from sculpt_jax import sharding as shd
from sculpt_jax import trace as trace_lib
from sculpt_jax import training as ft
from sculpt_jax.search import runner

log = logging.getLogger("sculpt_jax")


class PipelineError(RuntimeError):
    """A stage cannot run as configured; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Model, data and apply function.


def _models():
    from sculpt_jax import models  # the edge may choose models by name

    return models


def make_apply_fn(model, mean, std):
    """``apply(variables, x_uint8, train=False, **kw)``: normalises then runs `model.apply`."""
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)

    def apply(variables, x, train=False, **kwargs):
        return model.apply(variables, data_lib.normalize(jnp.asarray(x), mean, std), train=train,
                           **kwargs)  # fmt: skip

    return apply


@dataclasses.dataclass
class Setup:
    """What every stage needs: config, data, model, apply function, initial variables."""

    cfg: Any
    splits: data_lib.DataSplits
    model: Any
    apply_fn: Any
    init_variables: Any
    input_shape: tuple[int, ...]
    num_classes: int
    input_dtype: Any = np.uint8  # what apply_fn takes (the zoo: uint8, normalised inside)
    mesh: Any = None  # `make_mesh(cfg)`: the 1-D ("data",) mesh of the job, None on one device


def device_count(devices: int) -> int:
    """Devices a job uses: `devices` (the config field ``devices``; 0 = all of them).

    In a multi-process job (`sharding.initialize_distributed`) the count is GLOBAL: 0 = every
    device of every process, N = N / P on each of the P processes (N a multiple of P, at most the
    local count each). ValueError naming the field when it asks for more than there are, for a
    negative number, or for a count the processes cannot split evenly."""
    want, have = int(devices), jax.device_count()
    n_proc, local = jax.process_count(), jax.local_device_count()
    if want < 0 or want > have:
        where = "this machine has" if n_proc == 1 else f"the {n_proc} processes have"
        raise ValueError(
            f"devices={want} but {where} {have} {jax.devices()[0].platform} device(s); "
            f"set --config.devices to 1..{have} (0 = all of them)"
        )
    if n_proc > 1 and want % n_proc:
        raise ValueError(
            f"devices={want} cannot be split over the {n_proc} processes of this job (each uses "
            f"the same number of its {local} local devices); set --config.devices to a multiple of "
            f"{n_proc} up to {have} (0 = all of them)"
        )
    return want or have


def check_batches(n: int, sizes: dict) -> None:
    """ValueError naming the field and the fix unless every batch size {field: size} divides
    by the `n` devices a job shards its batches over (in a multi-process job: processes x local
    devices, each process placing its own rows of every batch)."""
    n_proc = jax.process_count()
    for key, bs in sizes.items():
        if n_proc > 1 and int(bs) < n_proc:
            raise ValueError(
                f"{key}={bs} is smaller than the {n_proc} processes of this job: each process "
                f"feeds its own rows of every batch; set {key} to a multiple of {n} (>= {n})"
            )
        if int(bs) % n:
            how = (f"{n // n_proc} per process x {n_proc} processes" if n_proc > 1
                   else "the job shards its batches over")  # fmt: skip
            fewer = ("fewer devices per process (--config.devices)" if n_proc > 1
                     else "fewer devices (devices=1, e.g. --config.devices=1)")  # fmt: skip
            raise ValueError(
                f"{key}={bs} is not divisible by the {n} devices ({how}); "
                f"set {key}={max(n, int(bs) // n * n)} (a multiple of {n}) or use {fewer}"
            )


def mesh_of(n: int):
    """The 1-D ("data",) mesh over `n` devices: the first `n` local devices in one process, the
    first n / P of each process's in a job of P processes (process by process, so each process
    owns a contiguous block of every batch). None for one device in one process, so that a
    one-device run is exactly the unsharded program."""
    n_proc = jax.process_count()
    if n_proc == 1:
        return None if n == 1 else shd.make_mesh(jax.devices()[:n])
    per = n // n_proc
    by_proc = [[d for d in jax.devices() if d.process_index == p][:per] for p in range(n_proc)]
    return shd.make_mesh([d for ds in by_proc for d in ds])


def make_mesh(cfg):
    """The job's mesh: `mesh_of(device_count(cfg.devices))`."""
    return mesh_of(device_count(cfg.get("devices", 0)))


def _eval_batch(s: Setup) -> int:
    """Evaluation batch: 256, rounded down to a multiple of the mesh's device count."""
    n = 1 if s.mesh is None else shd.n_devices(s.mesh)
    return max(n, 256 // n * n)


def _eval_step(s: Setup):
    return ft.make_eval_step(s.apply_fn, mesh=s.mesh)


def _train_arrays(s: Setup, augment: bool) -> tuple:
    """The train split's (images, labels) for a fit: as stored when the train step augments
    (ImageNet: stored larger, random-resized-cropped on device), else at the model input size
    (`data.eval_images`: ImageNet's eval transform; other datasets unchanged)."""
    split = s.splits.train if augment else data_lib.eval_split(s.splits.train, s.input_shape)
    return split.arrays


def setup(cfg) -> Setup:
    """Checks that ``cfg.workdir`` can be written (`paths.check_workdir`: a URL that cannot be
    opened fails here, before any long work), then loads the dataset and builds the model for
    `cfg` (host-only)."""
    paths_lib.check_workdir(cfg.workdir)
    models = _models()
    models.model_spec(cfg.model)  # unknown name -> ValueError listing valid ones
    splits = data_lib.load_dataset(
        cfg.dataset, cfg.data_dir or None, val_size=cfg.val_size, seed=cfg.seed,
        progress=cfg.progress, folder_mode=_input(cfg)["folder_mode"],
        image_size=cfg.get("image_size", 224),
    )  # fmt: skip
    if 0 < cfg.max_train_examples < splits.train.n:
        idx = np.sort(np.random.default_rng(cfg.seed).permutation(splits.train.n)
                      [: cfg.max_train_examples])  # fmt: skip
        splits = dataclasses.replace(splits, train=splits.train.take(idx))
    num_classes = splits.num_classes if cfg.num_classes <= 0 else cfg.num_classes
    if num_classes < splits.num_classes:
        raise ValueError(
            f"num_classes={num_classes} but {cfg.dataset} has {splits.num_classes} classes; "
            "leave --config.num_classes=-1 to use the dataset's"
        )
    model = models.get_model(cfg.model, num_classes=num_classes)
    shape = tuple(splits.image_shape)
    try:
        variables = models.init_model(model, jax.random.PRNGKey(cfg.seed), shape)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(
            f"model {cfg.model!r} cannot take {cfg.dataset} inputs of shape {shape}: {e}. CIFAR "
            "models take any HxW >= 8; ImageNet models and ViTs need their input size"
        ) from e
    apply_fn = make_apply_fn(model, splits.mean, splits.std)
    return Setup(cfg, splits, model, apply_fn, variables, shape, num_classes, mesh=make_mesh(cfg))


def _input(cfg) -> dict:
    """The input-pipeline settings (config.input; defaults for configs saved before it existed)."""
    inp = cfg.get("input") or {}
    return {"pipeline": inp.get("pipeline", "auto"), "workers": int(inp.get("workers", 0)),
            "folder_mode": inp.get("folder_mode", "auto")}  # fmt: skip


def _fit_input_kwargs(cfg) -> dict:
    """`training.fit` keywords of the input pipeline and step checkpointing."""
    inp = _input(cfg)
    return {"input_pipeline": inp["pipeline"], "data_workers": inp["workers"],
            "checkpoint_every_steps": int(cfg.get("checkpoint_every_steps", 0))}  # fmt: skip


def _abstract(tree):
    """Shapes and dtypes of an array pytree (a restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _run_fingerprint(cfg) -> dict:
    fp = {"model": cfg.model, "dataset": cfg.dataset, "data_dir": cfg.data_dir,
          "seed": cfg.seed, "val_size": cfg.val_size,
          "max_train_examples": cfg.max_train_examples}  # fmt: skip
    if cfg.dataset == "imagenet2012" and cfg.get("image_size", 224) != 224:
        fp["image_size"] = cfg.image_size
    if cfg.get("data_digest"):  # `sculpt_jax.api`: a digest of the user's model and arrays
        fp["data_digest"] = cfg.data_digest
    return fp


def save_config(cfg) -> None:
    """Writes ``<workdir>/config.json``: the config of the last command run in the workdir (the
    CLI reads it back when a later command names the same workdir without --config)."""
    wd = paths_lib.check_workdir(cfg.workdir)  # the first write of a command: fail here, clearly
    ckpt.save_json(os.path.join(wd, "config.json"),
                   json.loads(cfg.to_json_best_effort()))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# info


def model_info(name: str, num_classes: int | None = None, input_shape=None) -> dict:
    """Summary of a zoo model: params, exact dense FLOPs, XLA's count, traced layers, graph size."""
    models = _models()
    spec = models.model_spec(name)
    if spec.num_classes < 1 and not (num_classes and input_shape):
        raise ValueError(f"model {name!r} has no default input shape or class count: give "
                         "--input-shape H,W,C and --num-classes N")  # fmt: skip
    model = models.get_model(name, num_classes=num_classes)
    shape = tuple(input_shape or spec.input_shape)
    if len(shape) != 3:
        raise ValueError(f"--input-shape must be H,W,C (3 numbers), got {shape}")
    variables = jax.eval_shape(lambda k: models.init_model(model, k, shape), jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    t0 = time.perf_counter()
    lg = trace_lib.trace_model(model.apply, variables, x)
    trace_s = time.perf_counter() - t0
    n_conv = sum(layer.kind == "conv" for layer in lg.layers)
    n_dense = sum(layer.kind == "dense" for layer in lg.layers)
    lib = pat.get_library("reference6")
    valid = np.stack([pat.valid_patterns(layer, lib) for layer in lg.layers])
    level = "filter" if sum(layer.out_features for layer in lg.layers) <= 50_000 else "layer"
    gspec = graph_lib.build_graph_spec(lg, n_patterns=lib.n_patterns, valid=valid, level=level)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    params = int(sum(np.prod(v.shape) for v in jax.tree.leaves(variables["params"])))
    return {
        "model": name,
        "description": spec.description,
        "input_shape": list(shape),
        "num_classes": int(num_classes or spec.num_classes),
        "params": params,
        "dense_flops_exact": int(lg.dense_flops),
        "dense_macs_prunable": int(lg.dense_macs),
        "dense_conventional_macs": int(flops_lib.conventional_macs(lg)),  # padding taps included
        "xla_cost_analysis_flops": xla_flops,
        "conv_layers": int(n_conv),
        "dense_layers": int(n_dense),
        "traced_layers": int(lg.n_layers),
        "coupled_groups": len(lg.coupled_groups),
        "graph_level": level,
        "graph_nodes": int(gspec.n_real_nodes),
        "graph_edges": int(gspec.n_real_edges),
        "trace_seconds": round(trace_s, 3),
    }


# ----------------------------------------------------------------------------------------------
# pretrain


def _load_pretrained(path: str, like) -> Any:
    """Variables exported by a pretrain stage: PATH is a workdir, its pretrain/ or best_variables/."""
    cands = [os.path.join(path, "pretrain", "best_variables"), os.path.join(path, "best_variables"),
             path]  # fmt: skip
    for c in cands:
        if paths_lib.isdir(c) and os.path.basename(c.rstrip("/")) == "best_variables":
            try:
                return ckpt.load_pytree(c, like=like)
            except ValueError as e:
                raise ValueError(
                    f"checkpoint {c} does not match the model ({e}); pass the pretrain workdir of "
                    "the same --model and dataset"
                ) from e
    raise FileNotFoundError(
        f"no pretrained variables under {path!r}; give a workdir of a finished `pretrain` run (it "
        "holds pretrain/best_variables) or omit --checkpoint to pretrain here"
    )


def pretrain(cfg, *, overwrite: bool = False, s: Setup | None = None) -> dict:
    """Trains the dense model (resumable) and exports best-by-validation variables.

    Returns {"variables", "val_accuracy", "test_accuracy", "seconds"}.
    """
    s = s or setup(cfg)
    wd = paths_lib.resolve(os.path.join(cfg.workdir, "pretrain"))
    if cfg.pretrain.checkpoint:
        variables = _load_pretrained(paths_lib.resolve(cfg.pretrain.checkpoint),
                                     _abstract(s.init_variables))  # fmt: skip
        ev = ft.evaluate(_eval_step(s), variables, *s.splits.val.arrays, _eval_batch(s))
        log.info("loaded pretrained variables (val accuracy %.4f)", ev["accuracy"])
        return {"variables": variables, "val_accuracy": ev["accuracy"], "test_accuracy": None,
                "seconds": 0.0}  # fmt: skip
    p = cfg.pretrain
    t0 = time.perf_counter()
    res = ft.fit(
        s.apply_fn,
        s.init_variables,
        {"train": _train_arrays(s, p.augment), "val": s.splits.val.arrays,
         "test": s.splits.test.arrays},
        epochs=p.epochs,
        batch_size=p.batch_size,
        workdir=wd,
        seed=cfg.seed,
        optimizer=dict(
            kind="sgd",
            lr=p.lr,
            momentum=p.momentum,
            weight_decay=p.weight_decay,
            schedule=p.schedule,
        ),  # fmt: skip
        augment_fn=data_lib.make_augment(s.splits.name, s.input_shape) if p.augment else None,
        mesh=s.mesh,
        progress=cfg.progress,
        overwrite=overwrite,
        config_extra=_run_fingerprint(cfg),
        tensorboard=cfg.tensorboard,
        **_fit_input_kwargs(cfg),
    )
    ckpt.save_pytree(os.path.join(wd, "best_variables"), res.variables)
    out = {"val_accuracy": res.best_val_accuracy, "test_accuracy": res.test_accuracy,
           "seconds": time.perf_counter() - t0}  # fmt: skip
    ckpt.save_json(os.path.join(wd, "summary.json"), out)
    return dict(out, variables=res.variables)


# ----------------------------------------------------------------------------------------------
# prune (search)


@dataclasses.dataclass
class SearchSetup:
    graph: Any
    spec: Any
    env: Any
    library: Any
    reward: tuple = ()  # (images, labels) of the validation reward set
    calib: Any = None  # [B, batch, H, W, C] BN-recalibration batches or None
    decoder: Any = None  # the budget-exact decoder (decode.Decoder)
    order: Any = None  # graph.importance_order of the pretrained variables
    heldout: tuple = ()  # (images, labels) held out of the search, to re-score its top-K
    sensitivity_evals: int = 0  # evaluations spent on the sensitivity feature
    apply_fn: Any = None  # the model's apply function (for the held-out environment)


def split_validation(cfg, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reward-set indices, held-out indices) into the validation split (held out: search.
    heldout_size, -1 = half; reward set: search.reward_set_size, -1 = the rest): stratified and seeded
    (`data.stratified_split`), so both parts have every class in proportion whatever the order
    of the split. Raises ValueError when the two do not fit in the validation split."""
    sc = cfg.search
    n_val, n_held = len(labels), int(sc.get("heldout_size", 0))
    n_held = n_val // 2 if n_held < 0 else n_held
    n_reward = n_val - n_held if sc.reward_set_size < 0 else int(sc.reward_set_size)
    if n_reward < 1 or n_reward + n_held > n_val:
        raise ValueError(
            f"search.reward_set_size={sc.reward_set_size} and search.heldout_size={n_held} do not "
            f"fit in the validation split ({n_val} images); lower them or raise --config.val_size"
        )
    reward, held, _ = data_lib.stratified_split(labels, [n_reward, n_held], cfg.seed)
    return reward, held


def search_target(cfg) -> tuple[float, str]:
    """(target reduction, decoder measure) of the config: true FLOPs, the reference formula or
    parameters (`decode.MEASURES`)."""
    sc = cfg.search
    if sc.get("constraint", "flops") == "params":
        return float(sc.target_params), "params"
    if sc.get("constraint", "flops") == "latency":
        return float(sc.target_latency), "latency"
    return float(sc.target_flops), ("flops" if sc.flops_kind == "true" else "reference")


def _decoder_for(cfg, s: Setup, variables):
    """(LayerGraph, GraphSpec, importance order, budget-exact decoder) of the model (host, once).
    Raises ValueError for a target pruning cannot reach or a tolerance the model is too coarse
    for: neither depends on the weights, so `check_search` runs this on the initial ones."""
    sc = cfg.search
    lib = pat.get_library(sc.library)
    x = jnp.zeros((1, *s.input_shape), s.input_dtype)
    lg = trace_lib.trace_model(s.apply_fn, variables, x)
    valid = graph_lib.default_valid(lg, lib.n_patterns, lib)  # the classifier head keeps all
    if not valid[:, [i for i in range(lib.n_patterns) if i != lib.keep_id]].any():
        raise ValueError(f"model {cfg.model!r} has nothing the {lib.name!r} library can prune")
    spec = graph_lib.build_graph_spec(lg, n_patterns=lib.n_patterns, valid=valid, level=sc.level)
    order = np.asarray(graph_lib.importance_order(spec, variables))
    if _legacy(cfg):  # the reference's band rule: no decoder
        return lg, spec, order, None
    target, kind = search_target(cfg)
    table = latency_table(cfg, s, lg, variables) if kind == "latency" else None
    decoder = decode_lib.make_decoder(
        spec, order, lib, target=target, tolerance=sc.get("tolerance", 0.005), kind=kind,
        params_shapes=_abstract(variables["params"]), latency_table=table,
    )  # fmt: skip
    _, first = jax.jit(decoder.decode)(jnp.asarray(decode_lib.uniform_logits(decoder)))
    if not bool(first["on_budget"]):
        raise ValueError(
            f"{cfg.model} is too coarse for search.tolerance={decoder.tolerance}: the closest "
            f"reduction the uniform allocation reaches is {float(first['reduction']):.4f} for the "
            f"target {target}; raise the tolerance (--tolerance; sculpt_jax.prune(tolerance=...))"
        )
    return lg, spec, order, decoder


LATENCY_REPEATS = 20  # timed runs per table entry and per measured model (median)


def _latency_timer(build, info) -> float:
    """A `latency.Timer` on `compaction.measure_latency` (the report's timer): median ms."""
    from sculpt_jax import compaction as compact_lib

    fn, args = build()
    r = compact_lib.measure_latency(lambda a, _x: fn(*a), args, jnp.zeros(()),
                                    repeats=LATENCY_REPEATS, warmup=3)  # fmt: skip
    return float(r["median_ms"])


def latency_table_path(cfg) -> str:
    return paths_lib.resolve(os.path.join(cfg.workdir, "search", "latency_table.json"))


def latency_table(cfg, s: Setup, lg, variables):
    """The model's `latency.LatencyTable` on this backend (lowering search.latency_lowering with
    search.latency_min_width, batch search.latency_batch): read from `latency_table_path` when its
    `latency.table_key` matches (model shapes, backend platform and device kind, JAX version,
    batch, lowering, grid, min width, library), else measured here (every prunable layer, or its
    grouped units, on its width grid, then the dense model, and the unpruned model as compaction
    replays it, which calibrates T_rest) and written there. The dense model timed is the raw
    network (`s.model.apply`, normalisation excluded), as the compacted model `run` measures
    against it."""
    from sculpt_jax import compaction as compact_lib

    path = latency_table_path(cfg)
    if shd.is_primary():  # in a multi-process job process 0 alone times, the others read its table
        cached = ckpt.load_json(path) if paths_lib.isfile(path) else None
        sc, x1 = cfg.search, jnp.zeros((1, *s.input_shape), s.input_dtype)
        opts = dict(batch=int(sc.get("latency_batch", 1)), library=sc.library,
                    lowering=sc.get("latency_lowering", "filters"),
                    min_width=int(sc.get("latency_min_width", 0)))  # fmt: skip
        pinned = latency_lib.lowered_layers(lg, latency_lib.table_lowerings(
            lg, opts["lowering"], opts["min_width"], sc.library))  # fmt: skip
        table, fresh = latency_lib.cached_or_measure(
            cached, lg, s.model.apply, variables, x1, timer=_latency_timer,
            unpruned=compact_lib.unpruned_build(s.model.apply, variables, lg, x1,
                                                batch=opts["batch"], layer_lowerings=pinned),
            **opts,
        )  # fmt: skip
        if fresh:
            log.info("latency table measured on %s: dense %.3f ms, rest %.3f ms -> %s",
                     table.key["backend"], table.dense_ms, table.rest_ms, path)  # fmt: skip
            ckpt.save_json(path, latency_lib.to_json(table))
        else:
            log.info("latency table reused from %s", path)
    shd.sync("latency_table")
    if not shd.is_primary():  # every process decodes with the same table, so the same masks
        table = latency_lib.from_json(ckpt.load_json(path))
        log.info("latency table of process 0 read from %s", path)
    return table


def constraint_latency(cfg, s: Setup, variables, masks, ss: SearchSetup, pattern_ids) -> dict:
    """Predicted vs measured latency of the chosen model (constraint "latency"; host): the table's
    prediction for its pattern ids, and the model compacted as the table models it (align 1, each
    layer on the table's lowering: `LatencyTable.layer_lowerings`) timed by
    `compaction.measure_latency` at search.latency_batch, beside the dense model timed the same
    way. Flat ``latency_*`` row keys (ms and reductions)."""
    from sculpt_jax import compaction as compact_lib

    table = latency_table(cfg, s, ss.graph, variables)
    pred = ss.decoder.measure(jnp.asarray(pattern_ids, jnp.int32))
    b = int(cfg.search.get("latency_batch", 1))
    x = jax.random.normal(jax.random.key(0), (b, *s.input_shape), jnp.float32)
    fn, cv, _ = compact_lib.compact(s.model.apply, variables, ss.graph, masks, x[:1], align=1,
                                    layer_lowerings=table.layer_lowerings(ss.graph))  # fmt: skip
    r = compact_lib.measure_latencies(
        {"dense": (lambda v, x: s.model.apply(v, x, train=False), variables), "compact": (fn, cv)},
        x, repeats=LATENCY_REPEATS,
    )  # fmt: skip
    dense_ms, comp_ms = float(r["dense"]["median_ms"]), float(r["compact"]["median_ms"])
    return {"latency_table_backend": table.key["backend"], "latency_table_batch": b,
            "latency_table_lowering": table.key["lowering"],
            "latency_table_lowered_layers": len(table.layer_lowerings(ss.graph)),
            "latency_predicted_dense_ms": float(table.dense_ms),
            "latency_predicted_ms": float(pred["latency_ms"]),
            "latency_predicted_reduction": float(pred["latency_reduction"]),
            "latency_measured_dense_ms": dense_ms, "latency_measured_ms": comp_ms,
            "latency_measured_reduction": 1.0 - comp_ms / dense_ms}  # fmt: skip


def _legacy(cfg) -> bool:
    """True for the legacy band-rule heads (and AutoCompress), which do not use the decoder."""
    sc = cfg.search
    return sc.method == "autocompress" or (sc.method == "ppo" and sc.head != "mixture")


def validate_config(cfg):
    """`config.validate` plus the names only the registries know (pattern library, AutoCompress
    scheme): every field checked before any work. Returns cfg; ValueError naming the field."""
    from sculpt_jax.search import admm

    config_lib.validate(cfg)
    if cfg.dataset != "user":  # `sculpt_jax.api` passes its model in, not by name
        _models().model_spec(cfg.model)
    if cfg.search.library not in pat.library_names():
        raise ValueError(f"search.library={cfg.search.library!r} is not one of "
                         f"{', '.join(pat.library_names())}")  # fmt: skip
    if cfg.autocompress.scheme not in admm.SCHEMES:
        raise ValueError(f"autocompress.scheme={cfg.autocompress.scheme!r} is not one of "
                         f"{', '.join(admm.SCHEMES)}")  # fmt: skip
    check_devices(cfg, batches=cfg.dataset != "user")  # `api.prune` trains nothing
    return cfg


def check_devices(cfg, batches: bool = True) -> int:
    """The device count of the job (`device_count`), after checking (`batches`) that every
    sharded batch divides by it: before any work. The search's candidate counts need not divide
    (they are padded); evaluation batches are rounded to a multiple (`_eval_batch`)."""
    n = device_count(cfg.get("devices", 0))
    if batches:
        check_batches(n, {f"--config.{k}": cfg[k.split(".")[0]][k.split(".")[1]]
                      for k in ("pretrain.batch_size", "finetune.batch_size")})  # fmt: skip
    return n


def check_search(cfg, s: Setup) -> None:
    """Fails fast (before pretraining) on a search budget the model cannot meet."""
    if _legacy(cfg):
        return
    _decoder_for(cfg, s, s.init_variables)
    reward, _ = split_validation(cfg, s.splits.val.arrays[1])
    h = int(cfg.search.get("halving_images", 0))
    if h > 0 and -(-h // _reward_batch(cfg.search)) * _reward_batch(cfg.search) >= len(reward):
        raise ValueError(
            f"successive halving: search.halving_images={h} is not smaller than the reward set "
            f"({len(reward)} images), so halving would change nothing; lower it or set it to 0"
        )


def _on_budget_rate(history) -> float | None:
    """Mean of the iterations' on_budget_rate (None when not recorded: the legacy heads)."""
    rates = [h["on_budget_rate"] for h in history if h.get("on_budget_rate") is not None]
    return float(np.mean(rates)) if rates else None


def _reward_batch(sc) -> int:
    """Reward-set images per forward: 256, or the first stage's size when successive halving
    scores fewer (its first stage is whole batches)."""
    h = int(sc.get("halving_images", 0))
    return min(256, h) if h > 0 else 256


def make_search_setup(cfg, s: Setup, variables) -> SearchSetup:
    """Traces the model, builds the observation graph, the budget-exact decoder and the
    environment (host, once). Bad targets and sizes fail here, before any evaluation."""
    sc = cfg.search
    lib = pat.get_library(sc.library)
    lg, spec, order, decoder = _decoder_for(cfg, s, variables)
    v_imgs, v_labs = s.splits.val.arrays
    r_idx, h_idx = split_validation(cfg, v_labs)
    r_imgs, r_labs = v_imgs[r_idx], v_labs[r_idx]
    calib = None
    if sc.bn_recalib_batches > 0:
        n = sc.bn_recalib_batches * sc.bn_recalib_batch_size
        tr_imgs = _train_arrays(s, augment=False)[0]  # model-input size (ImageNet: eval crop)
        if n > len(tr_imgs):
            raise ValueError(f"BN recalibration wants {n} training images; only {len(tr_imgs)}")
        idx = np.random.default_rng(cfg.seed).permutation(len(tr_imgs))[:n]
        calib = tr_imgs[idx].reshape(sc.bn_recalib_batches, sc.bn_recalib_batch_size,
                                     *tr_imgs.shape[1:])  # fmt: skip
    env_cfg = env_lib.EnvConfig(
        target=sc.target_flops, band=sc.band, flops_kind=sc.flops_kind, reward=sc.reward,
        max_episode_steps=sc.max_episode_steps, eval_mode=sc.eval_mode,
        halving_images=sc.get("halving_images", 0), halving_keep=sc.get("halving_keep", 0.25),
        eval_batch_size=_reward_batch(sc),
    )  # fmt: skip
    make = lambda imgs, labs, feats=None: env_lib.make_env(
        s.apply_fn, variables, spec, imgs, labs, library=lib, calib_images=calib, config=env_cfg,
        node_features=feats, mesh=s.mesh,
    )  # fmt: skip
    env = make(r_imgs, r_labs)
    n_sens = 0
    if sc.get("sensitivity", False) and decoder is not None:
        feats = sensitivity_features(env, decoder)
        env, n_sens = make(r_imgs, r_labs, feats), lg.n_layers
    held = (v_imgs[h_idx], v_labs[h_idx]) if len(h_idx) else ()
    return SearchSetup(lg, spec, env, lib, (r_imgs, r_labs), calib, decoder, order, held, n_sens,
                       s.apply_fn)  # fmt: skip


def evaluate_candidates(env, pattern_ids) -> dict:
    """`env.evaluate` of stacked ``[K, n_nodes]`` pattern ids as host numpy arrays (host-only).
    With a mesh the ids enter replicated and the results leave replicated, so every process of
    a multi-process job reads all K candidates' numbers."""
    if env.mesh is None:
        return jax.tree.map(np.asarray, jax.jit(env.evaluate)(env.consts, jnp.asarray(pattern_ids)))
    repl = shd.replicated(env.mesh)
    ids = shd.replicate(np.asarray(pattern_ids), env.mesh)
    return shd.to_host(jax.jit(env.evaluate, out_shardings=repl)(env.consts, ids))


def sensitivity_features(env, decoder) -> np.ndarray:
    """Per-layer sensitivity as a node feature f32 [n_nodes, 1] (host, L + 1 evaluations).

    Layer l's value is the reward-set accuracy lost when ONLY layer l is pruned, with the pattern
    mixture the uniform allocation gives it at the target (the zero proposal's decode), relative
    to the dense model: ``(acc_dense - acc_l) / max(acc_dense, 1e-3)``, on every action node of l.
    """
    spec = env.spec
    ids, _ = jax.jit(decoder.decode)(jnp.asarray(decode_lib.uniform_logits(decoder)))
    ids = np.asarray(ids)
    keep = graph_lib.initial_pattern_ids(spec)
    cands = [keep]
    for nodes in spec.layer_nodes:
        c = keep.copy()
        c[nodes] = ids[nodes]
        cands.append(c)
    acc = evaluate_candidates(env, np.stack(cands))["accuracy"]
    drop = (acc[0] - acc[1:]) / max(float(acc[0]), 1e-3)
    feat = np.zeros((spec.n_nodes, 1), np.float32)
    for nodes, d in zip(spec.layer_nodes, drop, strict=True):
        feat[nodes, 0] = d
    return feat


def candidate_masks(ss: SearchSetup, cand: dict):
    """The mask pytree of a search candidate (AutoCompress candidates carry masks directly)."""
    if "masks" in cand:
        return cand["masks"]
    return ss.env.masks_of(jnp.asarray(cand["pattern_ids"]))


def _candidate_record(ss: SearchSetup, variables, cand: dict) -> dict:
    masks = candidate_masks(ss, cand)
    exact = flops_lib.count_exact(ss.graph, masks)
    if "pattern_ids" in cand:
        ids = graph_lib.layer_pattern_ids(ss.spec, jnp.asarray(cand["pattern_ids"]))
        hist = np.bincount(np.concatenate([np.asarray(i) for i in ids]),
                           minlength=ss.library.n_patterns).tolist()  # fmt: skip
    else:
        hist = None
    return {
        "search_val_accuracy": cand["accuracy"],
        "heldout_accuracy": cand.get("heldout_accuracy"),
        "flops_reduction": exact["flops_reduction"],
        "reference_formula_reduction": cand["reference_reduction"],
        "params_reduction": exact["params_reduction"],
        "masked_flops": exact["masked_flops"],
        "dense_flops": exact["dense_flops"],
        "masked_params": exact["masked_params"],
        "dense_params": exact["dense_params"],
        "seed": cand["seed"],
        "pattern_histogram": hist,
    }


def bandit_config(cfg) -> dict:
    """The `bandit.BanditConfig` fields of a config's bandit section."""
    b = cfg.bandit
    return dict(lr=b.lr, n_epochs=b.epochs, n_minibatches=b.minibatches, clip_eps=b.clip,
                target_kl=b.target_kl, target_kl_std=b.target_kl_std, ent_coef=b.entropy_coef,
                baseline=b.baseline, fit_lr=b.fit_lr, fit_steps=b.fit_steps)  # fmt: skip


def ppo_config(cfg) -> dict:
    """The `agent.PPOConfig` fields of a config's ppo section (legacy heads)."""
    c = cfg.ppo
    return dict(gamma=c.gamma, gae_lambda=c.gae_lambda, clip_eps=c.clip, vf_coef=c.value_coef,
                ent_coef=c.entropy_coef, lr=c.lr, max_grad_norm=c.max_grad_norm,
                n_epochs=c.epochs, n_minibatches=c.minibatches, advantage=c.advantage)  # fmt: skip


def proposal_config(cfg) -> dict:
    """`propose.ProposalConfig` fields beyond the sizes (exploration, CEM, annealing)."""
    b = cfg.bandit
    return dict(init_std=cfg.search.init_std, init_std_layer=cfg.search.init_std_layer,
                min_std=b.min_std, cem_elite=b.cem_elite,
                cem_alpha=b.cem_alpha, t0=cfg.autocompress.t0, t_stop=cfg.autocompress.t_stop)


def mixture_policy(cfg, ss: SearchSetup):
    """The low-dimensional GNN policy of `ss` with the config's sizes (`bandit`)."""
    c = cfg.ppo
    return bandit.make_mixture_policy(
        ss.spec, ss.decoder.action_mask, init_std=cfg.search.init_std,
        init_std_layer=cfg.search.init_std_layer, min_std=cfg.bandit.min_std,
        hidden=c.hidden, n_layers=c.gnn_layers, n_heads=c.heads,
    )  # fmt: skip


def _policy_meta(cfg, ss: SearchSetup) -> dict:
    obs = ss.env.observe(ss.env.consts, ss.env.reset())
    return {"head": "mixture", "library": ss.library.name, "n_patterns": ss.library.n_patterns,
            "n_features": int(obs.nodes["feat"].shape[1]), "hidden": cfg.ppo.hidden,
            "gnn_layers": cfg.ppo.gnn_layers, "heads": cfg.ppo.heads,
            "sensitivity": bool(cfg.search.get("sensitivity", False))}  # fmt: skip


def load_policy(path: str, cfg, ss: SearchSetup, policy):
    """`policy` starting from the params saved under PATH (a workdir, its search/ or policy/).

    Raises ValueError before any search when the saved policy cannot drive this one: another head,
    pattern library, node features or network sizes."""
    path = paths_lib.resolve(path)
    for cand in (os.path.join(path, "search", "policy"), os.path.join(path, "policy"), path):
        if paths_lib.isfile(os.path.join(cand, "policy.json")):
            break
    else:
        raise FileNotFoundError(
            f"no trained policy under {path!r}; give the workdir of a finished `prune` run with "
            "--config.search.method=ppo (it writes search/policy/)"
        )
    meta, want = ckpt.load_json(os.path.join(cand, "policy.json")), _policy_meta(cfg, ss)
    bad = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if bad:
        diff = ", ".join(f"{k}: saved {a!r} vs here {b!r}" for k, (a, b) in bad.items())
        raise ValueError(
            f"the policy in {cand} cannot start this search ({diff}); use the same head, pattern "
            "library, features and --config.ppo sizes as the run that trained it"
        )
    fresh = policy.init(jax.random.PRNGKey(0))
    gnn = ckpt.load_pytree(os.path.join(cand, "params"), like=_abstract(fresh["gnn"]))
    params = dict(fresh, gnn=gnn)  # the GNN transfers; this model's own correction starts at 0
    return policy._replace(init=lambda key, obs=None: params), cand


def save_policy(path: str, cfg, ss: SearchSetup, params) -> None:
    """Writes a trained mixture policy's GNN (the part that does not depend on the model's size)
    and policy.json, for `--policy-from`."""
    ckpt.save_pytree(os.path.join(path, "params"), params["gnn"])
    ckpt.save_json(os.path.join(path, "policy.json"), _policy_meta(cfg, ss))


def rescore(ss: SearchSetup, best: list[dict]) -> list[dict]:
    """The winner's curse: re-scores the kept candidates on the held-out validation part and
    orders them by it (each keeps its search score as ``accuracy``). No-op without a held-out
    part."""
    if not best or not ss.heldout:
        return best
    held = env_lib.make_env(ss.apply_fn, ss.env.consts["variables"], ss.spec, *ss.heldout,
                            library=ss.library, calib_images=ss.calib,
                            config=ss.env.config, mesh=ss.env.mesh)  # fmt: skip
    ids = jnp.asarray(np.stack([c["pattern_ids"] for c in best]))
    acc = evaluate_candidates(held, ids)["accuracy"]
    out = [dict(c, heldout_accuracy=float(a)) for c, a in zip(best, acc, strict=True)]
    return sorted(out, key=lambda c: -c["heldout_accuracy"])


def prune(cfg, *, overwrite: bool = False, s: Setup | None = None, variables=None) -> dict:
    """Runs (or resumes) the configured search and writes best.json + candidate pattern ids."""
    s = s or setup(cfg)
    if variables is None:
        check_search(cfg, s)
        variables = pretrain(cfg, s=s)["variables"]
    sc = cfg.search
    ss = make_search_setup(cfg, s, variables)
    wd = paths_lib.resolve(os.path.join(cfg.workdir, "search"))
    if sc.method == "autocompress":
        return _prune_autocompress(cfg, s, variables, ss, wd, overwrite)
    legacy = _legacy(cfg)
    policy, agent_cfg, policy_src = None, bandit_config(cfg), None
    if legacy:
        policy, agent_cfg = runner.policy_for(ss.env, sc.head, variables, cfg.ppo), ppo_config(cfg)
    elif sc.method == "ppo":
        policy = mixture_policy(cfg, ss)
        if sc.get("policy_from"):
            policy, policy_src = load_policy(sc.policy_from, cfg, ss, policy)
    result = runner.run_search(
        ss.env, sc.method, workdir=wd, iterations=sc.iterations, seed=cfg.seed,
        n_seeds=sc.n_seeds, n_envs=sc.n_envs, n_steps=sc.n_steps, top_k=sc.top_k, policy=policy,
        ppo_config=agent_cfg, order=ss.order, library=ss.library, progress=cfg.progress,
        decoder=None if legacy else ss.decoder, proposal=proposal_config(cfg),
        fingerprint=dict(_run_fingerprint(cfg), search=sc.to_dict(), ppo=cfg.ppo.to_dict(),
                         bandit=cfg.bandit.to_dict()),
        overwrite=overwrite, tensorboard=cfg.tensorboard,
    )  # fmt: skip
    if sc.method == "ppo" and not legacy:
        params = result.state.agent.params
        if sc.n_seeds > 1:
            params = jax.tree.map(lambda x: x[0], params)
        save_policy(os.path.join(wd, "policy"), cfg, ss, jax.device_get(params))
    best = rescore(ss, result.best)
    records = [dict(_candidate_record(ss, variables, c), rank=i) for i, c in enumerate(best)]
    target, kind = search_target(cfg)
    summary = {
        "method": sc.method,
        "head": sc.head if sc.method == "ppo" else None,
        "target_reduction": target,
        "target_measure": kind,
        "target_flops_reduction": sc.target_flops,
        "tolerance": None if legacy else ss.decoder.tolerance,
        "band": sc.band if legacy else None,
        "flops_kind": sc.flops_kind,
        "n_evals": result.n_evals + ss.sensitivity_evals,
        "sensitivity_evals": ss.sensitivity_evals,
        "n_in_band": result.n_in_band,
        "in_band_rate": result.n_in_band / max(result.n_evals, 1),  # on budget AND fully scored
        # every evaluation within the tolerance (equals in_band_rate unless successive halving
        # scored some on the first stage only)
        "on_budget_rate": _on_budget_rate(result.history),
        "reward_set_size": int(len(ss.reward[1])),
        "heldout_size": int(len(ss.heldout[1])) if ss.heldout else 0,
        "policy_from": policy_src,
        "seconds_this_run": result.seconds,
        "candidates": records,
    }
    ckpt.save_json(os.path.join(wd, "best.json"), summary)
    if best:
        ckpt.save_pytree(os.path.join(wd, "best_pattern_ids"),
                         {f"cand{i}": np.asarray(c["pattern_ids"])
                          for i, c in enumerate(best)})  # fmt: skip
    else:
        log.warning("no candidate on budget: raise search.iterations (or widen search.tolerance)")
    return {"summary": summary, "best": best, "search_setup": ss, "history": result.history}


def _ac_measure(cfg) -> str:
    """AutoCompress's target measure: exact FLOPs, or parameters (search.constraint=params)."""
    return "params" if cfg.search.get("constraint", "flops") == "params" else "flops"


def _prune_autocompress(cfg, s: Setup, variables, ss: SearchSetup, wd: str, overwrite: bool):
    """AutoCompress (simulated annealing + ADMM + purification) as the search stage.

    The evaluation budget (iterations * n_steps * n_envs) sets the annealing moves per temperature.
    Its result (masks and ADMM-trained variables of the kept candidates) is saved under
    <workdir>/search/autocompress and reused by a later run with the same settings.
    """
    from sculpt_jax.search import autocompress

    sc, ac = cfg.search, cfg.autocompress
    fp = runner._fingerprint(dict(_run_fingerprint(cfg), search=sc.to_dict(), ac=ac.to_dict()))
    out_dir = os.path.join(wd, "autocompress")
    best_path = os.path.join(wd, "best.json")
    like = {"masks": masking.ones_masks(variables), "variables": _abstract(variables)}
    best = None
    if not overwrite and paths_lib.exists(best_path):
        prev = ckpt.load_json(best_path)
        if prev.get("fingerprint") == fp and prev.get("candidates"):
            best = []
            for i, rec in enumerate(prev["candidates"]):
                tree = ckpt.load_pytree(os.path.join(out_dir, f"cand{i}"), like=like)
                best.append(dict(tree, accuracy=rec["search_val_accuracy"],
                                 reference_reduction=rec["reference_formula_reduction"],
                                 seed=rec["seed"]))  # fmt: skip
            summary = prev
    if best is None:
        n_temps = max(1, int(np.ceil(np.log(ac.t_stop / ac.t0) / np.log(ac.cooling))) + 1)
        budget = sc.iterations * sc.n_steps * sc.n_envs
        t0 = time.perf_counter()
        cands = autocompress.run_autocompress(
            s.apply_fn, variables, ss.graph,
            dataclasses.replace(s.splits, train=data_lib.eval_split(s.splits.train, s.input_shape)),
            target=search_target(cfg)[0],
            target_kind=_ac_measure(cfg), scheme=ac.scheme, rounds=ac.rounds, library=ss.library,
            t0=ac.t0, t_stop=ac.t_stop, cooling=ac.cooling, perturbation=ac.perturbation,
            moves_per_temperature=max(1, budget // (n_temps * ac.rounds)),
            admm_iterations=ac.admm_iterations, admm_steps=ac.admm_steps, rho=ac.rho,
            admm_lr=ac.admm_lr, batch_size=cfg.finetune.batch_size,
            reward_images=ss.reward[0], reward_labels=ss.reward[1], calib_images=ss.calib,
            top_k=sc.top_k, seed=cfg.seed, progress=cfg.progress,
        )  # fmt: skip
        best = cands[: sc.top_k]
        for i, c in enumerate(best):
            ckpt.save_pytree(os.path.join(out_dir, f"cand{i}"),
                             {"masks": c["masks"], "variables": c["variables"]})  # fmt: skip
        records = [dict(_candidate_record(ss, variables, c), rank=i) for i, c in enumerate(best)]
        summary = {
            "method": "autocompress",
            "target_reduction": search_target(cfg)[0],
            "target_measure": _ac_measure(cfg),
            "target_flops_reduction": sc.target_flops,
            "band": sc.band,
            "flops_kind": "true",
            "n_evals": int(best[0].get("n_evals", 0)) if best else 0,
            "n_in_band": None,
            "reward_set_size": int(len(ss.reward[1])),
            "heldout_size": 0,
            "seconds_this_run": time.perf_counter() - t0,
            "candidates": records,
            "fingerprint": fp,
        }
        ckpt.save_json(best_path, summary)
    return {"summary": summary, "best": best, "search_setup": ss, "history": []}


# ----------------------------------------------------------------------------------------------
# finetune + export


def finetune(cfg, *, overwrite: bool = False, s: Setup | None = None, variables=None,
             searched=None) -> dict:  # fmt: skip
    """Fine-tunes each kept candidate with its masks held (exact zeros), picks the best by
    validation accuracy, evaluates the test split ONCE on it and exports it."""
    s = s or setup(cfg)
    if variables is None:
        variables = pretrain(cfg, s=s)["variables"]
    if searched is None:
        searched = prune(cfg, s=s, variables=variables)
    ss: SearchSetup = searched["search_setup"]
    best = searched["best"][: cfg.search.top_k]
    if not best:
        raise PipelineError(
            "the search kept no candidate on budget, so there is nothing to fine-tune; run more "
            "search iterations (--config.search.iterations) or widen --config.search.tolerance "
            "(legacy heads: --config.search.band)"
        )
    f = cfg.finetune
    eval_step = _eval_step(s)
    results = []  # top-K fine-tuning: K sequential runs (TOPK_MODE)
    for k, cand in enumerate(best):
        masks = candidate_masks(ss, cand)
        start = cand.get("variables", variables)  # AutoCompress: the ADMM-trained weights
        res = ft.fit(
            s.apply_fn, start, {"train": _train_arrays(s, f.augment), "val": s.splits.val.arrays},
            epochs=f.epochs, batch_size=f.batch_size,
            workdir=paths_lib.resolve(os.path.join(cfg.workdir, "finetune", f"cand{k}")),
            seed=cfg.seed + k, masks=masks,
            optimizer=dict(kind="sgd", lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay,
                           schedule=f.schedule),
            augment_fn=data_lib.make_augment(s.splits.name, s.input_shape) if f.augment else None,
            mesh=s.mesh, progress=cfg.progress, overwrite=overwrite, tensorboard=cfg.tensorboard,
            config_extra=dict(_run_fingerprint(cfg), candidate=k, method=cfg.search.method),
            **_fit_input_kwargs(cfg),
        )  # fmt: skip
        results.append((res, masks, cand))
    k_best = int(np.argmax([r.best_val_accuracy for r, _, _ in results]))
    res, masks, cand = results[k_best]
    final = res.variables
    zero_ok = masking.pruned_exactly_zero(final, masks)
    if not zero_ok:
        raise PipelineError("internal error: a pruned weight is nonzero after fine-tuning")
    test = ft.evaluate(eval_step, final, *s.splits.test.arrays, _eval_batch(s))
    exact = flops_lib.count_exact(ss.graph, masks)
    summary = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "method": cfg.search.method,
        "chosen_candidate": k_best,
        "candidates_val_accuracy": [r.best_val_accuracy for r, _, _ in results],
        "val_accuracy": res.best_val_accuracy,
        "test_accuracy": test["accuracy"],
        "search_val_accuracy_before_finetune": cand["accuracy"],
        "heldout_accuracy_before_finetune": cand.get("heldout_accuracy"),
        "flops_reduction": exact["flops_reduction"],
        "reference_formula_flops_reduction": cand["reference_reduction"],
        "params_reduction": exact["params_reduction"],
        "dense_flops": exact["dense_flops"],
        "masked_flops": exact["masked_flops"],
        "dense_params": exact["dense_params"],
        "masked_params": exact["masked_params"],
        # the pruning literature's MACs (thop / fvcore: padding taps included), for comparison
        "dense_conventional_macs": exact["dense_conventional_macs"],
        "masked_conventional_macs": exact["masked_conventional_macs"],
        "conventional_macs_reduction": exact["conventional_macs_reduction"],
        "pruned_weights_exactly_zero": zero_ok,
        # which input path the training data took (data.input_path; fit logs the pipeline)
        "train_input_path": data_lib.input_path(s.splits.train.images),
    }
    export(os.path.join(cfg.workdir, "export"), final, masks, ss, cand.get("pattern_ids"), summary)
    return {"summary": summary, "variables": final, "masks": masks}


def export(path: str, variables, masks, ss: SearchSetup, pattern_ids, summary: dict) -> None:
    """Writes pruned variables, masks, per-layer pattern ids and summary.json under `path`."""
    path = paths_lib.resolve(path)
    ckpt.save_pytree(os.path.join(path, "variables"), variables)
    ckpt.save_pytree(os.path.join(path, "masks"), masks)
    if pattern_ids is not None:
        per_layer = graph_lib.layer_pattern_ids(ss.spec, jnp.asarray(pattern_ids))
        ckpt.save_json(os.path.join(path, "pattern_ids.json"), {
            layer.name: np.asarray(ids).tolist() for layer, ids in zip(ss.graph.layers, per_layer,
                                                                        strict=True)
        })  # fmt: skip
    ckpt.save_json(os.path.join(path, "summary.json"), summary)


def load_export(path: str, like_variables) -> tuple[Any, Any, dict]:
    """(variables, masks, summary) of an `export` folder; `like_variables` gives the structure."""
    path = paths_lib.resolve(path)
    variables = ckpt.load_pytree(os.path.join(path, "variables"), like=like_variables)
    masks = ckpt.load_pytree(os.path.join(path, "masks"),
                             like=masking.ones_masks(like_variables))  # fmt: skip
    return variables, masks, ckpt.load_json(os.path.join(path, "summary.json"))


def measure_latency(s: Setup, variables, masks, ss: SearchSetup, compact_dir: str,
                    batches=(1, 256), align: int = 0, lowering: str = "filters",
                    layer_lowerings: dict | None = None) -> dict:  # fmt: skip
    """Compacts the pruned model (exported to `compact_dir`, loadable without masks; output filters
    stored in multiples of `align`, 0 = `compaction.auto_align()`; convs in `lowering`, "auto"
    timed at the largest of `batches`; `layer_lowerings` pins single convs, as `compact`) and
    measures dense / masked / compacted latency on this device; returns flat ``latency_*`` row
    keys (and ``compact_lowering_layers``: how many convs run in each lowering)."""
    from sculpt_jax import compaction as compact_lib

    # The raw model on normalised input: normalisation is not part of the pruned network.
    x = data_lib.normalize(s.splits.test.arrays[0][:1], s.splits.mean, s.splits.std)
    align = align or compact_lib.auto_align()
    compacted = compact_lib.compact(s.model.apply, variables, ss.graph, masks, x, align=align,
                                    lowering=lowering, auto_batch=max(batches),
                                    layer_lowerings=layer_lowerings)  # fmt: skip
    compact_lib.save_compact(compact_dir, compacted[1], compacted[2])
    rep = compact_lib.latency_report(s.model.apply, variables, ss.graph, masks, x,
                                     batches=batches, compacted=compacted)  # fmt: skip
    used = [d["lowering"] for d in compacted[2]["layers"] if "lowering" in d]
    out = {"latency_device_kind": jax.devices()[0].device_kind, "compact_align": align,
           "compact_lowering": lowering,
           "compact_lowering_layers": {k: used.count(k) for k in sorted(set(used))},
           "compact_params": int(compacted[2]["params"]),
           "compact_stored_params": int(compacted[2]["stored_params"])}  # fmt: skip
    for b, r in rep["batches"].items():
        for kind in ("dense", "masked", "compact"):
            out[f"latency_ms_{kind}_b{b}"] = float(r[kind]["median_ms"])
        out[f"speedup_compact_b{b}"] = float(r["speedup_compact"])
    return out


# ----------------------------------------------------------------------------------------------
# run


def epoch_seconds(workdir: str) -> float | None:
    """Training seconds recorded by `training.fit` under `workdir` (its metrics.jsonl, or those of
    its sub-folders such as ``finetune/cand<k>/``): the sum of ``epoch_time_s`` over distinct
    epochs, so a run resumed over several sessions counts every epoch once. None if none."""
    paths = [os.path.join(workdir, "metrics.jsonl")]
    paths += [os.path.join(workdir, d, "metrics.jsonl") for d in paths_lib.listdir(workdir)]
    total, found = 0.0, False
    for path in paths:
        if not paths_lib.isfile(path):
            continue
        by_epoch = {r["epoch"]: r["epoch_time_s"] for r in ckpt.read_jsonl(path)
                    if "epoch" in r and "epoch_time_s" in r}  # fmt: skip
        total += sum(by_epoch.values())
        found = found or bool(by_epoch)
    return total if found else None


# How the top-K candidates are fine-tuned: "sequential" (K `training.fit` runs, one after
# another, each data parallel over the mesh) on every backend. A one-program vmap over K
# (`training.make_topk_train_step`) vmaps masked convs into grouped convs, measured ~10x slower
# than sequential forwards on XLA:CPU (ENVIRONMENT.md); it is not measured faster on any backend.
TOPK_MODE = "sequential"


def device_fields(s: Setup) -> dict:
    """What results.json records of the devices: kind, count (int) and the top-K mode."""
    n = 1 if s.mesh is None else shd.n_devices(s.mesh)
    dev = jax.devices()[0] if s.mesh is None else s.mesh.devices.flat[0]
    return {"device_kind": str(dev.device_kind), "device_count": int(n), "topk_mode": TOPK_MODE}


def run(cfg, *, overwrite: bool = False) -> dict:
    """The main job: pretrain -> search -> fine-tune -> report, printing the final table."""
    t0 = time.perf_counter()
    s = setup(cfg)
    save_config(cfg)
    log.info("data: %s", s.splits.summary() if hasattr(s.splits, "summary") else s.splits.name)
    check_search(cfg, s)
    pre = pretrain(cfg, overwrite=overwrite, s=s)
    t_pre = time.perf_counter() - t0
    searched = prune(cfg, overwrite=overwrite, s=s, variables=pre["variables"])
    t_search = time.perf_counter() - t0 - t_pre
    fin = finetune(cfg, overwrite=overwrite, s=s, variables=pre["variables"], searched=searched)
    dense_test = ft.evaluate(_eval_step(s), pre["variables"], *s.splits.test.arrays,
                             _eval_batch(s))["accuracy"]  # fmt: skip
    latency, pinned = {}, None
    if search_target(cfg)[1] == "latency":  # predicted vs measured, as the table models it
        k, ss = fin["summary"]["chosen_candidate"], searched["search_setup"]
        latency.update(constraint_latency(
            cfg, s, jax.device_get(fin["variables"]), jax.device_get(fin["masks"]),
            ss, searched["best"][k]["pattern_ids"]))  # fmt: skip
        # the export runs the convs the search timed in a grouped lowering in that lowering
        table = latency_lib.from_json(ckpt.load_json(latency_table_path(cfg)))  # written above
        pinned = table.layer_lowerings(ss.graph)
    if cfg.report.latency:  # on one device: host copies of the (possibly replicated) arrays
        latency.update(measure_latency(s, jax.device_get(fin["variables"]),
                                  jax.device_get(fin["masks"]), searched["search_setup"],
                                  os.path.join(cfg.workdir, "export", "compact"),
                                  align=cfg.report.get("compact_align", 0),
                                  lowering=cfg.report.get("compact_lowering", "filters"),
                                  layer_lowerings=pinned))  # fmt: skip
    wd = paths_lib.resolve(cfg.workdir)
    row = dict(fin["summary"], **latency,
               target_measure=searched["summary"].get("target_measure", "flops"),
               dense_val_accuracy=pre["val_accuracy"],
               dense_test_accuracy=dense_test, search_seconds=t_search,
               pretrain_epoch_seconds=epoch_seconds(os.path.join(wd, "pretrain")),
               finetune_epoch_seconds=epoch_seconds(os.path.join(wd, "finetune")),
               total_seconds=time.perf_counter() - t0, **device_fields(s))  # fmt: skip
    from sculpt_jax import report

    report.write_run_report(os.path.join(cfg.workdir, "report"), row, searched, cfg)
    if shd.is_primary():
        print(report.format_row_table([row]))
    return row
