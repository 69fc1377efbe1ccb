"""Hand a finished Snakemake run of one profile to DVC without rerunning it (`robust-ebm adopt-dvc`).

Each runner keeps its own bookkeeping: Snakemake its .snakemake/ metadata, DVC its dvc.lock. After a
Snakemake run dvc.lock holds nothing for the profile, so `dvc status` marks every stage changed. Adopting
writes the profile's settings.json (what DVC's `settings@P` stage would write), then records every stage
of the profile whose outputs exist in dvc.lock: DVC hashes its dependencies and outputs once and moves the
outputs into its cache, as `dvc commit --force` does. Unlike `dvc commit -f <77 stage names>`, which builds
the pipeline index and rewrites dvc.lock once per name (about 5 min on the smoke profile), the index is
built once and dvc.lock written once.
"""

from __future__ import annotations

from pathlib import Path

from .plan import SETTINGS_STAGE, Plan, dvc_stage_name
from .runtime import atomic_write_json


def adoptable(plan: Plan, root: Path) -> tuple[list[str], list[str]]:
    """(DVC stage names of the profile whose outputs all exist under `root`, those with an output missing)."""
    done, missing = [f"{SETTINGS_STAGE}@{plan.profile}"], []
    for job in plan.jobs:
        (done if all((root / o).exists() for o in job.outputs) else missing).append(dvc_stage_name(job))
    return done, missing


def write_settings(plan: Plan, root: Path) -> Path:
    """results/P/settings.json under `root`: {stage: {job name: settings digest}} (plan.Plan.settings_file)."""
    path = root / plan.values(SETTINGS_STAGE, {"profile": plan.profile})["settings"]
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, plan.settings_file())


def adopt(plan: Plan, root: Path) -> tuple[list[str], list[str]]:
    """Record the profile's finished stages in `root`/dvc.lock; return (committed, skipped) stage names."""
    from dvc.repo import Repo, lock_repo

    write_settings(plan, root)
    names, missing = adoptable(plan, root)
    wanted = set(names)
    with Repo(str(root)) as repo, lock_repo(repo):
        stages = [s for s in repo.index.stages if s.name in wanted]
        unknown = wanted - {s.name for s in stages}
        if unknown:
            raise ValueError(f"dvc.yaml has no stage {sorted(unknown)[0]} (and {len(unknown) - 1} more): "
                             "it is stale; run `robust-ebm dvc-yaml` first")
        for stage in stages:
            stage.save()
            stage.commit()
        by_file: dict[str, list] = {}
        for stage in stages:
            by_file.setdefault(stage.dvcfile.path, []).append(stage)
        for group in by_file.values():
            group[0].dvcfile.dump_stages(group, update_pipeline=False)
    return [s.name for s in stages], missing
