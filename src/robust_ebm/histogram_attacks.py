"""Per-attack adversarial images for the energy histograms of WEAT Fig.2 (papers.md §3.8).

These are **per-component diagnostics, not the headline robustness number**. Each attack runs
on its own, so its accuracy is that of one component; the number of the tables is the
AutoAttack ensemble (`autoattack.run_autoattack`: a point is robust only if every attack of
the ensemble fails on it), which is evaluate's `autoattack` column.

WEAT's notebook (Adversarial ML/Energy_analysis_sec_3.ipynb, compute_attack) runs **torchattacks 3.5.1**
(its robustbench.yml pin), every attack with one shared `steps` (2 in the released config; the
figure's value is not recorded), eps 8/255, alpha 2/255:

    name      implementation                                                WEAT Fig.2 panel (torchattacks call)
    pgd_kl    attacks.perturb, objective 'kl': KL(p(.|x) || p(.|x')), TRADES  TRADES-PGD (TPGD(eps, alpha, steps))
    apgd_ce   pyautoattack APGDAttack(loss='ce')                            APGD (APGD(loss='ce', n_restarts=1, seed=0))
    apgd_t    pyautoattack APGDAttack_targeted (targeted DLR loss)          APGD-T (APGDT(n_restarts=1, n_classes=10))
    apgd_dlr  pyautoattack APGDAttack(loss='dlr')                           APGD-DLR (APGD(loss='dlr'))
    fab       pyautoattack FABAttack_PT(targeted=False), untargeted         FAB (FAB(multi_targeted=False, n_restarts=1))
    square    pyautoattack SquareAttack, 1000 queries (margin loss)         Square (Square(n_queries=1000, loss='margin'))
    cw_l2     `cw_l2`: torchattacks 3.5.1's CW, L2, c 1, kappa 0, Adam lr   CW (CW(c=1, kappa=0, steps, lr=0.01))
              0.01, tanh space, no eps budget (its images are NOT in the
              L∞ ball; the panel says so)
    fab_t     pyautoattack FABAttack_PT(targeted=True), AutoAttack's FAB-T  not a WEAT panel (extra diagnostic)
    cw_linf   attacks.perturb, objective 'cw_margin': PGD on the CW margin  not a WEAT panel (extra diagnostic)
    (the PGD panel is evaluate's `pgd` column, L∞ PGD-20 on CE; torchattacks' PGD has a uniform random start)

torchattacks' APGD/APGDT/FAB/Square are ports of the same auto-attack code as pyautoattack's
classes, which we run. Iterations: APGD and FAB get `apgd_iters`/`fab_iters` (AutoAttack's 100),
the PGD-type attacks and CW get `pgd_steps` (20), since WEAT's single `steps` is not known.

Every attack but cw_l2 is L∞ with budget ε (8/255 pixel units by default) on [0,1] images.

pyautoattack's classes are used as AutoAttack 'standard' configures them for L∞
(pyautoattack 0.2.0, `AutoAttack.__init__` and `_set_version`):
APGD n_iter 100, n_restarts 1, rho 0.75, eot_iter 1; APGD-T the same with 9 target
classes; FAB(-T) n_iter 100, n_restarts 1, 9 target classes for FAB-T (alpha_max 0.1, eta 1.05,
beta 0.9); Square p_init 0.8, 1 restart, resc_schedule False, and 1000 queries as WEAT's
notebook asks (AutoAttack 'standard': 5000). APGD-DLR
is not in 'standard'; it gets APGD-CE's settings ('plus' gives it 5 restarts). The
settings `apgd_iters`, `fab_iters`, `square_queries`, `n_target_classes` and `pgd_steps`
can be lowered (smoke profile); the protocol string then says REDUCED next to the value. A model with
fewer than n_target_classes + 1 classes gets K - 1 targets (also written in the protocol).
The two PGD attacks use `attacks.perturb`: pgd_kl as TRADES does (N(0, 0.001²) start,
since KL has zero gradient at x' = x), cw_linf with a uniform start; both PGD-20, α 2/255.

Conventions, the same for every attack so that the panels compare like with like:
- Only the points the model classifies correctly are attacked (AutoAttack's rule); a
  misclassified point keeps its clean image. Hence a component's accuracy is never
  above the clean accuracy of the same points.
- pyautoattack returns the clean image for a point it fails to break (its `perturb`
  semantics); the PGD attacks return their last iterate. So in the pyautoattack panels
  the robust points sit on their clean energies; evaluate records `fraction_perturbed`.
- pyautoattack seeds torch's global RNG (`torch.random.manual_seed(seed)`) on every
  call; each attack runs inside `torch.random.fork_rng`, so the caller's RNG state is
  left as found, and the same seed gives the same images.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable

import pyautoattack
import torch
from pydantic import Field, field_validator
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack
from torch import Tensor, nn

from .attacks import AttackConfig, describe, perturb
from .runtime import model_mode
from .schema_types import Fraction, Strict

DIAGNOSTIC = ("per-component diagnostic for the energy histograms (WEAT Fig.2), not the headline robustness "
              "number (that is the AutoAttack ensemble, evaluate's 'autoattack' column)")
# name -> panel label: WEAT Fig.2's panels in the figure's order, then extra diagnostics
LABELS = {
    "pgd_kl": "TRADES (KL)",
    "apgd_ce": "APGD-CE",
    "apgd_t": "APGD-T",
    "apgd_dlr": "APGD-DLR",
    "fab": "FAB (untargeted)",
    "square": "Square",
    "cw_l2": "CW-L2 (unbounded)",
    "fab_t": "FAB-T (not in WEAT Fig.2)",
    "cw_linf": "CW-Linf margin PGD (not in WEAT Fig.2)",
}
NAMES = tuple(LABELS)
WEAT_FIG2 = ("pgd_kl", "apgd_ce", "apgd_t", "apgd_dlr", "fab", "square", "cw_l2")  # after evaluate's PGD column
# The reference settings the config may lower: WEAT's notebook for Square (1000 queries), else AutoAttack
# 'standard' (L∞) and PGD-20 (papers.md §3.2, §3.8)
STANDARD = {"apgd_iters": 100, "fab_iters": 100, "square_queries": 1000, "n_target_classes": 9, "pgd_steps": 20}
_AA_LOGGER = logging.getLogger("auto-attack")


class HistogramAttacksConfig(Strict):
    """evaluation.histogram_attacks: per-attack energies for WEAT Fig.2 (a diagnostic; see the module docstring)."""

    n_examples: int = Field(1000, ge=1, description="the first n evaluated test images")
    attacks: list[str] = Field(default_factory=lambda: list(WEAT_FIG2), min_length=1, description=f"any of {list(NAMES)}")
    eps: Fraction = Field(8 / 255, gt=0.0, le=1.0, description="L∞ budget, pixel units")
    step: Fraction = Field(2 / 255, gt=0.0, description="PGD step of pgd_kl and cw_linf, pixel units")
    pgd_steps: int = Field(STANDARD["pgd_steps"], ge=1, description="iterations of pgd_kl, cw_linf and cw_l2 (20)")
    apgd_iters: int = Field(STANDARD["apgd_iters"], ge=1, description="APGD n_iter (AutoAttack: 100)")
    apgd_restarts: int = Field(1, ge=1, description="APGD-CE/-DLR n_restarts (AutoAttack standard: 1)")
    fab_iters: int = Field(STANDARD["fab_iters"], ge=1, description="FAB n_iter (AutoAttack: 100)")
    square_queries: int = Field(STANDARD["square_queries"], ge=1, description="Square n_queries (WEAT's notebook: 1000; "
                                "AutoAttack standard: 5000)")
    n_target_classes: int = Field(STANDARD["n_target_classes"], ge=1, description="APGD-T / FAB-T targets (AutoAttack: 9)")
    seed: int = 0

    @field_validator("attacks")
    @classmethod
    def _check_names(cls, attacks):
        unknown = [a for a in attacks if a not in LABELS]
        if unknown:
            raise ValueError(f"unknown attack(s) {unknown}; valid names: {', '.join(NAMES)}")
        if len(set(attacks)) != len(attacks):
            raise ValueError(f"attacks are listed more than once: {attacks}")
        return attacks


class ComponentUnavailable(ValueError):
    """The attack cannot run on this model (too few classes); evaluate records it as skipped."""


@dataclass(frozen=True)
class Component:
    """A ready attack: `perturb(x, y)` on one batch on the model's device, and what exactly it runs."""

    perturb: Callable[[Tensor, Tensor], Tensor]
    protocol: str
    objective: str
    steps: int          # iterations (queries for Square)
    step: float | None  # fixed PGD step in pixel units; None for the adaptive pyautoattack attacks
    impl: object        # the pyautoattack attack object, or the AttackConfig of attacks.perturb
    bounded: bool = True  # inside the L∞ eps-ball (evaluate checks it); False for cw_l2


