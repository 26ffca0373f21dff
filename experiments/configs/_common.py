"""Shared helpers of the paper-table configs (not a config itself: it has no `get_config`).

Config files are loaded by path (`sculpt_jax.config.load_config("FILE.py[:variant]")`), so each one
imports this module after putting its own folder on `sys.path`. Every helper only assigns keys that
exist in `sculpt_jax.config.get_default_config()`; `base` locks the default first, so a misspelled
key fails at load time instead of silently adding a field nobody reads.

Variants are comma-separated tokens, e.g. ``"t30,smoke"``; `parse_variant` validates them.
"""

from __future__ import annotations

import ml_collections

from sculpt_jax.config import get_default_config

TARGETS = {"t30": 0.3, "t50": 0.5, "t70": 0.7}


def parse_variant(variant: str | None, allowed: tuple[str, ...]) -> list[str]:
    """Tokens of a variant string ("t30,smoke" -> ["t30", "smoke"]), validated against `allowed`.

    Raises:
      ValueError: an unknown token (the message lists the valid ones), or two FLOPs targets.
    """
    tokens = [t.strip() for t in (variant or "").split(",") if t.strip()]
    bad = [t for t in tokens if t not in allowed]
    if bad:
        raise ValueError(
            f"unknown config variant(s) {bad}; valid: {list(allowed)}, combinable with commas, "
            "e.g. FILE.py:t30,smoke"
        )
    if sum(t in TARGETS for t in tokens) > 1:
        raise ValueError(
            f"variant {variant!r} names two FLOPs targets; pick one of {list(TARGETS)}"
        )
    return tokens


def target_of(tokens: list[str], default: str = "t50") -> float:
    """The FLOPs-reduction target of the variant tokens (the `default` token when none is given)."""
    return TARGETS[next((t for t in tokens if t in TARGETS), default)]


def base(name: str, tokens: list[str]) -> ml_collections.ConfigDict:
    """The locked default config with a workdir named after the config file and its variant."""
    c = get_default_config()
    c.lock()
    c.workdir = "runs/" + "_".join([name, *tokens])
    return c


def cifar_budget(c: ml_collections.ConfigDict, *, epochs: int = 200) -> None:
    """Full CIFAR budgets (not the CPU defaults).

    Pretrain: SGD lr 0.1 (the standard He et al. 2016 recipe, not the reference's 0.01), momentum
    0.9, weight decay 5e-4, cosine, batch 128, `epochs` epochs, crop + flip. Validation: 6,000
    training images. Search: 64 iterations x 16 candidates = 1,024 candidate evaluations, each on
    a 5,000-image validation reward set after 4 x 128 images of BatchNorm recalibration; the top 3
    are re-scored on the other 1,000 validation images and fine-tuned. Fine-tune: `epochs` epochs,
    SGD lr 0.01 divided by 10 at 50/75/90%
    of the steps, weight decay 4e-5 (the reference's), batch 128, masks held (exact zeros).
    AutoCompress (``--config.search.method=autocompress``): its annealing gets the same 1,024
    evaluations (moves per temperature from the search budget); ADMM 30 iterations x 5 epochs of
    W-steps (1,720 steps of 128 on the 44,000 training images), the public reimplementation's
    budget (rho 1e-4).
    """
    c.val_size = 6000
    c.pretrain.epochs = epochs
    c.pretrain.batch_size = 128
    c.pretrain.lr = 0.1
    c.pretrain.weight_decay = 5e-4
    c.pretrain.schedule = "cosine"
    c.search.reward_set_size = 5000
    c.search.heldout_size = 1000
    c.search.bn_recalib_batches = 4
    c.search.bn_recalib_batch_size = 128
    c.search.n_envs = 16
    c.search.n_steps = 1
    c.search.iterations = 64
    c.search.top_k = 3
    c.finetune.epochs = epochs
    c.finetune.batch_size = 128
    c.finetune.lr = 0.01
    c.finetune.weight_decay = 4e-5
    c.finetune.schedule = "multistep"
    c.autocompress.admm_iterations = 30
    c.autocompress.admm_steps = 1720


