"""MLflow tracking: one experiment per (profile, data set), one parent run per
(method, seed, settings), one nested child run per stage.

    experiment  robust-ebm/<profile>/<dataset>        (figures/tables: robust-ebm/<profile>)
                tag mlflow.experimentKind=custom_model_development (MLflow 3: classic ML, not GenAI);
                a saved runs-table view 'headline' (VIEW_TAG) with the parents' headline columns
    parent run  <method>/s<seed>                       tags role=parent, method, seed, settings digest
                params  the run's settings: method.*, model.*, data.*, seed   (`run_settings`)
                metrics the headline numbers of its stages: acc/clean, acc/pgd, acc/autoattack,
                        fid/<gen>, fid_refclf/<gen>, gap/clean_adv, ... (`stage_numbers`)
                images  its figures (energy histograms, dynamics, samples), logged by the figures stage
    child run   <method>/s<seed>/<stage>              tags stage, git commit, dvc.lock hash
                params  the settings section the stage reads (training.*, evaluation.*, ...)
                metrics training curves under the same keys for every method (train/loss, train/lr,
                        val/clean_acc, val/pgd_acc, energy/*), and the stage's numbers

Settings are params, never metrics: only the numbers `stage_numbers` picks from a stage's result
are logged (the stage JSON, with every number and setting, is an artifact of the child run).
Params are immutable in MLflow, so a parent is found by (method, seed) AND the digest of its
params (tag robust_ebm.settings): a rerun with the same settings logs into the same parent, a rerun
with changed method/model/data settings opens a new parent of the same name beside the old one
(whose numbers belong to the old settings). A value longer than PARAM_VALUE_CHARS is cut and ends
in its digest, so two long values never look equal; the full settings are the child's settings.json.

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
SETTINGS_TAG = "robust_ebm.settings"
# MLflow 3 experiment kind (values in mlflow's UI: genai_development, custom_model_development)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# a saved runs-table view (MLflow UI: #/experiments/<id>/runs?viewStateShareKey=headline): the headline columns
VIEW_TAG, VIEW_PARAMS = "mlflow.sharedViewState.headline", ("method.loss", "model.arch", "method.schedule.epochs")
HEADLINE_ORDER = ("acc/", "val_selected/", "is/", "fid/", "is_top", "fid_top", "is_refclf/", "fid_refclf/", "consistency_refclf/",
                  "gap/", "gap_Ex/", "delta_Ex/", "fisher/")
PARAM_VALUE_CHARS = 500  # MLflow's historic limit (3.x stores 6000); short enough for the runs table
# parent params: prefix -> RunConfig field; child params: stage -> the RunConfig section it reads
RUN_SECTIONS = {"method": "method", "model": "model", "data": "dataset"}
STAGE_SECTIONS = {"train": "training", "evaluate": "evaluation", "generate": "generation", "metrics": "metrics"}


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


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[i:i + 100])


class Tracker:
    """Logs into one MLflow child run (and summaries into its parent)."""

    enabled = True

    def __init__(self, client, run_id: str, parent_id: str | None):
        self.client, self.run_id, self.parent_id = client, run_id, parent_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Nested settings, flattened ('optim.lr'); values as `param_value` writes them."""
        _log_params(self.client, self.run_id, as_params(params))

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, *, run_id: str | None = None) -> None:
        """Nested dicts are flattened ('pgd20.accuracy'); one batched call, not one per key."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_mlflow_key(k), v, now, step or 0) for k, v in numeric_leaves(metrics).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id or self.run_id, metrics=items[i:i + 1000])

    def log_summary(self, stage: str, result: dict[str, Any]) -> None:
        """A stage's result: its numbers (`stage_numbers`) into the child run, the headline ones into the parent."""
        run, headline = stage_numbers(stage, result)
        self.log_metrics(run)
        if self.parent_id:
            self.log_metrics(headline, run_id=self.parent_id)

    def log_image(self, path: str | Path, key: str, step: int = 0, *, run_id: str | None = None) -> None:
        """A PNG as an MLflow image series `key` (the UI's image charts put runs side by side)."""
        from PIL import Image

        with Image.open(path) as image:
            self.client.log_image(run_id or self.run_id, image.convert("RGB"), key=_mlflow_key(key), step=step)

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
    def log_image(self, path, key, step=0, *, run_id=None): pass
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


