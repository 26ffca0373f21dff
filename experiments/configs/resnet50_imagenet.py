"""ResNet-50 on ImageNet (ILSVRC-2012): AutoSculpt (GNN + PPO over the reference's 6 filter
patterns; only the 3x3 convs take spatial patterns, 1x1 convs keep-or-remove per filter).

Command (from the repository root):
  python -m sculpt_jax run --config experiments/configs/resnet50_imagenet.py \
      [--checkpoint PRETRAIN_WORKDIR]                                               # 50% FLOPs
  python -m sculpt_jax run --config experiments/configs/resnet50_imagenet.py:smoke  # CPU check
  Data: a prepared tfds `imagenet2012` or `--data-dir` pointing at an image-folder tree.

Variants (comma-separated): t30 | t50 (default) | t70 = target TRUE FLOPs reduction, band +-0.05;
smoke = NOT this model: ResNet-50 at 224x224 cannot run in a minute on CPU, so the smoke variant
runs the family's test-size `resnet50_tiny` (bottleneck blocks, ImageNet stem) on the embedded 8x8
digits, only to check the stages.

Budget (`_common.imagenet_budget`): dense pretraining 90 epochs (skip it with `--checkpoint`);
search 5,120 candidate evaluations on a 10,000-image validation reward set carved from train;
fine-tune the best in-band candidate 30 epochs.

Runtime: full run not yet measured; dense ImageNet pretraining alone takes days on one accelerator.
Smoke (resnet50_tiny): measured 135 s end to end (seed 0, November 2026) on a shared 2-core CPU
while other jobs ran (load average 7-9; an idle machine is faster).

Expected numbers: not yet measured. For orientation: torchvision's dense ResNet-50 (V1 weights)
reports 76.13% top-1. The AutoSculpt paper's own numbers were withdrawn by its authors (arXiv, June
2025) and are not a target.
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
    c = _common.base("resnet50_imagenet", tokens)
    c.model = "resnet50"
    _common.imagenet_budget(c)
    c.search.target_flops = _common.target_of(tokens)
    if "smoke" in tokens:
        _common.smoke(c, model="resnet50_tiny")
    return c
