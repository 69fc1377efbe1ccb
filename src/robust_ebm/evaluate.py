"""Evaluation stage: clean accuracy, PGD, energy attacks, AutoAttack and EOT on the test split.

Every column is one threat model, always in pixel units on [0,1] images (the
model normalises internally), on the first `n_examples` test images in file
order:

    clean         argmax f(x) = y
    pgd           L∞ PGD-20 on CE, ε 8/255, α 2/255, random start (JEAT Tab.3, WEAT)
    energy_attack the same budget, ascending E(x,y) only (JEAT Tab.1, Eq. 18)
    ebjdat_scale  EB-JDAT's released eval: 8/255 and 1/255 in [-1,1] units,
                  i.e. ε 4/255, α 0.5/255 pixel units (papers.md §3.2), on test images
                  with the model's test-time noise x̂ = clamp(x + σ n, 0, 1) as its eval_*.py
                  (test_noise 'model'; the ball is centred at x̂, see `noisy_attack`)
    autoattack    official AutoAttack on the first `autoattack.n_examples`
    eot           for models with test-time noise σ (meta["noise_std"] > 0):
                  PGD on E_s[CE(f(x + σ n_s), y)] and decision argmax E_s[softmax f(x + σ n_s)]

Clean, PGD and AutoAttack columns use the deterministic model (no test-time
noise, papers.md §3.1 [R]); the noise lives only in the EOT column and, as in
EB-JDAT's code, in the ebjdat_scale column.

Per-attack energies for WEAT Fig.2 (papers.md §3.8), when `evaluation.histogram_attacks`
is set: each attack of its list runs alone on the first `histogram_attacks.n_examples`
test images, L∞ ε 8/255 (`histogram_attacks.py`):

    pgd_kl    PGD-20 on KL(p(.|x) || p(.|x')) (TRADES)        attacks.perturb
    apgd_ce   APGD on CE                                      pyautoattack APGDAttack
    apgd_t    APGD on the targeted DLR loss, 9 targets        pyautoattack APGDAttack_targeted
    apgd_dlr  APGD on DLR                                     pyautoattack APGDAttack
    fab       untargeted FAB (WEAT's notebook)                pyautoattack FABAttack_PT
    square    Square, 1000 queries (WEAT's notebook)          pyautoattack SquareAttack
    cw_l2     CW-L2, c 1, Adam lr 0.01, NO eps budget          histogram_attacks.cw_l2 (torchattacks 3.5.1's CW)
    fab_t     targeted FAB, 9 targets (extra, not WEAT's)     pyautoattack FABAttack_PT
    cw_linf   PGD-20 on the CW margin (extra, not WEAT's)     attacks.perturb

These are per-component DIAGNOSTICS, not a headline number (the ensemble is the
`autoattack` column), so they sit under "histogram_attacks" in the JSON, not in
"columns": one entry each with the column keys plus clean_accuracy (same points),
fraction_perturbed, max_perturbation_linf and seconds; status "diagnostic", or
"skipped: <reason>" when the model has too few classes (APGD-DLR needs 3, APGD-T 4).
Only the points classified correctly are attacked, so accuracy <= clean_accuracy.

Outputs (paths: plan.PATTERNS "eval", "eval_energies"): `<out>.json` (one entry per column with n, accuracy, eps_pixel,
step_pixel, steps, objective, protocol, status, seconds; "histogram_attacks" as above) and
`<out>.energies.npz` (format: robust_ebm.energies_file) with per-example `labels`, `<name>_marginal` = E(x),
`<name>_joint` = E(x,y) and `<name>_correct` for clean, every column that returns
its adversarial images, and every histogram attack that ran (the energy histograms
and gaps of papers.md §3.8). A column or attack on the first n images has arrays
of length n, aligned with the first n entries of `clean_*` and `labels`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import energies_file, plan
from .attacks import AttackConfig, describe, perturb
from .autoattack import run_autoattack
from .data import load_prepared
from .histogram_attacks import DIAGNOSTIC as HIST_DIAGNOSTIC
from .histogram_attacks import ComponentUnavailable, build_component
from .inference import evaluate_inputs
from .model_sources import is_model_available
from .models import load_for_run
from .runtime import atomic_write_json, note_fallback, pick_device, seed_everything

log = logging.getLogger(__name__)
DETERMINISTIC = "not applicable: deterministic model"
# how the model was read (models.load_for_run's meta): foreign architecture, key layout, input normalisation
MODEL_SOURCE_KEYS = ("source", "arch", "reference_layout", "pickled", "input_normalization")
ENTRY_KEYS = ("n", "accuracy", "eps_pixel", "step_pixel", "steps", "objective", "protocol", "status")


# ----------------------------------------------------------------------------- EOT


class ExpectedLogSoftmax(nn.Module):
    """g(x) = (1/S) Σ_s log softmax f(x + σ n_s), n_s ~ N(0, I), drawn afresh each call.

    Then E(x,y) of g, -g[y], is E_s[CE(f(x + σ n_s), y)], so ascending the joint
    energy of g is EOT-PGD on cross-entropy: its gradient is the mean over draws
    of the per-draw gradients (Athalye et al. 2018).
    """

    def __init__(self, model: nn.Module, noise_std: float, samples: int, generator: torch.Generator):
        super().__init__()
        self.model, self.noise_std, self.samples, self.generator = model, noise_std, samples, generator

    def noisy_logits(self, x: Tensor) -> Tensor:
        """f(x + σ n_s) for every draw: (S, B, K)."""
        xs = x.unsqueeze(0).expand(self.samples, *x.shape)
        noise = torch.randn(xs.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return self.model((xs + self.noise_std * noise).flatten(0, 1)).view(self.samples, x.shape[0], -1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.log_softmax(self.noisy_logits(x), dim=2).mean(0)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The expected decision: argmax_k E_s[softmax f(x + σ n_s)][k]."""
        return torch.softmax(self.noisy_logits(x), dim=2).mean(0).argmax(1)


