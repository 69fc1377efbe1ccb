"""The numbers of a profile's runs, small enough to keep in git (`robust-ebm digest`).

Reads what the stages wrote under results/<profile>/ and writes, into one folder:

    <dataset>-<method>-s<seed>.json   one run: train.json, the evaluate and metrics JSONs (without the
                                      per-image energies), generate.json, and the seconds of each stage
    claims.json, claims.md           the claims stage's verdicts, copied as they are
    digest.json                      when, where and from which commit; the runs found and those missing
    README.md                        one table of the headline numbers and the cost of each run

Never models, samples or .npz energies: the digest is what must outlive the machine (docs/). A run whose
stages did not all finish is digested with what it has and listed with the stages it lacks.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
from pathlib import Path

from . import plan, samples_file
from .runtime import atomic_write_json, atomic_write_text
from .tracking import git_commit, git_dirty

# The README table: (header, stage, dotted path into that stage's JSON, scale). {gen} is each generator.
HEADLINE = (
    ("clean", "evaluate", "columns.clean.accuracy", 100.0),
    ("PGD-20", "evaluate", "columns.pgd.accuracy", 100.0),
    ("E(x,y) attack", "evaluate", "columns.energy_attack.accuracy", 100.0),
    ("AutoAttack", "evaluate", "columns.autoattack.accuracy", 100.0),
    ("JFS", "metrics", "fisher.jfs", 1.0),
    ("MFS", "metrics", "fisher.mfs", 1.0),
    ("gap E(x,y) clean→PGD", "metrics", "energy.gap.E_xy/clean->pgd", 1.0),
)
STAGE_FILES = {"train": "train_json", "evaluate": "eval", "generate": "samples", "metrics": "metrics"}


def digest(results_dir: Path, profile_cfg, out_dir: Path) -> Path:
    """Write the digest of every planned run of `profile_cfg` found under `results_dir` into `out_dir`."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, missing = [], []
    for dataset, method in profile_cfg.runs:
        for seed in profile_cfg.seeds:
            record = run_record(results_dir, dataset, method, seed)
            if record is None:
                missing.append(f"{dataset}/{method}/s{seed}")
                continue
            atomic_write_json(out_dir / f"{dataset}-{method}-s{seed}.json", record)
            runs.append(record)
    for key in ("claims_json", "claims_md"):
        claims = plan.profile_path(key, results_dir)
        if claims.is_file():
            shutil.copyfile(claims, out_dir / claims.name)
    about = provenance(profile_cfg.name) | {"runs": [r["run"] for r in runs], "not_run": missing}
    atomic_write_json(out_dir / "digest.json", about)
    atomic_write_text(out_dir / "README.md", markdown(runs, about))
    return out_dir


def run_record(results_dir: Path, dataset: str, method: str, seed: int) -> dict | None:
    """One run's stage outputs, or None when not even its training finished."""
    stages = {}
    for stage, key in STAGE_FILES.items():
        path = _stage_json(results_dir, key, dataset, method, seed)
        if path.is_file():
            stages[stage] = _without_energies(json.loads(path.read_text()))
    if "train" not in stages:
        return None
    seconds = {stage: _seconds(stage, out) for stage, out in stages.items()}
    return {"run": f"{dataset}/{method}/s{seed}", "dataset": dataset, "method": method, "seed": seed,
            "stages_missing": [s for s in STAGE_FILES if s not in stages],
            "seconds": seconds | {"total": round(sum(v for v in seconds.values() if v), 1)}, **stages}


def _stage_json(results_dir: Path, key: str, dataset: str, method: str, seed: int) -> Path:
    """The JSON a stage wrote, from the plan's pattern (results_dir is results/<profile>)."""
    path = plan.profile_path(key, results_dir, dataset=dataset, method=method, seed=seed)
    return samples_file.index_path(path) if key == "samples" else path


def _without_energies(record):
    """Drop per-image arrays (lists longer than 64 numbers): a digest keeps summaries only."""
    if isinstance(record, dict):
        return {k: _without_energies(v) for k, v in record.items()}
    if isinstance(record, list) and len(record) > 64 and all(isinstance(v, (int, float)) for v in record):
        return f"<{len(record)} values left out>"
    if isinstance(record, list):
        return [_without_energies(v) for v in record]
    return record


def _seconds(stage: str, out: dict) -> float | None:
    if stage == "generate":
        return round(sum(g.get("seconds") or 0.0 for g in out.get("generators", {}).values()), 1)
    return round(out["seconds"], 1) if isinstance(out.get("seconds"), (int, float)) else None


def lookup(record: dict, dotted: str):
    """record['a']['b'] for 'a.b' (no key of a stage JSON holds a dot), or None when a key is absent."""
    node = record
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def provenance(profile: str) -> dict:
    """When, on what and from which commit the digest was taken."""
    return {"profile": profile, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "commit": git_commit(Path.cwd()), "uncommitted_changes": bool(git_dirty(Path.cwd()))}


def machine() -> dict:
    import torch  # here: the digest of a folder needs no torch until it says which one ran

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def markdown(runs: list[dict], about: dict) -> str:
    gpu = about["machine"]["gpu"] or "no GPU"
    lines = [f"# Digest of profile `{about['profile']}`", "",
             f"Taken {about['date']} on {about['machine']['cpu']} ({about['machine']['cores']} cores, {gpu}), "
             f"torch {about['machine']['torch']}, commit {about['commit']}"
             + (" with uncommitted changes" if about["uncommitted_changes"] else "") + ".", "",
             "Accuracies in %, on the evaluation subsets the profile names (the `n` of each column in the run's "
             "JSON). Seconds are each stage's own measurement (train.json, the evaluate and metrics JSONs, the sum "
             "over generators).", ""]
    header = ["run", *(h for h, *_ in HEADLINE), "stand-in FID / IS per generator", "train s", "evaluate s",
              "generate s", "metrics s", "missing"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [r["run"]]
        for _, stage, path, scale in HEADLINE:
            value = lookup(r.get(stage, {}), path)
            cells.append(f"{value * scale:.2f}" if isinstance(value, (int, float)) else "–")
        cells.append(_standin_cell(r.get("metrics", {})))
        cells += [_fmt_seconds(r["seconds"].get(s)) for s in STAGE_FILES]
        cells.append(", ".join(r["stages_missing"]) or "")
        lines.append("| " + " | ".join(cells) + " |")
    if about["not_run"]:
        lines += ["", "Not run: " + ", ".join(about["not_run"]) + "."]
    return "\n".join(lines) + "\n"


def _standin_cell(metrics: dict) -> str:
    parts = []
    for name, entry in metrics.get("generators", {}).items():
        ref = entry.get("refclf", {})
        if isinstance(ref.get("fid_refclf"), (int, float)):
            parts.append(f"{name} {ref['fid_refclf']:.2f} / {ref['is_refclf']:.2f}")
        elif ref.get("status"):
            parts.append(f"{name}: {ref['status'].split(':')[0]}")   # the reason is in the run's JSON
    return "; ".join(parts) or "–"


def _fmt_seconds(value) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) else "–"
