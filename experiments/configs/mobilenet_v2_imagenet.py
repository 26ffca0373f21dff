"""MobileNet-V2 on ImageNet (ILSVRC-2012): AutoSculpt (GNN + PPO over the reference's 6 filter
patterns: the depthwise 3x3 convs take spatial patterns, the 1x1 convs keep-or-remove per filter).

Command (from the repository root):
  python -m sculpt_jax run --config experiments/configs/mobilenet_v2_imagenet.py \
      [--checkpoint PRETRAIN_WORKDIR]                                                   # 30% FLOPs
  python -m sculpt_jax run --config experiments/configs/mobilenet_v2_imagenet.py:smoke  # CPU check
  Data: a prepared tfds `imagenet2012` or `--data-dir` pointing at an image-folder tree.

Variants (comma-separated): t30 (default) | t50 | t70 = target TRUE FLOPs reduction, band +-0.05
(MobileNet-V2 spends most FLOPs in 1x1 convs, so 30% is the default target); smoke = NOT this
model: the smoke variant runs the family's test-size `mobilenet_v2_tiny` on the embedded 8x8 digits,
only to check the stages.

Budget (`_common.imagenet_budget`, pretrain lr 0.05 and weight decay 4e-5 as usual for
MobileNets): dense pretraining 90 epochs (skip it with `--checkpoint`); search 5,120 candidate
evaluations on a 10,000-image validation reward set carved from train; fine-tune the best in-band
candidate 30 epochs.

Runtime: full run not yet measured; dense ImageNet pretraining alone takes days on one accelerator.
Smoke (mobilenet_v2_tiny): measured 119 s end to end (seed 0, November 2026) on a shared 2-core CPU
while other jobs ran (load average 7-9; an idle machine is faster).

Expected numbers: not yet measured. For orientation: torchvision's dense MobileNet-V2 reports
71.88% top-1. No peer pruning number for MobileNet-V2 is in our reference list; for MobileNet-V1,
AMC (ECCV 2018) reports 70.5% at 50% FLOPs and GNN-RL (ICML 2022) 69.5% at 40% FLOPs. The
AutoSculpt paper's own numbers were withdrawn by its authors (arXiv, June 2025) and are not a
target.
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
    c = _common.base("mobilenet_v2_imagenet", tokens)
    c.model = "mobilenet_v2_imagenet"
    _common.imagenet_budget(c)
    c.pretrain.lr = 0.05
    c.pretrain.weight_decay = 4e-5
    c.search.target_flops = _common.target_of(tokens, default="t30")
    if "smoke" in tokens:
        _common.smoke(c, model="mobilenet_v2_tiny")
    return c