def _setting(key: str, value: int) -> str:
    """'100', or '10 (REDUCED from the standard 100)' when the config departs from the STANDARD setting."""
    standard = STANDARD[key]
    if value == standard:
        return f"{value}"
    return f"{value} ({'REDUCED from' if value < standard else 'more than'} the standard {standard})"


def _targets(cfg: HistogramAttacksConfig, num_classes: int) -> tuple[int, str]:
    """min(n_target_classes, K - 1) target classes, and how the protocol writes it."""
    n = min(cfg.n_target_classes, num_classes - 1)
    text = _setting("n_target_classes", cfg.n_target_classes)
    return n, text if n == cfg.n_target_classes else f"{n} (all other classes of {num_classes}; config {text})"


def _pyautoattack(what: str, cfg: HistogramAttacksConfig) -> str:
    return f"pyautoattack {pyautoattack.__version__} {what}, Linf, eps {cfg.eps * 255:.4g}/255 pixel units, seed {cfg.seed}"


# ----------------------------------------------------------------------------- the attacks

def _pgd(model, cfg, device, objective, random_start) -> tuple[Callable, AttackConfig]:
    """L∞ PGD-`pgd_steps` on `objective` (attacks.perturb), ε `eps`, α `step`, its own seeded generator.

    The start is clipped to [0,1] before the first gradient, as torchattacks 3.5.1 (WEAT's Fig.2 notebook)
    does in TPGD (tpgd.py:46-47) and PGD (pgd.py:56-59); TRADES' own training attack does not clip it.
    """
    attack = AttackConfig(norm="linf", eps=cfg.eps, step=cfg.step, steps=cfg.pgd_steps, random_start=random_start,
                          start_std=0.001, objective=objective)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return (lambda x, y: perturb(model, x, y, attack, generator=generator)), attack


