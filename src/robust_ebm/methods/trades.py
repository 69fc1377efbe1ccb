"""TRADES (Zhang et al. 2019, Eq. 5; papers.md §2.4).

    L = (1/B) Σ CE(f(x), y) + β · (1/B) Σ KL(p(·|x) ‖ p(·|x_adv))

x_adv maximises the same KL (cfg.attack, objective kl: start x + 0.001·N(0,I) not clipped before the
first gradient, 10 sign steps, eval mode; the clean logits of the attack are computed once: in eval
mode they do not change between steps). In energy form the KL is a conditional plus a marginal
energy-alignment term (WEAT Prop. 1), see `energy.kl_divergence`.

Train-mode forwards as in the released trades.py:79-82: f(x) for the CE, f(x_adv), then f(x) again
for the KL's target. In train mode BatchNorm normalises with the batch's own statistics, so the third
forward returns the first one's logits (same gradient); it matters only for the running statistics,
which see x, x_adv, x in that order (`repeat_clean_forward`; MAIL-TR and WEAT forward x and x_adv once
each, see their modules). The third update needs no forward: with batch statistics s_x, s_adv an update
r <- (1-m) r + m s three times gives

    r3 = (1-m)^3 r0 + m(1-m)^2 s_x + m(1-m) s_adv + m s_x,

which the two forwards reach with momenta m1 = m(1 + (1-m)^2) / (1 - m(1-m)) for x and m2 = m(1-m) for
x_adv (`_two_forward_momenta`); num_batches_tracked gets its third count by hand. Where that cannot
hold (a momentum None, or dropout, whose draws the third forward would consume) x is forwarded again
without autograd; a model without running statistics or dropout needs neither.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ..energy import cross_entropy, kl_divergence
from ..optim import bn_momentum
from ..schema_types import Strict
from .base import AdversarialMethod, LossOutput, energies, output


def _two_forward_momenta(m: float) -> tuple[float, float]:
    """Momenta (m1 for x, m2 for x_adv) that move running statistics as momentum m over x, x_adv, x does."""
    return m * (1 + (1 - m) ** 2) / (1 - m * (1 - m)), m * (1 - m)


class TradesParams(Strict):
    beta: float = Field(6.0, ge=0.0, description="weight of the KL term (train_trades_cifar10.py:36: 6)")


class TRADES(AdversarialMethod):
    """CE on x plus β·KL between clean and adversarial predictions."""

    Params = TradesParams
    attack_objectives = ("kl",)
    repeat_clean_forward = True   # trades.py:82 forwards x_natural a second time, after x_adv

    def forward(self, model, prepared: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Clean and adversarial logits from separate train-mode forwards (never one forward over
        cat([x, x_adv]): that would mix their BatchNorm statistics), BatchNorm statistics as after x, x_adv, x."""
        x, x_adv = prepared["x"], prepared["x_adv"]
        if not (self.repeat_clean_forward and model.training):
            return model(x), model(x_adv)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               and m.track_running_stats]
        dropout = any(m.training and m.p > 0 for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd))
        if dropout or any(m.momentum is None for m in bns):
            logits, logits_adv = model(x), model(x_adv)
            with torch.no_grad():
                model(x)
            return logits, logits_adv
        with bn_momentum(model, lambda m: _two_forward_momenta(m)[0]):
            logits = model(x)
        with bn_momentum(model, lambda m: _two_forward_momenta(m)[1]):
            logits_adv = model(x_adv)
        for m in bns:
            m.num_batches_tracked.add_(1)
        return logits, logits_adv

    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        y = prepared["y"]
        logits, logits_adv = self.forward(model, prepared)
        ce = cross_entropy(logits, y).mean()
        kl = kl_divergence(logits, logits_adv).mean()
        loss = ce + self.params.beta * kl
        return output(loss, {"ce": ce, "kl": kl}, energies(y, clean=logits, adv=logits_adv))