# ----------------------------------------------------------------------------- passes over the data


def _device_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def describe_attack(name: str, cfg: AttackConfig) -> str:
    """`attacks.describe(cfg)`, prefixed with what the column stands for."""
    text = describe(cfg)
    if name == "energy_attack":
        return f"JEAT Tab.1 energy attack (ascend E(x,y) only): {text}"
    if name == "ebjdat_scale":
        return f"ebjdat_scale: {2 * cfg.eps * 255:.4g}/255 in [-1,1] units (EB-JDAT eval code): {text}"
    return text


def _entry(n: int, accuracy: float | None, cfg: AttackConfig | None, protocol: str, status: str = "ok", **extra) -> dict:
    entry = {
        "n": n,
        "accuracy": accuracy,
        "eps_pixel": cfg.eps if cfg else 0.0,
        "step_pixel": cfg.step if cfg else 0.0,
        "steps": cfg.steps if cfg else 0,
        "objective": cfg.objective if cfg else "none",
        "protocol": protocol,
        "status": status,
    }
    entry.update(extra)
    return entry


def noisy_attack(model, cfg: AttackConfig, noise_std: float, *, attack_generator: torch.Generator,
                 noise_generator: torch.Generator, moves: list[Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """EB-JDAT's eval (eval_jem.py:418-455): PGD from the noisy test image x̂ = x + σ n, n ~ N(0, I).

    The code keeps x̂ unclamped as the centre of its ε-ball (adversarial images clamped to the range);
    here x̂ is clamped to [0,1] first, as every attack of this project starts from a valid image, so
    at pixels that the noise pushed out of range our ball reaches ε into the range, theirs ε minus the
    overshoot. `moves` collects max |x' - x̂| per image (the budget holds around x̂, not x).
    """
    def attack(xb: Tensor, yb: Tensor) -> Tensor:
        noise = torch.randn(xb.shape, generator=noise_generator, device=noise_generator.device, dtype=xb.dtype)
        centre = (xb + noise_std * noise.to(xb.device)).clamp(0.0, 1.0)
        xa = perturb(model, centre, yb, cfg, generator=attack_generator)
        moves.append((xa - centre).abs().flatten(1).amax(1).cpu())
        return xa
    return attack


def _check_linf(name: str, eps: float, linf: Tensor) -> float:
    """Lesson 1 of anchors.md: a number is void if the attack left its ε-ball; fail loudly. Returns max |x' - x|."""
    worst = float(linf.max()) if len(linf) else 0.0
    if worst > eps + 1e-5:
        raise RuntimeError(f"attack '{name}' moved a pixel by {worst:.6f} > eps {eps:.6f}; the attack is broken")
    return worst


def _check_budget(name: str, cfg: AttackConfig, linf: Tensor) -> float:
    """`_check_linf` for an AttackConfig (L∞ and projected; otherwise only reports the largest move)."""
    if cfg.project and cfg.norm == "linf":
        return _check_linf(name, cfg.eps, linf)
    return float(linf.max()) if len(linf) else 0.0


def _keep(energies: dict[str, np.ndarray], name: str, res: dict[str, Tensor]) -> float:
    """Store the energies and decisions of set `name` for the npz (energies_file.entries); return the accuracy."""
    energies.update(energies_file.entries(name, res["marginal"], res["joint"], correct=res["correct"]))
    return float(res["correct"].float().mean()) if len(res["correct"]) else float("nan")


# ----------------------------------------------------------------------------- the stage


def _load_test(run, data_dir, n_examples: int | None) -> tuple[Tensor, Tensor]:
    splits, _ = load_prepared(data_dir)
    images, labels = splits.test.images, splits.test.labels
    if n_examples is not None:
        if n_examples > len(labels):
            raise ValueError(
                f"evaluation.n_examples={n_examples} but the test split of {data_dir} has only {len(labels)} "
                f"images; lower evaluation.n_examples or set it to null for the whole split"
            )
        images, labels = images[:n_examples], labels[:n_examples]
    return images.float().div(255.0), labels.long()


def _check_model_fits(model, x: Tensor, y: Tensor, model_path) -> None:
    shape = (getattr(model, "in_channels", x.shape[1]), getattr(model, "image_size", x.shape[2]))
    if shape != (x.shape[1], x.shape[2]):
        raise ValueError(
            f"model {model_path} expects {shape[0]}x{shape[1]}x{shape[1]} images but the test split holds "
            f"{x.shape[1]}x{x.shape[2]}x{x.shape[3]}; evaluate it on the data set it was trained for"
        )
    k = getattr(model, "num_classes", None)
    if k is not None and len(y) and int(y.max()) >= k:
        raise ValueError(f"model {model_path} has {k} classes but the test labels reach {int(y.max())}")


def evaluate_stage(run, data_dir, model_path, out_path, tracker=None, source=None) -> dict:
    """Evaluate one checkpoint (any file `models.load_for_run` reads with `source`, the --arch etc. options;
    or 'robustbench:NAME') and write `out_path` JSON + energies npz."""
    model_path, out_path = Path(model_path), Path(out_path)
    if not is_model_available(model_path):
        raise FileNotFoundError(f"no checkpoint at {model_path}; train first or pass --model with a load_classifier-compatible file")
    if out_path.suffix != ".json":
        raise ValueError(f"--out must end in .json (got {out_path}); the energies go beside it as <name>.energies.npz")
    ev = run.evaluation
    t0 = time.time()
    fallbacks: list[str] = []
    device = pick_device(run.device, fallbacks)
    seed_everything(run.seed)
    model, meta = load_for_run(run, model_path, device, source=source)
    x, y = _load_test(run, data_dir, ev.n_examples)
    _check_model_fits(model, x, y, model_path)
    noise_std = float(meta.get("noise_std", 0.0) or 0.0)

    columns: dict[str, dict] = {}
    energies: dict[str, np.ndarray] = {"labels": y.numpy()}

    t_clean = time.time()
    clean = evaluate_inputs(model, x, y, batch_size=ev.batch_size, device=device, desc="clean")
    columns["clean"] = {**_entry(len(y), _keep(energies, "clean", clean), None,
                                 "clean test images, deterministic model (no test-time noise)"),
                        "seconds": round(time.time() - t_clean, 3)}

    for i, name in enumerate(("pgd", "energy_attack")):
        cfg: AttackConfig = getattr(ev, name)
        gen = _device_generator(run.seed + 1000 * (i + 1), device)
        attack = lambda xb, yb, cfg=cfg, gen=gen: perturb(model, xb, yb, cfg, generator=gen)  # noqa: E731
        columns[name] = _timed(lambda name=name, cfg=cfg, attack=attack: _attack_column(
            name, model, x, y, cfg, attack, ev.batch_size, device, energies))
    columns["ebjdat_scale"] = _timed(lambda: _ebjdat_scale_column(model, x, y, ev, noise_std, run.seed, device, energies))
    columns["autoattack"] = _timed(lambda: _autoattack_column(model, x, y, ev, device, energies, fallbacks))
    columns["eot"] = _timed(lambda: _eot_column(model, x, y, ev, noise_std, run.seed, device, energies))
    diagnostics = _histogram_attacks(model, x, y, clean["correct"], ev, device, energies, fallbacks)

    energies_path = energies_file.write(plan.beside(out_path, "eval", "eval_energies"), energies)
    result = {
        "model_path": str(model_path),
        "model_source": {k: meta[k] for k in MODEL_SOURCE_KEYS if k in meta},
        "method": getattr(run, "method_name", None),
        "seed": run.seed,
        "n_examples": len(y),
        "test_noise_std": noise_std,
        "device": str(device),
        "columns": columns,
        **({"histogram_attacks": diagnostics} if diagnostics is not None else {}),
        "energies_file": energies_path.name,
        "seconds": round(time.time() - t0, 3),
        "fallbacks": fallbacks,
    }
    atomic_write_json(out_path, result)
    if tracker is not None:  # the caller logs `result` and the JSON; the energies go beside them
        tracker.log_artifact(energies_path, artifact_path="evaluate")
    return result


def _timed(column: Callable[[], dict]) -> dict:
    """The entry `column()` returns, with the seconds it took (a column's cost, for the profile in docs/)."""
    t0 = time.time()
    return {**column(), "seconds": round(time.time() - t0, 3)}


def _attack_column(name, model, x, y, cfg: AttackConfig, attack, batch_size, device, energies) -> dict:
    """One white-box attack column (pgd, energy_attack) on the deterministic model."""
    res = evaluate_inputs(model, x, y, batch_size=batch_size, device=device, transform=attack, desc=name)
    return _entry(len(y), _keep(energies, name, res), cfg, describe_attack(name, cfg),
                  max_perturbation_linf=_check_budget(name, cfg, res["linf"]))


def _ebjdat_scale_column(model, x, y, ev, noise_std, seed, device, energies) -> dict:
    """EB-JDAT's PGD (half our pixel budget) on test images with the model's test-time noise (test_noise)."""
    cfg = ev.ebjdat_scale
    sigma = noise_std if cfg.test_noise == "model" else 0.0
    moves: list[Tensor] = []
    attack = noisy_attack(model, cfg, sigma, attack_generator=_device_generator(seed + 3000, device),
                          noise_generator=_device_generator(seed + 3001, device), moves=moves)
    res = evaluate_inputs(model, x, y, batch_size=ev.batch_size, device=device, transform=attack, desc="ebjdat_scale")
    noise = (f"test images + N(0, {sigma:g}^2) noise (pixel units; the model's test-time noise as in EB-JDAT's "
             f"eval_*.py), clamped to [0,1], ball centred there" if sigma > 0 else "clean test images")
    return _entry(len(y), _keep(energies, "ebjdat_scale", res), cfg, f"{describe_attack('ebjdat_scale', cfg)}; {noise}",
                  max_perturbation_linf=_check_budget("ebjdat_scale", cfg, torch.cat(moves) if moves else res["linf"]),
                  test_noise=cfg.test_noise, test_noise_std=sigma)


def _autoattack_column(model, x, y, ev, device, energies, fallbacks=None) -> dict:
    """Official AutoAttack on the first n points (deterministic model, eval mode, pixel-unit eps)."""
    aa = ev.autoattack
    n = len(y) if aa.n_examples is None else min(aa.n_examples, len(y))
    if aa.n_examples is not None and n < aa.n_examples:
        note_fallback(fallbacks, f"AutoAttack on {n} images, {aa.n_examples} requested "
                      "(evaluation.autoattack.n_examples exceeds the evaluated images)")
    out = run_autoattack(model, x[:n], y[:n], eps=aa.eps, norm=aa.norm, version=aa.version,
                         batch_size=aa.batch_size, seed=aa.seed, device=device, return_adv=True)
    res = evaluate_inputs(model, out.pop("x_adv"), y[:n], batch_size=ev.batch_size, device=device, desc="autoattack energies")
    energies.update(energies_file.entries("autoattack", res["marginal"], res["joint"],
                                          correct=np.asarray(out.pop("per_example_robust"), dtype=bool)))
    protocol = (f"official AutoAttack '{aa.version}' (pyautoattack; {', '.join(out['attacks'])}), {aa.norm}, "
                f"eps {aa.eps * 255:.4g}/255 pixel units, first {n} of the {len(y)} evaluated examples, seed {aa.seed}")
    return {"n": n, "accuracy": out["robust_accuracy"], "eps_pixel": aa.eps, "step_pixel": None, "steps": None,
            "objective": "autoattack", "protocol": protocol, "status": "ok",
            "clean_accuracy": out["clean_accuracy"], "flags": out["flags"]}


def _eot_column(model, x, y, ev, noise_std, seed, device, energies) -> dict:
    base = ev.pgd
    if noise_std <= 0:
        return _entry(0, None, base, DETERMINISTIC, DETERMINISTIC)
    samples = ev.eot.samples
    cfg = base.model_copy(update={"objective": "joint_energy"})
    wrapped = ExpectedLogSoftmax(model, noise_std, samples, _device_generator(seed + 7, device))
    protocol = (f"EOT: {describe_attack('eot', base)} on E_s[CE(f(x + sigma n_s), y)] over {samples} noise draws "
                f"(sigma {noise_std:g} pixel units); decision argmax E_s[softmax]")
    clean = evaluate_inputs(model, x, y, batch_size=ev.batch_size, device=device, predict=wrapped.predict, desc="eot clean")
    gen = _device_generator(seed + 8, device)
    attack = lambda xb, yb: perturb(wrapped, xb, yb, cfg, generator=gen)  # noqa: E731
    res = evaluate_inputs(model, x, y, batch_size=ev.batch_size, device=device, transform=attack,
                          predict=wrapped.predict, desc="eot")
    return _entry(len(y), _keep(energies, "eot", res), base, protocol,
                  clean_accuracy=float(clean["correct"].float().mean()), samples=samples, noise_std=noise_std,
                  max_perturbation_linf=_check_budget("eot", base, res["linf"]))


# ----------------------------------------------------------------------------- per-attack energies (WEAT Fig.2)


def _num_classes(model, x: Tensor, device: torch.device) -> int:
    with torch.no_grad():
        return int(model(x[:1].to(device)).shape[1])


def _histogram_attacks(model, x, y, clean_correct: Tensor, ev, device, energies, fallbacks=None) -> dict | None:
    """One diagnostic entry per attack of `evaluation.histogram_attacks` on the first n points (None when off).

    These are per-component diagnostics (histogram_attacks.py), kept out of `columns`
    so that no table or figure mistakes them for the AutoAttack number.
    """
    cfg = ev.histogram_attacks
    if cfg is None:
        return None
    n = min(cfg.n_examples, len(y))
    if n < cfg.n_examples:
        note_fallback(fallbacks, f"histogram attacks on {n} images, {cfg.n_examples} requested "
                      "(evaluation.histogram_attacks.n_examples exceeds the evaluated images)")
    k = _num_classes(model, x, device)
    return {name: _histogram_entry(name, model, x[:n], y[:n], clean_correct[:n], cfg, k, ev.batch_size, device, energies)
            for name in cfg.attacks}


def _histogram_entry(name, model, x, y, clean_correct, cfg, num_classes, batch_size, device, energies) -> dict:
    """Run one attack, store its energies as `<name>_*` in the npz, and describe it (status 'skipped: ...' if it cannot run)."""
    entry = {"n": len(y), "accuracy": None, "eps_pixel": cfg.eps, "step_pixel": None, "steps": None, "objective": name,
             "protocol": f"{HIST_DIAGNOSTIC}: {name}", "status": "diagnostic"}
    try:
        comp = build_component(name, model, cfg, num_classes=num_classes, device=device)
    except ComponentUnavailable as err:
        log.warning("histogram attack '%s' skipped: %s", name, err)
        return {**entry, "n": 0, "status": f"skipped: {err}"}
    t0 = time.time()
    res = evaluate_inputs(model, x, y, batch_size=batch_size, device=device, transform=comp.perturb, desc=name)
    return {**entry, "accuracy": _keep(energies, name, res), "step_pixel": comp.step, "steps": comp.steps,
            "objective": comp.objective, "protocol": comp.protocol,
            "clean_accuracy": float(clean_correct.float().mean()) if len(y) else float("nan"),
            "fraction_perturbed": float((res["linf"] > 0).float().mean()) if len(y) else float("nan"),
            "max_perturbation_linf": (_check_linf(name, cfg.eps, res["linf"]) if comp.bounded
                                      else float(res["linf"].max()) if len(y) else 0.0),
            "seconds": round(time.time() - t0, 3)}
