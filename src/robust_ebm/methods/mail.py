"""MAIL-TR: margin-aware instance reweighting on TRADES (Wang et al. 2021; papers.md §2.6).

For the first `warmup_epochs` epochs it is plain TRADES (MAIL train.py:91 runs at_loss while the
0-based `epoch <= 75`, i.e. 76 epochs). Afterwards (mail_loss.py:72-79) each sample's KL term is
reweighted by its probabilistic margin on the adversarial input,

    PM_i = max_{k ≠ y} p_adv[k] − p_adv[y]            (p_adv from the train-mode adversarial logits)
    w_i  = 3 · sigmoid(slope · (PM_i + bias))          (detached)
    L    = (1/B) Σ CE(f(x), y) + β · (1/B) Σ w_i · KL(p(·|x_i) ‖ p(·|x_adv_i))

so samples close to (or past) the decision boundary weigh more. Works for any number of classes
(the released PM uses torch.eye(10): CIFAR-10 only). Both phases forward x and x_adv once each in
train mode (at_loss.py:61-64, mail_loss.py:73-74): no third forward as in TRADES.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..energy import cross_entropy, kl_divergence
from ..schema_types import Strict
from .base import LossOutput, energies, output
from .trades import TRADES


class MailParams(Strict):
    beta: float = Field(5.0, ge=0.0, description="weight of the KL term (MAIL: 5)")
    warmup_epochs: int = Field(76, ge=0, description="plain TRADES for this many epochs (MAIL train.py:91: "
                                                     "0-based epoch <= 75, i.e. 76 of 120)")
    bias: float = Field(0.0, description="margin bias of the weight (README: mail_trades --bias 0)")
    slope: float = Field(2.0, description="margin slope of the weight (README: mail_trades --slope 2)")
    scale: float = Field(3.0, gt=0.0, description="weight scale (MAIL code: 3)")


def probabilistic_margin(logits: Tensor, y: Tensor) -> Tensor:
    """PM = max_{k≠y} p[k] − p[y] ∈ [−1, 1]; positive when the sample is misclassified."""
    p = logits.softmax(dim=1)
    return p.scatter(1, y[:, None], -1.0).amax(dim=1) - p.gather(1, y[:, None]).squeeze(1)


class MAILTrades(TRADES):
    """TRADES whose KL term is reweighted by the adversarial margin after the warm-up."""

    Params = MailParams
    repeat_clean_forward = False

    def weights(self, logits_adv: Tensor, y: Tensor, epoch: int) -> Tensor:
        """w_i; `epoch` is 1-based (the training loop's), so epochs 1..warmup_epochs are plain TRADES."""
        if epoch <= self.params.warmup_epochs:
            return torch.ones_like(y, dtype=logits_adv.dtype)
        p = self.params
        return p.scale * torch.sigmoid(p.slope * (probabilistic_margin(logits_adv.detach(), y) + p.bias))

    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        y = prepared["y"]
        logits, logits_adv = self.forward(model, prepared)
        w = self.weights(logits_adv, y, epoch)
        ce = cross_entropy(logits, y).mean()
        kl = (w * kl_divergence(logits, logits_adv)).mean()
        loss = ce + self.params.beta * kl
        return output(loss, {"ce": ce, "kl_weighted": kl, "w_mean": w.mean()},
                      energies(y, clean=logits, adv=logits_adv))
