"""The energies file (`<out>.energies.npz` of the evaluate and metrics stages): its one writer and reader.

A compressed npz of 1-D arrays, per set of images `<name>` (an evaluate column or attack, a generator):

    <name>_marginal   E(x)      <name>_joint   E(x,y)
    <name>_correct    (optional) the decision was right      <name>_labels (optional) the labels used
    labels            (evaluate) the test labels; a set on the first n images has n entries

Readers get {name: {"E_x", "E_xy"}} of every set with both energies (`read_sets`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np

from .files import load_npz
from .runtime import atomic_write_bytes

MARGINAL, JOINT, CORRECT, LABELS = "_marginal", "_joint", "_correct", "_labels"


def entries(name: str, marginal, joint, *, correct=None, labels=None) -> dict[str, np.ndarray]:
    """The arrays of one set, under their keys (CPU tensors or arrays in)."""
    out = {name + MARGINAL: np.asarray(marginal), name + JOINT: np.asarray(joint)}
    if correct is not None:
        out[name + CORRECT] = np.asarray(correct)
    if labels is not None:
        out[name + LABELS] = np.asarray(labels)
    return out


def write(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write `arrays` (from `entries`, plus 'labels') as one compressed npz, atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def read_sets(path: str | Path, *, fix: str) -> dict[str, dict[str, np.ndarray]]:
    """{name: {"E_x": E(x), "E_xy": E(x,y)}} of every set in the file that has both energies, in file order;
    files.BadFileError saying `fix` when the file is unreadable."""
    f = load_npz(path, fix=fix)
    return {key[: -len(MARGINAL)]: {"E_x": f[key], "E_xy": f[key[: -len(MARGINAL)] + JOINT]}
            for key in f if key.endswith(MARGINAL) and key[: -len(MARGINAL)] + JOINT in f}
