"""MLflow tracking: grouping into parent/child runs, batching, parallel safety, off switch."""

import multiprocessing as mp

import pytest

from robust_ebm import tracking


@pytest.fixture
def uri(tmp_path, monkeypatch):
    monkeypatch.delenv("ROBUST_EBM_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _runs(uri, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://x:5000")
    assert tracking.tracking_uri(None, tmp_path) == "http://x:5000"
    assert tracking.tracking_uri("sqlite:////a.db", tmp_path) == "sqlite:////a.db"
    assert not (tmp_path / "mlruns").exists()


def test_numeric_leaves_flattens_and_drops_non_numbers():
    flat = tracking.numeric_leaves({"pgd20": {"accuracy": 0.5, "protocol": "x"}, "n": 3,
                                    "ok": True, "bad": float("nan"), "l": [1, 2]})
    assert flat == {"pgd20.accuracy": 0.5, "n": 3.0, "ok": 1.0}


def test_stages_nest_under_one_parent_per_method_seed(uri, tmp_path):
    for stage in ("train", "evaluate"):
        with tracking.open_run(profile="smoke", stage=stage, dataset="digits", method="jem", seed=0,
                               uri=uri, project_dir=tmp_path) as t:
            t.log_params({"a": {"b": 1}})
            t.log_metrics({"loss": 1.5, "acc": {"clean": 0.9}}, step=2)
            t.log_summary(stage, {"accuracy": 0.25})
            t.log_dict({"x": 1}, "x.json")
    with tracking.open_run(profile="smoke", stage="train", dataset="digits", method="jem", seed=1,
                           uri=uri, project_dir=tmp_path):
        pass
    client, runs = _runs(uri, "robust-ebm/smoke/digits")
    parents = [r for r in runs if r.data.tags.get("robust_ebm_role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 3
    p0 = next(p for p in parents if p.data.tags["seed"] == "0")
    kids = [c for c in children if c.data.tags["mlflow.parentRunId"] == p0.info.run_id]
    assert sorted(c.data.tags["stage"] for c in kids) == ["evaluate", "train"]
    assert p0.data.metrics["train.accuracy"] == 0.25 and p0.data.metrics["evaluate.accuracy"] == 0.25
    child = kids[0]
    assert child.data.params["a.b"] == "1" and child.data.metrics["acc.clean"] == 0.9
    assert child.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["x.json"]
    assert list((tmp_path / "mlruns").rglob("x.json")), "artifacts live beside the DB, not in the cwd"
    history = client.get_metric_history(child.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(2, 1.5)]


def test_failed_stage_marks_run_failed(uri, tmp_path):
    with pytest.raises(RuntimeError):
        with tracking.open_run(profile="smoke", stage="train", dataset="d", method="m", seed=0,
                               uri=uri, project_dir=tmp_path):
            raise RuntimeError("boom")
    _, runs = _runs(uri, "robust-ebm/smoke/d")
    assert [r.info.status for r in runs if r.data.tags.get("stage") == "train"
            and "mlflow.parentRunId" in r.data.tags] == ["FAILED"]


def test_tracking_off_is_a_noop(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUST_EBM_TRACKING", "off")
    with tracking.open_run(profile="smoke", stage="train", uri=f"sqlite:///{tmp_path}/m.db") as t:
        t.log_metrics({"a": 1})
        assert not t.enabled
    assert not (tmp_path / "m.db").exists()


def _worker(uri, project_dir, seed):
    with tracking.open_run(profile="smoke", stage="train", dataset="digits", method="standard",
                           seed=seed % 2, uri=uri, project_dir=project_dir) as t:
        t.log_metrics({"loss": float(seed)}, step=0)


def test_parallel_jobs_on_a_fresh_db_lose_no_run(uri, tmp_path):
    ctx = mp.get_context("fork")  # fork: no re-import of mlflow per worker
    procs = [ctx.Process(target=_worker, args=(uri, str(tmp_path), i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    _, runs = _runs(uri, "robust-ebm/smoke/digits")
    parents = [r for r in runs if r.data.tags.get("robust_ebm_role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and len(parents) == 2  # seeds 0 and 1: one parent each
    assert sorted(c.data.metrics["loss"] for c in children) == [0.0, 1.0, 2.0, 3.0]


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
