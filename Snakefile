# robust-ebm workflow. From the repository root:
#
#     snakemake --cores all results/tables --config profile=smoke
#
# Every job comes from robust_ebm.plan (the same plan writes dvc.yaml); the
# rules under workflow/rules/ only call `robust-ebm <stage>` with explicit paths.
# The profile (smoke | mini | paper) defaults to `profile:` in params.yaml.
# results/tables is a symlink to results/<profile>/tables (see README).

import os
import shutil
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from robust_ebm.config import ConfigError, load_params
from robust_ebm.plan import Plan

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # jobs inherit it; commands stay identical
if shutil.which("robust-ebm") is None:  # e.g. `.venv/bin/snakemake` run without activating the venv
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

configfile: "params.yaml"

try:  # an invalid params.yaml (or profile) fails here, before any job runs
    PARAMS = load_params("params.yaml")
    PROFILE = str(config.get("profile") or PARAMS.profile)
    PLANS = {name: Plan(PARAMS, name) for name in PARAMS.profiles}
    PLAN = PLANS[PROFILE] if PROFILE in PLANS else Plan(PARAMS, PROFILE)
except (ConfigError, ValueError) as err:
    raise WorkflowError(f"params.yaml (or --config profile=...) is invalid; nothing was run:\n{err}") from None

RESULTS = PLAN.results

report: "workflow/report/workflow.rst"

include: "workflow/rules/common.smk"
include: "workflow/rules/runs.smk"
include: "workflow/rules/summary.smk"


rule all:
    default_target: True
    input:
        f"{RESULTS}/tables",
