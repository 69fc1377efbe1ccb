"""MLflow tracking: grouping into parent/child runs, batching, parallel safety, off switch."""

import json
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
            t.log_summary(stage, {"columns": {"clean": {"accuracy": 0.25, "eps_pixel": 0.0, "steps": 0}}})
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
    assert p0.data.metrics == {"acc/clean": 0.25}  # the evaluate result's headline; train's is empty here
    assert sorted(c.info.run_name for c in kids) == ["jem/s0/evaluate", "jem/s0/train"]
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


# =========================================================================== MLflow as researchers use it

SETTING_WORDS = ("eps", "step", "steps", "n", "n_ref", "seed", "epochs", "probes", "grid", "radius", "n_images")


def _stage_results():
    """Stage results shaped like the real ones, with the settings the stages write beside their numbers."""
    attack = {"eps_pixel": 8 / 255, "step_pixel": 2 / 255, "steps": 10, "n": 128, "status": "ok"}
    evaluate = {"seed": 0, "n_examples": 128, "test_noise_std": 0.0, "seconds": 1.5,
                "columns": {"clean": {"accuracy": 0.9, "eps_pixel": 0.0, "steps": 0, "n": 128},
                            "pgd": {"accuracy": 0.4, **attack}, "energy_attack": {"accuracy": 0.5, **attack},
                            "autoattack": {"accuracy": 0.35, "clean_accuracy": 0.875, "eps_pixel": 8 / 255, "n": 32},
                            "eot": {"accuracy": None, "n": 0, "steps": 5}},
                "histogram_attacks": {"apgd_ce": {"accuracy": 0.3, "steps": 10, "n": 16}}}
    metrics = {"seconds": 0.6,
               "generators": {"sgld": {"n_samples": 40, "is_inception_n40": 3.5, "fid_inception_n40": 80.0,
                                       "is_inception_n10": 3.1, "fid_inception_n10": 120.0, "n_ref": 500,
                                       "protocols": {"uniform": {"requested": 50, "n": 40, "keys_suffix": "inception_n40"},
                                                     "small": {"requested": 10, "n": 10, "keys_suffix": "inception_n10"}},
                                       "top_confident": {"is_top10pct": 4.0, "is_std_top10pct": 0.1, "n_top10pct": 30,
                                                         "fid_top10pct": 70.0, "fid_top7": "not computed: the top 7 holds 1 image(s)",
                                                         "protocol": "JEM++ cond_is_fid"},
                                       "refclf": {"fid_refclf": 1.5, "is_refclf": 6.7, "class_consistency_refclf": 0.95,
                                                  "n": 40, "n_ref": 1237}}},
               "fisher": {"jfs": 0.17, "mfs": 0.28, "n": 32, "probes": 1},
               "landscape": {"grid": 9, "radius": 1.0, "n_images": 16},
               "energy": {"gap": {"E_xy/clean->pgd": 0.22, "E_x/clean->pgd": -0.006, "E_xy/clean->generated/sgld": -0.7},
                          "delta": {"E_x/clean-pgd": {"mean": 0.006, "std": 0.03, "n": 128}}}}
    train = {"epochs": 2, "steps": 8, "selected_epoch": 2, "seconds": 3.0, "images_per_s": 100.0,
             "val": [{"epoch": 1, "clean_acc": 0.5, "pgd_acc": 0.2, "n": 16}, {"epoch": 2, "clean_acc": 0.6, "pgd_acc": 0.3, "n": 16}]}
    return {"train": train, "evaluate": evaluate, "metrics": metrics}


