"""Full training state on disk: written atomically, read with weights_only=True.

A checkpoint is a plain dict

    {"state": {name: obj.state_dict()}  model, optimiser, schedule, scaler, method (replay buffer), ...
     "rng":   python, numpy, torch CPU, CUDA, and every named torch.Generator
     "progress": epoch, step in epoch, best metric, guard retries, dynamics so far, ...}

holding only tensors and plain Python types, so `torch.load(weights_only=True)`
can read it and a resumed run continues bit-exactly on the CPU.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .files import BadFileError, load_torch
from .runtime import atomic_torch_save

RESUME_FIX = ("it is the run's resume state: move it away (or restore a good copy) to start the run afresh; "
              "nothing was changed")


def rng_state(generators: Mapping[str, torch.Generator]) -> dict:
    """Every random number generator state as tensors and plain types."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
        "numpy": {"kind": kind, "keys": np_keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def set_rng_state(state: dict, generators: Mapping[str, torch.Generator]) -> None:
    """Inverse of `rng_state`; every generator named in `generators` must be in the state."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["keys"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    missing = set(generators) - set(state["generators"])
    if missing:
        raise KeyError(f"checkpoint has no state for generator(s) {sorted(missing)}")
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def snapshot(stateful: Mapping[str, Any], generators: Mapping[str, torch.Generator], progress: dict) -> dict:
    """Collect state_dict() of every stateful object, all RNG states and the loop's progress."""
    return {"state": {name: obj.state_dict() for name, obj in stateful.items()},
            "rng": rng_state(generators), "progress": progress}


def restore(ckpt: dict, stateful: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> dict:
    """Load a snapshot into the live objects; returns its progress dict."""
    missing = set(stateful) - set(ckpt["state"])
    if missing:
        raise KeyError(f"checkpoint has no state for {sorted(missing)}")
    for name, obj in stateful.items():
        obj.load_state_dict(ckpt["state"][name])
    set_rng_state(ckpt["rng"], generators)
    return ckpt["progress"]


def save_checkpoint(path: str | Path, ckpt: dict) -> Path:
    """Write atomically (temporary file, then rename): a kill never leaves half a checkpoint."""
    return atomic_torch_save(ckpt, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint onto the CPU with weights_only=True (no arbitrary code is unpickled);
    files.BadFileError, naming the file, when it is truncated, corrupt or not a checkpoint."""
    ckpt = load_torch(path, fix=RESUME_FIX)
    if not isinstance(ckpt, dict):
        raise BadFileError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict; {RESUME_FIX}")
    return ckpt
