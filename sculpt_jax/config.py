"""Configuration: the default `ml_collections.ConfigDict` and config-file loading (layer 0).

A config file is a Python file with `get_config(variant: str | None = None) -> ConfigDict` (big_vision
style); `load_config("experiments/configs/resnet20_cifar10.py:smoke")` calls it with "smoke".
Overrides use dotted keys, `--config.search.target_flops=0.4` on the command line or
`apply_overrides(cfg, {"search.target_flops": "0.4"})`; values are cast to the type of the field they
replace. Configs are frozen after parsing; derived sizes are computed by functions, never written back.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os

import ml_collections

from sculpt_jax import paths as paths_lib


def get_default_config() -> ml_collections.ConfigDict:
    """The main job's defaults: ResNet-20 on the embedded digits data, CPU-sized budgets.

    Every field is documented inline; experiment configs start from this and change what they need.
    """
    c = ml_collections.ConfigDict()
    c.model = "resnet20"  # any name of sculpt_jax.models.list_models()
    c.num_classes = -1  # -1: the dataset's
    c.dataset = "digits"  # digits (embedded, offline) | cifar10 | cifar100 | imagenet2012 | folder
    c.data_dir = (
        ""  # local CIFAR pickle batches, image-folder tree or .tar.gz; tfds data_dir for tfds
    )
    c.val_size = -1  # -1: dataset default (digits 200, CIFAR 5,000)
    c.image_size = 224  # imagenet2012 only: model input side (train stored at size*256/224)
    c.max_train_examples = -1  # > 0: a fixed random subset of the training split (smoke runs)
    c.seed = 0
    c.workdir = "runs/default"
    c.progress = True  # progress bars
    c.tensorboard = True  # metrics also as TensorBoard event files (<stage>/tensorboard/; tensorboardX)
    # Local devices the job uses, as one 1-D ("data",) mesh (pretrain and fine-tune: data parallel;
    # search: each call's candidates split over them): 0 = all of jax.devices(), N = the first N.
    # Batch sizes must be multiples of the count (checked before any work).
    c.devices = 0
    # Checkpoint pretrain / fine-tune every N optimizer steps too (resume mid-epoch); 0 = epoch ends.
    c.checkpoint_every_steps = 0

    c.input = ml_collections.ConfigDict()
    # Train batches: numpy (in memory, data.iterate_batches) | grain (sculpt_jax.input_pipeline,
    # per-process shards, worker processes) | auto (grain for lazy/streamed images: ImageNet and
    # streamed folders; numpy for digits/CIFAR/small folders, which are faster in memory).
    c.input.pipeline = "auto"
    c.input.workers = 0  # grain worker processes decoding (0: in the main process, 2 threads)
    # Image folders: auto (stream from disk above data.STREAM_THRESHOLD_BYTES) | memory | stream
    c.input.folder_mode = "auto"
    # Many hosts: join a multi-process job with JAX's cluster auto-detection (TPU pod slices,
    # SLURM, Open MPI). Read by the CLI before parsing; SCULPT_NUM_PROCESSES > 1 (with
    # SCULPT_PROCESS_ID, SCULPT_COORDINATOR) joins one without this flag. `devices` is then global.
    c.distributed = False

    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.checkpoint = ""  # a pretrained workdir/checkpoint to start from instead of training
    c.pretrain.epochs = 12
    c.pretrain.batch_size = 64
    c.pretrain.lr = 0.05  # the reference uses 0.01 for 200 epochs; shorter budgets need more
    c.pretrain.momentum = 0.9
    c.pretrain.weight_decay = 5e-4
    c.pretrain.schedule = "cosine"  # cosine | multistep | constant
    c.pretrain.augment = True

    c.search = ml_collections.ConfigDict()
    # ppo (AutoSculpt: GNN + PPO) | random | uniform | cem | anneal | magnitude | autocompress
    c.search.method = "ppo"
    c.search.library = "reference6"  # pattern library (sculpt_jax.patterns)
    # flops | params | latency: what the target reduction counts. latency: the latency a per-layer
    # table measured on this backend predicts for the compacted model (sculpt_jax.latency; measured
    # once and cached in <workdir>/search/latency_table.json)
    c.search.constraint = "flops"
    c.search.target_flops = 0.5  # target FLOPs reduction in (0, 1) (constraint "flops")
    c.search.target_params = 0.5  # target parameter reduction in (0, 1) (constraint "params")
    c.search.target_latency = 0.3  # target predicted-latency reduction in (0, 1) ("latency")
    c.search.latency_batch = 1  # batch size the latency table is measured (and the model timed) at
    # The compaction lowering the latency table models: filters | grouped | taps (pattern-grouped
    # execution: the 3x3 convs of at least latency_min_width filters run as one dense op per
    # footprint group / kernel tap, sculpt_jax.compaction); the chosen model is compacted so.
    c.search.latency_lowering = "filters"
    c.search.latency_min_width = 0
    c.search.flops_kind = "true"  # true (exact masked FLOPs) | reference (the reference's formula)
    # Budget-exact decoding (sculpt_jax.decode): every proposal is decoded to within this much of
    # the target (0.005 = 0.5 percentage points). The legacy heads use the reference's band instead.
    c.search.tolerance = 0.005
    c.search.band = 0.05  # legacy heads only: |reduction - target| <= band is in band
    c.search.reward = "paper"  # legacy heads only: paper | gated
    c.search.reward_set_size = -1  # validation images scored per candidate (-1: all not held out)
    # Validation images held out of the search to re-score its top-K before choosing what to
    # fine-tune (the winner's curse): -1 = half of the validation split, 0 = off.
    c.search.heldout_size = -1
    c.search.bn_recalib_batches = 4  # adaptive-BN batches of training data per candidate (0: off)
    c.search.bn_recalib_batch_size = 128
    c.search.halving_images = 0  # > 0: successive halving, first stage on this many reward images
    c.search.halving_keep = 0.25  # fraction of each call's candidates promoted to the full set
    c.search.eval_mode = "auto"  # auto | map | vmap: how N candidates are evaluated per call
    # mixture (low-dimensional GNN policy, budget-exact, bandit PPO) | legacy: paper | per_group |
    # per_filter (the reference's band rule; see experiments/RESULTS.md)
    c.search.head = "mixture"
    c.search.level = "filter"  # filter | layer graph
    c.search.n_envs = 16  # candidates per compiled evaluation call
    c.search.n_steps = 1  # calls per iteration (one policy update per iteration)
    c.search.iterations = 8
    c.search.max_episode_steps = 500  # legacy heads only
    c.search.top_k = 3  # on-budget candidates kept (re-scored when heldout_size > 0, fine-tuned)
    c.search.n_seeds = 1
    # Initial std of the proposal Gaussian (policy, random, CEM, annealing steps): on the shared
    # network-wide row of pattern logits and on each layer's row (sculpt_jax.decode)
    c.search.init_std = 1.0
    c.search.init_std_layer = 0.5
    c.search.sensitivity = False  # per-layer sensitivity node feature (costs L evaluations)
    c.search.policy_from = ""  # a workdir whose trained policy starts this search (transfer)

    c.bandit = ml_collections.ConfigDict()  # the mixture head's contextual-bandit PPO update
    c.bandit.lr = 1.0  # natural-gradient step size of the improvement (sculpt_jax.bandit)
    c.bandit.epochs = 8
    c.bandit.minibatches = 1
    c.bandit.clip = 0.2
    # trust region per update: the mean part of KL(old || new) over the ~100 action dimensions
    # (20 nats: about 0.6 std per dimension), and its std part; chosen on digits, 5 seeds, from
    # 0.5 .. 50 (experiments/RESULTS.md, "Search quality")
    c.bandit.target_kl = 20.0
    c.bandit.target_kl_std = 2.0
    c.bandit.entropy_coef = 0.0
    c.bandit.baseline = "loo"  # loo (leave-one-out) | mean | rank (centred ranks)
    c.bandit.fit_lr = 0.01  # Adam on the GNN's params when fitting its mean to the improved one
    c.bandit.fit_steps = 64
    c.bandit.min_std = 0.05
    c.bandit.cem_elite = 0.25  # method cem: elite fraction
    c.bandit.cem_alpha = 0.7  # method cem: smoothing

    c.ppo = ml_collections.ConfigDict()  # GNN sizes (all heads) and the legacy heads' PPO
    c.ppo.lr = 1e-3
    c.ppo.gamma = 0.9
    c.ppo.gae_lambda = 0.95
    c.ppo.advantage = "gae"  # gae | reference
    c.ppo.clip = 0.2
    c.ppo.epochs = 3
    c.ppo.minibatches = 1
    c.ppo.value_coef = 0.5
    c.ppo.entropy_coef = 0.0
    c.ppo.max_grad_norm = 1.0
    c.ppo.hidden = 64
    c.ppo.gnn_layers = 2
    c.ppo.heads = 4
    c.ppo.sigma = 0.2

    c.autocompress = ml_collections.ConfigDict()  # search.method=autocompress (arXiv 1907.03141)
    c.autocompress.scheme = "filter+column"  # filter | column | filter+column | pattern
    c.autocompress.rounds = 3  # progressive rounds; per-round target 1 - (1 - s)^(1/R)
    c.autocompress.t0 = 100.0
    c.autocompress.t_stop = 20.0
    c.autocompress.cooling = 0.9
    c.autocompress.perturbation = 0.35
    # ADMM: smoke-sized here (the digits job); the paper-table configs set real budgets
    # (experiments/configs/_common.py: CIFAR 30 x 1,720 steps, ImageNet 10 x 5,000)
    c.autocompress.admm_iterations = 3
    c.autocompress.admm_steps = 10  # SGD W-steps per ADMM iteration
    c.autocompress.rho = 1e-4
    c.autocompress.admm_lr = 1e-3

    c.finetune = ml_collections.ConfigDict()
    c.finetune.epochs = 6
    c.finetune.batch_size = 64
    c.finetune.lr = 0.01  # the reference uses 1e-3 for 200 epochs
    c.finetune.momentum = 0.9
    c.finetune.weight_decay = 4e-5
    c.finetune.schedule = "multistep"  # lr / 10 at 50%, 75%, 90% of the steps
    c.finetune.augment = True

    c.report = ml_collections.ConfigDict()
    c.report.latency = True
    # Output filters of the compacted model stored in multiples of this (`compaction.compact` align);
    # 0 = `compaction.auto_align()` for the backend (16 on CPU, measured; 1 elsewhere).
    c.report.compact_align = 0
    # How the exported compact model runs its convs (`compaction.compact` lowering): "filters",
    # "grouped", "taps", or "auto" (each conv on the lowering timed fastest for it here, at the
    # largest latency batch; kept only if the whole model is faster than "filters").
    c.report.compact_lowering = "filters"
    c.report.plots = True
    return c


def _merge(node: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if key not in node:  # a field this version no longer has
            continue
        if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _merge(node[key], value)
        else:
            node[key] = value


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config saved in ``<workdir>/config.json`` by the last command run there (over the
    defaults, so fields added since keep their defaults), or None when there is none."""
    path = os.path.join(paths_lib.resolve(workdir), "config.json")
    if not paths_lib.isfile(path):
        return None
    saved = json.loads(paths_lib.read_text(path))
    cfg = get_default_config()
    _merge(cfg, saved)
    return cfg


