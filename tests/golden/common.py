"""Shared plumbing of the golden fixtures: find reference checkouts, import their files, save/load fixtures.

Golden fixtures are numbers produced by the official code of each paper (never its source):
`make_golden.py` imports a reference file from a fetched checkout at run time, runs one of its
functions on fixed small float64 inputs, and stores inputs, outputs and provenance in
`tests/fixtures/golden/<name>.pt`. The tests (`tests/test_golden_*.py`) rerun the project's code
on the stored inputs and compare, from the fixtures alone, with no reference code present.

A reference checkout is a folder named `<owner>+<name>` (as the `fetch` tool and `git clone`
into such a folder give) under the refs root: `--refs DIR` or env ROBUST_EBM_REFS.
Its commit is `git rev-parse HEAD` when it is a git work tree, else the first line of `.ref_commit`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.util
import sys
import types
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
TOLERANCE = 1e-8        # float64 on both sides; anything looser needs a written, tested reason

REPOSITORIES = (
    "wgrathwohl/JEM", "sndnyang/JEMPP", "sndnyang/SADAJEM", "jkcjkc/EB-JDAT",
    "OmnAI-Lab/Robust-Classifiers-under-the-lens-of-EBM", "yaodongyu/TRADES", "YisenWang/MART",
    "QizhouWang/MAIL", "MadryLab/robustness", "fra31/auto-attack",
)


class Reference:
    """One fetched checkout of an official repository."""

    def __init__(self, repo: str, root: Path):
        self.repo, self.root = repo, Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"reference checkout of {repo} not found at {self.root}: "
                                    f"fetch it and pass --refs DIR (folders named owner+name)")
        self.commit = self._commit()

    def _commit(self) -> str:
        from robust_ebm.tracking import git_commit

        commit = git_commit(self.root) if (self.root / ".git").exists() else None
        if commit:
            return commit
        marker = self.root / ".ref_commit"
        if marker.is_file():
            return marker.read_text().split()[0]
        raise FileNotFoundError(f"{self.root} is neither a git work tree nor has a .ref_commit file naming its commit")

    def load(self, relpath: str, *, stubs: dict[str, types.ModuleType] | None = None, name: str | None = None):
        """Import `relpath` of the checkout as a fresh module (its folder first on sys.path).

        `stubs` stands in for imports the function under test never uses (tensorboardX, foolbox, ...);
        they are removed from sys.modules again afterwards so references never leak into each other.
        """
        path = self.root / relpath
        folder = str(path.parent)
        added = {k: v for k, v in (stubs or {}).items() if k not in sys.modules}
        sys.modules.update(added)
        sys.path.insert(0, folder)
        mod_name = name or f"golden_ref_{self.repo.replace('/', '_').replace('-', '_')}_{path.stem}"
        try:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        finally:
            sys.path.remove(folder)
            # the reference's own sibling modules (utils, models, ...) and the stubs must not shadow
            # another reference's; libraries it imported (torch, numpy, ...) stay loaded
            for key in list(added):
                sys.modules.pop(key, None)
            for key, mod in list(sys.modules.items()):
                path = getattr(mod, "__path__", None)
                places = [getattr(mod, "__file__", None) or "", *(path if isinstance(path, (list, tuple)) or
                                                                  type(path).__name__ == "_NamespacePath" else [])]
                if key != mod_name and any(str(p).startswith(str(self.root)) for p in places):
                    sys.modules.pop(key, None)   # also namespace packages (folders without __init__.py)

    def source(self, relpath: str, function: str) -> dict:
        """Provenance of one reference function, stored in every fixture."""
        return {"repo": self.repo, "commit": self.commit, "file": relpath, "function": function}


def refs_from_root(root: Path) -> dict[str, Reference]:
    """Every known repository found under `root` (folders `owner+name`)."""
    out = {}
    for repo in REPOSITORIES:
        folder = Path(root) / repo.replace("/", "+")
        if folder.is_dir():
            out[repo] = Reference(repo, folder)
    return out


def stub_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


@contextlib.contextmanager
def patched(obj, **attrs):
    """Set attributes of a reference module (its `args` global, a stubbed `F`) for the block, then restore
    them (or delete the ones it did not have: `args` is a global only under __main__)."""
    missing = object()
    old = {k: getattr(obj, k, missing) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is missing:
                delattr(obj, k)
            else:
                setattr(obj, k, v)


@contextlib.contextmanager
def float64():
    """Default dtype float64 inside the block (reference modules build their layers in it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def save_fixture(name: str, *, source: dict | list[dict], inputs: dict, outputs: dict, note: str = "") -> Path:
    """tests/fixtures/golden/<name>.pt: inputs and outputs (tensors, numbers, strings) plus provenance."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    payload = {
        "source": source if isinstance(source, list) else [source],
        "generated": _dt.date.today().isoformat(),
        "torch": str(torch.__version__),  # TorchVersion is refused by weights_only loads
        "note": note,
        "inputs": inputs,
        "outputs": outputs,
    }
    path = FIXTURES / f"{name}.pt"
    torch.save(payload, path)
    return path


def load_fixture(name: str) -> dict:
    """A fixture written by save_fixture, loaded without running any pickled code."""
    path = FIXTURES / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"golden fixture {path} missing: run `python tests/golden/make_golden.py --refs DIR`")
    return torch.load(path, weights_only=True)


def assert_close(ours, theirs, *, what: str, tol: float = TOLERANCE) -> None:
    """Max absolute difference <= tol, with a message naming the quantity and the difference."""
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(theirs.shape)}"
    diff = (ours - theirs).abs().max().item() if ours.numel() else 0.0
    assert diff <= tol, f"{what}: max |ours - reference| = {diff:.3e} > {tol:g}"
