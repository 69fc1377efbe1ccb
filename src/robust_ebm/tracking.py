"""MLflow tracking: one experiment per (profile, data set), one parent run per
(method, seed), one nested child run per stage.

    experiment  robust-ebm/<profile>/<dataset>        (figures/tables: robust-ebm/<profile>)
    parent run  <method>/s<seed>                       tags role=parent, method, seed
    child run   <stage>                                tags stage, git commit, dvc.lock hash

Where: params `tracking.uri`, else env MLFLOW_TRACKING_URI, else the sqlite
file `sqlite:///<abs project dir>/mlflow.db` (absolute, so `dvc exp` temp
copies and other working directories still log to the project's DB).
Parallel jobs: creating a fresh sqlite DB from several processes at once
corrupts its schema (ecosystem.md §3), so DB creation, experiment lookup and
parent lookup-or-create all run under a file lock beside the DB.
Telemetry is off (MLFLOW_DISABLE_TELEMETRY=true) unless the user set it.
`ROBUST_EBM_TRACKING=off` gives a no-op tracker (said once in the log).

Only MlflowClient is used (no fluent global "active run"), so nothing leaks
between stages run in one process.

Run status. A child run ends FINISHED when its stage returns, KILLED when it
is interrupted (SIGINT, or SIGTERM, which cli.main turns into an interrupt),
and FAILED on any other error. A parent run spans stage jobs in separate
processes, so its status is derived, under the lock, whenever one of its
stages starts or ends, from the latest child run of each stage:
FAILED if any is FAILED, else KILLED if any is KILLED, else RUNNING if any is
RUNNING, else FINISHED. A run of the smoke DAG whose stages all finished is
therefore FINISHED, and a rerun stage replaces its failed predecessor. A
process killed outright (SIGKILL, power loss) cannot say so; its run is left
RUNNING until the next stage run that opens the same experiment on the same
host finds its process gone (tags robust_ebm.host, robust_ebm.process) and
marks it KILLED.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import numbers
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
DISABLE_ENV = "ROBUST_EBM_TRACKING"
HOST_TAG, PROCESS_TAG = "robust_ebm.host", "robust_ebm.process"


def tracking_uri(configured: str | None = None, project_dir: str | Path | None = None) -> str:
    """params tracking.uri > $MLFLOW_TRACKING_URI > sqlite:///mlflow.db; a relative sqlite
    path is made absolute against `project_dir` (default: the working directory)."""
    root = Path(project_dir or Path.cwd()).resolve()
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{root / uri[len('sqlite:///'):]}"  # relative sqlite path -> absolute
    return uri


def _lock_path(uri: str) -> Path:
    """The lock file: beside a sqlite DB, else one per URI in the temp dir."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):] + ".lock")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"robust-ebm-mlflow-{digest}.lock"


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, numbers.Real):
        if value == value and abs(value) != float("inf"):  # MLflow rejects NaN/inf
            out[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)


def numeric_leaves(d: dict, prefix: str = "") -> dict[str, float]:
    """{'a': {'b': 1}} -> {'a.b': 1.0}; lists and strings are skipped (they go to log_dict)."""
    out: dict[str, float] = {}
    _flatten(prefix, d, out)
    return out


def _mlflow_key(key: str) -> str:
    """MLflow keys allow alphanumerics, _ - . space / ; replace everything else."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)[:250]


class Tracker:
    """Logs into one MLflow child run (and summaries into its parent)."""

    enabled = True

    def __init__(self, client, run_id: str, parent_id: str | None):
        self.client, self.run_id, self.parent_id = client, run_id, parent_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flat_params(params)
        items = [Param(_mlflow_key(k), str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, *, run_id: str | None = None) -> None:
        """Nested dicts are flattened ('pgd20.accuracy'); one batched call, not one per key."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_mlflow_key(k), v, now, step or 0) for k, v in numeric_leaves(metrics).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id or self.run_id, metrics=items[i:i + 1000])

    def log_summary(self, stage: str, result: dict[str, Any]) -> None:
        """A stage's returned numbers: into the child run, and into the parent as '<stage>.<key>'."""
        self.log_metrics(result)
        if self.parent_id:
            self.log_metrics({stage: result}, run_id=self.parent_id)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            log.warning("not logging missing artifact %s", path)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


class NullTracker:
    """Same interface, does nothing (ROBUST_EBM_TRACKING=off)."""

    enabled = False
    run_id = parent_id = None

    def log_params(self, params): pass
    def log_metrics(self, metrics, step=None, *, run_id=None): pass
    def log_summary(self, stage, result): pass
    def log_artifact(self, path, artifact_path=None): pass
    def log_dict(self, obj, artifact_file): pass
    def set_tags(self, tags): pass


def _flat_params(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat_params(v, key))
        else:
            out[key] = v
    return out