def param_value(value: Any) -> str:
    """A setting as an MLflow param value: lists as compact JSON, at most PARAM_VALUE_CHARS characters
    (a longer value is cut and ends in '...sha256:<12 hex>' of the whole, so distinct values stay distinct)."""
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, tuple)) else str(value)
    if len(text) <= PARAM_VALUE_CHARS:
        return text
    tail = "...sha256:" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return text[:PARAM_VALUE_CHARS - len(tail)] + tail


def as_params(settings: dict) -> dict[str, str]:
    """Nested settings -> {'method.optim.lr': '0.1', ...} with valid keys and values."""
    return {_mlflow_key(k): param_value(v) for k, v in _flat_params(settings).items()}


def run_settings(run: dict) -> dict[str, str]:
    """A (method, seed) parent's params from RunConfig.to_dict(): the keys `method`, `dataset`, `seed`
    (params.yaml's names), then the settings method.*, model.*, data.* (data: the data set's section)."""
    sections = {prefix: run[field] for prefix, field in RUN_SECTIONS.items()}
    return {**as_params({"method": run["method_name"], "dataset": run["dataset_name"], "seed": run["seed"]}),
            **as_params(sections)}


def stage_settings(run: dict, stage: str) -> dict[str, str]:
    """A stage's child params: the RunConfig section it reads (training.*, evaluation.*, ...)."""
    section = STAGE_SECTIONS.get(stage)
    return as_params({section: run[section]}) if section else {}


