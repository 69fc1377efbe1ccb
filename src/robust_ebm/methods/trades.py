"""TRADES (Zhang et al. 2019, Eq. 5; papers.md §2.4).

    L = (1/B) Σ CE(f(x), y) + β · (1/B) Σ KL(p(·|x) ‖ p(·|x_adv))

x_adv maximises the same KL (cfg.attack, objective kl: start x + 0.001·N(0,I) not clipped before the
first gradient, 10 sign steps, eval mode; the clean logits of the attack are computed once: in eval
mode they do not change between steps). In energy form the KL is a conditional plus a marginal
energy-alignment term (WEAT Prop. 1), see `energy.kl_divergence`.

Train-mode forwards as in the released trades.py:79-82: f(x) for the CE, f(x_adv), then f(x) again
for the KL's target. In train mode BatchNorm normalises with the batch's own statistics, so the third
forward returns the first one's logits (same gradient); it matters only for the running statistics,
which see x, x_adv, x in that order. We run it without autograd for those statistics alone
(`repeat_clean_forward`; MAIL-TR and WEAT forward x and x_adv once each, see their modules).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..energy import cross_entropy, kl_divergence
from ..schema_types import Strict
from .base import AdversarialMethod, LossOutput, energies, output


class TradesParams(Strict):
    beta: float = Field(6.0, ge=0.0, description="weight of the KL term (train_trades_cifar10.py:36: 6)")


class TRADES(AdversarialMethod):
    """CE on x plus β·KL between clean and adversarial predictions."""

    Params = TradesParams
    attack_objectives = ("kl",)
    repeat_clean_forward = True   # trades.py:82 forwards x_natural a second time, after x_adv

    def forward(self, model, prepared: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Clean and adversarial logits from separate train-mode forwards (never one forward over
        cat([x, x_adv]): that would mix their BatchNorm statistics)."""
        logits, logits_adv = model(prepared["x"]), model(prepared["x_adv"])
        if self.repeat_clean_forward and model.training:
            with torch.no_grad():
                model(prepared["x"])
        return logits, logits_adv

    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        y = prepared["y"]
        logits, logits_adv = self.forward(model, prepared)
        ce = cross_entropy(logits, y).mean()
        kl = kl_divergence(logits, logits_adv).mean()
        loss = ce + self.params.beta * kl
        return output(loss, {"ce": ce, "kl": kl}, energies(y, clean=logits, adv=logits_adv))
