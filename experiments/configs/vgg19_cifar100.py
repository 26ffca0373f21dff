"""VGG-19-BN on CIFAR-100: AutoSculpt (GNN + PPO over the reference's 6 filter patterns).

Command (from the repository root):
  python -m sculpt_jax run --config experiments/configs/vgg19_cifar100.py           # 50% FLOPs
  python -m sculpt_jax run --config experiments/configs/vgg19_cifar100.py:smoke     # CPU check
  Data: a prepared tfds `cifar100`, or add `--data-dir DIR` (CIFAR-100 python batches or an
  image-folder tree).

Variants (comma-separated): t30 | t50 (default) | t70 = target TRUE (exact) FLOPs reduction, band
+-0.05; smoke = the same VGG-19 (20M parameters) on the embedded 8x8 digits with tiny budgets (its
five max-pools still fit 8x8 inputs).

Budget (`_common.cifar_budget`): pretrain 200 epochs; search 12,800 candidate evaluations on a
5,000-image validation reward set; fine-tune the top 3 in-band candidates 200 epochs each. The
graph has one node per filter (5,504 conv filters).

Runtime: full run not yet measured on an accelerator. Smoke: measured 257 s end to end (seed 0,
November 2026) on a shared 2-core CPU while other jobs ran (load average 7-9; an idle machine is
faster).

Expected numbers: not yet measured. No peer number for VGG-19 on CIFAR-100 is in our reference
list; the AutoSculpt paper's own numbers were withdrawn by its authors (arXiv, June 2025) and are
not a target.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))  # configs are loaded by path: find _common
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402

VARIANTS = ("t30", "t50", "t70", "smoke")


def get_config(variant=None):
    tokens = _common.parse_variant(variant, VARIANTS)
    c = _common.base("vgg19_cifar100", tokens)
    c.model = "vgg19"
    c.dataset = "cifar100"
    _common.cifar_budget(c)
    c.pretrain.lr = 0.05  # VGG-BN from scratch is less stable at 0.1
    c.search.target_flops = _common.target_of(tokens)
    if "smoke" in tokens:
        _common.smoke(c)
    return c
