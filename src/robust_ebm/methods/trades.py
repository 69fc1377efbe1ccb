"""TRADES (Zhang et al. 2019; papers.md §2.4).

    L = (1/B) Σ CE(f(x), y) + β · (1/B) Σ KL(p(·|x) ‖ p(·|x_adv))

x_adv maximises the same KL (cfg.attack, objective kl: start x + 0.001·N(0,I), 10 sign steps, eval
mode; the clean logits of the attack are computed once). In energy form the KL is a conditional plus
a marginal energy-alignment term (WEAT Prop. 1), see `energy.kl_divergence`.

The clean and adversarial batches go through the network in two separate train-mode forwards, as
in the released code: one forward over cat([x, x_adv]) would mix their BatchNorm statistics.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from ..energy import cross_entropy, kl_divergence
from ..schema_types import Strict
from .base import AdversarialMethod, LossOutput, energies, output


class TradesParams(Strict):
    beta: float = Field(6.0, ge=0.0, description="weight of the KL term (TRADES: 6)")


class TRADES(AdversarialMethod):
    """CE on x plus β·KL between clean and adversarial predictions."""

    Params = TradesParams
    attack_objectives = ("kl",)

    def forward(self, model, prepared: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Clean and adversarial logits, two train-mode forwards (one each)."""
        return model(prepared["x"]), model(prepared["x_adv"])

    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        y = prepared["y"]
        logits, logits_adv = self.forward(model, prepared)
        ce = cross_entropy(logits, y).mean()
        kl = kl_divergence(logits, logits_adv).mean()
        loss = ce + self.params.beta * kl
        return output(loss, {"ce": ce, "kl": kl}, energies(y, clean=logits, adv=logits_adv))
