"""EB-JDAT (Jiang et al. 2025; papers.md §2.13): JEM plus an adversarial joint-distribution term.

    L = p_x            · [(1/B) Σ E(x_px) − (1/B) Σ E(x_sgld)]      log p(x)        (JEM term)
      + p_y_given_x    · (1/B) Σ CE(f(x), y)                        log p(y|x)
      + p_x_xadv       · [(1/B) Σ E(x_px) − (1/B) Σ E(x̃)]          log p(x̃|x)      ("min-max energy")
      + p_y_given_xadv · (1/B) Σ CE(f(x̃), y)                        log p(y|x̃, x)

x_sgld comes from the JEM / JEM++ / SADA-JEM back-end chosen by `sampler:`; x̃ is seeded by the
labelled batch x. Two x̃ samplers (`sampler_variant`, papers.md §6.1):

  code  (default, the released `sampleXadv`): eval mode, x̃0 = clip(x + U(−ε, ε)), then `in_steps` steps
        x̃ ← clip(x̃ + α · sign ∇x̃ [−E(x̃, y) + D(x, x̃)]) — i.e. *descending* E(x̃, y) — with
        D = ‖n(f(x)) − n(f(x̃))‖² between L2-normalised logit vectors, and no projection to the ε-ball.
        The code runs micro-batches of 2 but normalises each logit vector on its own, so the
        objective is separable and one vectorised pass gives the same x̃ (`perception_group` = 1);
        a larger group normalises jointly over consecutive groups of that many samples.
  paper energy *ascent* on E(x̃, y) with projection to the ε-ball (PGD, objective joint_energy).

ε and α are pixel units: the code's 8/255 and 2/255 in [−1,1] units are 4/255 and 1/255 here.

BatchNorm bookkeeping. x̃ is drawn in eval mode, so it depends on the running statistics at that
moment. The released step (train_jempp.py:365-437, train_sadajem.py:326-376, plc alltrain1) runs
its train-mode forwards in this order, each one moving the running statistics:

    f(x_px), the sampler chain (train mode), f(x_sgld), f(x) | draw x̃ (eval) | f(x_px), f(x̃), f(x̃)

`prepare` replays the forwards before the bar (no gradient; skipped for a model without running
statistics, e.g. the JEM back-end, which has no normalisation), then draws x̃. `loss` computes each
forward once and moves the statistics as the code's forwards after the bar do: x_px once, x_sgld and x
not at all (already counted), x̃ as two identical forwards (`bn_updates`). The loss and its gradient do
not depend on running statistics (train mode), only x̃ and the statistics left after the step do.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from .. import attacks
from ..energy import cross_entropy, joint_energy, marginal_energy
from ..runtime import model_mode
from ..schema_types import Fraction
from .base import Batch, LossOutput, energies, output
from .jem import JEM, JemParams, px_contrast


class EbjdatParams(JemParams):
    p_x_xadv: float = Field(0.1, ge=0.0, description="weight of E(x_px) − E(x̃) (code 0.1; paper 1)")
    p_y_given_xadv: float = Field(1.0, ge=0.0, description="weight of CE on x̃")
    sampler_variant: Literal["code", "paper"] = "code"
    in_steps: int = Field(5, ge=1, description="sign steps of the x̃ sampler")
    eps: Fraction = Field(4 / 255, ge=0.0, le=1.0, description="start radius (and ball radius of 'paper'), pixels")
    step: Fraction = Field(1 / 255, gt=0.0, description="sign-step size, pixels")
    perception_group: int = Field(1, ge=1, description="samples normalised together in D (code: 1)")


def _running_bns(model) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def bn_updates(model, times: int):
    """Train-mode forwards in the block move BN running statistics as `times` identical forwards would.

    One update r <- (1-m) r + m s, repeated k times on the same batch, is r <- (1-m)^k r + (1-(1-m)^k) s,
    so the block sets each momentum m to 1 - (1-m)^k (k = 0 freezes the statistics).
    """
    bns = _running_bns(model)
    if any(m.momentum is None for m in bns):
        raise ValueError("EB-JDAT replays the code's BatchNorm updates and needs a BN momentum; the model has "
                         "momentum=None (cumulative average): set the model's bn_momentum")
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0 - (1.0 - m.momentum) ** times
    try:
        yield
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum


def normalise_logits(logits: Tensor, group: int) -> Tensor:
    """Divide logits by the L2 norm (+1e-10) over consecutive groups of `group` rows (1: per sample)."""
    gid = torch.arange(logits.shape[0], device=logits.device) // group
    sq = torch.zeros(int(gid[-1]) + 1, device=logits.device, dtype=logits.dtype).index_add(0, gid, logits.pow(2).sum(1))
    return logits / (sq.sqrt()[gid, None] + 1e-10)


def code_sampler(model, x: Tensor, y: Tensor, *, eps: float, step: float, steps: int, group: int,
                 generator: torch.Generator | None = None) -> Tensor:
    """The released EB-JDAT x̃ sampler (no ε-ball projection); returns detached x̃ in [0,1]."""
    with model_mode(model, "eval"), torch.enable_grad():
        with torch.no_grad():
            clean = normalise_logits(model(x), group)
        device = generator.device if generator is not None else x.device
        u = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        x_t = (x.detach() + eps * (2 * u - 1)).clamp(0.0, 1.0)
        for _ in range(steps):
            x_t.requires_grad_(True)
            logits = model(x_t)
            distance = (clean - normalise_logits(logits, group)).pow(2).sum(1)
            (grad,) = torch.autograd.grad((-joint_energy(logits, y) + distance).sum(), x_t)
            x_t = (x_t.detach() + step * grad.sign()).clamp(0.0, 1.0)
    return x_t.detach()


class EBJDAT(JEM):
    """JEM plus an adversarial energy contrast and CE on x̃ (sampler back-end from `sampler:`)."""

    Params = EbjdatParams
    no_attack_hint = "its x̃ sampler is set in params (eps, step, in_steps, sampler_variant); remove the attack block"

    def sample_xadv(self, model, x: Tensor, y: Tensor) -> Tensor:
        p = self.params
        if p.sampler_variant == "code":
            return code_sampler(model, x, y, eps=p.eps, step=p.step, steps=p.in_steps, group=p.perception_group,
                                generator=self.generator)
        cfg = attacks.AttackConfig(norm="linf", eps=p.eps, step=p.step, steps=p.in_steps, random_start="uniform",
                                   objective="joint_energy", project=True, model_mode="eval")
        return attacks.perturb(model, x.clamp(0.0, 1.0), y, cfg, generator=self.generator)

    def prepare(self, model, batch: Batch, *, epoch: int) -> dict[str, Tensor]:
        """x_sgld, then x̃ after the code's earlier train-mode forwards (module docstring, BatchNorm)."""
        replay = bool(_running_bns(model)) and model.training
        if replay and batch.x_px is not None:
            with torch.no_grad():
                model(batch.x_px)
        prepared = super().prepare(model, batch, epoch=epoch)
        if replay:
            with torch.no_grad():
                model(prepared["x_sgld"])
                model(batch.x)
        return prepared | {"x_tilde": self.sample_xadv(model, batch.x, batch.y)}

    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        p, y = self.params, prepared["y"]
        e_data = marginal_energy(model(prepared["x_px"]))      # the code's f(x_px) after x̃
        with bn_updates(model, 0):                            # counted in prepare
            e_sgld = marginal_energy(model(prepared["x_sgld"]))
            logits = model(prepared["x"])
        with bn_updates(model, 2):                            # the code's f(x̃) and f.classify(x̃)
            logits_tilde = model(prepared["x_tilde"])
        px = px_contrast(e_data, e_sgld)
        ce = cross_entropy(logits, y).mean()
        px_xadv = px_contrast(e_data, marginal_energy(logits_tilde))
        ce_xadv = cross_entropy(logits_tilde, y).mean()
        loss = p.p_x * px + p.p_y_given_x * ce + p.p_x_xadv * px_xadv + p.p_y_given_xadv * ce_xadv
        log = energies(y, clean=logits, adv=logits_tilde) | {"E_x/px": e_data.detach(), "E_x/sgld": e_sgld.detach()}
        return output(loss, {"px": px, "ce": ce, "px_xadv": px_xadv, "ce_xadv": ce_xadv}, log)
