"""How well does the search reward rank candidates? With and without BN recalibration.

    python benchmarks/reward_quality.py [--model resnet20] [--dataset digits] [--data-dir PATH]
        [--candidates 10] [--target 0.5] [--band 0.05] [--finetune-epochs 1] [--workdir DIR]

Pretrains the model (or reuses `--workdir`'s pretrain stage), draws random in-band candidates
(per-group Dirichlet pattern probabilities, importance-placed, as the random-search baseline does),
scores each on the validation reward set WITHOUT and WITH adaptive-BN recalibration (EagleEye), then
fine-tunes each for a few epochs (masks held) and prints the Spearman rank correlation between each
score and the validation accuracy after fine-tuning. The better scorer is the default of
`search.bn_recalib_batches` (> 0 means recalibration on).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import header  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from sculpt_jax import config as config_lib  # noqa: E402
from sculpt_jax import graph as graph_lib  # noqa: E402
from sculpt_jax import pipeline  # noqa: E402
from sculpt_jax import training as ft  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default="")
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--band", type=float, default=0.05)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--max-train", type=int, default=-1)
    p.add_argument("--workdir", default="")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    header("reward signal quality (Spearman rank correlation)")

    cfg = config_lib.get_default_config()
    cfg.model, cfg.dataset, cfg.data_dir, cfg.seed = (
        args.model,
        args.dataset,
        args.data_dir,
        args.seed,
    )
    cfg.max_train_examples = args.max_train
    cfg.workdir = args.workdir or tempfile.mkdtemp(prefix="reward_quality_")
    cfg.progress = False
    cfg.search.target_flops, cfg.search.band = args.target, args.band
    s = pipeline.setup(cfg)
    variables = pipeline.pretrain(cfg, s=s)["variables"]
    ss = pipeline.make_search_setup(cfg, s, variables)  # with recalibration (config default)
    cfg.search.bn_recalib_batches = 0
    plain = pipeline.make_search_setup(cfg, s, variables).env
    spec = ss.spec
    order = np.asarray(graph_lib.importance_order(spec, variables))
    rng = np.random.default_rng(args.seed)
    group = np.maximum(spec.node_group, 0)
    ev_plain, ev_recal = jax.jit(plain.evaluate), jax.jit(ss.env.evaluate)
    cands, tries = [], 0
    while len(cands) < args.candidates and tries < 200 * args.candidates:
        batch = []
        for _ in range(8):
            probs = rng.dirichlet(np.ones(spec.n_patterns), size=spec.n_groups)
            logits = np.where(spec.valid, np.log(probs[group] + 1e-12), -1e9)
            g = rng.gumbel(size=logits.shape)
            ids = np.where(spec.action_mask, np.argmax(logits + g, -1), -1).astype(np.int32)
            batch.append(np.asarray(graph_lib.place_by_importance(spec, order, ids)))
        tries += 8
        batch = np.stack(batch)
        info = ev_plain(plain.consts, batch, jnp.zeros((8,), bool))
        ok = np.abs(np.asarray(info["reduction"]) - args.target) <= args.band
        cands.extend(batch[ok].tolist())
    cands = np.asarray(cands[: args.candidates], np.int32)
    print(f"# {len(cands)} in-band candidates from {tries} random proposals")
    a_plain = np.asarray(ev_plain(plain.consts, cands)["accuracy"])
    a_recal = np.asarray(ev_recal(ss.env.consts, cands)["accuracy"])
    after = []
    for k, ids in enumerate(cands):
        masks = ss.env.masks_of(jnp.asarray(ids))
        res = ft.fit(
            s.apply_fn, variables, {"train": s.splits.train.arrays, "val": s.splits.val.arrays},
            epochs=args.finetune_epochs, batch_size=cfg.finetune.batch_size,
            workdir=os.path.join(cfg.workdir, "rq", f"c{k}"), seed=args.seed, masks=masks,
            optimizer=dict(kind="sgd", lr=cfg.finetune.lr, momentum=0.9,
                           weight_decay=cfg.finetune.weight_decay, schedule="multistep"),
            progress=False, overwrite=True,
        )  # fmt: skip
        after.append(res.best_val_accuracy)
        print(f"cand {k}: reward-set acc plain {a_plain[k]:.3f}  recalibrated {a_recal[k]:.3f}  "
              f"val acc after {args.finetune_epochs}-epoch fine-tune {after[-1]:.3f}", flush=True)  # fmt: skip
    rho_plain = spearmanr(a_plain, after).statistic
    rho_recal = spearmanr(a_recal, after).statistic
    print(f"spearman(plain score, fine-tuned acc) = {rho_plain:+.3f}")
    print(f"spearman(BN-recalibrated score, fine-tuned acc) = {rho_recal:+.3f}")
    print(f"mean score: plain {a_plain.mean():.3f}, recalibrated {a_recal.mean():.3f}; "
          f"mean fine-tuned {np.mean(after):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
