"""PreJEAT and JEAT (Zhu et al., ICCV 2021; papers.md §2.7-2.8).

PreJEAT (§3.3): adversarial training whose attack ascends the joint energy only (Eq. 18),
x_adv = x + η·sign(∇x E(x, y)), and whose loss is the usual CE = E(x_adv, y) − E(x_adv).

JEAT (Algorithm 1) trains −log p(x, y) = −log p(y|x) − log p(x) *at the adversarial input*:

    1. x_adv: δ ~ U(−ε, ε), one signed step of size ε on E(x+δ, y), clipped to the ε-ball (cfg.attack)
    2. x̃: Langevin chains on E(x) from a replay buffer (cfg.sampler; Eq. 17 in its coupled form)
    3. L = p_y_given_x · (1/B) Σ [E(x_adv, y) − E(x_adv)] + p_x · [(1/B) Σ E(x_adv) − (1/B) Σ E(x̃)]

The positive sample of the p(x) term is x_adv, not x, so one forward over x_adv serves both terms.
"""

from __future__ import annotations

from torch import Tensor

from ..energy import cross_entropy, marginal_energy
from .base import Batch, LossOutput, energies, forward_each, output
from .jem import JemParams, SamplerMethod, px_contrast
from .pgd_at import PGDAT


class PreJEAT(PGDAT):
    """CE at the energy adversarial example (attack objective joint_energy, JEAT Eq. 18)."""

    attack_objectives = ("joint_energy",)


class JEAT(SamplerMethod):
    """JEAT Algorithm 1: energy adversarial example + SGLD negatives, −log p(x, y) at x_adv."""

    Params = JemParams
    attack_objectives = ("joint_energy",)

    def prepare(self, model, batch: Batch, *, epoch: int) -> dict[str, Tensor]:
        x_adv = self.attack(model, batch.x, batch.y)  # x stays in for energy-dynamics probes; loss() ignores it
        return {"x": batch.x, "y": batch.y, "x_adv": x_adv, "x_sgld": self.sampler.sample(model, batch.x.shape[0])}

    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        y = prepared["y"]
        logits_adv, logits_sgld = forward_each(model, prepared["x_adv"], prepared["x_sgld"])
        e_sgld = marginal_energy(logits_sgld)
        ce = cross_entropy(logits_adv, y).mean()
        px = px_contrast(marginal_energy(logits_adv), e_sgld)
        loss = self.params.p_y_given_x * ce + self.params.p_x * px
        return output(loss, {"ce_adv": ce, "px": px}, energies(y, adv=logits_adv) | {"E_x/sgld": e_sgld.detach()})
