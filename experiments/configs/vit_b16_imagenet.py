"""ViT-B/16 on ImageNet (ILSVRC-2012): AutoSculpt with the ViT region patterns ("vit6", one
pattern per dense layer: zero 1/3, 2/3 or all of its input columns or output rows) on a layer-level
graph (one node per layer, REFERENCE.md sec. 2 and 4).

Command (from the repository root):
  python -m sculpt_jax run --config experiments/configs/vit_b16_imagenet.py \
      --checkpoint PRETRAIN_WORKDIR                                                # 30% FLOPs
  python -m sculpt_jax run --config experiments/configs/vit_b16_imagenet.py:smoke  # CPU check
  Data: a prepared tfds `imagenet2012` or `--data-dir` pointing at an image-folder tree.

Variants (comma-separated): t30 (default) | t50 | t70 = target TRUE FLOPs reduction, band +-0.05;
smoke = NOT this model: the smoke variant runs the family's test-size `vit_tiny` (patch 8, so one
token on 8x8 digits) with the same vit6 library and layer-level graph, only to check the stages.

Difference from the reference: the reference prunes only the 12 attention output projections; our
vit6 library applies to every dense layer (qkv, attention output, MLP; the patch embedding and the
classifier can only be kept or removed).

Budget (`_common.imagenet_budget`): search 5,120 candidate evaluations on a 10,000-image validation
reward set; fine-tune the best in-band candidate 30 epochs with SGD. Dense pretraining of a ViT-B/16
with this SGD recipe from scratch will NOT reach published accuracies (they use AdamW, heavy
augmentation and/or ImageNet-21k pretraining); start from a pretrained workdir with `--checkpoint`.

Runtime: full run not yet measured. Smoke (vit_tiny): measured 68 s end to end (seed 0, November
2026) on a shared 2-core CPU while other jobs ran (load average 7-9; an idle machine is faster).

Expected numbers: not yet measured. For orientation: torchvision's dense ViT-B/16 reports 81.07%
top-1. The AutoSculpt paper's own numbers were withdrawn by its authors (arXiv, June 2025) and are
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
    c = _common.base("vit_b16_imagenet", tokens)
    c.model = "vit_b16"
    _common.imagenet_budget(c)
    c.pretrain.lr = 0.01
    c.search.library = "vit6"
    c.search.level = "layer"
    c.search.target_flops = _common.target_of(tokens, default="t30")
    c.finetune.lr = 0.003
    if "smoke" in tokens:
        _common.smoke(c, model="vit_tiny")
    return c
