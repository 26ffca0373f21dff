"""Policy transfer: a mixture policy trained on one model, applied to a model it never saw.

For each direction (``--models A B``: A -> B and B -> A) and each of ``--seeds`` seeds: the GNN
policy is trained by the bandit PPO search on the source model (``--budget`` evaluations), then on
the target model:

* zero-shot: the transferred policy's MEAN proposal decoded at the target (1 evaluation), beside
  the untrained policy's mean (the uniform allocation, also 1 evaluation);
* warm start: the search from the transferred policy (`--budget` evaluations) vs the search from
  scratch and random search at the same budget.

Best on-budget reward-set accuracy before fine-tuning, mean +- std over seeds, and the held-out
re-score of the chosen candidate; `--json PATH` writes everything. Both models are pretrained
here on the same dataset (digits by default, cached in --workdir).

    python benchmarks/transfer.py --models resnet20 resnet56 --seeds 3 --budget 96
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import header, machine  # noqa: E402
from search import _mean_std  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs=2, default=["resnet20", "resnet56"])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default="")
    p.add_argument("--pretrain-epochs", type=int, default=12)
    p.add_argument("--budget", type=int, default=96)
    p.add_argument("--n-envs", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--workdir", default="")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def _setup(a, model):
    from sculpt_jax import pipeline
    from sculpt_jax.config import get_default_config

    cfg = get_default_config()
    cfg.model, cfg.dataset, cfg.data_dir = model, a.dataset, a.data_dir
    cfg.progress = False
    cfg.workdir = os.path.join(a.workdir, model)
    cfg.pretrain.epochs = a.pretrain_epochs
    cfg.search.target_flops = a.target
    cfg.search.n_envs, cfg.search.n_steps = a.n_envs, 1
    s = pipeline.setup(cfg)
    pre = pipeline.pretrain(cfg, s=s)
    ss = pipeline.make_search_setup(cfg, s, pre["variables"])
    print(f"# {model}: pretrained val {pre['val_accuracy']:.4f}, {ss.decoder.n_dims} action dims",
          flush=True)  # fmt: skip
    return cfg, ss


def _search(cfg, ss, method, seed, budget, policy=None, tag=""):
    from sculpt_jax import pipeline
    from sculpt_jax.search import runner

    res = runner.run_search(
        ss.env, method, workdir=os.path.join(cfg.workdir, "search", f"{tag}{method}_s{seed}"),
        iterations=budget // cfg.search.n_envs, seed=seed, n_envs=cfg.search.n_envs, n_steps=1,
        top_k=3, policy=policy, ppo_config=pipeline.bandit_config(cfg), order=ss.order,
        library=ss.library, decoder=ss.decoder, proposal=pipeline.proposal_config(cfg),
        progress=False, overwrite=True,
    )  # fmt: skip
    best = pipeline.rescore(ss, res.best)
    acc = max([c["accuracy"] for c in best], default=float("nan"))
    held = best[0]["heldout_accuracy"] if best and "heldout_accuracy" in best[0] else float("nan")
    return acc, held, res.state


def _mean_accuracy(ss, proposal):
    ids, info = jax.jit(ss.decoder.decode)(jnp.asarray(proposal))
    out = jax.jit(ss.env.evaluate)(ss.env.consts, ids[None])
    assert bool(info["on_budget"])
    return float(out["accuracy"][0])


def main(argv=None) -> None:
    a = parse(argv)
    header("policy transfer between models")
    from sculpt_jax import pipeline

    a.workdir = a.workdir or tempfile.mkdtemp(prefix="bench_transfer_")
    setups = {m: _setup(a, m) for m in a.models}
    out = {"command": " ".join(sys.argv), "machine": machine(), "budget": a.budget,
           "directions": {}}  # fmt: skip
    for src, dst in (a.models, a.models[::-1]):
        (cs, ss_src), (cd, ss_dst) = setups[src], setups[dst]
        rows = {k: [] for k in ("zero_shot", "untrained_mean", "warm", "warm_heldout", "scratch",
                                "scratch_heldout", "random", "random_heldout")}  # fmt: skip
        obs_dst = ss_dst.env.observe(ss_dst.env.consts, ss_dst.env.reset())
        untrained = _mean_accuracy(ss_dst, np.zeros(ss_dst.decoder.action_mask.shape, np.float32))
        for seed in range(a.seeds):
            pol_src = pipeline.mixture_policy(cs, ss_src)
            _, _, state = _search(cs, ss_src, "ppo", seed, a.budget, pol_src, tag="train_")
            pol_dst = pipeline.mixture_policy(cd, ss_dst)
            # the GNN transfers; the target model's own correction starts at zero
            params = dict(pol_dst.init(jax.random.PRNGKey(0)), gnn=state.agent.params["gnn"])
            warm = pol_dst._replace(init=lambda key, obs=None, p=params: p)
            rows["zero_shot"].append(_mean_accuracy(ss_dst, pol_dst.dist(params, obs_dst)[0]))
            rows["untrained_mean"].append(untrained)
            for name, method, pol in (("warm", "ppo", warm), ("scratch", "ppo", pol_dst),
                                      ("random", "random", None)):  # fmt: skip
                acc, held, _ = _search(cd, ss_dst, method, seed, a.budget, pol, tag=f"{src}_{name}_")
                rows[name].append(acc)
                rows[f"{name}_heldout"].append(held)
        key = f"{src}->{dst}"
        out["directions"][key] = rows
        for k, v in rows.items():
            print(f"{key:>20} {k:>16}: {_mean_std(v)}  per seed {[round(x, 4) for x in v]}",
                  flush=True)  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"# wrote {a.json}")


if __name__ == "__main__":
    main()