HEADLINE = {"acc/clean": 0.9, "acc/pgd": 0.4, "acc/energy_attack": 0.5, "acc/autoattack": 0.35,
            "is/sgld": 3.5, "fid/sgld": 80.0, "is_top10pct/sgld": 4.0, "fid_top10pct/sgld": 70.0, "fid_refclf/sgld": 1.5, "is_refclf/sgld": 6.7,
            "consistency_refclf/sgld": 0.95, "fisher/jfs": 0.17, "fisher/mfs": 0.28, "gap/clean_adv": 0.22,
            "gap_Ex/clean_adv": -0.006, "delta_Ex/clean_adv": 0.006, "gap/clean_gen/sgld": -0.7,
            "val_selected/clean_acc": 0.6, "val_selected/pgd_acc": 0.3}


def _smoke_run(params, method="jem", **method_changes):
    profile = params.profile_config("smoke")
    run = profile.run(profile.run_datasets[0], method, 0)
    if method_changes:
        run = run.model_copy(update={"method": run.method.model_copy(update=method_changes)})
    return run


def _log_stages(run, uri, tmp_path, stages=("train", "evaluate", "metrics")):
    results = _stage_results()
    run = run.model_copy(update={"tracking": run.tracking.model_copy(update={"uri": uri})})
    for stage in stages:
        with tracking.open_stage_run(run, stage, project_dir=tmp_path) as t:
            t.log_summary(stage, results[stage])


def test_stage_numbers_pick_results_not_settings():
    for stage, result in _stage_results().items():
        numbers, headline = tracking.stage_numbers(stage, result)
        assert headline.items() <= numbers.items()
        assert not [k for k in numbers if k.rsplit("/", 1)[-1].rsplit(".", 1)[-1] in SETTING_WORDS], numbers
    merged = {}
    for stage, result in _stage_results().items():
        merged |= tracking.stage_numbers(stage, result)[1]
    assert merged == HEADLINE  # eot's accuracy is None: left out, not logged as 0
    assert tracking.stage_numbers("generate", {"seed": 0, "generators": {}}) == ({}, {})


def test_parent_run_carries_settings_as_params_and_headline_numbers_as_metrics(uri, tmp_path, params):
    from mlflow.tracking import MlflowClient

    run = _smoke_run(params)
    _log_stages(run, uri, tmp_path)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"robust-ebm/smoke/{run.dataset_name}")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"  # classic ML UI, not GenAI
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("robust_ebm_role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == "jem/s0" and parent.info.status == "FINISHED"
    p = parent.data.params
    assert p["method"] == "jem" and p["dataset"] == run.dataset_name and p["seed"] == "0"
    assert p["data.source"] == run.dataset.source and p["method.loss"] == run.method.loss
    assert p["method.optim.lr"] == str(run.method.optim.lr) and p["model.arch"] == run.model.arch
    assert p["method.optim.betas"] == json.dumps(run.method.optim.betas, separators=(",", ":"))
    assert not [k for k in p if k.startswith(("training.", "evaluation.", "paths.", "tracking."))]
    assert parent.data.metrics == HEADLINE  # short names, results only: no setting among the metrics
    view = json.loads(client.get_experiment(exp.experiment_id).tags[tracking.VIEW_TAG])  # the runs table's columns
    columns = view["selectedColumns"]
    assert {f"metrics.`{k}`" for k in HEADLINE} <= set(columns) and "params.`method.loss`" in columns
    assert columns.index("metrics.`acc/clean`") < columns.index("metrics.`fid_refclf/sgld`")
    assert sorted(c.info.run_name for c in children) == ["jem/s0/evaluate", "jem/s0/metrics", "jem/s0/train"]
    for child in children:
        stage = child.data.tags["stage"]
        section = tracking.STAGE_SECTIONS[stage]
        assert child.data.params and all(k.startswith(section + ".") for k in child.data.params)
        assert not [k for k in child.data.metrics if k.rsplit("/", 1)[-1] in SETTING_WORDS]
        assert "settings.json" in [a.path for a in client.list_artifacts(child.info.run_id)]
    evaluate = next(c for c in children if c.data.tags["stage"] == "evaluate")
    assert evaluate.data.params["evaluation.pgd.steps"] == str(run.evaluation.pgd.steps)
    assert evaluate.data.metrics["acc_diag/apgd_ce"] == 0.3 and evaluate.data.metrics["acc/autoattack_subset_clean"] == 0.875


def test_changed_settings_open_a_new_parent_instead_of_failing(uri, tmp_path, params):
    """MLflow params are immutable: a rerun with another lr logs into a new parent of the same name."""
    from mlflow.tracking import MlflowClient

    run = _smoke_run(params)
    _log_stages(run, uri, tmp_path, ("train",))
    _log_stages(run, uri, tmp_path, ("evaluate",))  # same settings: same parent
    changed = _smoke_run(params, optim=run.method.optim.model_copy(update={"lr": run.method.optim.lr / 10}))
    _log_stages(changed, uri, tmp_path, ("train",))
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"robust-ebm/smoke/{run.dataset_name}")
    parents = client.search_runs([exp.experiment_id], "tags.robust_ebm_role = 'parent'",
                                 order_by=["attributes.start_time ASC"])
    assert [r.info.run_name for r in parents] == ["jem/s0", "jem/s0"]
    assert [r.data.params["method.optim.lr"] for r in parents] == [str(run.method.optim.lr), str(run.method.optim.lr / 10)]
    assert "acc/clean" in parents[0].data.metrics and "acc/clean" not in parents[1].data.metrics


