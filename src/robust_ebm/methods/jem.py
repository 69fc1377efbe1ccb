"""JEM, JEM++ and SADA-JEM: the classifier as an energy-based model of p(x, y) (papers.md §2.10-2.12).

    L = p_x · [ (1/B) Σ E(x_px) − (1/B) Σ E(x_sgld) ] + p_y_given_x · (1/B) Σ CE(f(x), y)

E(x) = −logsumexp f(x). The first term is the contrastive-divergence estimate of −∇ log p(x): it
lowers the energy of data (the p(x) stream x_px, a second minibatch) and raises it on samples
x_sgld of the model, drawn by persistent Langevin chains on E(x) from a replay buffer.

The three methods differ only in their configuration (`sampler:`, `data:`, `optim:`):
    JEM       decoupled SGLD (step 1, noise 0.01 in [-1,1] units), uniform buffer init, no BN, eval-mode sampling
    JEM++     PYLD (proximal YOPO sampler), informative (class-Gaussian) init, BN in train mode while sampling
    SADA-JEM  SGLD without noise, Gaussian-mixture init, un-augmented p(x) stream; SAM is the optimiser's job

Forward order follows the released code, which matters for BatchNorm running statistics only
(train-mode outputs use batch statistics): JEM++ (`--plc alltrain1`, train_jempp.py:238-240) and
SADA-JEM (train_sadajem.py:203-206) forward x_px BEFORE sampling, then x_sgld, then the labelled x.
`params.px_forward: before_sampling` reproduces that: prepare() runs a no-grad forward of x_px (the
statistics update) and loss() takes E(x_px) with the statistics frozen, so every BN layer sees the
same batches in the same order as the reference. `after_sampling` (JEM, where no BN exists, and
JEM++'s `--plc alltrain2`) samples first and updates the statistics in loss().
"""

from __future__ import annotations

import torch
from typing import Literal

from pydantic import Field
from torch import Tensor

from .. import sampling
from ..energy import cross_entropy, marginal_energy
from ..optim import frozen_bn_stats
from ..schema_types import Strict
from .base import Batch, LossOutput, Method, energies, forward_each, output


class PersistentSampler:
    """Persistent contrastive divergence on E(x): buffer draws → SGLD/PYLD → written back to the buffer."""

    def __init__(self, cfg, *, image_shape, num_classes, stats, device, generator):
        self.cfg = cfg
        self.generator = generator
        self.device = device
        init_fn = sampling.make_init_fn(cfg, shape=image_shape, stats=stats, device=device)
        # the buffer gets its own stream (saved with it), seeded from the method's generator
        seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
        own = torch.Generator(device=device).manual_seed(seed)
        self.buffer = sampling.ReplayBuffer(cfg.buffer_size, image_shape, num_classes, init_fn, cfg.reinit_prob,
                                            generator=own, device=device)

    def sample(self, model, n: int) -> Tensor:
        x0, idx = self.buffer.sample(n)
        x = sampling.run_sampler(model, x0, self.cfg, generator=self.generator)
        self.buffer.update(idx, x)
        return x

    def more_steps(self) -> str:
        old = self.cfg.steps
        self.cfg = self.cfg.model_copy(update={"steps": max(2 * old, 1)})
        return f"sampler steps {old} -> {self.cfg.steps}"

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "steps": self.cfg.steps}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.cfg = self.cfg.model_copy(update={"steps": int(state["steps"])})

    def samples(self) -> Tensor:
        return self.buffer.images


def px_contrast(e_data: Tensor, e_model: Tensor) -> Tensor:
    """Contrastive divergence on p(x): mean E(data) − mean E(model samples); its gradient is −∇θ log p(x)."""
    return e_data.mean() - e_model.mean()


class SamplerMethod(Method):
    """A method that keeps a persistent sampler on E(x) (JEAT, the JEM family, EB-JDAT)."""

    remedies = ("more_sgld_steps",)
    needs_sampler = True

    @classmethod
    def dataset_problems(cls, cfg, num_classes: int) -> list[tuple[str, str]]:
        """The persistent buffer holds one block per class (sampling.ReplayBuffer)."""
        problem = cfg.sampler and sampling.buffer_size_problem(cfg.sampler.buffer_size, num_classes)
        return [("sampler.buffer_size", f"{problem}; set a multiple of {num_classes}")] if problem else []

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.sampler = PersistentSampler(cfg.sampler, image_shape=self.image_shape, num_classes=self.num_classes,
                                         stats=self.stats, device=self.device, generator=self.generator)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def apply_remedy(self, remedy: str) -> str:
        if remedy == "more_sgld_steps":
            return f"{remedy}: {self.sampler.more_steps()}"
        return super().apply_remedy(remedy)

    def samples(self) -> Tensor | None:
        return self.sampler.samples()


class JemParams(Strict):
    p_x: float = Field(1.0, ge=0.0, description="weight of the p(x) contrastive term")
    p_y_given_x: float = Field(1.0, ge=0.0, description="weight of CE on the labelled batch")
    px_forward: Literal["after_sampling", "before_sampling"] = Field(
        "after_sampling", description="when x_px updates BatchNorm statistics (module docstring)")


class JEM(SamplerMethod):
    """JEM objective (Grathwohl et al. 2020): p(x) contrastive divergence + CE."""

    Params = JemParams
    needs_px_stream = True

    def prepare(self, model, batch: Batch, *, epoch: int) -> dict[str, Tensor]:
        if batch.x_px is None:
            raise ValueError(f"method '{self.name}' needs batch.x_px, the p(x) stream (needs_px_stream is true)")
        n = batch.x_px.shape[0]
        if self.params.px_forward == "before_sampling":
            with torch.no_grad():
                model(batch.x_px)  # the reference's first forward: its BN statistics update, before sampling
        return {"x": batch.x, "y": batch.y, "x_px": batch.x_px, "x_sgld": self.sampler.sample(model, n)}

    def px_terms(self, model, prepared: dict[str, Tensor], x: Tensor | None = None):
        """E(x_px), E(x_sgld), their contrast, and the logits of `x` if given. Forward order x_px, x_sgld, x
        (BatchNorm sees them so); a model without batch statistics takes them in one forward (`forward_each`)."""
        xs = (prepared["x_px"], prepared["x_sgld"]) + (() if x is None else (x,))
        if self.params.px_forward == "before_sampling":
            with frozen_bn_stats(model):  # statistics already updated by prepare()
                out = [model(xs[0])]
            out += forward_each(model, *xs[1:])
        else:
            out = forward_each(model, *xs)
        e_data, e_sgld = marginal_energy(out[0]), marginal_energy(out[1])
        return e_data, e_sgld, px_contrast(e_data, e_sgld), (out[2] if x is not None else None)

    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        y = prepared["y"]
        e_data, e_sgld, px, logits = self.px_terms(model, prepared, prepared["x"])
        ce = cross_entropy(logits, y).mean()
        loss = self.params.p_x * px + self.params.p_y_given_x * ce
        log = energies(y, clean=logits) | {"E_x/px": e_data.detach(), "E_x/sgld": e_sgld.detach()}
        return output(loss, {"px": px, "ce": ce}, log)


class JEMPP(JEM):
    """JEM++ (Yang & Ji 2021): the JEM objective with the PYLD sampler and informative init (config)."""


class SADAJEM(JEM):
    """SADA-JEM (Yang et al. 2023): the JEM objective, noise-free SGLD from a Gaussian-mixture buffer,
    un-augmented p(x) stream; the SAM optimiser calls loss() twice on the same prepared inputs."""