def load_config(spec: str | None) -> ml_collections.ConfigDict:
    """Loads `path.py[:variant]`; None or "" gives `get_default_config()`.

    Raises:
      FileNotFoundError: the file does not exist (the message says where configs live).
      ValueError: the file has no `get_config`.
    """
    if not spec:
        return get_default_config()
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config file {path!r} not found; pass a Python file with get_config(), e.g. "
            "experiments/configs/resnet20_cifar10.py or experiments/configs/resnet20_cifar10.py:smoke"
        )
    mod_spec = importlib.util.spec_from_file_location(
        "sculpt_jax_config_" + os.path.basename(path)[:-3], path
    )
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(
            f"config file {path!r} defines no get_config(); add one returning a ConfigDict"
        )
    try:
        return module.get_config(variant or None)
    except TypeError:
        if variant:
            raise
        return module.get_config()


def _cast(old, text: str):
    if isinstance(old, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(old, int):
        return int(float(text)) if "e" in text.lower() else int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, str):
        return text
    return ast.literal_eval(text)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, str]):
    """Applies dotted-key overrides {"search.target_flops": "0.4"} in place, casting to field types.

    Raises:
      KeyError: an unknown key (the message lists the valid keys of that section).
      ValueError: a value that cannot be cast to the field's type.
    """
    for key, text in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise KeyError(f"unknown config section {p!r} in {key!r}; sections: {sorted(node)}")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"unknown config key {key!r}; valid keys here: {sorted(node)}")
        try:
            node[leaf] = _cast(node[leaf], text) if isinstance(text, str) else text
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"bad value {text!r} for config key {key!r}: {e}") from e
    return cfg


