"""When a run directory's checkpoint may be resumed (docs/reliability.md, "Resume is keyed").

checkpoint.pt is resumed only when its resume key (code of the train stage's import closure, the
data it read, the settings train reads) equals the current one; otherwise the run starts afresh,
says why in one line, and the previous files move to out_dir/stale/.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from . import plan
from .checkpoint import load_checkpoint
from .progress import GRIDS
from .runtime import atomic_write_json


def run_files() -> tuple[str, ...]:
    """Names of a run directory's files that belong to one training (moved to stale/ when it is not resumed):
    every plan.PATTERNS file inside the `model_dir` pattern (model.pt, train.json, checkpoint.pt, ...), and the
    grids folder."""
    run_dir = plan.PATTERNS["model_dir"]
    return (*(Path(p).name for p in plan.PATTERNS.values() if Path(p).parent == Path(run_dir)), GRIDS)


def data_digest(splits, stats) -> str:
    """sha256 of what training reads from the data stage: train and valid splits, class statistics."""
    digest = hashlib.sha256()

    def add(name, value):
        digest.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode() + value.view(torch.uint8).numpy().tobytes()
                          if value.numel() else b"empty")
        else:
            digest.update(repr(value).encode())

    for name in ("train", "valid"):
        split = getattr(splits, name)
        add(f"{name}.images", split.images)
        add(f"{name}.labels", split.labels)
    for key, value in sorted((stats.to_dict() if stats is not None else {}).items()):
        add(f"stats.{key}", value)
    return digest.hexdigest()[:16]


def resume_key(run, splits, stats) -> dict:
    """What a checkpoint was written under; it is resumed only when all three still hold.

    code: the train stage's import closure (plan.code_digest); data: `data_digest`; settings: the
    digest of the RunConfig fields train reads (plan.run_settings_digest, Snakemake's rerun trigger).
    """
    return {"code": plan.code_digest("train"), "data": data_digest(splits, stats),
            "settings": plan.run_settings_digest(run, "train")}


def stale_reason(ckpt_path: Path, key: dict) -> str | None:
    """Why the checkpoint must not be resumed under `key` (None: it may): another code, data or settings."""
    saved = load_checkpoint(ckpt_path)["progress"].get("resume_key")
    if not isinstance(saved, dict):
        return "it carries no resume key (written by an older robust-ebm)"
    changed = [k for k in key if saved.get(k) != key[k]]
    if not changed:
        return None
    what = {"code": "the train code", "data": "the data", "settings": "the settings"}
    return " and ".join(f"{what[k]} changed ({saved.get(k)} -> {key[k]})" for k in changed)


def move_aside(out_dir: Path, reason: str) -> Path:
    """Move the previous run's files into out_dir/stale/ (replacing an older one) before a fresh start."""
    stale = out_dir / "stale"
    shutil.rmtree(stale, ignore_errors=True)
    stale.mkdir()
    for name in run_files():
        if (out_dir / name).exists():
            os.replace(out_dir / name, stale / name)
    atomic_write_json(stale / "why.json", {"reason": reason})
    return stale
