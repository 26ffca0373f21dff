"""Search quality (PPO heads vs random at the same evaluation budget) and search throughput.

Part "quality": pretrains a ResNet-20 with `sculpt_jax.pipeline.pretrain` (CIFAR-10 from
``../shared/data/cifar10-jpeg.tar.gz`` via dataset "folder" when present, else the embedded digits),
builds the environment with `pipeline.make_search_setup`, then runs PPO with each policy head
(paper, per_group, per_filter) and random search with the SAME number of candidate evaluations,
and prints the best in-band reward-set (validation) accuracy over --seeds as mean +- std.

Part "throughput": ResNet-56 (random weights), a synthetic 32x32x3 reward set of --reward-size
images (5,000 is the reference's). For each N in --n-envs: candidate evaluations/s and seconds per
PPO iteration (T = --n-steps rollout steps x N envs + the PPO update, one compiled call), side by
side with a plain sequential Python loop doing the reference's per-step work (random proposal ->
masks -> exact FLOPs -> one jitted forward per reward batch -> observation graph rebuilt), measured
in the same run, and ratios. Then `EnvConfig(eval_mode=...)` "map" vs "vmap" for N candidates.

    python benchmarks/search.py                                   # both parts, CPU-sized
    python benchmarks/search.py --part quality --seeds 3 --budget 256 --pretrain-epochs 15
    python benchmarks/search.py --part throughput --n-envs 1 8 32 --n-steps 8 --reward-size 5000
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import header, time_fn  # noqa: E402

CIFAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                     "cifar10-jpeg.tar.gz")  # fmt: skip
HEADS = ("paper", "per_group", "per_filter")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "quality", "throughput"], default="all")
    q = p.add_argument_group("quality")
    q.add_argument("--model", default="resnet20")
    q.add_argument("--dataset", default="auto", help="auto (CIFAR-10 folder if present, else "
                   "digits) | cifar10-folder | digits")  # fmt: skip
    q.add_argument("--train-subset", type=int, default=5000, help="training images (-1: all)")
    q.add_argument("--val-size", type=int, default=-1, help="-1: dataset default")
    q.add_argument("--pretrain-epochs", type=int, default=3)
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--target", type=float, default=0.5, help="true FLOPs reduction target")
    q.add_argument("--band", type=float, default=0.05)
    q.add_argument("--reward", default="gated", choices=["paper", "gated"])
    q.add_argument("--reward-set-size", type=int, default=500, help="quality reward set (-1: val)")
    q.add_argument("--calib-batches", type=int, default=4, help="BN recalibration batches (0: off)")
    q.add_argument("--budget", type=int, default=64, help="candidate evaluations per method+seed")
    q.add_argument("--q-envs", type=int, default=4, help="N for the quality runs")
    q.add_argument("--q-steps", type=int, default=4, help="T for the quality runs")
    q.add_argument("--seeds", type=int, default=3)
    q.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    q.add_argument("--workdir", default="", help="default: a fresh temp dir")
    t = p.add_argument_group("throughput")
    t.add_argument("--t-model", default="resnet56")
    t.add_argument("--reward-size", type=int, default=256, help="synthetic reward-set images")
    t.add_argument("--eval-batch", type=int, default=256, help="reward-set batch per forward")
    t.add_argument("--n-envs", nargs="+", type=int, default=[1, 4, 8])
    t.add_argument("--n-steps", type=int, default=4, help="T per PPO iteration")
    t.add_argument("--t-head", default="per_group", choices=HEADS)
    t.add_argument("--repeats", type=int, default=3, help="timed iterations / loop steps")
    t.add_argument("--eval-modes", nargs="+", default=["map", "vmap"], choices=["map", "vmap"])
    return p.parse_args(argv)


def _ppo_config(cfg) -> dict:
    """The PPO settings dict of `pipeline.prune` from a config's ppo section."""
    c = cfg.ppo
    return dict(gamma=c.gamma, gae_lambda=c.gae_lambda, clip_eps=c.clip, vf_coef=c.value_coef,
                ent_coef=c.entropy_coef, lr=c.lr, max_grad_norm=c.max_grad_norm,
                n_epochs=c.epochs, n_minibatches=c.minibatches, advantage=c.advantage)  # fmt: skip


