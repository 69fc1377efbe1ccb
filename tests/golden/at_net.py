"""The tiny kuangliu-style ResNet of the adversarial-training golden fixtures (gen_at.py, test_golden_at.py).

Our ResNet-18 layout (models._resnet18: stem conv, norm, act, stages of BasicBlocks, global pool, fc)
with one block of width 4 (identity shortcut) and one of width 8 (stride 2, 1x1-conv shortcut), so
fixtures stay a few kB. `reference_key` maps its names to the kuangliu ResNet's (TRADES, MART, MAIL,
WEAT models/resnet.py); loading our weights through it into the reference class is the architecture check.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from torch import nn

from robust_ebm.models import BasicBlock, Classifier, ModelConfig

NUM_CLASSES = 10


def tiny_resnet() -> Classifier:
    """Our ResNet-18 layout (models._resnet18) with one block of width 4 and one of width 8 (stride 2)."""
    cfg = ModelConfig(arch="resnet18")
    trunk = [("norm", nn.BatchNorm2d(4)), ("act", nn.ReLU()),
             ("stage1", nn.Sequential(BasicBlock(4, 4, 1, cfg))), ("stage2", nn.Sequential(BasicBlock(4, 8, 2, cfg))),
             ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
    return Classifier(nn.Identity(), nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.Sequential(OrderedDict(trunk)),
                      nn.Linear(8, NUM_CLASSES), num_classes=NUM_CLASSES, in_channels=3, image_size=8)


def reference_key(ours: str) -> str:
    """Our parameter/buffer name -> the kuangliu ResNet's (conv1, bn1, layerN.i.{conv,bn}k, shortcut, linear)."""
    key = re.sub(r"^stem\.", "conv1.", ours)
    key = re.sub(r"^trunk\.norm\.", "bn1.", key)
    key = re.sub(r"^trunk\.stage(\d)\.", r"layer\1.", key)
    key = re.sub(r"\.norm(\d)\.", r".bn\1.", key)
    return re.sub(r"^fc\.", "linear.", key)
