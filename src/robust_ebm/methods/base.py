"""The interface every training method implements, and the few pieces several methods share.

A method turns a batch into a scalar loss in two steps:

    prepared = method.prepare(model, batch, epoch=e)   # attacks, SGLD samples: no parameter gradient
    out = method.loss(model, prepared, epoch=e)        # differentiable in θ, pure given `prepared`

so that SAM (SADA-JEM) can call `loss` twice on the same inputs. `loss` runs the model in whatever
mode the training loop chose (train); attacks and samplers switch modes themselves and restore them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor, nn

from .. import attacks
from ..energy import joint_energy, marginal_energy
from ..schema_types import Strict


@dataclass
class Batch:
    x: Tensor                    # labelled images in [0,1], augmented (+ input noise if configured)
    y: Tensor
    x_px: Tensor | None = None   # second stream for the p(x) term (methods with needs_px_stream)


@dataclass
class LossOutput:
    loss: Tensor                 # scalar, differentiable w.r.t. the model parameters
    terms: dict[str, float]      # detached components for logging (e.g. "ce", "kl", "px")
    energies: dict[str, Tensor]  # detached per-sample energies, keys like "E_x/clean", "E_xy/adv", "E_x/sgld"


class NoParams(Strict):
    """This method has no settings of its own."""


def parse_params(schema: type[Strict], params, name: str) -> Strict:
    """Validate a method's `params:` block; errors name the unknown key and the allowed keys."""
    if isinstance(params, schema):
        return params
    if isinstance(params, BaseModel):
        params = params.model_dump()
    try:
        return schema.model_validate(params or {})
    except ValidationError as err:
        allowed = ", ".join(sorted(schema.model_fields)) or "(none)"
        problems = []
        for e in err.errors():
            key = ".".join(str(part) for part in e["loc"])
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            else:
                problems.append(f"'{key}': {e['msg']}")
        raise ValueError(f"method '{name}' params: {'; '.join(problems)}. Allowed keys: {allowed}") from None


