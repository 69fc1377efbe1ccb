"""Gradient attacks on [0,1] images: FGSM and PGD (L∞, L2) on CE, energy, KL and MART objectives.

PGD (Madry et al.) ascends a per-sample objective J(x') over the ε-ball
around x intersected with the pixel box [0,1], from x' = x + δ0 (clipped by Π
unless `clamp_start` is false, as in the TRADES-family codes):

    L∞:  x' <- Π(x' + α · sign(∇J))           Π = clip to [x-ε, x+ε], then to [0,1]
    L2:  x' <- Π(x' + α · ∇J / ||∇J||₂)       Π = rescale δ to ||δ||₂ <= ε, then clip to [0,1]

Objectives (all built from `robust_ebm.energy`, all ascended):
- 'ce'              CE(x', y) = E(x',y) - E(x')      (targeted: -CE(x', t))
- 'joint_energy'    E(x', y)                          (JEAT Eq. 18; targeted: -E(x', t))
- 'marginal_energy' E(x')
- 'kl'              KL(p(.|x) || p(.|x'))             (TRADES; p(.|x) computed once)
- 'mart'            CE(x', y) - log(1.0001 - p(ŷ|x') + 1e-12), ŷ = most likely wrong class (MART's BCE)
- 'cw_margin'       max_{j≠y} f(x')[j] - f(x')[y] = E(x',y) - min_{j≠y} E(x',j)   (Carlini-Wagner margin;
                    L∞ PGD on it is the "CW∞" of Madry/TRADES-style evaluations, see `cw_margin`)

Gradients are taken w.r.t. the input only (`torch.autograd.grad`), so no
parameter `.grad` is touched. The model runs in `cfg.model_mode` and gets
its previous mode back afterwards.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from .energy import cross_entropy, joint_energy, kl_divergence, marginal_energy
from .runtime import model_mode
from .schema_types import Fraction, Strict


class AttackConfig(Strict):
    """One attack. eps and step are in pixel units ([0,1] images)."""

    norm: Literal["linf", "l2"] = "linf"
    eps: Fraction = Field(8 / 255, ge=0.0)
    step: Fraction = Field(2 / 255, gt=0.0)
    steps: int = Field(10, ge=1)
    restarts: int = Field(1, ge=1)
    random_start: Literal["none", "uniform", "normal"] = "uniform"
    start_std: Fraction = Field(0.001, ge=0.0, description="std of the 'normal' start (TRADES: 0.001)")
    clamp_start: bool = Field(True, description="clip the random start to the pixel box (and ball) before the first "
                                                "gradient (Madry's LinfStep.random_perturb); false: the first gradient "
                                                "is taken at the raw x + δ0 (TRADES trades.py:31, MART, MAIL, WEAT, "
                                                "and every _pgd_whitebox evaluation)")
    objective: Literal["ce", "joint_energy", "marginal_energy", "kl", "mart", "cw_margin"] = "ce"
    targeted: bool = False
    project: bool = Field(True, description="project to the eps-ball every step (EB-JDAT's code does not)")
    model_mode: Literal["eval", "train"] = "eval"

    @model_validator(mode="after")
    def _check_budget(self):
        if self.norm == "linf" and self.eps > 1.0:
            raise ValueError(f"eps={self.eps} exceeds 1 for an L-inf attack on [0,1] images; write budgets in pixel units, e.g. '8/255'")
        if self.targeted and self.objective not in ("ce", "joint_energy"):
            raise ValueError(f"targeted attacks need objective 'ce' or 'joint_energy', not '{self.objective}'")
        return self


def runner_up(logits: Tensor, y: Tensor) -> Tensor:
    """ŷ = argmax_{k≠y} f(x)[k]: the most likely wrong class (lowest E(x,k) over k ≠ y)."""
    return logits.scatter(1, y.view(-1, 1), float("-inf")).argmax(dim=1)


def mart_boosted_ce(logits: Tensor, y: Tensor) -> Tensor:
    """MART's adversarial BCE term: CE(x,y) - log(1.0001 - p(ŷ|x) + 1e-12), ŷ = argmax_{k≠y} f(x)[k]
    (MART mart.py:44-48, constants included).

    p(ŷ|x) = exp(-CE(x, ŷ)) in energy form.
    """
    p_wrong = torch.exp(-cross_entropy(logits, runner_up(logits, y)))
    return cross_entropy(logits, y) - torch.log(1.0001 - p_wrong + 1e-12)


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin m(x,y) = max_{j≠y} f(x)[j] - f(x)[y] = E(x,y) - E(x,ŷ), ŷ = `runner_up`.

    m > 0 exactly when x is misclassified. Its gradient is ∇f(x)[ŷ] - ∇f(x)[y]
    (the max picks one class; ties are broken by argmax). L∞ PGD ascending m is
    the "CW∞" attack of Madry/TRADES/MART-style evaluations (MART's `cwloss`
    ascends -relu(f[y] - max_{j≠y} f[j] + 50), which has the same gradient until
    a wrong class leads by 50). It is NOT the optimisation-based Carlini-Wagner
    L∞ attack (ART's `CarliniLInfMethod`, binary search over the constant c)
    that WEAT's CW_test.py calls (papers.md §3.4).
    """
    return joint_energy(logits, y) - joint_energy(logits, runner_up(logits, y))