def use_fast_prng() -> None:
    """Turns off `jax_threefry_partitionable` (jax 0.10's default is on).

    Measured on XLA:CPU (2 cores): with it on, EVERY random op (initializers, augmentation, action
    sampling) costs ~1.5 s of compile time unloaded and ~8 s under load, and a tiny ResNet's init
    took 57 s; with it off, a few hundred ms. Random streams differ from the partitionable ones but
    stay deterministic. The CLI, the tests and the benchmarks call this before any JAX work; library
    users may call it too (it is a global JAX setting, so we never flip it on import).
    """
    import jax

    jax.config.update("jax_threefry_partitionable", False)


SCHEDULES = ("multistep", "cosine", "constant")  # `training.make_lr_schedule`


def _validate_training(cfg: ml_collections.ConfigDict) -> None:
    """pretrain / finetune / autocompress optimiser fields (see `validate`)."""
    for sec in ("pretrain", "finetune"):
        t = cfg[sec]
        if t.schedule not in SCHEDULES:
            raise ValueError(f"{sec}.schedule={t.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not t.lr > 0:
            raise ValueError(f"{sec}.lr must be > 0, got {t.lr}")
        if not (0.0 <= t.momentum < 1.0 and t.weight_decay >= 0.0):
            raise ValueError(
                f"{sec}.momentum must be in [0, 1) and {sec}.weight_decay >= 0, got "
                f"{t.momentum} and {t.weight_decay}"
            )
    ac = cfg.get("autocompress")
    if ac is not None:
        if not (ac.admm_lr > 0 and ac.rho >= 0 and ac.rounds >= 1 and ac.admm_iterations >= 0
                and ac.admm_steps >= 0):  # fmt: skip
            raise ValueError(
                "autocompress.admm_lr must be > 0, rho >= 0, rounds >= 1, admm_iterations and "
                f"admm_steps >= 0; got {ac.admm_lr}, {ac.rho}, {ac.rounds}, "
                f"{ac.admm_iterations}, {ac.admm_steps}"
            )
        if not 0 < ac.t_stop < ac.t0 or not 0 < ac.cooling < 1:
            raise ValueError(
                f"autocompress needs 0 < t_stop < t0 and 0 < cooling < 1, got t0={ac.t0}, "
                f"t_stop={ac.t_stop}, cooling={ac.cooling}"
            )


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the values a run would otherwise reject only after minutes of work (host-only).

    Raises:
      ValueError: naming the field, the bad value and what is allowed.
    """
    s = cfg.search
    if not 0.0 < s.target_flops < 1.0:
        raise ValueError(
            f"target FLOPs reduction must be in (0, 1), got {s.target_flops}; e.g. 0.5 removes "
            "half of the FLOPs (--target-flops 0.5)"
        )
    if not 0.0 < s.get("target_params", 0.5) < 1.0:
        raise ValueError(f"search.target_params must be in (0, 1), got {s.target_params}")
    if not 0.0 < s.get("target_latency", 0.3) < 1.0:
        raise ValueError(f"search.target_latency must be in (0, 1), got {s.target_latency}")
    if s.get("latency_batch", 1) < 1:
        raise ValueError(f"search.latency_batch must be >= 1, got {s.latency_batch}")
    if s.get("latency_min_width", 0) < 0:
        raise ValueError(f"search.latency_min_width must be >= 0, got {s.latency_min_width}")
    if s.get("constraint", "flops") == "latency" and (
        s.method == "autocompress" or (s.method == "ppo" and s.head != "mixture")
    ):
        raise ValueError(
            "search.constraint=latency needs the budget-exact decoder: use search.head=mixture "
            f"(method {s.method!r}, head {s.head!r} use the reference's FLOPs band)"
        )
    if not 0.0 < s.band < 1.0:
        raise ValueError(f"search.band must be in (0, 1), got {s.band}")
    if not 0.0 < s.get("tolerance", 0.005) < 1.0:
        raise ValueError(
            f"search.tolerance must be in (0, 1), got {s.tolerance}; e.g. 0.005 accepts "
            "reductions within half a percentage point of the target"
        )
    choices = {
        "search.method": (s.method, ("ppo", "random", "uniform", "cem", "anneal", "magnitude",
                                     "autocompress")),
        "search.head": (s.head, ("mixture", "paper", "per_group", "per_filter")),
        "search.constraint": (s.get("constraint", "flops"), ("flops", "params", "latency")),
        "search.latency_lowering": (s.get("latency_lowering", "filters"),
                                    ("filters", "grouped", "taps")),
        "search.flops_kind": (s.flops_kind, ("true", "reference")),
        "search.reward": (s.reward, ("paper", "gated")),
        "search.level": (s.level, ("filter", "layer")),
        "search.eval_mode": (s.eval_mode, ("auto", "map", "vmap")),
        "ppo.advantage": (cfg.ppo.advantage, ("gae", "reference")),
    }  # fmt: skip
    if "bandit" in cfg:
        choices["bandit.baseline"] = (cfg.bandit.baseline, ("loo", "mean", "rank"))
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key in (
        "pretrain.epochs",
        "finetune.epochs",
        "search.iterations",
        "search.n_envs",
        "search.n_steps",
        "search.top_k",
        "pretrain.batch_size",
        "finetune.batch_size",
    ):
        section, name = key.split(".")
        if cfg[section][name] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[section][name]}")
    if s.get("heldout_size", 0) < -1 or s.get("halving_images", 0) < 0:
        raise ValueError("search.heldout_size must be >= -1 (-1 = half the validation split, 0 = "
                         "off) and search.halving_images >= 0 (0 = off)")  # fmt: skip
    if not 0.0 < s.get("halving_keep", 0.25) <= 1.0:
        raise ValueError(f"search.halving_keep must be in (0, 1], got {s.halving_keep}")
    if not (s.get("init_std", 1.0) > 0 and s.get("init_std_layer", 0.5) > 0):
        raise ValueError("search.init_std and search.init_std_layer must be > 0")
    if "bandit" in cfg:
        b = cfg.bandit
        if not (b.lr > 0 and b.target_kl > 0 and b.target_kl_std > 0 and b.clip > 0):
            raise ValueError("bandit.lr, bandit.target_kl, bandit.target_kl_std and bandit.clip "
                             "must be > 0")  # fmt: skip
        if b.epochs < 1 or b.minibatches < 1 or (s.n_envs * s.n_steps) % b.minibatches:
            raise ValueError(
                f"bandit.epochs >= 1 and bandit.minibatches >= 1 dividing the {s.n_envs * s.n_steps}"
                " samples of an iteration (search.n_envs * search.n_steps) are required"
            )
    _validate_training(cfg)
    every = cfg.get("checkpoint_every_steps", 0)
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ValueError(f"checkpoint_every_steps must be an int >= 0 (0 = every epoch only), got "
                         f"{every!r}")  # fmt: skip
    if "input" in cfg:
        inp = cfg.input
        for key, value, allowed in (("input.pipeline", inp.pipeline, ("auto", "numpy", "grain")),
                                    ("input.folder_mode", inp.folder_mode,
                                     ("auto", "memory", "stream"))):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{key}={value!r} is not one of {', '.join(allowed)}")
        if not isinstance(inp.workers, int) or inp.workers < 0:
            raise ValueError(f"input.workers must be an int >= 0, got {inp.workers!r}")
    if s.get("n_seeds", 1) < 1:
        raise ValueError(f"search.n_seeds must be >= 1, got {s.n_seeds}")
    p = cfg.ppo
    if p.epochs < 1 or p.minibatches < 1 or (s.n_envs * s.n_steps) % p.minibatches:
        raise ValueError(
            f"ppo.epochs >= 1 and ppo.minibatches >= 1 dividing the {s.n_envs * s.n_steps} "
            "transitions of a rollout (search.n_envs * search.n_steps) are required, got "
            f"epochs={p.epochs}, minibatches={p.minibatches}"
        )
    val = cfg.get("val_size", -1)
    if not isinstance(val, int) or isinstance(val, bool) or (val < 1 and val != -1):
        raise ValueError(
            f"val_size must be a number of training images >= 1 held out for validation (-1 = "
            f"the dataset's default), not a fraction: got {val!r}; e.g. --config.val_size=5000"
        )
    align = cfg.report.get("compact_align", 0)
    if not isinstance(align, int) or align < 0:
        raise ValueError(
            f"report.compact_align must be an int >= 0 (0 = auto for the backend, 1 = no padding), "
            f"got {align!r}"
        )
    lowering = cfg.report.get("compact_lowering", "filters")
    if lowering not in ("filters", "grouped", "taps", "auto"):
        raise ValueError(
            f"report.compact_lowering must be filters, grouped, taps or auto, got {lowering!r}"
        )
    return cfg