def cifar_cpu_budget(c: ml_collections.ConfigDict) -> None:
    """A real CIFAR budget for a 2-core CPU (the `cpu` variant): about 1.5 hours.

    The full 45,000 / 5,000 / 10,000 train / validation / test split, but few epochs: pretrain 8
    epochs (SGD lr 0.1, cosine, batch 128); search 8 iterations x 16 candidates = 128 candidate
    evaluations on a 2,000-image validation reward set after 2 x 128 images of BatchNorm
    recalibration, the best re-scored on 2,000 held-out validation images; fine-tune the single
    best candidate 3 epochs (lr 0.01,
    multistep); AutoCompress's ADMM 3 iterations x 350 W-steps (one epoch each). Measured on the 2-core Xeon: 6-7 minutes per training epoch while other work
    shared the machine (ENVIRONMENT.md: XLA:CPU's conv kernel gradient), so this is the budget a
    CPU session affords, not the paper's. Start it first and work beside it (it resumes per epoch).
    """
    cifar_budget(c, epochs=8)
    c.val_size = 5000
    c.search.reward_set_size = 2000
    c.search.heldout_size = 2000
    c.search.bn_recalib_batches = 2
    c.search.n_envs = 16
    c.search.n_steps = 1
    c.search.iterations = 8
    c.search.top_k = 3
    c.finetune.epochs = 3
    c.autocompress.admm_iterations = 3
    c.autocompress.admm_steps = 350


def imagenet_budget(c: ml_collections.ConfigDict) -> None:
    """ImageNet budgets: 90-epoch dense pretraining (skip it with ``--checkpoint WORKDIR`` of a
    finished pretrain run), 32 iterations x 16 = 512 candidate evaluations on a 10,000-image
    validation reward set (carved from train, with 2,000 more held out to re-score the top 3; the
    ILSVRC validation set is the test split), and a 30-epoch fine-tune of the single best
    candidate (batch 256, lr 0.01, multistep). AutoCompress's ADMM: 10 iterations x 1 epoch of
    W-steps (5,000 steps of 256): our choice, a third of the CIFAR iteration count at a fifth of its
    epochs, since 30 x 5 ImageNet epochs would exceed the whole pretraining.
    """
    c.dataset = "imagenet2012"
    c.val_size = 12000
    c.pretrain.epochs = 90
    c.pretrain.batch_size = 256
    c.pretrain.lr = 0.1
    c.pretrain.weight_decay = 1e-4
    c.pretrain.schedule = "cosine"
    c.search.reward_set_size = 10000
    c.search.heldout_size = 2000
    c.search.bn_recalib_batches = 4
    c.search.bn_recalib_batch_size = 128
    c.search.n_envs = 16
    c.search.n_steps = 1
    c.search.iterations = 32
    c.search.top_k = 3
    c.finetune.epochs = 30
    c.finetune.batch_size = 256
    c.finetune.lr = 0.01
    c.finetune.weight_decay = 4e-5
    c.finetune.schedule = "multistep"
    c.autocompress.admm_iterations = 10
    c.autocompress.admm_steps = 5000


def smoke(c: ml_collections.ConfigDict, model: str | None = None) -> None:
    """Shrinks a config to a CPU check of every stage: the embedded digits data (real 8x8
    handwritten digits, offline), 1 pretrain epoch, 2 search iterations x 16 candidates (32) on a
    64-image reward set (64 more held out), a small GNN, 1 fine-tune epoch of the best candidate, ADMM 3 x 10 W-steps.
    The decoder's tolerance is widened to +-0.05 (the tiny ImageNet variants have so few filters
    that one filter moves the count by more than the default 0.005), and the legacy heads' band to
    +-0.4. A smoke run checks the stages, not the search. `model` replaces the row's model when the
    real one cannot run on CPU (ImageNet models: the family's tiny variant)."""
    if model:
        c.model = model
    c.dataset = "digits"
    c.data_dir = ""
    c.num_classes = -1
    c.val_size = -1
    c.pretrain.checkpoint = ""
    c.pretrain.epochs = 1
    c.pretrain.batch_size = 64
    c.pretrain.lr = 0.05
    c.search.reward_set_size = 64
    c.search.heldout_size = 64
    c.search.tolerance = 0.05
    c.search.bn_recalib_batches = 1
    c.search.bn_recalib_batch_size = 64
    c.search.n_envs = 4
    c.search.n_steps = 4
    c.search.iterations = 2
    c.search.max_episode_steps = 50
    c.search.top_k = 1
    c.search.band = 0.4
    c.ppo.hidden = 16
    c.ppo.gnn_layers = 1
    c.ppo.heads = 2
    c.finetune.epochs = 1
    c.finetune.batch_size = 64
    c.autocompress.admm_iterations = 3
    c.autocompress.admm_steps = 10
    c.report.latency = False
