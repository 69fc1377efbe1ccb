"""WEAT: energy-weighted TRADES (Mirza et al. 2024; papers.md §2.9).

Each sample is weighted by its marginal energy on the clean input (train-mode forward, detached),

    w(x) = 1 / log(1 + exp(|E(x)|)) = 1 / softplus(|E(x)|),   E(x) = −logsumexp f(x)

so confident, low-energy samples count less (w ≤ 1/log 2). The weights are not renormalised.

    WEAT_nat:  (1/B) Σ w_i · CE(f(x_i), y_i)     + β · (1/B) Σ w_i · KL(p(·|x_i) ‖ p(·|x_adv_i))
    WEAT_adv:  (1/B) Σ w_i · CE(f(x_adv_i), y_i) + β · (same weighted KL)

x_adv is the TRADES KL attack (cfg.attack, objective kl, 10 × 2/255, ε 8/255, start x + 0.001·N(0,I)
not clipped; WEAT_loss.py:62-72). x and x_adv are forwarded once each in train mode
(WEAT_loss.py:82-83, 133-134): no third forward as in TRADES. The KL is the released one,
Σ p (log p − log(q + 1e-12)) (WEAT_loss.py:89, 140; `base.released_kl`).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..energy import cross_entropy, marginal_energy
from ..schema_types import Strict
from .base import LossOutput, energies, output, released_kl
from .trades import TRADES


class WeatParams(Strict):
    variant: Literal["nat", "adv"] = Field("nat", description="CE on clean (nat) or adversarial (adv) inputs")
    beta: float = Field(6.0, ge=0.0, description="weight of the KL term (WEAT CLI default 6)")


def energy_weights(logits: Tensor) -> Tensor:
    """w = 1 / softplus(|E(x)|), detached."""
    return 1.0 / F.softplus(marginal_energy(logits.detach()).abs())


class WEAT(TRADES):
    """TRADES with both terms weighted by 1/softplus(|E(x)|)."""

    Params = WeatParams
    repeat_clean_forward = False

    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        y = prepared["y"]
        logits, logits_adv = self.forward(model, prepared)
        w = energy_weights(logits)
        ce_logits = logits if self.params.variant == "nat" else logits_adv
        ce = (w * cross_entropy(ce_logits, y)).mean()
        kl = (w * released_kl(logits, logits_adv)).mean()
        loss = ce + self.params.beta * kl
        return output(loss, {"ce_weighted": ce, "kl_weighted": kl, "w_mean": w.mean()},
                      energies(y, clean=logits, adv=logits_adv))
