"""Search quality (every method through the same budget-exact decoder, same evaluations, several
seeds) and search throughput.

Part "quality": a pretrained ResNet (``--pretrained WORKDIR``: a pretrain workdir, e.g. written by
`benchmarks/pretrain_torch.py`; else pretrained here with `pipeline.pretrain`, cached in
``--workdir`` so reruns skip it), the environment of `pipeline.make_search_setup` (BN
recalibration, a stratified validation reward set and a held-out validation part), then every
method of `--methods` for `--seeds` seeds at each budget of `--budgets` candidate evaluations:
best on-budget reward-set accuracy BEFORE fine-tuning (mean +- std over seeds), the held-out
re-score of the kept top-K (the chosen candidate is the best on the held-out part), the in-band
(on-budget) rate, and optionally a short masked fine-tune of each method's chosen candidate. Methods
without budget-dependent schedules (ppo, random, uniform, cem) read the smaller budgets off one run
at the largest. Prints a table per budget with the default method's margin over random and uniform
in standard errors, and writes ``--json PATH``.

Part "halving": successive halving's first stage against full scoring on --halving-candidates
random proposals (the policy's initial distribution): Spearman rank correlation of the first-stage
and the full reward-set accuracies, how many of the true top --halving-keep fraction the first
stage promotes, and evaluations/s of `env.evaluate_staged` vs `env.evaluate` (N per call, median
of 3 calls after a compiling one).

Part "throughput": ResNet-56 (random weights), a synthetic 32x32x3 reward set of --reward-size
images (5,000 is the reference's). For each N in --n-envs: candidate evaluations/s and seconds per
legacy PPO iteration (T = --n-steps rollout steps x N envs + the PPO update, one compiled call),
side by side with a plain sequential Python loop doing the reference's per-step work (random
proposal -> masks -> exact FLOPs -> one jitted forward per reward batch -> observation graph
rebuilt), measured in the same run, and ratios. Then `EnvConfig(eval_mode=...)` "map" vs "vmap".

    python benchmarks/search.py --part quality --dataset digits --seeds 3 --budgets 96
    python benchmarks/search.py --part quality --pretrained runs/r20_c10 --seeds 5 --budgets 128 512
    python benchmarks/search.py --part halving --pretrained runs/r20_c10 --halving-images 512
    python benchmarks/search.py --part throughput --t-envs 1 8 32 --n-steps 8 --reward-size 5000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import header, machine, time_fn  # noqa: E402

CIFAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                     "cifar10-jpeg.tar.gz")  # fmt: skip
HEADS = ("paper", "per_group", "per_filter")
METHODS = ("ppo", "random", "uniform", "cem", "anneal", "magnitude")
ONE_RUN = ("ppo", "random", "uniform", "cem")  # no schedule depends on the budget


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "quality", "halving", "throughput"], default="all")
    q = p.add_argument_group("quality")
    q.add_argument("--model", default="resnet20")
    q.add_argument("--dataset", default="auto", help="auto (CIFAR-10 folder if present, else "
                   "digits) | cifar10-folder | digits")  # fmt: skip
    q.add_argument("--pretrained", default="", help="a pretrain workdir to start from")
    q.add_argument("--pretrain-epochs", type=int, default=12)
    q.add_argument("--val-size", type=int, default=-1, help="-1: 400 for digits, 5000 for CIFAR")
    q.add_argument("--target", type=float, default=0.5, help="true FLOPs reduction target")
    q.add_argument("--tolerance", type=float, default=0.005)
    q.add_argument("--reward-set-size", type=int, default=-1, help="-1: val minus held-out")
    q.add_argument("--heldout-size", type=int, default=-1, help="-1: half of the validation split")
    q.add_argument("--calib-batches", type=int, default=2, help="BN recalibration batches")
    q.add_argument("--calib-batch-size", type=int, default=128)
    q.add_argument("--halving-images", type=int, default=0, help="successive halving (0: off)")
    q.add_argument("--halving-keep", type=float, default=0.25)
    q.add_argument("--budgets", nargs="+", type=int, default=[96])
    q.add_argument("--n-envs", dest="q_envs", type=int, default=16, help="N per call")
    q.add_argument("--seeds", type=int, default=3)
    q.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. +seeds-1 "
                   "(confirm a setting tuned on some seeds on fresh ones)")  # fmt: skip
    q.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    q.add_argument("--sensitivity", action="store_true", help="add the sensitivity feature")
    q.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE")
    q.add_argument("--finetune-epochs", type=int, default=0, help="short fine-tune (0: off)")
    q.add_argument("--finetune-images", type=int, default=-1, help="training images (-1: all)")
    q.add_argument("--finetune-budgets", nargs="*", type=int, default=None,
                   help="fine-tune only at these budgets (default: every budget)")  # fmt: skip
    q.add_argument("--workdir", default="", help="default: a fresh temp dir")
    q.add_argument("--json", default="", help="write the quality results here")
    q.add_argument("--halving-candidates", type=int, default=64, help="part halving: proposals")
    t = p.add_argument_group("throughput")
    t.add_argument("--t-model", default="resnet56")
    t.add_argument("--reward-size", type=int, default=256, help="synthetic reward-set images")
    t.add_argument("--eval-batch", type=int, default=256, help="reward-set batch per forward")
    t.add_argument("--t-envs", dest="n_envs", nargs="+", type=int, default=[1, 4, 8])
    t.add_argument("--n-steps", type=int, default=4, help="T per PPO iteration")
    t.add_argument("--t-head", default="per_group", choices=HEADS)
    t.add_argument("--repeats", type=int, default=3, help="timed iterations / loop steps")
    t.add_argument("--eval-modes", nargs="+", default=["map", "vmap"], choices=["map", "vmap"])
    return p.parse_args(argv)


def _mean_std(xs) -> str:
    xs = np.asarray(xs, np.float64)
    ok = xs[np.isfinite(xs)]
    if ok.size == 0:
        return "   n/a"
    miss = "" if ok.size == xs.size else f" ({xs.size - ok.size} seed(s) without)"
    return f"{ok.mean():.4f} +- {ok.std(ddof=1) if ok.size > 1 else 0.0:.4f}{miss}"


def margin_in_se(a, b) -> float:
    """(mean a - mean b) / sqrt(se_a^2 + se_b^2), sample stds (ddof 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    return float((a.mean() - b.mean()) / se) if se > 0 else float("inf") * np.sign(a.mean() - b.mean())


# ----------------------------------------------------------------------------------------------
# quality


def quality_config(a):
    from sculpt_jax.config import apply_overrides, get_default_config

    ds = a.dataset
    if ds == "auto":
        ds = "cifar10-folder" if os.path.exists(CIFAR) else "digits"
    cfg = get_default_config()
    cfg.model = a.model
    # "cifar10" reads the JPEG tarball with the canonical CIFAR-10 normalisation, the same split
    # and constants as benchmarks/pretrain_torch.py (the "folder" loader computes its own)
    cfg.dataset, cfg.data_dir = ("cifar10", CIFAR) if ds == "cifar10-folder" else ("digits", "")
    cfg.val_size = a.val_size if a.val_size > 0 else (400 if ds == "digits" else 5000)
    cfg.progress = False
    cfg.workdir = a.workdir or tempfile.mkdtemp(prefix="bench_search_")
    cfg.pretrain.epochs = a.pretrain_epochs
    cfg.pretrain.checkpoint = a.pretrained
    sc = cfg.search
    sc.target_flops, sc.tolerance = a.target, a.tolerance
    sc.heldout_size = a.heldout_size if a.heldout_size >= 0 else cfg.val_size // 2
    sc.reward_set_size = a.reward_set_size
    sc.bn_recalib_batches, sc.bn_recalib_batch_size = a.calib_batches, a.calib_batch_size
    sc.halving_images, sc.halving_keep = a.halving_images, a.halving_keep
    sc.n_envs, sc.n_steps, sc.top_k = a.q_envs, 1, 3
    sc.sensitivity = a.sensitivity
    apply_overrides(cfg, dict(kv.split("=", 1) for kv in a.set))
    return cfg, ds


def _finetune(cfg, s, variables, ss, cand, a, seed) -> float:
    """Test accuracy of `cand` after a short masked fine-tune (its masks held)."""
    from sculpt_jax import pipeline
    from sculpt_jax import training as ft

    tr = s.splits.train.arrays
    if 0 < a.finetune_images < len(tr[0]):
        idx = np.random.default_rng(seed).permutation(len(tr[0]))[: a.finetune_images]
        tr = (tr[0][idx], tr[1][idx])
    f = cfg.finetune
    res = ft.fit(s.apply_fn, variables, {"train": tr, "val": s.splits.val.arrays,
                                         "test": s.splits.test.arrays},
                 epochs=a.finetune_epochs, batch_size=f.batch_size, workdir=tempfile.mkdtemp(),
                 seed=seed, masks=pipeline.candidate_masks(ss, cand),
                 optimizer=dict(kind="sgd", lr=f.lr, momentum=f.momentum,
                                weight_decay=f.weight_decay, schedule="cosine"),
                 progress=False)  # fmt: skip
    return float(res.test_accuracy)


def quality(a) -> dict:
    from sculpt_jax import pipeline
    from sculpt_jax.search import runner

    cfg, ds = quality_config(a)
    s = pipeline.setup(cfg)
    t = time.perf_counter()
    pre = pipeline.pretrain(cfg, s=s)
    variables = pre["variables"]
    print(f"# data: {ds} train={s.splits.train.n} val={s.splits.val.n}; model={a.model}; "
          f"pretrained val {pre['val_accuracy']:.4f} ({time.perf_counter() - t:.0f}s); "
          f"workdir={cfg.workdir}", flush=True)  # fmt: skip
    ss = pipeline.make_search_setup(cfg, s, variables)
    sc = cfg.search
    n_call = sc.n_envs * sc.n_steps
    budgets = sorted({max(n_call, b // n_call * n_call) for b in a.budgets})
    print(f"# search: target {a.target} true FLOPs +- {a.tolerance}; reward set "
          f"{len(ss.reward[1])} images, held out {len(ss.heldout[1]) if ss.heldout else 0}; BN "
          f"recalibration {sc.bn_recalib_batches}x{sc.bn_recalib_batch_size}; halving "
          f"{sc.halving_images or 'off'}; N={sc.n_envs}; budgets {budgets}; seeds {a.seeds}; "
          f"sensitivity evals {ss.sensitivity_evals}", flush=True)  # fmt: skip
    out = {"default_method": cfg.search.method, "command": " ".join(sys.argv),
           "machine": machine(), "pretrained_val_accuracy": pre["val_accuracy"],
           "by_budget": {str(b): {"methods": {}} for b in budgets}}  # fmt: skip
    for m in a.methods:
        policy = pipeline.mixture_policy(cfg, ss) if m == "ppo" else None
        runs = [(budgets[-1], budgets)] if m in ONE_RUN else [(b, [b]) for b in budgets]
        rows = {b: {"best_in_band_acc": [], "heldout_acc": [], "in_band": [], "seconds": [],
                    "finetuned_test_acc": [], "curve": []} for b in budgets}  # fmt: skip
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            for top, reads in runs:
                t = time.perf_counter()
                res = runner.run_search(
                    ss.env, m, workdir=os.path.join(os.path.abspath(cfg.workdir), "search", m,
                                                    f"b{top}_s{seed}"),
                    iterations=top // n_call, seed=seed, n_envs=sc.n_envs, n_steps=sc.n_steps,
                    top_k=sc.top_k, policy=policy, ppo_config=pipeline.bandit_config(cfg),
                    order=ss.order, library=ss.library, decoder=ss.decoder,
                    proposal=pipeline.proposal_config(cfg), progress=False,
                    best_at=tuple(b // n_call for b in reads), overwrite=True,
                )  # fmt: skip
                secs = time.perf_counter() - t
                for b in reads:
                    it = b // n_call
                    best = pipeline.rescore(ss, res.best_at.get(it, res.best))
                    r = rows[b]
                    r["best_in_band_acc"].append(max([c["accuracy"] for c in best],
                                                     default=float("nan")))  # fmt: skip
                    r["heldout_acc"].append(best[0].get("heldout_accuracy", best[0]["accuracy"])
                                            if best else float("nan"))  # fmt: skip
                    # evaluations within the tolerance (with halving, not only the promoted ones)
                    r["in_band"].append(float(np.mean([h["on_budget_rate"]
                                                       for h in res.history[:it]])))  # fmt: skip
                    r["seconds"].append(secs * b / top)
                    r["curve"].append([h.get("reward_mean") for h in res.history[:it]])
                    if a.finetune_epochs > 0 and best and (a.finetune_budgets is None
                                                           or b in a.finetune_budgets):
                        r["finetuned_test_acc"].append(
                            _finetune(cfg, s, variables, ss, best[0], a, seed))
        for b in budgets:
            r = rows[b]
            entry = {"best_in_band_acc": r["best_in_band_acc"], "heldout_acc": r["heldout_acc"],
                     "in_band_rate": float(np.mean(r["in_band"])),
                     "evaluations": int(b + ss.sensitivity_evals),
                     "seconds_per_seed": float(np.mean(r["seconds"])),
                     "seconds_by_seed": r["seconds"],
                     # the mean reward of each iteration's proposals (on budget: the accuracy),
                     # averaged over seeds: a method that learns raises it
                     "mean_reward_by_iteration": np.nanmean(np.asarray(r["curve"], np.float64),
                                                            axis=0).tolist()}  # fmt: skip
            if r["finetuned_test_acc"]:
                entry["finetuned_test_acc"] = r["finetuned_test_acc"]
            out["by_budget"][str(b)]["methods"][m] = entry
            print(f"budget {b:4d} {m:>9}: best on-budget val acc {_mean_std(r['best_in_band_acc'])}"
                  f"  held-out {_mean_std(r['heldout_acc'])}  in-band {entry['in_band_rate']:.3f}"
                  f"  {entry['seconds_per_seed']:.0f}s/seed  mean reward it 1 -> last "
                  f"{entry['mean_reward_by_iteration'][0]:.3f} -> "
                  f"{entry['mean_reward_by_iteration'][-1]:.3f}"
                  + (f"  fine-tuned test {_mean_std(r['finetuned_test_acc'])}"
                     if r["finetuned_test_acc"] else ""), flush=True)  # fmt: skip
        _write_json(a.json, out)  # after every method: a run cut short keeps what it measured
    d = out["default_method"]
    for b in budgets:
        ms = out["by_budget"][str(b)]["methods"]
        if d not in ms:
            continue
        for base in ("random", "uniform"):
            if base in ms and a.seeds > 1:
                for key in ("best_in_band_acc", "heldout_acc"):
                    z = margin_in_se(ms[d][key], ms[base][key])
                    ms[d].setdefault("margin_se", {})[f"{key} vs {base}"] = z
                    print(f"budget {b}: {d} - {base} on {key}: {z:+.2f} standard errors")
    out["methods"] = out["by_budget"][str(budgets[-1])]["methods"]
    _write_json(a.json, out)
    if a.json:
        print(f"# wrote {a.json}")
    return out


def _write_json(path: str, out: dict) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(path + ".tmp", path)


def halving(a) -> dict:
    from scipy.stats import spearmanr

    from sculpt_jax import env as env_lib
    from sculpt_jax import pipeline
    from sculpt_jax.search import propose

    cfg, ds = quality_config(a)
    if cfg.search.halving_images <= 0:
        raise SystemExit("--part halving needs --halving-images > 0")
    s = pipeline.setup(cfg)
    variables = pipeline.pretrain(cfg, s=s)["variables"]
    ss = pipeline.make_search_setup(cfg, s, variables)
    full = ss.env
    n_first = -(-cfg.search.halving_images // full.config.eval_batch_size)
    n_first *= min(full.config.eval_batch_size, len(ss.reward[1]))
    first = env_lib.make_env(s.apply_fn, variables, ss.spec, ss.reward[0][:n_first],
                             ss.reward[1][:n_first], library=ss.library, calib_images=ss.calib,
                             config=dataclasses.replace(full.config, halving_images=0))  # fmt: skip
    pcfg = propose.ProposalConfig(n_envs=a.q_envs, **pipeline.proposal_config(cfg))
    method = propose.make_method("random", ss.decoder, pcfg)
    keys = jax.random.split(jax.random.PRNGKey(0), -(-a.halving_candidates // a.q_envs))
    props = jnp.concatenate([method.propose({}, None, k, 0)[0] for k in keys])
    ids, _ = jax.jit(jax.vmap(ss.decoder.decode))(props)
    ev_full, ev_first = jax.jit(full.evaluate), jax.jit(first.evaluate)
    acc_full = np.concatenate([np.asarray(ev_full(full.consts, ids[i:i + a.q_envs])["accuracy"])
                               for i in range(0, len(ids), a.q_envs)])  # fmt: skip
    acc_first = np.concatenate([np.asarray(ev_first(first.consts, ids[i:i + a.q_envs])["accuracy"])
                                for i in range(0, len(ids), a.q_envs)])  # fmt: skip
    rho = float(spearmanr(acc_first, acc_full).statistic)
    k = max(1, int(np.ceil(cfg.search.halving_keep * len(ids))))
    recall = len(set(np.argsort(-acc_first)[:k]) & set(np.argsort(-acc_full)[:k])) / k
    staged = jax.jit(full.evaluate_staged)
    batch = ids[: a.q_envs]
    rate = {}
    for name, fn in (("full", lambda: ev_full(full.consts, batch)),
                     ("staged", lambda: staged(full.consts, batch))):  # fmt: skip
        jax.block_until_ready(fn())
        rate[name] = a.q_envs / time_fn(lambda fn=fn: jax.block_until_ready(fn()), warmup=0,
                                        repeats=3)  # fmt: skip
    out = {"command": " ".join(sys.argv), "machine": machine(), "dataset": ds,
           "reward_images": int(len(ss.reward[1])), "first_stage_images": int(n_first),
           "keep": cfg.search.halving_keep, "candidates": int(len(ids)), "spearman": rho,
           "top_recall": recall, "evals_per_s_full": rate["full"],
           "evals_per_s_staged": rate["staged"], "speedup": rate["staged"] / rate["full"]}  # fmt: skip
    print(f"halving: {len(ids)} random proposals, first stage {n_first} of {len(ss.reward[1])} "
          f"reward images, keep {cfg.search.halving_keep}: Spearman {rho:.3f}, top-{k} recall "
          f"{recall:.3f}; evals/s full {rate['full']:.3f}, staged {rate['staged']:.3f} "
          f"(x{out['speedup']:.2f})", flush=True)  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


# ----------------------------------------------------------------------------------------------
# throughput


def _random_ids(spec, rng: np.random.Generator) -> np.ndarray:
    """Host: a uniform random valid pattern id per action node, -1 elsewhere ([n_nodes] int32)."""
    valid = np.asarray(spec.valid)
    u = rng.random(valid.shape) * valid
    ids = np.where(np.asarray(spec.action_mask), np.argmax(u, axis=1), -1)
    return ids.astype(np.int32)


def throughput(a) -> None:
    from sculpt_jax import agent as agent_lib
    from sculpt_jax import env as env_lib
    from sculpt_jax import flops as flops_lib
    from sculpt_jax import graph as graph_lib
    from sculpt_jax import masking
    from sculpt_jax import patterns as pat
    from sculpt_jax import trace as trace_lib
    from sculpt_jax.config import get_default_config
    from sculpt_jax.models import get_model, init_model
    from sculpt_jax.pipeline import ppo_config
    from sculpt_jax.search import runner

    model = get_model(a.t_model, num_classes=10)
    variables = init_model(model, jax.random.PRNGKey(0), (32, 32, 3))
    lg = trace_lib.trace_model(model.apply, variables, jnp.zeros((1, 32, 32, 3), jnp.float32))
    lib = pat.get_library("reference6")
    valid = np.stack([pat.valid_patterns(layer, lib) for layer in lg.layers])
    spec = graph_lib.build_graph_spec(lg, n_patterns=lib.n_patterns, valid=valid, level="filter")
    rng = np.random.default_rng(0)
    r_x = rng.normal(size=(a.reward_size, 32, 32, 3)).astype(np.float32)
    r_y = rng.integers(0, 10, size=(a.reward_size,)).astype(np.int32)
    bs = min(a.eval_batch, a.reward_size)
    print(f"# throughput: {a.t_model} (random init), {spec.n_real_nodes} graph nodes, "
          f"{len(spec.action_nodes)} action nodes; synthetic reward set {a.reward_size} x 32x32x3, "
          f"batch {bs}; T={a.n_steps}; no BN recalibration", flush=True)  # fmt: skip

    def make(mode):
        return env_lib.make_env(model.apply, variables, spec, r_x, r_y, library=lib,
                                config=env_lib.EnvConfig(target=0.5, band=0.05, reward="paper",
                                                         eval_mode=mode, eval_batch_size=bs))  # fmt: skip

    # -- the sequential Python loop (the reference's per-step work, jitted pieces) --
    masks_fn = jax.jit(lambda ids: masking.apply_masks(variables["params"],
                                                       masking.pattern_ids_to_masks(
                                                           lg, variables, graph_lib.layer_pattern_ids(
                                                               spec, ids), lib)))  # fmt: skip
    counter = jax.jit(lambda ids: flops_lib.count(lg, masking.pattern_ids_to_masks(
        lg, variables, graph_lib.layer_pattern_ids(spec, ids), lib))["flops_reduction"])  # fmt: skip
    fwd = jax.jit(lambda p, x: model.apply({"params": p, "batch_stats": variables["batch_stats"]},
                                           x, train=False))  # fmt: skip
    obs_fn = jax.jit(lambda ids: graph_lib.make_observation(spec, variables, ids))
    batches = [(jnp.asarray(r_x[i : i + bs]), r_y[i : i + bs]) for i in range(0, a.reward_size, bs)]

    def loop_step():
        ids = jnp.asarray(_random_ids(spec, rng))
        params = masks_fn(ids)
        red = float(counter(ids))
        correct = 0
        for x, y in batches:
            correct += int(np.sum(np.argmax(np.asarray(fwd(params, x)), -1) == y))
        jax.block_until_ready(obs_fn(ids))
        return red, correct / a.reward_size

    t = time.perf_counter()
    loop_step()
    loop_compile = time.perf_counter() - t
    loop_s = time_fn(loop_step, warmup=1, repeats=a.repeats)
    print(f"sequential loop: {loop_s:.3f} s/eval = {1 / loop_s:.3f} evals/s "
          f"(compile {loop_compile:.1f}s)", flush=True)  # fmt: skip

    # -- the compiled PPO iteration --
    cfg = get_default_config()
    env = make("auto")
    order = np.asarray(graph_lib.importance_order(spec, variables))
    policy = agent_lib.make_policy(spec, a.t_head, order=order, sigma=cfg.ppo.sigma,
                                   hidden=cfg.ppo.hidden, n_layers=cfg.ppo.gnn_layers,
                                   n_heads=cfg.ppo.heads)  # fmt: skip
    ppo_cfg = ppo_config(cfg)
    for n in a.n_envs:
        init_fn, iter_fn = runner.compiled_search(
            env, "ppo", order=order, policy=policy, ppo_config=ppo_cfg, n_envs=n,
            n_steps=a.n_steps, top_k=1, budget=a.n_steps * n, library=lib, n_seeds=1,
        )  # fmt: skip
        holder = {"s": init_fn(jnp.stack([jax.random.PRNGKey(0)]))}

        def one_iter(holder=holder, iter_fn=iter_fn):
            holder["s"], out = iter_fn(env.consts, holder["s"])
            jax.block_until_ready(out)

        t = time.perf_counter()
        one_iter()
        compile_s = time.perf_counter() - t
        it_s = time_fn(one_iter, warmup=0, repeats=a.repeats)
        eps = a.n_steps * n / it_s
        print(f"PPO N={n:3d} T={a.n_steps}: {it_s:8.3f} s/iteration  {eps:8.3f} evals/s  "
              f"x{eps * loop_s:6.2f} vs loop  (eval_mode {env.config.resolved_eval_mode}, "
              f"first call incl. compile {compile_s:.1f}s)", flush=True)  # fmt: skip

    # -- eval_mode map vs vmap for N candidates --
    envs = {m: make(m) for m in a.eval_modes}
    for n in a.n_envs:
        ids = jnp.asarray(np.stack([_random_ids(spec, rng) for _ in range(n)]))
        line, rate = f"evaluate N={n:3d}:", {}
        for m, e in envs.items():
            ev = jax.jit(e.evaluate)
            t = time.perf_counter()
            jax.block_until_ready(ev(e.consts, ids))
            c = time.perf_counter() - t
            sec = time_fn(lambda ev=ev, e=e, ids=ids: jax.block_until_ready(ev(e.consts, ids)), warmup=0,
                          repeats=a.repeats)  # fmt: skip
            rate[m] = n / sec
            line += f"  {m} {rate[m]:8.3f} evals/s (compile {c:.1f}s)"
        if len(rate) == 2:
            line += f"  vmap/map {rate['vmap'] / rate['map']:.2f}"
        print(line, flush=True)


def main(argv=None) -> None:
    a = parse(argv)
    header("search quality and throughput")
    if a.part in ("all", "quality"):
        quality(a)
    if a.part == "halving":
        halving(a)
    if a.part in ("all", "throughput"):
        throughput(a)


if __name__ == "__main__":
    main()
