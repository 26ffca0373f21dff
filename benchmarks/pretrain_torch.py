"""Pretrain a CIFAR ResNet in PyTorch (CPU) and export it as a sculpt-jax pretrain workdir.

Why: on XLA:CPU the conv kernel gradient makes JAX training 4-5x slower than PyTorch's CPU
kernels (ENVIRONMENT.md; measured again here on a 2-core AMD EPYC: ResNet-20, batch 128, JAX 47
img/s vs PyTorch 216 img/s), so the search-quality benchmark's dense model (ResNet-20 pretrained
to >= 85% validation accuracy on CIFAR-10) is trained here on a CPU-only machine. The network is
the same (akamaster's option-A ResNet: symmetric padding, torch BatchNorm defaults, zero-padded
shortcuts), the data are `sculpt_jax.data.load_dataset`'s split (same train / validation images,
same normalisation), training is SGD with crop + flip augmentation and a cosine schedule, and the
best-validation epoch's weights are converted to the Flax variables of `sculpt_jax.models` and
written to ``<workdir>/pretrain/best_variables`` (what ``--checkpoint WORKDIR`` and
``benchmarks/search.py --pretrained WORKDIR`` read). The conversion is checked: the Flax model's
validation accuracy must equal PyTorch's (the script fails otherwise). Benchmarks only: the
package never imports torch. Needs ``pip install torch`` (the CPU build is enough).

    python benchmarks/pretrain_torch.py --data-dir ../shared/data/cifar10-jpeg.tar.gz \
        --workdir runs/r20_c10_torch --epochs 18
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _common import header  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10 (batches, folder or .tar.gz)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--workdir", required=True)
    p.add_argument("--model", default="resnet20", help="resnet20 | resnet32 | resnet44 | resnet56")
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    return p.parse_args(argv)


def torch_resnet(blocks_per_stage: int, num_classes: int, in_ch: int):
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            sc = x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x
            if self.extra:
                sc = F.pad(sc, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            return F.relu(y + sc)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem_conv = nn.Conv2d(in_ch, 16, 3, 1, 1, bias=False)
            self.stem_bn = nn.BatchNorm2d(16)
            blocks, cin = [], 16
            for s, w in enumerate((16, 32, 64)):
                for b in range(blocks_per_stage):
                    blocks.append(Block(cin, w, 2 if b == 0 and s > 0 else 1))
                    cin = w
            self.blocks = nn.ModuleList(blocks)
            self.head = nn.Linear(64, num_classes)

        def forward(self, x):
            x = F.relu(self.stem_bn(self.stem_conv(x)))
            for b in self.blocks:
                x = b(x)
            return self.head(x.mean((2, 3)))

    return Net()


def to_flax(net, blocks_per_stage: int) -> dict:
    """PyTorch state -> sculpt_jax.models ResNetCIFAR variables (OIHW -> HWIO, BN, dense)."""
    sd = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    params, stats = {}, {}

    def conv(src, dst):
        params[dst] = {"kernel": np.transpose(sd[src + ".weight"], (2, 3, 1, 0))}

    def bn(src, dst):
        params[dst] = {"scale": sd[src + ".weight"], "bias": sd[src + ".bias"]}
        stats[dst] = {"mean": sd[src + ".running_mean"], "var": sd[src + ".running_var"]}

    conv("stem_conv", "stem_conv")
    bn("stem_bn", "stem_bn")
    for i in range(3 * blocks_per_stage):
        s, b = divmod(i, blocks_per_stage)
        name = f"stage{s + 1}_block{b}"
        params[name], stats[name] = {}, {}
        for part in ("conv1", "conv2"):
            params[name][part] = {"kernel": np.transpose(sd[f"blocks.{i}.{part}.weight"],
                                                         (2, 3, 1, 0))}  # fmt: skip
        for part in ("bn1", "bn2"):
            params[name][part] = {"scale": sd[f"blocks.{i}.{part}.weight"],
                                  "bias": sd[f"blocks.{i}.{part}.bias"]}  # fmt: skip
            stats[name][part] = {"mean": sd[f"blocks.{i}.{part}.running_mean"],
                                 "var": sd[f"blocks.{i}.{part}.running_var"]}  # fmt: skip
    params["head"] = {"kernel": sd["head.weight"].T, "bias": sd["head.bias"]}
    return {"params": params, "batch_stats": stats}


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop 32 from 4-pixel zero padding + horizontal flip (NHWC uint8)."""
    n, h, w, _ = x.shape
    pad = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    dy, dx = rng.integers(0, 9, n), rng.integers(0, 9, n)
    out = np.stack([pad[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


def main(argv=None) -> None:
    a = parse(argv)
    header("pretrain a CIFAR ResNet with PyTorch and export it to sculpt-jax")
    import torch
    import torch.nn.functional as F

    from sculpt_jax import checkpoint as ckpt
    from sculpt_jax import data as data_lib
    from sculpt_jax import training as ft
    from sculpt_jax.config import use_fast_prng
    from sculpt_jax.models import get_model
    from sculpt_jax.pipeline import make_apply_fn

    use_fast_prng()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    n = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}[a.model]
    splits = data_lib.load_dataset(a.dataset, a.data_dir, val_size=a.val_size, seed=a.seed)
    (tx, ty), (vx, vy) = splits.train.arrays, splits.val.arrays
    mean = np.asarray(splits.mean, np.float32)
    std = np.asarray(splits.std, np.float32)

    def tensor(x):
        return torch.from_numpy(((x / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2))

    net = torch_resnet(n, splits.num_classes, tx.shape[-1])
    opt = torch.optim.SGD(net.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.weight_decay,
                          nesterov=False)  # fmt: skip
    steps = a.epochs * (len(tx) // a.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng = np.random.default_rng(a.seed)
    wd = os.path.abspath(os.path.join(a.workdir, "pretrain"))
    os.makedirs(wd, exist_ok=True)

    def val_accuracy(model):
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(vx), 500):
                correct += int((model(tensor(vx[i : i + 500])).argmax(1).numpy() == vy[i : i + 500]).sum())
        model.train()
        return correct / len(vx)

    best, best_state, history, start = -1.0, None, [], 0
    state_path = os.path.join(wd, "torch_state.pt")  # written every epoch: a killed run resumes
    if os.path.exists(state_path):
        st = torch.load(state_path, weights_only=False)
        if st["args"] != vars(a):
            raise SystemExit(f"{state_path} was written with other arguments ({st['args']}); "
                             "use another --workdir or delete it")  # fmt: skip
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        best, best_state, history, start = st["best"], st["best_state"], st["history"], st["epoch"]
        print(f"# resuming after epoch {start} (best val {best:.4f})", flush=True)
    for epoch in range(start, a.epochs):
        t0 = time.perf_counter()
        perm = rng.permutation(len(tx))
        for i in range(len(tx) // a.batch_size):
            idx = perm[i * a.batch_size : (i + 1) * a.batch_size]
            x = tensor(augment(tx[idx], rng))
            loss = F.cross_entropy(net(x), torch.from_numpy(ty[idx].astype(np.int64)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = val_accuracy(net)
        history.append({"epoch": epoch + 1, "val_accuracy": acc, "seconds": time.perf_counter() - t0})
        print(json.dumps(history[-1]), flush=True)
        if acc > best:
            best = acc
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        torch.save({"args": vars(a), "net": net.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "best": best, "best_state": best_state,
                    "history": history, "epoch": epoch + 1}, state_path + ".tmp")  # fmt: skip
        os.replace(state_path + ".tmp", state_path)
    net.load_state_dict(best_state)
    variables = to_flax(net, n)
    apply_fn = make_apply_fn(get_model(a.model, num_classes=splits.num_classes), splits.mean,
                             splits.std)  # fmt: skip
    flax_acc = ft.evaluate(ft.make_eval_step(apply_fn), variables, vx, vy, 250)["accuracy"]
    print(f"# best validation accuracy: torch {best:.4f}, converted flax model {flax_acc:.4f}")
    if abs(flax_acc - best) > 1e-3:
        raise SystemExit("conversion check failed: the Flax model disagrees with PyTorch")
    ckpt.save_pytree(os.path.join(wd, "best_variables"), variables)
    ckpt.save_json(os.path.join(wd, "summary.json"), {
        "trainer": "pytorch (benchmarks/pretrain_torch.py)", "model": a.model,
        "dataset": a.dataset, "val_size": a.val_size, "seed": a.seed, "epochs": a.epochs,
        "val_accuracy": best, "flax_val_accuracy": flax_acc, "history": history,
    })  # fmt: skip
    print(f"# wrote {wd}/best_variables")


if __name__ == "__main__":
    main()