def test_long_param_values_are_cut_to_the_limit_and_stay_distinct():
    a, b = tracking.param_value(list(range(400))), tracking.param_value(list(range(401)))
    assert len(a) == len(b) == tracking.PARAM_VALUE_CHARS and a != b and "...sha256:" in a
    assert tracking.param_value([0.9, 0.999]) == "[0.9,0.999]" and tracking.param_value(None) == "None"
    assert tracking.as_params({"a": {"b c": 1, "d+e": "x"}}) == {"a.b c": "1", "a.d_e": "x"}


def test_figures_of_one_run_go_to_its_parent_as_images(uri, tmp_path, params):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    run = _smoke_run(params)
    _log_stages(run, uri, tmp_path, ("evaluate",))
    d = run.dataset_name
    figures = tmp_path / "figures"
    figures.mkdir()
    entries = [{"name": f"energy_hist_attacks_{d}_jem_s0", "kind": "energy_histograms", "dataset": d, "method": "jem",
                "seed": 0}, {"name": f"samples_{d}_jem_s0_sgld", "kind": "samples", "dataset": d, "method": "jem", "seed": 0},
               {"name": f"dynamics_{d}_standard_s0", "kind": "dynamics", "dataset": d, "method": "standard", "seed": 0},
               {"name": f"clean_vs_autoattack_{d}", "kind": "accuracy_scatter", "dataset": d}]
    for e in entries:
        Image.new("RGB", (20, 10), (255, 0, 0)).save(figures / f"{e['name']}.png")
        e["files"] = [f"{e['name']}.png", f"{e['name']}.pdf"]
    (figures / "figures.json").write_text(json.dumps({"profile": "smoke", "figures": entries}))
    profile = params.profile_config("smoke")
    with tracking.open_run(profile="smoke", stage="figures", uri=uri, project_dir=tmp_path) as t:
        missing = tracking.log_run_figures(t, figures / "figures.json",
                                           lambda ds, m, s: tracking.run_settings(profile.run(ds, m, s).to_dict()),
                                           profile="smoke")
    assert missing == [f"dynamics_{d}_standard_s0"]  # standard/s0 has no parent run in this store
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"robust-ebm/smoke/{d}")
    (parent,) = client.search_runs([exp.experiment_id], "tags.robust_ebm_role = 'parent'")
    images = [a.path for a in client.list_artifacts(parent.info.run_id, "images")]
    keys = sorted({p.split("/", 1)[1].split("+", 1)[0] for p in images})
    assert keys == ["energy_hist_attacks", "samples_sgld"]  # one key per figure kind, the same for every method
    assert any(p.endswith(".png") for p in images)


