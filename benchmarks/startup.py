"""Start-up cost of a `robust-ebm` stage (issue 13 item 3): CPU and wall seconds from process start until the
stage function is called (imports, params, MLflow run opened), then until the process ends. The stage runs
for real (same arguments as its Snakemake job); only its entry function is wrapped to take the time.

    PYTHONPATH=src python benchmarks/startup.py evaluate -- --params params.yaml --profile smoke ... --out X

Prints one line: `<stage> startup_cpu_s=… startup_wall_s=… modules=… total_cpu_s=… total_wall_s=…`.
With --startup-only the process ends when the stage is called (no work; its MLflow run is left RUNNING, so
use a scratch project). CPU time is what to compare on a shared machine (wall time depends on the load).
"""

from __future__ import annotations

import importlib
import os
import resource
import sys
import time

ENTRIES = {"data": ("robust_ebm.data", "prepare_stage"), "train": ("robust_ebm.train", "train_stage"),
           "evaluate": ("robust_ebm.evaluate", "evaluate_stage"), "generate": ("robust_ebm.generate", "generate_stage"),
           "metrics": ("robust_ebm.metrics", "metrics_stage"), "figures": ("robust_ebm.figures", "figures_stage"),
           "claims": ("robust_ebm.claims", "claims_stage"), "tables": ("robust_ebm.tables", "tables_stage")}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    wall0 = time.perf_counter()
    stage, rest = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    startup_only = "--startup-only" in sys.argv[:sys.argv.index("--")]
    module_name, entry = ENTRIES[stage]
    module = importlib.import_module(module_name)
    real, marks = getattr(module, entry), {}

    def timed(*args, **kwargs):
        marks["startup_cpu_s"], marks["startup_wall_s"] = _cpu(), time.perf_counter() - wall0
        marks["modules"] = len(sys.modules)
        if startup_only:
            _report(stage, marks)
            os._exit(0)
        return real(*args, **kwargs)

    setattr(module, entry, timed)
    from robust_ebm.cli import main as cli_main

    rc = cli_main([stage, *rest])
    marks["total_cpu_s"], marks["total_wall_s"] = _cpu(), time.perf_counter() - wall0
    _report(stage, marks)
    return rc


def _report(stage: str, marks: dict) -> None:
    print(f"{stage} " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in marks.items()),
          file=sys.__stdout__, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.exit(main())
