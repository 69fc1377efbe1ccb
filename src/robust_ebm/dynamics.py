"""Energy dynamics during training (papers.md §3.9), one row per epoch in dynamics.json.

Three kinds of curves, all energies from `robust_ebm.energy`:

1. Mean and variance of every per-sample energy the method reports
   (LossOutput.energies: E_x/clean, E_xy/adv, E_x/sgld, ...), over the epoch.
2. JEAT Fig.3, on batches with an adversarial input x_adv, every
   `every_n_steps` steps (model in eval mode, no gradients):
       Δx E(x,y) = E_θ(x_adv, y) − E_θ(x, y)        before the update
       Δθ E(x,y) = E_θ'(x_adv, y) − E_θ(x_adv, y)   after the update θ -> θ'
   and the same for E(x).
3. WEAT's energy divergence on a FIXED training subset, at the end of every
   `every_n_epochs`-th epoch, with the PGD-10 attack x*:
       ΔE(x) = mean E(x) − E(x*)   (and ΔE(x,y)).

dynamics.json = {"epochs": [{"epoch": 1, "<name>": value, ...}, ...]}: one record per epoch,
every record with every name, null where a quantity was not measured in that epoch (records are
what `dvc plots` reads; `columns` turns them back into aligned lists for the figures).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from . import attacks
from .energy import joint_energy, marginal_energy
from .runtime import model_mode
from .schema_types import Strict


# --------------------------------------------------------------------------- settings (methods.<m>.dynamics)


class DynamicsConfig(Strict):
    """Energy dynamics during training (JEAT Fig.3, WEAT ΔE curves) on a fixed training subset."""

    every_n_epochs: int = Field(1, ge=0, description="0: off")
    n_fixed: int = Field(512, ge=1)
    every_n_steps: int = Field(10, ge=0, description="JEAT Δx/Δθ probes on batches with x_adv every N steps; 0: off")


class _Moments:
    """Running sum, sum of squares and count per key (kept on the device; one host sync per epoch)."""

    def __init__(self):
        self.acc: dict[str, Tensor] = {}

    def add(self, key: str, values: Tensor) -> None:
        v = values.detach().double().flatten()
        row = torch.stack([v.sum(), (v * v).sum(), torch.tensor(float(v.numel()), dtype=torch.float64, device=v.device)])
        self.acc[key] = self.acc[key] + row if key in self.acc else row

    def summary(self) -> dict[str, float]:
        out = {}
        for key, (s, sq, n) in ((k, v.cpu().tolist()) for k, v in self.acc.items()):
            mean = s / n
            out[f"{key}/mean"], out[f"{key}/var"] = mean, max(sq / n - mean * mean, 0.0)
        return out

    def state_dict(self) -> dict:
        return {k: v.cpu() for k, v in self.acc.items()}

    def load_state_dict(self, state: dict, device) -> None:
        self.acc = {k: v.to(device) for k, v in state.items()}


def _energies(model, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    logits = model(x).float()
    return joint_energy(logits, y), marginal_energy(logits)


class DynamicsRecorder:
    """Collects the three kinds of curves; `state_dict` lets a resumed run continue the same lists."""

    def __init__(self, cfg, *, attack_cfg, device):
        self.cfg, self.device = cfg, torch.device(device)
        self.attack_cfg = attack_cfg.model_copy(update={"steps": 10})   # WEAT: PGD-10
        self.history: dict[str, list] = {"epoch": []}
        self.moments = _Moments()

    # ---- per step
    def observe(self, energies: dict[str, Tensor]) -> None:
        for key, values in energies.items():
            self.moments.add(key, values)

    def wants_probe(self, step: int, prepared: dict) -> bool:
        n = getattr(self.cfg, "every_n_steps", 0)
        return self.cfg.every_n_epochs > 0 and n > 0 and step % n == 0 and "x_adv" in prepared

    @torch.no_grad()
    def probe_before(self, model, prepared: dict) -> dict[str, Tensor]:
        """Energies at θ of the clean and adversarial batch (before the optimiser step)."""
        with model_mode(model, "eval"):
            e_xy, e_x = _energies(model, prepared["x"], prepared["y"])
            a_xy, a_x = _energies(model, prepared["x_adv"], prepared["y"])
        self.moments.add("jeat/dx_E_xy", a_xy - e_xy)
        self.moments.add("jeat/dx_E_x", a_x - e_x)
        return {"x_adv": prepared["x_adv"], "y": prepared["y"], "E_xy": a_xy, "E_x": a_x}

    @torch.no_grad()
    def probe_after(self, model, before: dict[str, Tensor]) -> None:
        """Energies at θ' of the same adversarial batch (after the optimiser step)."""
        with model_mode(model, "eval"):
            a_xy, a_x = _energies(model, before["x_adv"], before["y"])
        self.moments.add("jeat/dtheta_E_xy", a_xy - before["E_xy"])
        self.moments.add("jeat/dtheta_E_x", a_x - before["E_x"])

    # ---- per epoch
    def divergence(self, model, x: Tensor, y: Tensor, generator: torch.Generator, batch_size: int = 256) -> dict:
        """WEAT ΔE(x) = mean E(x) − E(x*) and ΔE(x,y) on the fixed subset, x* = PGD-10(x)."""
        d_x, d_xy = [], []
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            x_star = attacks.perturb(model, xb, yb, self.attack_cfg, generator=generator)
            with torch.no_grad(), model_mode(model, "eval"):
                e_xy, e_x = _energies(model, xb, yb)
                s_xy, s_x = _energies(model, x_star, yb)
            d_x.append(e_x - s_x)
            d_xy.append(e_xy - s_xy)
        return {"weat/dE_x": torch.cat(d_x).mean().item(), "weat/dE_xy": torch.cat(d_xy).mean().item()}

    def is_divergence_epoch(self, epoch: int) -> bool:
        """epoch is 1-based; every_n_epochs = 0 switches the WEAT curve off."""
        n = self.cfg.every_n_epochs
        return n > 0 and epoch % n == 0

    def end_epoch(self, epoch: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Close the epoch: append one row (moments + extra) and reset the accumulators."""
        row = self.moments.summary() | (extra or {})
        n_before = len(self.history["epoch"])
        self.history["epoch"].append(epoch)
        for key in row:
            self.history.setdefault(key, [None] * n_before)
        for key, values in self.history.items():
            if key != "epoch":
                values.append(row.get(key))
        self.moments = _Moments()
        return row

    def as_json(self) -> dict[str, list]:
        return {k: list(v) for k, v in self.history.items()}

    def records(self) -> dict[str, list[dict]]:
        """dynamics.json: {"epochs": one record per epoch}."""
        keys = list(self.history)
        return {"epochs": [dict(zip(keys, row)) for row in zip(*(self.history[k] for k in keys))]}

    def state_dict(self) -> dict:
        return {"history": self.as_json(), "moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.moments.load_state_dict(state["moments"], self.device)


def columns(records: dict[str, list[dict]]) -> dict[str, list]:
    """A dynamics.json's records as aligned lists {"epoch": [...], "<name>": [...]} (null where absent)."""
    rows = records.get("epochs", [])
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in keys}