def objective_value(objective: str, logits_adv: Tensor, y: Tensor, logits_nat: Tensor | None = None,
                    target: Tensor | None = None) -> Tensor:
    """Per-sample (B,) value that the attack ascends. A `target` makes 'ce'/'joint_energy' targeted (descended)."""
    if target is not None:
        if objective == "ce":
            return -cross_entropy(logits_adv, target)
        if objective == "joint_energy":
            return -joint_energy(logits_adv, target)
        raise ValueError(f"a target label only makes sense for objective 'ce' or 'joint_energy', not '{objective}'")
    if objective == "ce":
        return cross_entropy(logits_adv, y)
    if objective == "joint_energy":
        return joint_energy(logits_adv, y)
    if objective == "marginal_energy":
        return marginal_energy(logits_adv)
    if objective == "kl":
        if logits_nat is None:
            raise ValueError("objective 'kl' needs logits_nat, the logits of the natural images")
        return kl_divergence(logits_nat, logits_adv)
    if objective == "mart":
        return mart_boosted_ce(logits_adv, y)
    if objective == "cw_margin":
        return cw_margin(logits_adv, y)
    raise ValueError(f"unknown objective '{objective}'; use ce, joint_energy, marginal_energy, kl, mart or cw_margin")


# ---------------------------------------------------------------- geometry of the ball

