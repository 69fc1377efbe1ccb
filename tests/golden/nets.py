"""Tiny networks and inputs of the JEM-family golden fixtures, shared by generator and tests.

Weights come from a closed formula (no RNG, so nothing hinges on torch's generator and a ResNet-18's
11M weights need not be stored): parameter tensor number t of the state dict, flattened, gets

    w[i] = amplitude * sin(GOLDEN * i + 0.5 + t)           (GOLDEN = the golden angle, a low-discrepancy step)

with amplitude 2/sqrt(fan_in) for conv/linear weights (variance 2/fan_in), 0.1 for biases and BN
shifts, 1 + 0.1 sin(...) for BN scales, 0.1 sin(...) running means, 1 + 0.25 (1 + sin(...)) running
variances. Fixtures store `weight_digest` (sum and sum of squares per tensor) to catch any drift.
"""

from __future__ import annotations

import math

import torch

from robust_ebm.models import ModelConfig, build_model

GOLDEN = math.pi * (3 - math.sqrt(5))


def _wave(n: int, t: int) -> torch.Tensor:
    return torch.sin(GOLDEN * torch.arange(n, dtype=torch.float64) + 0.5 + t)


def formula_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The formula weights for every float tensor of `model.state_dict()` (see module docstring)."""
    out = {}
    for t, (key, value) in enumerate(model.state_dict().items()):
        if not torch.is_floating_point(value):
            out[key] = value.clone()
            continue
        wave = _wave(value.numel(), t).view(value.shape)
        name = key.rsplit(".", 1)[-1]
        if name == "running_var":
            out[key] = 1.0 + 0.25 * (1.0 + wave)
        elif name == "running_mean":
            out[key] = 0.1 * wave
        elif name == "weight" and value.dim() == 1:   # a BatchNorm scale
            out[key] = 1.0 + 0.1 * wave
        elif name == "weight":
            out[key] = 2.0 / math.sqrt(value[0].numel()) * wave
        else:
            out[key] = 0.1 * wave
    return out


def build(cfg: ModelConfig, *, num_classes: int = 10, image_size: int = 16) -> torch.nn.Module:
    """Our Classifier in float64 with the formula weights."""
    model = build_model(cfg, num_classes=num_classes, in_channels=3, image_size=image_size).double()
    model.load_state_dict(formula_state(model))
    return model


def weight_digest(model: torch.nn.Module) -> torch.Tensor:
    """(n_tensors, 2): sum and sum of squares of every float state tensor (fixture integrity)."""
    rows = [torch.stack([v.double().sum(), v.double().pow(2).sum()])
            for v in model.state_dict().values() if torch.is_floating_point(v)]
    return torch.stack(rows)


def images(n: int, size: int, *, seed: int) -> torch.Tensor:
    """n images in [0,1] on the 1/255 grid, float64, about a quarter of the pixels exactly 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g).double() / 255
    sat = torch.rand(x.shape, generator=g)
    return torch.where(sat < 0.12, torch.zeros_like(x), torch.where(sat > 0.88, torch.ones_like(x), x))


JEM_WRN = ModelConfig(arch="wrn", depth=16, width=1, norm="none", activation="leaky_relu",
                      input_range="symmetric", block="jem")
JEMPP_WRN = ModelConfig(arch="wrn", depth=16, width=1, norm="batch", bn_momentum=0.9, activation="leaky_relu",
                        input_range="symmetric", block="jem")
TRADES_WRN = ModelConfig(arch="wrn", depth=16, width=1, norm="batch", block="trades")
RESNET18 = ModelConfig(arch="resnet18")


def capture(pairs):
    """Forward hooks on (name, module) pairs -> (dict name -> detached output, handles to remove)."""
    out, handles = {}, []
    for name, module in pairs:
        handles.append(module.register_forward_hook(
            lambda m, i, o, name=name: out.__setitem__(name, o.detach().clone())))
    return out, handles


def our_blocks(model):
    """(name, module) of our stem and every residual block: 'stem', 'stage{s}.{b}'."""
    pairs = [("stem", model.stem)]
    for name, module in model.trunk.named_children():
        if name.startswith("stage"):
            pairs += [(f"{name}.{j}", block) for j, block in enumerate(module)]
    return pairs


FULL_GRAD_MAX = 2048   # larger gradients are stored as a signature (keeps fixtures small)


def signature(g: torch.Tensor) -> torch.Tensor:
    """(9,): sum of squares and 8 projections on fixed waves: any change of g moves some entry."""
    flat = g.detach().double().flatten()
    probes = torch.stack([_wave(flat.numel(), 100 + k) for k in range(8)])
    return torch.cat([flat.pow(2).sum().view(1), probes @ flat])


def grad_record(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors up to FULL_GRAD_MAX elements, `signature` beyond (keys prefixed 'sig:')."""
    return {(k if v.numel() <= FULL_GRAD_MAX else f"sig:{k}"): (v.detach().clone() if v.numel() <= FULL_GRAD_MAX
                                                           else signature(v)) for k, v in grads.items()}


def bn_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


# the method fixtures: WRN-10-1 (one block per stage), 4 classes, 8x8 images
METHOD_CLASSES, METHOD_SIZE, METHOD_BATCH, METHOD_BUFFER = 4, 8, 4, 8
JEM_WRN10 = JEM_WRN.model_copy(update={"depth": 10})
JEMPP_WRN10 = JEMPP_WRN.model_copy(update={"depth": 10})


def probes(d: int, m: int = 3) -> torch.Tensor:
    """(d, m) fixed probe vectors: covariances are stored as cov @ probes (a 3072 x 3072 matrix is 75 MB)."""
    return torch.stack([_wave(d, 200 + j) for j in range(m)], dim=1)
