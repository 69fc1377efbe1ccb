"""Reading the files one stage hands to the next (checkpoints, prepared data, .npz arrays).

Every file is read in full before the stage starts its work, with `torch.load(weights_only=True)`
or `np.load(allow_pickle=False)`, so no file can run code on load; the one exception,
`load_torch_unsafe`, is only reached through an explicit user flag (--unsafe-pickle). A file that cannot be read is
refused with one `BadFileError` line naming the file, what is wrong and the fix. Nothing here
writes, moves or deletes a file: the fix is always the user's (or the producing stage's) to make.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class BadFileError(ValueError):
    """An input file is truncated, corrupt, unsafe to unpickle, or of another run; the message names
    the file and the fix."""


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__


def load_torch(path: str | Path, *, fix: str, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) of `path`; BadFileError (naming the file and `fix`) when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):
            what = ("holds pickled Python objects that would run code when loaded (refused: only tensors and plain "
                    "types are read)")
        else:
            what = "is not a torch file (corrupt, random bytes, or a plain pickle)"
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as err:
        what = f"cannot be read, it is truncated or corrupt ({_first_line(err)})"
    raise BadFileError(f"{path} {what}; {fix}")


def load_torch_unsafe(path: str | Path, *, fix: str, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=False): a whole pickled model. UNSAFE: unpickling runs any code the file
    holds, so call this only when the user asked for it for a file they trust."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as err:
        what = (f"holds a pickled object whose class cannot be imported ({_first_line(err)}); put the module that "
                "defines it on PYTHONPATH")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError,
            IndexError) as err:
        what = f"cannot be read, it is truncated or corrupt ({_first_line(err)})"
    raise BadFileError(f"{path} {what}; {fix}")


def load_npz(path: str | Path, *, fix: str) -> dict[str, np.ndarray]:
    """Every array of an .npz read into memory (allow_pickle=False); BadFileError when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; {fix}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise BadFileError(f"{path} cannot be read, it is truncated or corrupt ({_first_line(err)}); {fix}") from None