def _pgd_kl(model, cfg, num_classes, device) -> Component:
    fn, attack = _pgd(model, cfg, device, "kl", "normal")
    protocol = (f"TRADES KL attack (robust_ebm.attacks.perturb, as TRADES's trades_loss): {describe(attack)}, "
                f"steps {_setting('pgd_steps', cfg.pgd_steps)}")
    return Component(fn, protocol, "kl", cfg.pgd_steps, cfg.step, attack)


def _cw_linf(model, cfg, num_classes, device) -> Component:
    fn, attack = _pgd(model, cfg, device, "cw_margin", "uniform")
    protocol = (f"CW-Linf = L-inf PGD on the Carlini-Wagner margin max_(j!=y) f_j - f_y (robust_ebm.attacks.perturb, "
                f"the 'CW-inf' of Madry/TRADES-style evaluations): {describe(attack)}, "
                f"steps {_setting('pgd_steps', cfg.pgd_steps)}. NOT ART's CarliniLInfMethod that WEAT's "
                "CW_test.py calls (papers.md §3.4)")
    return Component(fn, protocol, "cw_margin", cfg.pgd_steps, cfg.step, attack)


def cw_l2(model: nn.Module, x: Tensor, y: Tensor, *, c: float = 1.0, kappa: float = 0.0, steps: int = 50,
          lr: float = 0.01) -> Tensor:
    """Untargeted Carlini-Wagner L2 as torchattacks 3.5.1's `CW.forward` (WEAT's pin), no eps budget:

        x' = (tanh(w) + 1) / 2, w0 = atanh(clamp(2x - 1, -1, 1)); Adam(lr) on
        sum_i ||x'_i - x_i||^2 + c * sum_i max(max(onehot_y * f) - max((1 - onehot_y) * f), -kappa)
        (torchattacks' f: a max over the masked logits, so a zeroed entry can win when logits are negative);
        keeps, per image, the misclassified iterate of smallest L2 (else the clean image); every
        max(steps // 10, 1) steps it stops when the cost rose since the last check.
    """
    x = x.detach()
    onehot = torch.eye(0 if x.numel() == 0 else int(model(x[:1]).shape[1]), device=x.device, dtype=x.dtype)[y]
    w = (0.5 * torch.log((1 + (x * 2 - 1).clamp(-1, 1)) / (1 - (x * 2 - 1).clamp(-1, 1)))).detach().requires_grad_(True)
    best, best_l2 = x.clone(), torch.full((len(x),), 1e10, device=x.device, dtype=x.dtype)
    optimizer, previous = torch.optim.Adam([w], lr=lr), 1e10
    with torch.enable_grad():
        for step in range(steps):
            adv = (torch.tanh(w) + 1) / 2
            l2 = (adv - x).pow(2).flatten(1).sum(1)
            logits = model(adv)
            real, other = (onehot * logits).max(1).values, ((1 - onehot) * logits).max(1).values
            cost = l2.sum() + c * (real - other).clamp(min=-kappa).sum()
            optimizer.zero_grad()
            cost.backward()
            optimizer.step()
            with torch.no_grad():
                better = (logits.argmax(1) != y) & (best_l2 > l2)
                best_l2, best[better] = torch.where(better, l2, best_l2), adv[better]
            if step % max(steps // 10, 1) == 0:
                if cost.item() > previous:
                    return best
                previous = cost.item()
    return best


def _cw_l2(model, cfg, num_classes, device) -> Component:
    protocol = (f"CW-L2 as torchattacks 3.5.1 CW(c=1, kappa=0, steps={_setting('pgd_steps', cfg.pgd_steps)}, lr=0.01), "
                "untargeted, the attack WEAT's notebook runs for its CW panel (histogram_attacks.cw_l2); minimum-L2, "
                "NO eps budget: its images may leave the L-inf ball")
    return Component(lambda x, y: cw_l2(model, x, y, steps=cfg.pgd_steps), protocol, "cw (L2, c 1)", cfg.pgd_steps,
                     0.01, "torchattacks-3.5.1 CW", bounded=False)


def _apgd(loss: str):
    """Builder of APGD on `loss` ('ce' or 'dlr'), with the settings AutoAttack 'standard' gives APGD-CE."""

    def build(model, cfg, num_classes, device) -> Component:
        if loss == "dlr" and num_classes < 3:
            raise ComponentUnavailable(f"the DLR loss needs >= 3 classes, the model has {num_classes}")
        attack = APGDAttack(model, n_iter=cfg.apgd_iters, norm="Linf", n_restarts=cfg.apgd_restarts, eps=cfg.eps,
                            seed=cfg.seed, loss=loss, eot_iter=1, rho=0.75, verbose=False, device=device,
                            logger=_AA_LOGGER)
        as_in = "AutoAttack 'standard' runs APGD-CE" if loss == "ce" else "APGD-CE of AutoAttack 'standard', DLR loss"
        protocol = _pyautoattack(f"APGDAttack(loss='{loss}', n_iter {_setting('apgd_iters', cfg.apgd_iters)}, "
                                 f"n_restarts {cfg.apgd_restarts}, rho 0.75, eot_iter 1) as {as_in}", cfg)
        return Component(attack.perturb, protocol, loss, cfg.apgd_iters, None, attack)
    return build


def _apgd_t(model, cfg, num_classes, device) -> Component:
    if num_classes < 4:
        raise ComponentUnavailable(f"the targeted DLR loss needs >= 4 classes, the model has {num_classes}")
    n_targets, targets = _targets(cfg, num_classes)
    attack = APGDAttack_targeted(model, n_iter=cfg.apgd_iters, norm="Linf", n_restarts=1, eps=cfg.eps, seed=cfg.seed,
                                 eot_iter=1, rho=0.75, n_target_classes=n_targets, verbose=False, device=device,
                                 logger=_AA_LOGGER)
    protocol = _pyautoattack(f"APGDAttack_targeted(targeted DLR, n_iter {_setting('apgd_iters', cfg.apgd_iters)}, "
                             f"n_restarts 1, n_target_classes {targets}, rho 0.75, eot_iter 1) as AutoAttack 'standard' "
                             "runs APGD-T", cfg)
    return Component(attack.perturb, protocol, "dlr-targeted", cfg.apgd_iters, None, attack)


def _fab_t(model, cfg, num_classes, device) -> Component:
    n_targets, targets = _targets(cfg, num_classes)
    attack = FABAttack_PT(model, norm="Linf", n_restarts=1, n_iter=cfg.fab_iters, eps=cfg.eps, seed=cfg.seed,
                          targeted=True, n_target_classes=n_targets, verbose=False, device=device)
    protocol = _pyautoattack(f"FABAttack_PT(targeted, n_iter {_setting('fab_iters', cfg.fab_iters)}, n_restarts 1, "
                             f"n_target_classes {targets}, alpha_max 0.1, eta 1.05, beta 0.9) as AutoAttack 'standard' "
                             "runs FAB-T; a point counts as broken only within eps", cfg)
    return Component(attack.perturb, protocol, "fab-targeted (minimum norm)", cfg.fab_iters, None, attack)


def _fab(model, cfg, num_classes, device) -> Component:
    attack = FABAttack_PT(model, norm="Linf", n_restarts=1, n_iter=cfg.fab_iters, eps=cfg.eps, seed=cfg.seed,
                          targeted=False, verbose=False, device=device)
    protocol = _pyautoattack(f"FABAttack_PT(untargeted, n_iter {_setting('fab_iters', cfg.fab_iters)}, n_restarts 1, "
                             "alpha_max 0.1, eta 1.05, beta 0.9) as WEAT's notebook runs torchattacks.FAB("
                             "multi_targeted=False); a point counts as broken only within eps", cfg)
    return Component(attack.perturb, protocol, "fab (minimum norm, untargeted)", cfg.fab_iters, None, attack)


def _square(model, cfg, num_classes, device) -> Component:
    attack = SquareAttack(model, norm="Linf", n_queries=cfg.square_queries, eps=cfg.eps, p_init=0.8, n_restarts=1,
                          seed=cfg.seed, verbose=False, loss="margin", resc_schedule=False, device=device)
    protocol = _pyautoattack(f"SquareAttack(margin loss, n_queries {_setting('square_queries', cfg.square_queries)}, "
                             "p_init 0.8, n_restarts 1, resc_schedule False); WEAT's notebook: 1000 queries (AutoAttack "
                             "'standard': 5000)", cfg)
    return Component(attack.perturb, protocol, "margin (score-based)", cfg.square_queries, None, attack)


_BUILDERS = {"pgd_kl": _pgd_kl, "apgd_ce": _apgd("ce"), "apgd_t": _apgd_t, "apgd_dlr": _apgd("dlr"),
             "fab": _fab, "square": _square, "cw_l2": _cw_l2, "fab_t": _fab_t, "cw_linf": _cw_linf}
assert tuple(_BUILDERS) == NAMES


# ----------------------------------------------------------------------------- shared conventions

@contextmanager
def _private_rng(device: torch.device):
    """Run a block with torch's global RNG forked (pyautoattack reseeds it), restored on exit."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


def _attack_correct_only(model: nn.Module, attack: Callable, device: torch.device) -> Callable:
    """x' = attack(x, y) where f(x) is correct, else x (AutoAttack's rule); eval mode, caller's RNG untouched."""

    def run(x: Tensor, y: Tensor) -> Tensor:
        with model_mode(model, "eval"), _private_rng(device):
            with torch.no_grad():
                correct = model(x).argmax(1) == y
            x_adv = attack(x, y).detach().to(x.device)
        return torch.where(correct.view(-1, *[1] * (x.dim() - 1)), x_adv, x)

    return run


def build_component(name: str, model: nn.Module, cfg: HistogramAttacksConfig, *, num_classes: int,
                    device: torch.device) -> Component:
    """The attack `name` of this module on `model`; raises ComponentUnavailable when the model has too few classes."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown attack '{name}'; valid names: {', '.join(NAMES)}")
    if num_classes < 2:
        raise ComponentUnavailable(f"a classifier needs >= 2 classes, the model has {num_classes}")
    comp = _BUILDERS[name](model, cfg, num_classes, device)
    return replace(comp, perturb=_attack_correct_only(model, comp.perturb, device),
                   protocol=f"{DIAGNOSTIC}: {comp.protocol}; only points classified correctly are attacked "
                            "(AutoAttack's rule)")
