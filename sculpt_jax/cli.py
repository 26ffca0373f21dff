"""The command line (layer 6): `python -m sculpt_jax COMMAND [flags]`.

Commands:
  info      model summary: params, exact dense FLOPs, traced layers, graph size (`--json`);
            `info --list` names the zoo; `--model package.module:Class` takes a user Linen module.
  pretrain  train a dense model (checkpointed, resumable).
  prune     search pruning patterns (PPO = AutoSculpt, or a baseline / AutoCompress) on a pretrained model.
  finetune  fine-tune searched candidates with the pruned weights held at exactly zero.
  run       the main job: pretrain -> prune -> fine-tune -> report, in one workdir.

Every command but `info` takes `--config FILE[:variant]` (default: `sculpt_jax.config`'s defaults),
dotted overrides `--config.search.target_flops=0.4`, and shortcuts for the common fields
(`--model`, `--dataset`, `--data-dir`, `--workdir`, `--seed`, `--target-flops`, `--method`,
`--head`, `--tolerance`, `--checkpoint`, `--policy-from`). Each command writes its config to
`<workdir>/config.json`; a later command naming that workdir without `--config` starts from it.
This is the only module that reads flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

SHORTCUTS = {
    "model": "model",
    "dataset": "dataset",
    "data_dir": "data_dir",
    "workdir": "workdir",
    "seed": "seed",
    "target_flops": "search.target_flops",
    "method": "search.method",
    "head": "search.head",
    "checkpoint": "pretrain.checkpoint",
    "policy_from": "search.policy_from",
    "tolerance": "search.tolerance",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sculpt_jax",
        description="sculpt-jax: automatic pattern-based pruning (AutoSculpt, AutoCompress) in JAX.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="model summary (params, exact FLOPs, traced layers)")
    info.add_argument("--model", help="a model name (see --list) or package.module:ClassName")
    info.add_argument("--list", action="store_true", help="list the model zoo and exit")
    info.add_argument("--num-classes", type=int, default=None)
    info.add_argument("--input-shape", default=None, help="H,W,C (default: the model's)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")

    for name, text in (
        ("pretrain", "train the dense model"),
        ("prune", "search pruning patterns on a pretrained model"),
        ("finetune", "fine-tune the searched candidates of a workdir"),
        ("run", "the main job: pretrain -> prune -> fine-tune -> report"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("--config", default="", help="config file FILE.py[:variant]")
        c.add_argument("--model")
        c.add_argument("--dataset", help="digits | cifar10 | cifar100 | imagenet2012 | folder")
        c.add_argument(
            "--data-dir", dest="data_dir", help="local data (CIFAR batches, folder, tar)"
        )
        c.add_argument("--workdir", help="where checkpoints, metrics and reports go")
        c.add_argument("--seed", type=int)
        c.add_argument("--target-flops", dest="target_flops", type=float)
        c.add_argument("--method", help="ppo | random | uniform | cem | anneal | magnitude | "
                       "autocompress")  # fmt: skip
        c.add_argument("--head", help="PPO actor head: mixture (default) | legacy paper | "
                       "per_group | per_filter")  # fmt: skip
        c.add_argument("--tolerance", type=float, help="accepted |reduction - target| (0.005)")
        c.add_argument("--policy-from", dest="policy_from",
                       help="start the search from the policy trained in this workdir")
        c.add_argument("--checkpoint", help="pretrained workdir or checkpoint to start from")
        c.add_argument("--overwrite", action="store_true", help="discard an incompatible workdir")
        c.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _base_config(args, overrides: dict):
    """--config FILE, else the config.json of a workdir an earlier command ran in (so `prune
    --workdir W` after `pretrain --workdir W ...` continues that run), else the defaults."""
    from sculpt_jax import config as config_lib

    workdir = args.workdir or overrides.get("workdir")
    saved = None if args.config or not workdir else config_lib.load_workdir_config(workdir)
    if saved is None:
        return config_lib.load_config(args.config)
    logging.getLogger("sculpt_jax").info("using %s/config.json (the last command's config); "
                                         "flags override it", workdir)  # fmt: skip
    saved.progress = True  # --quiet is per command
    return saved


def parse(argv: list[str]):
    """Parses argv into (args, frozen config). Unknown `--config.x.y=v` pairs become overrides."""
    from sculpt_jax import config as config_lib

    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, str] = {}
    bad = []
    i = 0
    while i < len(rest):
        item = rest[i]
        if item.startswith("--config."):
            key, eq, value = item[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(rest):
                    bad.append(item)
                    break
                value = rest[i + 1]
                i += 1
            overrides[key] = value
        else:
            bad.append(item)
        i += 1
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config fields: --config.KEY=VALUE)")
    if args.command == "info":
        return args, None
    cfg = _base_config(args, overrides)
    for flag, key in SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if key in overrides and overrides[key] != str(value):  # which one was meant is unknowable
            parser.error(f"--{flag.replace('_', '-')} {value} and --config.{key}={overrides[key]} "
                         "disagree; give one of them")  # fmt: skip
        overrides[key] = str(value)
    if args.quiet:
        overrides["progress"] = "false"
    import jax

    if jax.process_index() > 0:  # process 0 draws the progress bars of a multi-process job
        overrides["progress"] = "false"
    try:
        config_lib.apply_overrides(cfg, overrides)
    except (KeyError, ValueError) as e:
        parser.error(str(e.args[0] if e.args else e))
    from sculpt_jax import pipeline

    pipeline.validate_config(cfg)
    return args, cfg.lock()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from sculpt_jax import config as config_lib
    from sculpt_jax import sharding as shd

    config_lib.use_fast_prng()
    try:  # before anything touches a JAX backend (importing the pipeline does)
        if shd.initialize_distributed(_wants_distributed(argv)):
            _log_processes()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from sculpt_jax import checkpoint as ckpt
    from sculpt_jax import pipeline

    try:
        args, cfg = parse(argv)
        if args.command == "info" and (args.list or not args.model):
            return _list_models(args)
        if args.command == "info":
            shape = tuple(int(s) for s in args.input_shape.split(",")) if args.input_shape else None
            summary = pipeline.model_info(args.model, args.num_classes, shape)
            if args.json:
                print(json.dumps(summary, indent=2))
            else:
                for k, v in summary.items():
                    print(f"{k:>28}: {v}")
            return 0
        fn = {
            "pretrain": pipeline.pretrain,
            "prune": pipeline.prune,
            "finetune": pipeline.finetune,
            "run": pipeline.run,
        }[args.command]
        _log_devices()
        pipeline.save_config(cfg)
        fn(cfg, overwrite=args.overwrite)
        return 0
    except (ValueError, OSError, KeyError, pipeline.PipelineError, ckpt.CorruptCheckpointError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2


def _wants_distributed(argv: list[str]) -> bool:
    """``--config.distributed=true`` (or ``--config.distributed true``) on the command line: read
    before parsing, since the processes must join before any JAX backend use."""
    for i, item in enumerate(argv):
        if item.startswith("--config.distributed"):
            value = item.partition("=")[2] if "=" in item else (argv[i + 1] if i + 1 < len(argv)
                                                                else "")  # fmt: skip
            return value.strip().lower() in ("1", "true", "yes")
    return False


def _log_processes() -> None:
    """In a multi-process job: log lines carry ``[process i/P]``; processes other than 0 log
    warnings and errors only (process 0 speaks for the job)."""
    import jax

    i, n = jax.process_index(), jax.process_count()
    fmt = f"%(levelname)s [process {i}/{n}] %(name)s: %(message)s"
    for h in logging.getLogger().handlers:
        h.setFormatter(logging.Formatter(fmt))
    if i:
        logging.getLogger("sculpt_jax").setLevel(logging.WARNING)


def _log_devices() -> None:
    """Logs the devices this process runs on, e.g. ``devices: 8 x TPU v3 (backend tpu, jax ...)``:
    a job that silently fell back to CPU says so (the Colab notebook prints this line)."""
    import jax

    devices = jax.devices()
    logging.getLogger("sculpt_jax").info(
        "devices: %d x %s (backend %s, jax %s)",
        len(devices), devices[0].device_kind, jax.default_backend(), jax.__version__,
    )  # fmt: skip


def _list_models(args) -> int:
    from sculpt_jax import models

    if not args.list:
        print("error: info needs --model NAME (or --list for the names)", file=sys.stderr)
        return 2
    specs = [models.model_spec(n) for n in models.list_models()]
    if args.json:
        print(json.dumps([dataclasses.asdict(s) for s in specs], indent=2))
        return 0
    for s in specs:
        shape = "x".join(str(d) for d in s.input_shape)
        print(f"{s.name:<22} {shape:<10} {s.num_classes:>5}  {s.description}")
    return 0


def run() -> None:
    """Console-script entry point (`sculpt-jax ...`)."""
    sys.exit(main())
