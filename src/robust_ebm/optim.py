"""Optimisers (SGD, Adam, SAM) and per-iteration learning-rate schedules.

SAM (Foret et al. 2021, Alg. 1) takes two gradient evaluations per step:

    e_w = rho * T_w^2 g / ||T_w g||_2        (T_w = I for SAM; T_w = |w| for ASAM, Kwon et al. 2021 Eq. 11)
    w   <- w + e_w;  g' = grad L(w + e_w);   w <- w - e_w (restored exactly);  base step with g'

SADA-JEM uses the adaptive form with rho = 2 and keeps BatchNorm running
statistics frozen during the second pass (`frozen_bn_stats`).

Every schedule is stepped once per iteration and has the form

    lr(t) = lr * shape(t) * warmup(t) * scale,    warmup(t) = min(1, t / warmup_iters)

(t = 0-based iteration; JEM's train_wrn_ebm.py:303-304 sets lr * cur_iter / warmup_iters for
cur_iter <= warmup_iters, so the first step runs at lr 0) with shape one of constant (1), multistep
(gamma^#{milestones <= epoch}, epoch 0-based: JEM's `if epoch in decay_epochs` over range(n_epochs),
MAIL's adjust_learning_rate(epoch) over range(epochs); TRADES/MART test a 1-based `epoch >= 75`, i.e.
milestone 74), cosine (0.5 (1 + cos(pi t / T))), or torch's OneCycleLR (WEAT main.py:102-104: max_lr
= lr, pct_start, total_steps = epochs x steps per epoch, torch defaults otherwise: cosine anneal,
div_factor 25, final_div_factor 1e4, momentum cycled 0.85-0.95). `scale` starts at 1 and is lowered by
the divergence guard's `lr_decay` remedy.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from .schema_types import Strict

# --------------------------------------------------------------------------- settings (methods.<m>.optim, .schedule)


class OptimConfig(Strict):
    name: Literal["sgd", "adam", "sam"]
    lr: float = Field(gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    sam_rho: float = Field(0.05, gt=0.0, description="SAM neighbourhood radius (SADA-JEM: 2.0, adaptive)")
    sam_adaptive: bool = False

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, betas):
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        return betas


class ScheduleConfig(Strict):
    """Learning-rate schedule, stepped per iteration (warm-up, onecycle) or per epoch (multistep)."""

    name: Literal["constant", "multistep", "cosine", "onecycle"]
    epochs: int = Field(ge=1)
    milestones: list[int] = Field(default_factory=list, description="0-based epochs from which lr *= gamma once more "
                                  "(multistep; torch MultiStepLR stepped per epoch; a 1-based `epoch >= m` is milestone m - 1)")
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_iters: int = Field(0, ge=0, description="linear warm-up from 0 (JEM family: 1000)")
    pct_start: float = Field(0.25, gt=0.0, lt=1.0, description="onecycle: fraction of steps spent rising")

    @field_validator("milestones")
    @classmethod
    def _check_milestones(cls, milestones):
        if any(m <= 0 for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"milestones must be positive and strictly increasing, got {milestones}")
        return milestones

    @model_validator(mode="after")
    def _check_milestones_fit(self):
        late = [m for m in self.milestones if m > self.epochs] if self.name == "multistep" else []
        if late:
            raise ValueError(f"milestones={late} lie beyond epochs={self.epochs}: that lr step would never "
                             "happen; lower the milestone or raise schedule.epochs")
        return self


# --------------------------------------------------------------------------- optimisers


class SAM:
    """Sharpness-aware minimisation around a base optimiser (adaptive=True: ASAM)."""

    def __init__(self, base: Optimizer, *, rho: float, adaptive: bool):
        if rho <= 0:
            raise ValueError(f"SAM rho must be > 0, got {rho}")
        self.base, self.rho, self.adaptive = base, rho, adaptive
        self._saved: dict[nn.Parameter, torch.Tensor] = {}

    @property
    def param_groups(self):
        return self.base.param_groups

    def _params(self):
        return [p for g in self.base.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def perturbation(self) -> list[torch.Tensor]:
        """e_w = rho * T^2 g / ||T g|| for every parameter with a gradient."""
        params = self._params()
        scaled = [(p.abs() * p.grad) if self.adaptive else p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        factor = self.rho / (norm + 1e-12)
        return [(p.abs() * s if self.adaptive else s) * factor for p, s in zip(params, scaled)]

    @torch.no_grad()
    def first_step(self) -> None:
        """Move to the worst case w + e_w (remember w)."""
        params = self._params()
        for p, e in zip(params, self.perturbation()):
            self._saved[p] = p.detach().clone()
            p.add_(e)

    @torch.no_grad()
    def second_step(self) -> None:
        """Restore w exactly, then take the base step with the gradient at w + e_w."""
        if not self._saved:
            raise RuntimeError("SAM.second_step called without first_step")
        for p, w in self._saved.items():
            p.copy_(w)
        self._saved.clear()
        self.base.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)


def base_optimizer(opt) -> Optimizer:
    """The torch optimiser that owns the parameter groups (SAM's base, or opt itself)."""
    return opt.base if isinstance(opt, SAM) else opt


def build_optimizer(params, cfg, *, device: torch.device):
    """SGD, Adam or SAM(SGD) from an OptimConfig; fused kernels on CUDA."""
    params = list(params)
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.name in ("sgd", "sam"):
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=cfg.nesterov, **fused)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **fused)
    else:
        raise ValueError(f"unknown optimiser '{cfg.name}'; use sgd, adam or sam")
    return SAM(opt, rho=cfg.sam_rho, adaptive=cfg.sam_adaptive) if cfg.name == "sam" else opt