def _mean_std(xs) -> str:
    xs = np.asarray(xs, np.float64)
    ok = xs[np.isfinite(xs)]
    if ok.size == 0:
        return "   n/a (no in-band candidate)"
    miss = "" if ok.size == xs.size else f"  ({xs.size - ok.size} seed(s) without in-band)"
    return f"{ok.mean():.4f} +- {ok.std():.4f}{miss}"


# ----------------------------------------------------------------------------------------------
# quality


def quality(a) -> None:
    from sculpt_jax import graph as graph_lib
    from sculpt_jax import pipeline
    from sculpt_jax.config import get_default_config
    from sculpt_jax.search import runner

    ds = a.dataset
    if ds == "auto":
        ds = "cifar10-folder" if os.path.exists(CIFAR) else "digits"
    cfg = get_default_config()
    cfg.model = a.model
    cfg.dataset, cfg.data_dir = ("folder", CIFAR) if ds == "cifar10-folder" else ("digits", "")
    cfg.val_size = a.val_size
    cfg.progress = False
    cfg.workdir = a.workdir or tempfile.mkdtemp(prefix="bench_search_")
    cfg.pretrain.epochs = a.pretrain_epochs
    cfg.pretrain.batch_size = a.batch_size
    sc = cfg.search
    sc.target_flops, sc.band, sc.reward = a.target, a.band, a.reward
    sc.reward_set_size = a.reward_set_size
    sc.bn_recalib_batches = a.calib_batches
    sc.bn_recalib_batch_size = a.batch_size
    s = pipeline.setup(cfg)
    if 0 < a.train_subset < s.splits.train.n:
        idx = np.sort(np.random.default_rng(0).permutation(s.splits.train.n)[: a.train_subset])
        s = dataclasses.replace(
            s, splits=dataclasses.replace(s.splits, train=s.splits.train.take(idx))
        )
    if sc.reward_set_size > s.splits.val.n:
        print(f"# reward set: the validation split has only {s.splits.val.n} images; using all")
        sc.reward_set_size = -1
    print(f"# quality data: {ds} train={s.splits.train.n} val={s.splits.val.n}; model={a.model}; "
          f"workdir={cfg.workdir}", flush=True)  # fmt: skip
    t = time.perf_counter()
    pre = pipeline.pretrain(cfg, s=s)
    variables = pre["variables"]
    print(f"# pretrain: {a.pretrain_epochs} epochs, val {pre['val_accuracy']:.4f}, "
          f"{time.perf_counter() - t:.0f}s", flush=True)  # fmt: skip
    ss = pipeline.make_search_setup(cfg, s, variables)
    order = np.asarray(graph_lib.importance_order(ss.spec, variables))
    iters = max(1, a.budget // (a.q_envs * a.q_steps))
    n_evals = iters * a.q_envs * a.q_steps
    print(f"# search: target {a.target} (true FLOPs) band {a.band} reward {a.reward}; "
          f"{n_evals} evaluations per method+seed (N={a.q_envs} x T={a.q_steps} x {iters} it); "
          f"seeds {a.seeds}", flush=True)  # fmt: skip
    ppo_cfg = _ppo_config(cfg)
    methods = [f"ppo/{h}" for h in a.heads] + ["random"]
    for m in methods:
        policy = None
        if m.startswith("ppo/"):
            policy = runner.policy_for(ss.env, m[4:], variables, cfg.ppo)
        best, secs, in_band = [], [], []
        for seed in range(a.seeds):
            t = time.perf_counter()
            res = runner.run_search(
                ss.env, "ppo" if policy is not None else m,
                workdir=os.path.join(os.path.abspath(cfg.workdir), "search",
                                     m.replace("/", "_"), f"seed{seed}"),
                iterations=iters, seed=seed, n_envs=a.q_envs, n_steps=a.q_steps, top_k=1,
                policy=policy, ppo_config=ppo_cfg, order=order, library=ss.library,
                progress=False,
            )  # fmt: skip
            secs.append(time.perf_counter() - t)
            best.append(res.best[0]["accuracy"] if res.best else float("nan"))
            in_band.append(res.n_in_band / max(res.n_evals, 1))
        print(f"{m:>14}: best in-band val acc {_mean_std(best)}  in-band rate "
              f"{np.mean(in_band):.3f}  {np.mean(secs):.1f}s/seed (first incl. compile)  "
              f"per seed {[round(b, 4) for b in best]}", flush=True)  # fmt: skip


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
    ppo_cfg = _ppo_config(cfg)
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
    if a.part in ("all", "throughput"):
        throughput(a)


if __name__ == "__main__":
    main()