def _l2(t: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped (B, 1, 1, 1) to broadcast against images."""
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def _project(delta: Tensor, cfg: AttackConfig) -> Tensor:
    if cfg.norm == "linf":
        return delta.clamp(-cfg.eps, cfg.eps)
    return delta * torch.clamp(cfg.eps / (_l2(delta) + 1e-12), max=1.0)


def _ascent_direction(grad: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / (_l2(grad) + 1e-12)


def _random_start(x: Tensor, cfg: AttackConfig, generator: torch.Generator | None) -> Tensor:
    """δ0: zero, uniform in the ball (L∞ cube / L2 ball), or N(0, start_std²)."""
    if cfg.random_start == "none":
        return torch.zeros_like(x)
    device = generator.device if generator is not None else x.device
    draw = dict(generator=generator, device=device, dtype=x.dtype)
    if cfg.random_start == "normal":
        return (cfg.start_std * torch.randn(x.shape, **draw)).to(x.device)
    if cfg.norm == "linf":
        return (cfg.eps * (2 * torch.rand(x.shape, **draw) - 1)).to(x.device)
    # uniform in the L2 ball: uniform direction, radius eps * U^(1/d)
    direction = torch.randn(x.shape, **draw)
    direction = direction / (_l2(direction) + 1e-12)
    radius = cfg.eps * torch.rand(x.shape[0], **draw) ** (1.0 / x[0].numel())
    return (direction * radius.view(-1, 1, 1, 1)).to(x.device)


def _constrain(x_adv: Tensor, x: Tensor, cfg: AttackConfig) -> Tensor:
    if cfg.project:
        x_adv = x + _project(x_adv - x, cfg)
    return x_adv.clamp(0.0, 1.0)


# ---------------------------------------------------------------- the attack

def _check_inputs(x, y, cfg, logits_nat, target):
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float NCHW batch, got shape {tuple(x.shape)} and dtype {x.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    low, high = torch.aminmax(x.detach())
    if low < 0 or high > 1:
        raise ValueError(f"x must be [0,1] pixels (got range [{low:.3f}, {high:.3f}]); "
                         "the Classifier normalises inside, so pass unnormalised images")
    if cfg.targeted and target is None:
        raise ValueError("cfg.targeted is true: pass target=<(B,) labels>")
    if target is not None and not cfg.targeted:
        raise ValueError("a target was passed but cfg.targeted is false; set targeted: true")
    if logits_nat is not None and logits_nat.shape[0] != x.shape[0]:
        raise ValueError(f"logits_nat has {logits_nat.shape[0]} rows for a batch of {x.shape[0]}")


def _success(logits: Tensor, y: Tensor, target: Tensor | None, objective: str) -> Tensor:
    """Per-sample attack success used to rank restarts (only defined for 'ce' and 'cw_margin')."""
    if objective not in ("ce", "cw_margin"):
        return torch.zeros_like(y, dtype=torch.bool)
    pred = logits.argmax(dim=1)
    return pred == target if target is not None else pred != y


def _pgd_run(model, x, y, cfg, logits_nat, target, generator) -> Tensor:
    x_adv = x + _random_start(x, cfg, generator)
    if cfg.clamp_start:
        x_adv = _constrain(x_adv, x, cfg)
    for _ in range(cfg.steps):
        x_adv.requires_grad_(True)
        value = objective_value(cfg.objective, model(x_adv), y, logits_nat, target).sum()
        (grad,) = torch.autograd.grad(value, x_adv)
        x_adv = _constrain(x_adv.detach() + cfg.step * _ascent_direction(grad, cfg.norm), x, cfg)
    return x_adv


def perturb(model: nn.Module, x: Tensor, y: Tensor, cfg: AttackConfig, *, logits_nat: Tensor | None = None,
            target: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """PGD on `cfg.objective`; returns detached x_adv in [0,1], inside the ε-ball unless cfg.project is false.

    With restarts > 1 each example keeps its best restart: a successful one
    (CE: misclassified / hits the target) first, then the highest objective.
    """
    _check_inputs(x, y, cfg, logits_nat, target)
    x = x.detach()
    with model_mode(model, cfg.model_mode), torch.enable_grad():
        if cfg.objective == "kl" and logits_nat is None:
            with torch.no_grad():
                logits_nat = model(x)
        if logits_nat is not None:
            logits_nat = logits_nat.detach()
        if cfg.restarts == 1:
            return _pgd_run(model, x, y, cfg, logits_nat, target, generator)

        best_x, best_value, best_success = None, None, None
        for _ in range(cfg.restarts):
            x_adv = _pgd_run(model, x, y, cfg, logits_nat, target, generator)
            with torch.no_grad():
                logits = model(x_adv)
            value = objective_value(cfg.objective, logits, y, logits_nat, target)
            success = _success(logits, y, target, cfg.objective)
            if best_x is None:
                best_x, best_value, best_success = x_adv, value, success
                continue
            better = (success & ~best_success) | ((success == best_success) & (value > best_value))
            best_x = torch.where(better.view(-1, 1, 1, 1), x_adv, best_x)
            best_value = torch.where(better, value, best_value)
            best_success = best_success | success
        return best_x


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, objective: str = "ce",
         random_start: Literal["none", "uniform"] = "none", model_mode: str = "eval",
         generator: torch.Generator | None = None) -> Tensor:
    """One signed step of size ε (FGSM; with random_start='uniform', FGSM-RS / JEAT Algorithm 1 step 1).

    Same as perturb with AttackConfig(norm='linf', eps=eps, step=eps, steps=1).
    """
    cfg = AttackConfig(norm="linf", eps=eps, step=eps, steps=1, random_start=random_start,
                       objective=objective, model_mode=model_mode)
    return perturb(model, x, y, cfg, generator=generator)


def describe(cfg: AttackConfig) -> str:
    """A protocol label computed from the config itself, so it can never disagree with what ran."""
    start = {"none": "no random start", "uniform": "uniform random start",
             "normal": f"N(0, {cfg.start_std:g}^2) random start"}[cfg.random_start]
    return (
        f"{cfg.norm} PGD-{cfg.steps} on {cfg.objective}, eps {cfg.eps * 255:.4g}/255, "
        f"step {cfg.step * 255:.4g}/255 pixel units, {start}, {cfg.restarts} restart(s)"
        f"{'' if cfg.project else ', no projection to the eps-ball'}"
        f"{'' if cfg.clamp_start or cfg.random_start == 'none' else ', start not clipped'}"
    )