@contextlib.contextmanager
def bn_momentum(model: nn.Module, rule):
    """Every BatchNorm layer's momentum m becomes rule(m) inside the block (m None: cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = rule(m.momentum)
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def frozen_bn_stats(model: nn.Module):
    """BatchNorm layers keep their running statistics (momentum 0) inside the block."""
    return bn_momentum(model, lambda m: 0.0)


def shape_factor(cfg, step: int, steps_per_epoch: int) -> float:
    """shape(t) of the constant, multistep and cosine schedules at iteration t (0-based)."""
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "multistep":
        epoch = step // steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        total = cfg.epochs * steps_per_epoch
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    raise ValueError(f"no closed form for schedule '{cfg.name}'")


def warmup_factor(step: int, warmup_iters: int) -> float:
    """Linear warm-up of the JEM family: t / warmup_iters for t <= warmup_iters, so iteration 0 has lr 0
    (`if cur_iter <= args.warmup_iters: lr = args.lr * cur_iter / float(args.warmup_iters)`:
    JEM train_wrn_ebm.py:303-306, JEM++ train_jempp.py:227-230, SADA-JEM train_sadajem.py:188-191)."""
    return 1.0 if warmup_iters <= 0 else min(1.0, step / warmup_iters)


class LRSchedule:
    """Per-iteration schedule = shape x linear warm-up x remedy scale (see module docstring)."""

    def __init__(self, optimizer, cfg, *, steps_per_epoch: int):
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1 (is the training split smaller than one batch?)")
        self.optimizer = base_optimizer(optimizer)
        self.warmup_iters = cfg.warmup_iters
        first_decay = min(cfg.milestones, default=None) if cfg.name == "multistep" else None
        if first_decay is not None and cfg.warmup_iters >= first_decay * steps_per_epoch:
            raise ValueError(f"schedule.warmup_iters={cfg.warmup_iters} reaches the first milestone (epoch {first_decay} "
                             f"= iteration {first_decay * steps_per_epoch}): JEM's "
                             "warm-up statement would override that decay, which is not modelled; lower warmup_iters")
        self.step_count, self.scale = 0, 1.0
        if cfg.name == "onecycle":
            max_lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.inner = OneCycleLR(self.optimizer, max_lr=max_lrs, total_steps=cfg.epochs * steps_per_epoch,
                                    pct_start=cfg.pct_start)
        else:
            shape_factor(cfg, 0, steps_per_epoch)  # rejects unknown names before training
            self.inner = LambdaLR(self.optimizer, partial(shape_factor, cfg, steps_per_epoch=steps_per_epoch))
        self._apply()

    def _apply(self) -> None:
        factor = warmup_factor(self.step_count, self.warmup_iters) * self.scale
        for group, lr in zip(self.optimizer.param_groups, self.inner.get_last_lr()):
            group["lr"] = lr * factor

    def step(self) -> None:
        self.inner.step()
        self.step_count += 1
        self._apply()

    def scale_lr(self, factor: float) -> None:
        """Multiply every future learning rate by `factor` (divergence remedy)."""
        self.scale *= factor
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "step_count": self.step_count, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.step_count, self.scale = state["step_count"], state["scale"]
        self._apply()
