# robust-ebm workflow. From the repository root:
#
#     snakemake --cores all results/tables --config profile=smoke
#     snakemake --cores all --configfile other.yaml     # another params file (a full params.yaml replacement)
#
# `--configfile FILE` names the params file every job reads (passed on as --params FILE);
# `--config` takes one key, profile=<name>; any other key is refused.
# Every job comes from robust_ebm.plan (the same plan writes dvc.yaml); the
# rules under workflow/rules/ only call `robust-ebm <stage>` with explicit paths.
# The profile (smoke | mini | paper) defaults to `profile:` in params.yaml.
# results/tables is a symlink to results/<profile>/tables (see README).

import os
import shutil
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from robust_ebm import jobserver
from robust_ebm.config import ConfigError, load_params
from robust_ebm.plan import OUTPUTS, Plan

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # jobs inherit it; commands stay identical
if shutil.which("robust-ebm") is None:  # e.g. `.venv/bin/snakemake` run without activating the venv
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

CONFIG_KEYS = ("profile",)  # what --config may set; the params file itself comes with --configfile


def params_file():
    """The params file: the one --configfile, else params.yaml (relative to here when inside the project)."""
    files = [Path(f) for f in workflow.overwrite_configfiles]
    if len(files) > 1:
        raise WorkflowError(f"give one --configfile (a complete params file), not {len(files)}: "
                            f"{', '.join(map(str, files))}; nothing was run")
    if not files:
        return "params.yaml"
    path = files[0].resolve()
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


unknown = sorted(set(workflow.config_settings.config) - set(CONFIG_KEYS))
if unknown:
    raise WorkflowError(f"unknown --config key(s) {unknown}; allowed: {list(CONFIG_KEYS)} "
                        "(e.g. --config profile=smoke; another params file: --configfile FILE); nothing was run")
PARAMS_FILE = params_file()
try:  # an invalid params file (or profile) fails here, before any job runs
    PARAMS = load_params(PARAMS_FILE)
    PROFILE = str(workflow.config_settings.config.get("profile") or PARAMS.profile)
    PLANS = {name: Plan(PARAMS, name, params_file=PARAMS_FILE) for name in PARAMS.profiles}
    if PROFILE not in PLANS:
        raise ConfigError(f"{PARAMS_FILE}: unknown profile '{PROFILE}' (from --config profile=...); "
                          f"allowed: {sorted(PLANS)}")
    PLAN = PLANS[PROFILE]
except (ConfigError, ValueError) as err:
    raise WorkflowError(f"{PARAMS_FILE} (or --config profile=...) is invalid; nothing was run:\n{err}") from None

RESULTS = PLAN.results

report: "workflow/report/workflow.rst"

include: "workflow/rules/common.smk"
include: "workflow/rules/runs.smk"
include: "workflow/rules/summary.smk"


rule all:
    default_target: True
    input:
        f"{RESULTS}/tables",


# One warm `robust-ebm serve` process per workflow run: the jobs' `robust-ebm` commands run in
# children it forks, instead of each importing torch and MLflow (robust_ebm.jobserver).
# ROBUST_EBM_JOBSERVER=off before snakemake runs every job in its own process.
JOB_SERVER = []  # the server onstart started (none when off or not on Linux)

onstart:
    JOB_SERVER.append(jobserver.start())

onsuccess:
    jobserver.stop(JOB_SERVER)

onerror:
    jobserver.stop(JOB_SERVER)
