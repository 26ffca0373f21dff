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
import os

import ml_collections


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
    c.max_train_examples = -1  # > 0: a fixed random subset of the training split (smoke runs)
    c.seed = 0
    c.workdir = "runs/default"
    c.progress = True  # progress bars

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
    c.search.method = "ppo"  # ppo | random | uniform | magnitude | autocompress
    c.search.library = "reference6"  # pattern library (sculpt_jax.patterns)
    c.search.target_flops = 0.5  # target FLOPs reduction in (0, 1)
    c.search.band = 0.05  # |reduction - target| <= band counts as in-band (REFERENCE.md sec. 5)
    c.search.flops_kind = "true"  # true (exact masked FLOPs) | reference (the reference's formula)
    c.search.reward = "paper"  # paper | gated
    c.search.reward_set_size = -1  # validation examples used for the reward (-1: all of them)
    c.search.bn_recalib_batches = 4  # adaptive-BN batches of training data per candidate (0: off)
    c.search.bn_recalib_batch_size = 128
    c.search.eval_mode = "auto"  # auto | map | vmap: how N candidates are evaluated per call
    c.search.head = "per_group"  # paper | per_group | per_filter (see experiments/RESULTS.md)
    c.search.level = "filter"  # filter | layer graph
    c.search.n_envs = 4
    c.search.n_steps = 8  # rollout length T per iteration
    c.search.iterations = 10
    c.search.max_episode_steps = 500
    c.search.top_k = 3  # in-band candidates kept for fine-tuning
    c.search.n_seeds = 1

    c.ppo = ml_collections.ConfigDict()
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
    # Output filters of the compacted model stored in multiples of this (`compact.compact` align);
    # 0 = `compact.auto_align()` for the backend (16 on CPU, measured; 1 elsewhere).
    c.report.compact_align = 0
    c.report.plots = True
    return c


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
    if not 0.0 < s.band < 1.0:
        raise ValueError(f"search.band must be in (0, 1), got {s.band}")
    choices = {
        "search.method": (s.method, ("ppo", "random", "uniform", "magnitude", "autocompress")),
        "search.head": (s.head, ("paper", "per_group", "per_filter")),
        "search.flops_kind": (s.flops_kind, ("true", "reference")),
        "search.reward": (s.reward, ("paper", "gated")),
        "search.level": (s.level, ("filter", "layer")),
        "search.eval_mode": (s.eval_mode, ("auto", "map", "vmap")),
        "ppo.advantage": (cfg.ppo.advantage, ("gae", "reference")),
    }
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
    align = cfg.report.get("compact_align", 0)
    if not isinstance(align, int) or align < 0:
        raise ValueError(
            f"report.compact_align must be an int >= 0 (0 = auto for the backend, 1 = no padding), "
            f"got {align!r}"
        )
    return cfg
