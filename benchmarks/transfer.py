"""Policy transfer: a mixture policy trained on one model, applied to a model it never saw.

For each direction (``--models A B``: A -> B and B -> A) and each of ``--seeds`` seeds: the GNN
policy is trained by the bandit PPO search on the source model (``--budget`` evaluations), then on
the target model:

* zero-shot: the transferred policy's MEAN proposal decoded at the target (1 evaluation), beside
  the untrained policy's mean (the uniform allocation, also 1 evaluation);
* warm start: the search from the transferred policy (`--budget` evaluations) vs the search from
  scratch and random search at the same budget.

``--joint M1 M2 ..``: one GNN is also trained on those models at once (`propose.make_joint_search`,
``--budget`` evaluations on each) and applied the same way to every model of ``--models`` it did
not see (direction ``M1+M2->B``).

Best on-budget reward-set accuracy before fine-tuning, mean +- std over seeds, and the held-out
re-score of the chosen candidate; `--json PATH` writes everything. Both models are pretrained
here on the same dataset (digits by default, cached in --workdir).

    python benchmarks/transfer.py --models resnet20 resnet56 --seeds 3 --budget 96
    python benchmarks/transfer.py --models resnet20 resnet56 --joint resnet20 resnet32 --seeds 3
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
    p.add_argument("--joint", nargs="*", default=[], help="also train one GNN on these models "
                   "at once and apply it to the --models it did not see")  # fmt: skip
    p.add_argument("--skip-pairs", action="store_true", help="only the --joint directions")
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


def _joint_gnn(a, setups, names, seed):
    """The GNN trained on the models `names` at once (--budget evaluations on each)."""
    from sculpt_jax import pipeline
    from sculpt_jax.search import propose

    cfgs, sss = zip(*(setups[m] for m in names), strict=True)
    policies = [pipeline.mixture_policy(c, ss) for c, ss in zip(cfgs, sss, strict=True)]
    init, iterate = propose.make_joint_search(
        [ss.env for ss in sss], [ss.decoder for ss in sss], policies,
        propose.ProposalConfig(n_envs=a.n_envs, n_steps=1, top_k=3, budget=a.budget,
                               **pipeline.proposal_config(cfgs[0])),
        pipeline.bandit_config(cfgs[0]),
    )  # fmt: skip
    iterate = jax.jit(iterate)
    state, consts = init(jax.random.PRNGKey(seed)), [ss.env.consts for ss in sss]
    for _ in range(max(1, a.budget // a.n_envs)):
        state, out = iterate(consts, state)
    best = [round(float(x), 4) for x in np.asarray(out["metrics"]["best_accuracy"])]
    print(f"# joint {'+'.join(names)} seed {seed}: best accuracy per model {best}", flush=True)
    return state.agent.params["gnn"]


def _apply(a, setups, dst, gnns, untrained):
    """Zero-shot and warm-started search on `dst` from one trained GNN per seed, beside the
    search from scratch and random search."""
    from sculpt_jax import pipeline

    cd, ss_dst = setups[dst]
    rows = {k: [] for k in ("zero_shot", "untrained_mean", "warm", "warm_heldout", "scratch",
                            "scratch_heldout", "random", "random_heldout")}  # fmt: skip
    obs_dst = ss_dst.env.observe(ss_dst.env.consts, ss_dst.env.reset())
    for seed, gnn in enumerate(gnns):
        pol_dst = pipeline.mixture_policy(cd, ss_dst)
        # the GNN transfers; the target model's own correction starts at zero
        params = dict(pol_dst.init(jax.random.PRNGKey(0)), gnn=gnn)
        warm = pol_dst._replace(init=lambda key, obs=None, p=params: p)
        rows["zero_shot"].append(_mean_accuracy(ss_dst, pol_dst.dist(params, obs_dst)[0]))
        rows["untrained_mean"].append(untrained)
        for name, method, pol in (("warm", "ppo", warm), ("scratch", "ppo", pol_dst),
                                  ("random", "random", None)):  # fmt: skip
            acc, held, _ = _search(cd, ss_dst, method, seed, a.budget, pol, tag=f"{name}_")
            rows[name].append(acc)
            rows[f"{name}_heldout"].append(held)
    return rows


def main(argv=None) -> None:
    a = parse(argv)
    header("policy transfer between models")
    from sculpt_jax import pipeline

    a.workdir = a.workdir or tempfile.mkdtemp(prefix="bench_transfer_")
    setups = {m: _setup(a, m) for m in dict.fromkeys([*a.models, *a.joint])}
    out = {"command": " ".join(sys.argv), "machine": machine(), "budget": a.budget,
           "directions": {}}  # fmt: skip
    untrained = {m: _mean_accuracy(ss, np.zeros(ss.decoder.action_mask.shape, np.float32))
                 for m, (_, ss) in setups.items()}  # fmt: skip
    directions = [] if a.skip_pairs else [([src], dst) for src, dst in (a.models, a.models[::-1])]
    directions += [(list(a.joint), dst) for dst in a.models if a.joint and dst not in a.joint]
    for srcs, dst in directions:
        if len(srcs) == 1:
            cs, ss_src = setups[srcs[0]]
            gnns = []
            for seed in range(a.seeds):
                pol_src = pipeline.mixture_policy(cs, ss_src)
                _, _, state = _search(cs, ss_src, "ppo", seed, a.budget, pol_src, tag="train_")
                gnns.append(state.agent.params["gnn"])
        else:
            gnns = [_joint_gnn(a, setups, srcs, seed) for seed in range(a.seeds)]
        key = f"{'+'.join(srcs)}->{dst}"
        rows = _apply(a, setups, dst, gnns, untrained[dst])
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