class Method(ABC):
    """Base class: one subclass per training method (see the module docstring for the protocol).

    What a method needs from its `MethodConfig` is declared by class attributes and checked by
    `config_problems` (and, per data set, `dataset_problems`) when params.yaml loads (config.py), so
    `robust-ebm check` rejects every setting that building the method would reject; `__init__` runs
    the same checks.
    """

    Params: type[Strict] = NoParams
    needs_px_stream: bool = False
    attack_objectives: tuple[str, ...] = ()  # non-empty: cfg.attack is required, with one of these objectives
    no_attack_hint: str = "remove the attack block"  # empty attack_objectives: the method takes no attack
    needs_sampler: bool = False              # True: cfg.sampler is required (energy sampler_energy); else forbidden
    sampler_energy: str = "marginal"

    @classmethod
    def config_problems(cls, cfg) -> list[tuple[str, str]]:
        """(key under methods.<name>, what is wrong and how to fix it) for every setting this method cannot run with."""
        name, problems = cfg.loss, []
        try:
            parse_params(cls.Params, cfg.params, name)
        except ValueError as err:
            problems.append(("params", str(err)))
        if cls.attack_objectives:
            allowed = " or ".join(cls.attack_objectives)
            if cfg.attack is None:
                problems.append(("attack", f"loss '{name}' needs an attack block with objective {allowed}; add one"))
            elif cfg.attack.objective not in cls.attack_objectives:
                problems.append(("attack.objective", f"loss '{name}' needs objective {allowed}, "
                                 f"got '{cfg.attack.objective}'"))
        elif cfg.attack is not None:
            problems.append(("attack", f"loss '{name}' takes no attack; {cls.no_attack_hint}"))
        if cls.needs_sampler:
            if cfg.sampler is None:
                problems.append(("sampler", f"loss '{name}' needs a sampler block (SGLD/PYLD on E(x)); add one"))
            elif cfg.sampler.energy != cls.sampler_energy:
                problems.append(("sampler.energy", f"loss '{name}' samples with energy '{cls.sampler_energy}', "
                                 f"got '{cfg.sampler.energy}'; set sampler.energy: {cls.sampler_energy}"))
        else:
            if cfg.sampler is not None:
                problems.append(("sampler", f"loss '{name}' takes no sampler; remove the sampler block"))
            if getattr(getattr(cfg, "guard", None), "remedy", None) == "more_sgld_steps":
                problems.append(("guard.remedy", f"'more_sgld_steps' needs a sampler, which loss '{name}' has not; "
                                 "use lr_decay or reseed"))
        if not cls.needs_px_stream:
            for key in ("px_batch_size", "px_augment", "px_noise_std"):
                if getattr(getattr(cfg, "data", None), key, None) is not None:
                    problems.append((f"data.{key}", f"loss '{name}' has no p(x) stream, so {key} would be ignored; "
                                     "remove it"))
        return problems

    @classmethod
    def dataset_problems(cls, cfg, num_classes: int) -> list[tuple[str, str]]:
        """(key, problem) for every setting this method cannot run with on a data set of `num_classes` classes."""
        return []

    @classmethod
    def check_config(cls, cfg, num_classes: int | None = None) -> None:
        """`config_problems` (and `dataset_problems` given `num_classes`) as one ValueError (for configs built
        outside load_params, e.g. bench, tests)."""
        problems = cls.config_problems(cfg) + (cls.dataset_problems(cfg, num_classes) if num_classes is not None else [])
        if problems:
            raise ValueError(f"method '{cfg.loss}': " + "; ".join(f"{key}: {text}" for key, text in problems))

    def __init__(self, cfg, *, num_classes: int, image_shape: tuple[int, int, int], stats=None,
                 device, generator: torch.Generator):
        self.check_config(cfg, num_classes)
        self.cfg = cfg
        self.name = cfg.loss
        self.params = parse_params(self.Params, cfg.params, self.name)
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.stats = stats
        self.device = torch.device(device)
        self.generator = generator

    @abstractmethod
    def prepare(self, model, batch: Batch, *, epoch: int) -> dict[str, Tensor]:
        """Everything that needs no parameter gradient: attacks, SGLD samples. Returns the inputs of loss()."""

    @abstractmethod
    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        """Pure in θ given `prepared`; SAM calls it twice on the same prepared inputs."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"method '{self.name}' keeps no state but the checkpoint holds {sorted(state)}")

    def apply_remedy(self, remedy: str) -> str:
        """Divergence-guard hook (GuardConfig.remedy). Only 'more_sgld_steps' concerns a method (it doubles
        the sampler's steps); 'lr_decay' and 'reseed' are the training loop's. Returns what changed."""
        return f"{remedy}: nothing to change in method '{self.name}'"

    def samples(self) -> Tensor | None:
        return None

    def attack(self, model, x: Tensor, y: Tensor) -> Tensor:
        """x_adv from cfg.attack (detached, in [0,1]).

        With input noise (data.noise_std > 0) x may leave [0,1] by a few σ; the attack starts from
        the clipped image, as every adversarial image must be a valid image.
        """
        if getattr(getattr(self.cfg, "data", None), "noise_std", 0.0):
            x = x.clamp(0.0, 1.0)
        return attacks.perturb(model, x, y, self.cfg.attack, generator=self.generator)


class AdversarialMethod(Method):
    """Methods whose only preparation is one attack on the labelled batch."""

    def prepare(self, model, batch: Batch, *, epoch: int) -> dict[str, Tensor]:
        return {"x": batch.x, "y": batch.y, "x_adv": self.attack(model, batch.x, batch.y)}


def released_kl(logits_nat: Tensor, logits_adv: Tensor) -> Tensor:
    """Per-sample Σ_k p_k (log p_k − log(q_k + 1e-12)), p = softmax(f(x)), q = softmax(f(x_adv)): the KL as the
    MART and WEAT codes compute it (nn.KLDivLoss on torch.log(q + 1e-12); mart.py:55, WEAT_loss.py:89,140).
    Equal to `energy.kl_divergence` up to the 1e-12, which matters once some q_k is tiny."""
    log_p = logits_nat.log_softmax(dim=1)
    return (log_p.exp() * (log_p - torch.log(logits_adv.softmax(dim=1) + 1e-12))).sum(dim=1)


def per_sample(model: nn.Module) -> bool:
    """True when a forward treats every image on its own: no BatchNorm in training mode (batch statistics,
    running-statistics updates) and no active dropout (its mask is one draw per call)."""
    for m in model.modules():
        if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            if not isinstance(m, nn.modules.dropout._DropoutNd) or m.p > 0:
                return False
    return True


def forward_each(model: nn.Module, *xs: Tensor) -> tuple[Tensor, ...]:
    """model(x) for each x: one forward of the concatenated batch when `per_sample(model)` (same logits up to
    rounding, larger convolutions), else one forward per x in the given order (BatchNorm sees each batch alone)."""
    if len(xs) > 1 and per_sample(model):
        return torch.split(model(torch.cat(xs)), [len(x) for x in xs])
    return tuple(model(x) for x in xs)


def energies(y: Tensor | None = None, **logits: Tensor) -> dict[str, Tensor]:
    """Detached per-sample energies for the dynamics log: E_x/<tag> (and E_xy/<tag> when y is given)."""
    out = {}
    for tag, lg in logits.items():
        lg = lg.detach()
        out[f"E_x/{tag}"] = marginal_energy(lg)
        if y is not None:
            out[f"E_xy/{tag}"] = joint_energy(lg, y)
    return out


def output(loss: Tensor, terms: dict[str, Tensor], energy_log: dict[str, Tensor]) -> LossOutput:
    """Pack a LossOutput; the logged terms cross to the host in one transfer."""
    values = torch.stack([t.detach().float().reshape(()) for t in terms.values()]).tolist()
    return LossOutput(loss=loss, terms=dict(zip(terms, values)), energies=energy_log)
