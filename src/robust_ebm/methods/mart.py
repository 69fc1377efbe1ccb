"""MART (Wang et al. 2020, Eq. 12; papers.md §2.5).

    L = (1/B) Σ [ CE(f(x_adv), y) − log(1.0001 − p_adv[ŷ] + 1e-12) ]
        + β · (1/B) Σ KL_ε(p(·|x) ‖ p(·|x_adv)) · (1.0000001 − p(y|x))

ŷ = the most likely wrong class under p_adv (boosted CE); the KL of correctly classified clean inputs
is down-weighted by their clean confidence p(y|x) (kept differentiable). The constants are those of
the released mart.py:48-55, including KL_ε = Σ_k p_k (log p_k − log(p_adv,k + 1e-12)).
x_adv is CE-PGD (cfg.attack, objective ce, start x + 0.001·N(0,I) not clipped, eval mode).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from ..attacks import mart_boosted_ce
from ..schema_types import Strict
from .base import AdversarialMethod, LossOutput, energies, output, released_kl


class MartParams(Strict):
    beta: float = Field(5.0, ge=0.0, description="weight of the confidence-weighted KL term "
                                                 "(train_resnet.py:41: 5.0; train_wideresnet.py: 6.0)")


class MART(AdversarialMethod):
    """Boosted CE on x_adv plus a KL weighted by (1 − clean confidence)."""

    Params = MartParams
    attack_objectives = ("ce", "mart")

    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        y = prepared["y"]
        logits, logits_adv = model(prepared["x"]), model(prepared["x_adv"])
        bce = mart_boosted_ce(logits_adv, y).mean()
        p_true = logits.softmax(dim=1).gather(1, y[:, None]).squeeze(1)
        kl = (released_kl(logits, logits_adv) * (1.0000001 - p_true)).mean()
        loss = bce + self.params.beta * kl
        return output(loss, {"bce_adv": bce, "kl_weighted": kl}, energies(y, clean=logits, adv=logits_adv))