def settings_digest(params: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the numbers of a stage

def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")


def _train_numbers(r: dict) -> tuple[dict, dict]:
    """Validation accuracies of the selected epoch (the checkpoint kept), and the training time."""
    val = next((v for v in r.get("val") or [] if v.get("epoch") == r.get("selected_epoch")), {})
    headline = {f"val_selected/{k}": val.get(k) for k in ("clean_acc", "pgd_acc")}
    return {"time/train_s": r.get("seconds"), "train/images_per_s": r.get("images_per_s")}, headline


def _evaluate_numbers(r: dict) -> tuple[dict, dict]:
    """acc/<column> of every headline column (clean, pgd, energy_attack, ebjdat_scale, autoattack, eot);
    the child also gets the histogram attacks' diagnostic accuracies and AutoAttack's subset clean accuracy."""
    columns = r.get("columns") or {}
    headline = {f"acc/{name}": col.get("accuracy") for name, col in columns.items()}
    run = {f"acc_diag/{name}": d.get("accuracy") for name, d in (r.get("histogram_attacks") or {}).items()}
    run["acc/autoattack_subset_clean"] = (columns.get("autoattack") or {}).get("clean_accuracy")
    return run | {"time/evaluate_s": r.get("seconds")}, headline


def _metrics_numbers(r: dict) -> tuple[dict, dict]:
    """Per generator: IS/FID (Inception, uniform protocol; the papers' top-confident buffer protocol), the
    refclf stand-ins; Fisher scores; the energy
    gaps (EB-JDAT Tab.1: mean E(x,y) of set - clean; WEAT ΔE: paired mean of E(x) clean - adversarial)."""
    headline, run = {}, {}
    for gen, entry in (r.get("generators") or {}).items():
        for key, value in entry.items():  # is_inception_n<N>, fid_inception_n<N>: both protocols
            if key.startswith(("is_inception_n", "fid_inception_n")):
                run[f"{key.split('_inception_')[0]}_{key.rsplit('_', 1)[1]}/{gen}"] = value
        uniform = ((entry.get("protocols") or {}).get("uniform") or {}).get("keys_suffix")  # inception_n<N>
        if uniform:
            headline[f"is/{gen}"], headline[f"fid/{gen}"] = entry.get(f"is_{uniform}"), entry.get(f"fid_{uniform}")
        for key, value in (entry.get("top_confident") or {}).items():  # the papers' buffer protocol: fid_top10pct
            if key.startswith(("is_top", "fid_top")):
                headline[f"{key}/{gen}"] = value
        refclf = entry.get("refclf") or {}
        headline |= {f"fid_refclf/{gen}": refclf.get("fid_refclf"), f"is_refclf/{gen}": refclf.get("is_refclf"),
                     f"consistency_refclf/{gen}": refclf.get("class_consistency_refclf")}
    fisher = r.get("fisher") or {}
    headline |= {f"fisher/{k}": fisher.get(k) for k in ("jfs", "mfs")}
    energy = r.get("energy") or {}
    gap, delta = energy.get("gap") or {}, energy.get("delta") or {}
    headline |= {"gap/clean_adv": gap.get("E_xy/clean->pgd"), "gap_Ex/clean_adv": gap.get("E_x/clean->pgd"),
                 "delta_Ex/clean_adv": (delta.get("E_x/clean-pgd") or {}).get("mean")}
    for key, value in gap.items():
        if key.startswith("E_xy/clean->generated/"):
            headline[f"gap/clean_gen/{key.rsplit('/', 1)[1]}"] = value
    return run | {"time/metrics_s": r.get("seconds")}, headline


STAGE_NUMBERS = {"train": _train_numbers, "evaluate": _evaluate_numbers, "metrics": _metrics_numbers}


def stage_numbers(stage: str, result: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(numbers for the stage's child run, headline numbers for its parent) from a stage's result dict.
    Settings in the result (eps, steps, n, seed, epochs) are never picked; missing or non-finite
    numbers are left out. A stage without an entry in STAGE_NUMBERS contributes no numbers."""
    pick = STAGE_NUMBERS.get(stage)
    if pick is None or not isinstance(result, dict):
        return {}, {}
    run, headline = pick(result)
    headline = {k: float(v) for k, v in headline.items() if _number(v)}
    return {k: float(v) for k, v in run.items() if _number(v)} | headline, headline


def _git(root: str | Path | None, *args: str) -> str | None:
    """`git <args>` in `root` (None: the working directory): its stripped output, None when git fails or is absent."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(root: str | Path | None = None) -> str | None:
    """The commit (HEAD) of the git checkout holding `root` (None: the working directory); None outside one.
    The one lookup of the project's commit: MLflow tags, `robust-ebm digest`, the benchmarks."""
    return _git(root, "rev-parse", "HEAD") or None


def git_dirty(root: str | Path | None = None) -> bool | None:
    """Whether tracked files of that checkout differ from its commit (untracked files do not count); None outside
    a checkout."""
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def source_tags(project_dir: str | Path | None = None) -> dict[str, str]:
    """git commit (mlflow.source.git.commit) and sha256 of dvc.lock, when available."""
    root = Path(project_dir or Path.cwd())
    tags = {}
    commit = git_commit(root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    lock = root / "dvc.lock"
    if lock.exists():
        tags["dvc.lock.sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
    return tags


def _experiment_id(client, name: str, uri: str) -> str:
    """Find or create, tagged as model training (EXPERIMENT_KIND_TAG); a sqlite DB keeps its artifacts
    beside it in mlruns/ (not in the cwd)."""
    exp = client.get_experiment_by_name(name)
    if exp:
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # a store written before the tag existed
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def _parent_query(method: str, seed: int, settings: str) -> str:
    return (f"tags.robust_ebm_role = 'parent' and tags.method = '{method}' and tags.seed = '{seed}' "
            f"and tags.`{SETTINGS_TAG}` = '{settings}'")


def _parent_run(client, experiment_id: str, method: str, seed: int, tags: dict, params: dict[str, str]) -> str:
    """Find the (method, seed, settings) parent run by tags, or create it with `params`. Call under the lock."""
    digest = settings_digest(params)
    found = client.search_runs([experiment_id], filter_string=_parent_query(method, seed, digest), max_results=1,
                               order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"{method}/s{seed}",
                            tags={**tags, "robust_ebm_role": "parent", SETTINGS_TAG: digest})
    _log_params(client, run.info.run_id, params)
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


def _update_view(client, experiment_id: str, parent_id: str) -> None:
    """Keep the experiment's saved runs-table view (VIEW_TAG) showing every headline metric of the parents
    and a few settings. Call under the lock (several stage processes update it)."""
    keys = set(client.get_run(parent_id).data.metrics)
    tags = client.get_experiment(experiment_id).tags
    old = json.loads(tags.get(VIEW_TAG, "{}")).get("selectedColumns", [])
    known = {c[len("metrics.`"):-1] for c in old if c.startswith("metrics.`")}
    if keys <= known and old:
        return
    order = lambda k: (next((i for i, p in enumerate(HEADLINE_ORDER) if k.startswith(p)), len(HEADLINE_ORDER)), k)  # noqa: E731
    columns = [f"params.`{k}`" for k in VIEW_PARAMS] + [f"metrics.`{k}`" for k in sorted(keys | known, key=order)]
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps({"selectedColumns": columns,
                                                                    "orderByKey": "attributes.start_time",
                                                                    "orderByAsc": False}))


def end_status(error: BaseException | None) -> str:
    """FINISHED (no error), KILLED (interrupt: SIGINT, or SIGTERM via cli), FAILED (anything else)."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


@contextlib.contextmanager
def open_run(*, profile: str, stage: str, dataset: str | None = None, method: str | None = None,
             seed: int | None = None, uri: str | None = None, prefix: str = "robust-ebm",
             project_dir: str | Path | None = None,
             parent_params: dict[str, str] | None = None) -> Iterator[Tracker | NullTracker]:
    """A child run for `stage`, nested under the (method, seed, settings) parent when method and seed are
    given; `parent_params` (`run_settings`) are the parent's params and pick it by their digest.

    The run ends FINISHED, KILLED on an interrupt, or FAILED when the body raises (the error is re-raised).
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
                                                                    if k != "stage"}, parent_params or {})
        child_tags = {**tags, HOST_TAG: socket.gethostname(), PROCESS_TAG: _process_token(),
                      **({PARENT_TAG: parent_id} if parent_id else {})}
        run = client.create_run(exp_id, run_name=f"{method}/s{seed}/{stage}" if parent_id else stage,
                                tags=child_tags)
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
                _update_view(client, exp_id, parent_id)


@contextlib.contextmanager
def open_stage_run(run_cfg, stage: str, project_dir: str | Path | None = None) -> Iterator[Tracker | NullTracker]:
    """open_run for a RunConfig: the parent carries `run_settings`, the child `stage_settings` and the
    whole resolved RunConfig as settings.json."""
    tracking = run_cfg.tracking
    settings = run_cfg.to_dict()
    with open_run(profile=run_cfg.profile, stage=stage, dataset=run_cfg.dataset_name,
                  method=run_cfg.method_name, seed=run_cfg.seed, uri=tracking.uri,
                  prefix=tracking.experiment_prefix or "robust-ebm", project_dir=project_dir,
                  parent_params=run_settings(settings)) as tracker:
        if tracker.enabled:
            tracker.log_params(stage_settings(settings, stage))
            tracker.log_dict(settings, "settings.json")
        yield tracker


def parent_run_id(client, experiment: str, method: str, seed: int, params: dict[str, str]) -> str | None:
    """The (method, seed, settings) parent run in `experiment`, or None when none was logged."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=_parent_query(method, seed, settings_digest(params)),
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def figure_key(entry: dict) -> str:
    """The image key of a figures.json entry: its name without the data set, method and seed
    ('energy_hist_attacks_digits_jem_s0' -> 'energy_hist_attacks'), the same for every run."""
    tag = f"_{entry['dataset']}_{entry['method']}_s{entry['seed']}"
    return entry["name"].replace(tag, "", 1) if tag in entry["name"] else entry["kind"]


def log_run_figures(tracker, index_path: str | Path, run_settings_of, *, profile: str,
                    prefix: str = "robust-ebm") -> list[str]:
    """Log each figure of figures.json that shows one (dataset, method, seed) as an image of that run's
    parent (`figure_key`); `run_settings_of(dataset, method, seed)` gives the parent's params.
    Returns the names of figures whose parent run is not in the store (their runs were not tracked)."""
    if not tracker.enabled:
        return []
    index_path = Path(index_path)
    missing = []
    for entry in json.loads(index_path.read_text())["figures"]:
        if not all(entry.get(k) is not None for k in ("dataset", "method", "seed")):
            continue  # a figure of several runs stays with the figures run
        png = next((index_path.parent / f for f in entry["files"] if f.endswith(".png")), None)
        experiment = "/".join((prefix, profile, entry["dataset"]))
        parent = parent_run_id(tracker.client, experiment, entry["method"], entry["seed"],
                               run_settings_of(entry["dataset"], entry["method"], entry["seed"]))
        if parent is None or png is None:
            missing.append(entry["name"])
            continue
        tracker.log_image(png, figure_key(entry), run_id=parent)
    if missing:
        log.warning("MLflow: %d figures not logged to a run (no PNG, or no parent run of their method and seed "
                    "in the store): %s", len(missing), ", ".join(missing))
    return missing

