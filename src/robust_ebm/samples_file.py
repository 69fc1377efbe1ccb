"""The samples folder of the generate stage (plan.PATTERNS["samples"]): its one writer and reader.

    generate.json    the index (`INDEX`): {"generators": {name: {"files": {"npz", "grid"}, "count", "kind",
                     "status", ...}}, ...}, written by generate, read by metrics, figures and digest
    <name>.npz       one generator's samples: images uint8 (N,C,H,W), labels int64 (N,); buffer generators
                     also logits float32 (N,K) of the float images (the papers' top-confident IS/FID)
    <name>_grid.png  one row per class (generate.save_grid)

Readers get the generators that produced samples (`produced`) and each one's arrays (`read`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .files import BadFileError, load_npz
from .runtime import atomic_write_bytes, atomic_write_json

INDEX = "generate.json"
REQUIRED = ("images", "labels")


def index_path(samples_dir: str | Path) -> Path:
    return Path(samples_dir) / INDEX


def file_names(name: str) -> dict[str, str]:
    """The files of generator `name` in the folder (its index record's "files")."""
    return {"npz": f"{name}.npz", "grid": f"{name}_grid.png"}


def write(path: str | Path, images: np.ndarray, labels: np.ndarray, **extra: np.ndarray) -> Path:
    """One generator's npz (uint8 images, labels stored as int64, `extra` arrays such as logits), atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels.astype(np.int64), **extra)
    return atomic_write_bytes(path, buffer.getvalue())


def write_index(samples_dir: str | Path, report: dict[str, Any]) -> Path:
    return atomic_write_json(index_path(samples_dir), report)


def count(path: str | Path) -> int | None:
    """How many samples a finished npz holds (images and labels agree), None when it is absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path) as done:
            n = len(done["labels"])
            return n if len(done["images"]) == n else None
    except (OSError, ValueError, KeyError):
        return None


def read(path: str | Path, *, fix: str) -> dict[str, np.ndarray]:
    """Every array of one generator's npz (images, labels, optional logits); files.BadFileError saying `fix`
    when it cannot be read or lacks images and labels."""
    arrays = load_npz(path, fix=fix)
    if any(key not in arrays for key in REQUIRED):
        raise BadFileError(f"{path} holds {sorted(arrays)}, not images and labels; {fix}")
    return arrays


def generators(samples_dir: str | Path, *, fix: str) -> dict[str, dict[str, Any]]:
    """{name: record} of the folder's index; FileNotFoundError without one, BadFileError when it is no index."""
    index = index_path(samples_dir)
    if not index.is_file():
        raise FileNotFoundError(f"no {index}; {fix}")
    try:
        records = json.loads(index.read_text())["generators"]
        if not isinstance(records, dict):
            raise TypeError(f"'generators' is a {type(records).__name__}")
    except (ValueError, KeyError, TypeError) as err:
        raise BadFileError(f"{index} is not the generate stage's index ({type(err).__name__}: {err}); {fix}") from None
    return records


def produced(samples_dir: str | Path, *, fix: str) -> dict[str, tuple[dict[str, Any], Path]]:
    """{name: (record, npz path)} of the generators that produced samples, in the index's order (a skipped
    generator, e.g. a buffer generator of a model without a replay buffer, has count 0 and no npz)."""
    samples_dir = Path(samples_dir)
    out = {}
    for name, record in generators(samples_dir, fix=fix).items():
        npz = samples_dir / (record.get("files") or {}).get("npz", file_names(name)["npz"])
        if record.get("count", 0) and npz.is_file():
            out[name] = (record, npz)
    return out
