"""Helpers for the workflow tests: a hermetic copy of this checkout in a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin/: snakemake, dvc, robust-ebm


def copy_checkout(dst: Path) -> Path:
    """Copy tracked + untracked-not-ignored files (what a fresh clone would hold) and `git init` it."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)  # DVC's Repo needs an SCM
    return dst


def hermetic_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Tools write caches under tmp, never in $HOME (ecosystem.md §7); the venv's bin first on PATH."""
    env = dict(os.environ)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "XDG_CACHE_HOME": str(tmp / "cache"), "MPLCONFIGDIR": str(tmp / "cache" / "mpl"),
        "DVC_SITE_CACHE_DIR": str(tmp / "cache" / "dvc"), "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "TORCH_HOME": str(tmp / "cache" / "torch"),
    })
    env.update(extra)
    return env


def snakemake(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def parse_dry_run(text: str) -> list[dict]:
    """Job blocks of `snakemake -n -p`: [{'rule', 'input': [...], 'output': [...], 'command'}]."""
    jobs: list[dict] = []
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith(("rule ", "localrule ")) and line.rstrip().endswith(":"):
            jobs.append({"rule": line.split()[1].rstrip(":"), "input": [], "output": [], "command": None})
        elif jobs and stripped.startswith(("input: ", "output: ")):
            key, value = stripped.split(": ", 1)
            jobs[-1][key] = value.split(", ")
        elif jobs and stripped.startswith("Shell command: "):
            jobs[-1]["command"] = stripped[len("Shell command: "):]
    return jobs
