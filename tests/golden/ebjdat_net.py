"""The tiny network of the EB-JDAT / JEAT goldens, shared by the generator and the tests (no reference code).

The goldens check the methods' mathematics, not an architecture (the WRN layouts have their own
goldens), so both sides run the SAME small module: our `Classifier` (the [0,1] -> [-1,1] map
`SymmetricRange`, a stem conv, a trunk, a linear head), and on the reference side the same stem,
trunk and head inside the fork's own `CCF` (`f.classify`, `f(x)`, `f(x, y)`), fed [-1,1] images.
The trunk is one pre-activation residual block with a strided conv and a 1x1 shortcut, LeakyReLU 0.2
and BatchNorm with momentum 0.9 (the forks' `get_norm('batch')`), or no normalisation (EB-JDAT-JEM).

Key mapping ours -> reference CCF: stem.* -> f.conv1.*, trunk.* -> f.trunk.*, fc.* -> class_output.*.
"""

from __future__ import annotations

import torch
from torch import nn

from robust_ebm.models import Classifier, SymmetricRange

WIDTH, NUM_CLASSES, IMAGE_SIZE = 4, 10, 8


class Trunk(nn.Module):
    """(B, W, H, H) stem output -> (B, 2W) features: one pre-activation block, then norm, LeakyReLU, mean pool."""

    def __init__(self, width: int, batch_norm: bool):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c, momentum=0.9)) if batch_norm else (lambda c: nn.Identity())
        self.act = nn.LeakyReLU(0.2)
        self.bn1, self.conv1 = norm(width), nn.Conv2d(width, width, 3, padding=1)
        self.bn2, self.conv2 = norm(width), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(width, 2 * width, 1, stride=2)
        self.bn_out = norm(2 * width)

    def forward(self, h):
        out = self.conv1(self.act(self.bn1(h)))
        out = self.conv2(self.act(self.bn2(out))) + self.shortcut(h)
        return self.act(self.bn_out(out)).mean((2, 3))


def build(batch_norm: bool) -> Classifier:
    """Our side: float64 Classifier with default-initialised weights (load the fixture's state after)."""
    stem = nn.Conv2d(3, WIDTH, 3, padding=1)
    model = Classifier(SymmetricRange(), stem, Trunk(WIDTH, batch_norm), nn.Linear(2 * WIDTH, NUM_CLASSES),
                       num_classes=NUM_CLASSES, in_channels=3, image_size=IMAGE_SIZE)
    return model.double()


def initial_state(batch_norm: bool, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights, with non-trivial BN running statistics so that eval-mode forwards differ from train mode."""
    torch.manual_seed(seed)
    model = build(batch_norm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.7, 1.3)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def images(n: int, *, seed: int) -> torch.Tensor:
    """n images in [0,1] on the 1/255 grid, float64, with about a quarter of the pixels exactly 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g).double() / 255
    sat = torch.rand(x.shape, generator=g, dtype=torch.float64)
    return torch.where(sat < 0.12, torch.zeros_like(x), torch.where(sat > 0.88, torch.ones_like(x), x))
