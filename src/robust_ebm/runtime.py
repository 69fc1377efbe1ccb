"""Run-time plumbing shared by every stage: device choice, fallbacks, seeding, atomic writes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


FALLBACK_LOG = logging.getLogger("robust_ebm.fallback")
CPU_FALLBACK = "device auto: no CUDA GPU available, ran on the CPU"


def note_fallback(fallbacks: list[str] | None, message: str) -> None:
    """A fallback (a stand-in, the CPU for the GPU, a smaller subset) is never silent: it is logged as a
    warning and appended to `fallbacks`, which the stage writes into its output JSON (key "fallbacks");
    the tables stage repeats them in its captions."""
    FALLBACK_LOG.warning("fallback: %s", message)
    if fallbacks is not None and message not in fallbacks:
        fallbacks.append(message)


def pick_device(name: str = "auto", fallbacks: list[str] | None = None) -> torch.device:
    """'auto' -> CUDA when available, else CPU (a fallback, see `note_fallback`); any other string is
    passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        note_fallback(fallbacks, CPU_FALLBACK)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available; use device: auto or cpu")
    return device


def describe_device(name: str) -> tuple[bool, str]:
    """(usable, what the stages will run on) for a profile's `device`: `robust-ebm check`'s line."""
    cuda = torch.cuda.is_available()
    gpu = f"CUDA ({torch.cuda.get_device_name(0)})" if cuda else ""
    if name == "cpu":
        return True, "cpu (the profile asks for the CPU)"
    if name == "auto":
        return True, gpu or ("CPU: no CUDA GPU available, so the stages will run on the CPU (a fallback each stage "
                             "logs and records; a GPU profile takes far longer)")
    if name == "cuda" and not cuda:
        return False, "MISSING: the profile asks for cuda but no CUDA GPU is available; use device: auto or cpu"
    return True, gpu or name


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (all devices); return a CPU generator seeded likewise."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (epoch streams, validation, reseeding)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@contextmanager
def model_mode(model: nn.Module, mode: str):
    """Put every submodule in 'train' or 'eval' mode for the block; restore each one's own flag after, also on error."""
    if mode not in ("train", "eval"):
        raise ValueError(f"model_mode must be 'train' or 'eval', got '{mode}'")
    previous = [(module, module.training) for module in model.modules()]
    model.train(mode == "train")
    try:
        yield model
    finally:
        for module, training in previous:
            module.training = training


def _atomic_replace(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text to a temporary file beside `path`, then rename it into place."""
    return _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write raw bytes (an encoded .npz or .png) atomically."""
    return _atomic_replace(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file, then rename: a killed process never leaves half a file.
    Saved through a file object, so the zip's member names are "archive/..." and not the temporary
    name: the same object gives the same bytes (and sha256) in every run."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            torch.save(obj, file)

    return _atomic_replace(Path(path), save)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