def source_tags(project_dir: str | Path | None = None) -> dict[str, str]:
    """git commit (mlflow.source.git.commit) and sha256 of dvc.lock, when available."""
    root = Path(project_dir or Path.cwd())
    tags = {}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    lock = root / "dvc.lock"
    if lock.exists():
        tags["dvc.lock.sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
    return tags


def _experiment_id(client, name: str, uri: str) -> str:
    """Find or create; a sqlite DB keeps its artifacts beside it in mlruns/ (not in the cwd)."""
    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _parent_run(client, experiment_id: str, method: str, seed: int, tags: dict) -> str:
    """Find the (method, seed) parent run by tags, or create it. Call under the lock."""
    query = (f"tags.robust_ebm_role = 'parent' and tags.method = '{method}' "
             f"and tags.seed = '{seed}'")
    found = client.search_runs([experiment_id], filter_string=query, max_results=1,
                               order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"{method}/s{seed}",
                            tags={**tags, "robust_ebm_role": "parent"})
    return run.info.run_id


def _process_token(pid: int | None = None) -> str:
    """'<pid>:<start time>' (Linux /proc), so a reused pid does not pass for the process that logged."""
    pid = os.getpid() if pid is None else pid
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{pid}:{start}"


def _process_alive(token: str) -> bool:
    """Whether the process of a `_process_token` still runs (a zombie counts as gone)."""
    pid_text, _, start = token.partition(":")
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return start == "?"  # no /proc: trust os.kill
    return fields[0] != "Z" and (start == "?" or fields[19] == start)


def _reap_orphans(client, experiment_id: str) -> set[str]:
    """Mark RUNNING runs of this host whose process is gone as KILLED; return their parents' ids."""
    host = socket.gethostname()
    orphans = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                 f"tags.`{HOST_TAG}` = '{host}'", max_results=1000)
    parents = set()
    for run in orphans:
        token = run.data.tags.get(PROCESS_TAG)
        if token and not _process_alive(token):
            client.set_tag(run.info.run_id, "robust_ebm.end", "process gone without ending its run (killed)")
            client.set_terminated(run.info.run_id, "KILLED")
            log.info("MLflow: run %s (%s) was left RUNNING by a killed process; marked KILLED",
                     run.info.run_id, run.data.tags.get("stage"))
            if PARENT_TAG in run.data.tags:
                parents.add(run.data.tags[PARENT_TAG])
    return parents


def _settle_parent(client, experiment_id: str, parent_id: str) -> str:
    """Set the parent's status from the latest child run of each stage (module docstring); return it."""
    children = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                  max_results=1000, order_by=["attributes.start_time DESC"])
    latest: dict[str, str] = {}
    for child in children:
        latest.setdefault(child.data.tags.get("stage", child.info.run_id), child.info.status)
    statuses = set(latest.values())
    status = next((s for s in ("FAILED", "KILLED", "RUNNING") if s in statuses), "FINISHED")
    if status == "RUNNING":
        client.update_run(parent_id, status="RUNNING")
    else:
        client.set_terminated(parent_id, status)
    return status


def end_status(error: BaseException | None) -> str:
    """FINISHED (no error), KILLED (interrupt: SIGINT, or SIGTERM via cli), FAILED (anything else)."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


@contextlib.contextmanager
def open_run(*, profile: str, stage: str, dataset: str | None = None, method: str | None = None,
             seed: int | None = None, uri: str | None = None, prefix: str = "robust-ebm",
             project_dir: str | Path | None = None) -> Iterator[Tracker | NullTracker]:
    """A child run for `stage` (nested under the (method, seed) parent when both are given).

    The run ends FINISHED, or FAILED when the body raises (the error is re-raised).
    """
    if os.environ.get(DISABLE_ENV, "").lower() == "off":
        log.info("MLflow tracking disabled (%s=off): nothing is logged", DISABLE_ENV)
        yield NullTracker()
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(uri, project_dir)
    lock = _lock_path(uri)
    lock.parent.mkdir(parents=True, exist_ok=True)
    experiment = "/".join(x for x in (prefix, profile, dataset) if x)
    tags = {"profile": profile, "stage": stage, **source_tags(project_dir)}
    tags.update({k: str(v) for k, v in (("dataset", dataset), ("method", method), ("seed", seed))
                 if v is not None})
    with FileLock(str(lock), timeout=600):  # schema creation + lookups: one process at a time
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client, experiment, uri)
        orphaned_parents = _reap_orphans(client, exp_id)
        parent_id = None
        if method is not None and seed is not None:
            parent_id = _parent_run(client, exp_id, method, seed, {k: v for k, v in tags.items()
                                                                    if k != "stage"})
        child_tags = {**tags, HOST_TAG: socket.gethostname(), PROCESS_TAG: _process_token(),
                      **({PARENT_TAG: parent_id} if parent_id else {})}
        run = client.create_run(exp_id, run_name=stage, tags=child_tags)
        for parent in orphaned_parents | ({parent_id} if parent_id else set()):
            _settle_parent(client, exp_id, parent)
    tracker = Tracker(client, run.info.run_id, parent_id)
    log.info("MLflow: run %s (%s) in experiment '%s' at %s", run.info.run_id, stage, experiment, uri)
    error: BaseException | None = None
    try:
        yield tracker
    except BaseException as err:
        error = err
        raise
    finally:
        status = end_status(error)
        with FileLock(str(lock), timeout=600):
            if error is not None:
                client.set_tag(run.info.run_id, "robust_ebm.end", f"{type(error).__name__}: {error}"[:5000])
            client.set_terminated(run.info.run_id, status)
            if parent_id:
                _settle_parent(client, exp_id, parent_id)


def open_stage_run(run_cfg, stage: str, project_dir: str | Path | None = None):
    """open_run for a RunConfig (profile, dataset_name, method_name, seed, tracking)."""
    tracking = getattr(run_cfg, "tracking", None)
    return open_run(profile=run_cfg.profile, stage=stage, dataset=run_cfg.dataset_name,
                    method=run_cfg.method_name, seed=run_cfg.seed,
                    uri=getattr(tracking, "uri", None),
                    prefix=getattr(tracking, "experiment_prefix", None) or "robust-ebm",
                    project_dir=project_dir)


def log_json_file(tracker, path: str | Path, stage: str) -> None:
    """Log a stage's JSON output: its numbers as metrics, the file as an artifact."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        tracker.log_summary(stage, json.loads(path.read_text()))
    tracker.log_artifact(path)
