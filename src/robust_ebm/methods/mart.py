"""MART (Wang et al. 2020; papers.md §2.5).

    L = (1/B) Σ [ CE(f(x_adv), y) − log(1.0001 − p_adv[ŷ]) ]
        + β · (1/B) Σ KL(p(·|x) ‖ p(·|x_adv)) · (1 − p(y|x))

ŷ = the most likely wrong class under p_adv (boosted CE); the KL of correctly classified clean inputs
is down-weighted by their clean confidence p(y|x) (kept differentiable, as in the released code).
x_adv is CE-PGD (cfg.attack, objective ce, start x + 0.001·N(0,I)).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from ..attacks import mart_boosted_ce
from ..energy import kl_divergence
from ..schema_types import Strict
from .base import AdversarialMethod, LossOutput, energies, output


class MartParams(Strict):
    beta: float = Field(6.0, ge=0.0, description="weight of the confidence-weighted KL term (MART: 6)")


class MART(AdversarialMethod):
    """Boosted CE on x_adv plus a KL weighted by (1 − clean confidence)."""

    Params = MartParams
    attack_objectives = ("ce", "mart")

    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        y = prepared["y"]
        logits, logits_adv = model(prepared["x"]), model(prepared["x_adv"])
        bce = mart_boosted_ce(logits_adv, y).mean()
        p_true = logits.softmax(dim=1).gather(1, y[:, None]).squeeze(1)
        kl = (kl_divergence(logits, logits_adv) * (1.0 - p_true)).mean()
        loss = bce + self.params.beta * kl
        return output(loss, {"bce_adv": bce, "kl_weighted": kl}, energies(y, clean=logits, adv=logits_adv))
