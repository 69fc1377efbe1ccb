"""Small builders shared by several test files."""

import torch

from robust_ebm.models import ModelConfig, build_model

TINY_CNN = ModelConfig(arch="tiny_cnn", width=4)


def tiny_classifier(seed=0, classes=3, channels=1, size=8):
    """A seeded tiny CNN classifier in eval mode (1x8x8 inputs by default)."""
    torch.manual_seed(seed)
    return build_model(TINY_CNN, num_classes=classes, in_channels=channels, image_size=size).eval()