def test_stage_run_with_tracking_off_logs_nothing(monkeypatch, tmp_path, params):
    monkeypatch.setenv("ROBUST_EBM_TRACKING", "off")
    run = _smoke_run(params)
    run = run.model_copy(update={"tracking": run.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path}/m.db"})})
    with tracking.open_stage_run(run, "train", project_dir=tmp_path) as t:
        t.log_summary("train", _stage_results()["train"])
        t.log_image(tmp_path / "absent.png", "x")
        assert not t.enabled
    assert tracking.log_run_figures(t, tmp_path / "absent.json", None, profile="smoke") == []
    assert not (tmp_path / "m.db").exists()


def test_figures_command_logs_a_runs_histogram_to_its_parent(uri, tmp_path, params, repo_root, monkeypatch):
    """`robust-ebm figures` end to end on a real store: the energy histogram of jem/s0 becomes an image of the
    jem/s0 parent; figures of several runs stay artifacts of the figures run."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from robust_ebm import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run = _smoke_run(params)
    _log_stages(run, uri, tmp_path, ("evaluate",))
    d = run.dataset_name
    eval_dir = tmp_path / "results" / "eval" / d / "jem"
    eval_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(eval_dir / "s0.energies.npz", **{f"{s}_{k}": rng.normal(size=64) - (s == "pgd")
                                               for s in ("clean", "pgd") for k in ("marginal", "joint")})
    (eval_dir / "s0.json").write_text(json.dumps({"columns": {"clean": {"accuracy": 0.9}, "autoattack": {"accuracy": 0.3},
                                                              "pgd": {"accuracy": 0.4, "eps_pixel": 8 / 255}}}))
    assert cli.main(["figures", "--params", str(repo_root / "params.yaml"), "--profile", "smoke",
                     "--results", str(tmp_path / "results"), "--out", str(tmp_path / "figures")]) == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"robust-ebm/smoke/{d}")
    (parent,) = client.search_runs([exp.experiment_id], "tags.robust_ebm_role = 'parent'")
    images = [a.path for a in client.list_artifacts(parent.info.run_id, "images")]
    assert images and all(p.startswith("images/energy_hist_attacks+step+0+") for p in images)
    profile_exp = client.get_experiment_by_name("robust-ebm/smoke")
    assert profile_exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    (figures_run,) = client.search_runs([profile_exp.experiment_id])
    drawn = {a.path for a in client.list_artifacts(figures_run.info.run_id, "figures")}
    assert {f"figures/clean_vs_autoattack_{d}.png", f"figures/energy_hist_clean_adv_gen_{d}_s0.png",
            "figures/figures.json"} <= drawn


def test_git_commit_and_dirty_flag_of_a_checkout(tmp_path):
    """tracking.git_commit / git_dirty: HEAD of the checkout holding a folder, and whether tracked files changed
    (untracked ones do not count); None outside a checkout. MLflow's commit tag takes the same commit."""
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    assert tracking.git_commit(repo) is None and tracking.git_dirty(repo) is None  # tmp_path is in no checkout

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (repo / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert tracking.git_commit(repo) == head and tracking.git_dirty(repo) is False
    assert tracking.source_tags(repo)["mlflow.source.git.commit"] == head
    (repo / "new.txt").write_text("untracked")
    assert tracking.git_dirty(repo) is False
    (repo / "a.txt").write_text("2")
    assert tracking.git_dirty(repo) is True and tracking.git_commit(repo) == head


def test_the_commit_is_looked_up_in_one_place():
    """The package and the benchmarks ask tracking.git_commit for the project's commit; none runs git itself."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    owner = root / "src" / "robust_ebm" / "tracking.py"
    callers = [p for d in ("src", "benchmarks", "tests/golden") for p in (root / d).rglob("*.py")
               if p != owner and '"rev-parse"' in p.read_text()]
    assert callers == []
