"""Run integrity: nothing stale, nothing lost (docs/reliability.md lists every case below).

    stale results      editing a module reruns exactly the jobs whose command imports it (Snakemake, DVC)
    resume key         a train checkpoint is resumed only under the same code, data and settings
    MLflow status      parent runs end FINISHED / FAILED / KILLED, never RUNNING forever
    concurrency        8 processes on one fresh sqlite store; overlapping Snakemake runs are refused
    kill and resume    every method family resumes bit-exactly (cut by max_steps; SIGKILL in `slow`)
    divergence         NaN / inf / exploding energies roll back, apply the remedy, log it, or stop clearly
    interrupted DAG    SIGINT / SIGKILL of a real Snakemake run, then a rerun (`slow`)
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import sigkill_when
from repo_copy import ROOT, copy_checkout, hermetic_env, parse_dry_run, snakemake
from robust_ebm import methods, plan, tracking
from robust_ebm.data import class_stats
from robust_ebm.divergence import TrainingDiverged
from robust_ebm.models import ModelConfig, load_classifier
from robust_ebm.train import train_splits

PROFILE = "smoke"
TARGET = f"results/{PROFILE}/tables"


# =========================================================================== stale results


def _outputs_as_placeholders(root: Path) -> None:
    """Every output of the smoke plan as a tiny file (directory outputs get one file), in DAG order."""
    from robust_ebm.config import load_params
    from robust_ebm.plan import Plan

    directories = {"data", "generate", "figures", "tables"}
    for job in Plan(load_params(root / "params.yaml"), PROFILE).jobs:
        for out in job.outputs:
            path = root / out
            if job.stage in directories:
                path.mkdir(parents=True, exist_ok=True)
                (path / "placeholder").write_text(out)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(out)


# One job of each stage for DVC (a status over all 75 smoke stages costs minutes of CPU).
DVC_STAGES = ("data@smoke-digits", "train@smoke-digits-standard-s0", "evaluate@smoke-digits-standard-s0",
              "generate@smoke-digits-standard-s0", "metrics@smoke-digits-standard-s0", "figures@smoke", "tables@smoke")


@pytest.fixture(scope="module")
def results_tree(tmp_path_factory):
    """A copy of the checkout whose smoke results are complete and up to date for both tools."""
    tmp = tmp_path_factory.mktemp("stale")
    root = copy_checkout(tmp / "repo")
    env = hermetic_env(tmp, PYTHONPATH=str(root / "src"))
    _outputs_as_placeholders(root)
    done = snakemake(["--touch", "--forceall", "--cores", "1", TARGET, "--config", f"profile={PROFILE}"], root, env)
    assert done.returncode == 0, done.stdout + done.stderr
    up_to_date = snakemake(["-n", "--cores", "1", TARGET, "--config", f"profile={PROFILE}"], root, env)
    assert "Nothing to be done" in up_to_date.stdout + up_to_date.stderr, up_to_date.stdout + up_to_date.stderr
    adopted = subprocess.run(["robust-ebm", "adopt-dvc", "--profile", PROFILE], cwd=root, capture_output=True,
                             text=True, env=hermetic_env(tmp, PYTHONPATH=str(root / "src")), timeout=900)
    assert adopted.returncode == 0 and "77 stages of profile smoke recorded" in adopted.stdout, adopted.stderr
    assert _dvc_changed(root, tmp) == {}  # the Snakemake run is DVC's now: every smoke stage up to date
    still = snakemake(["-n", "--cores", "1", TARGET, "--config", f"profile={PROFILE}"], root, env)
    assert "Nothing to be done" in still.stdout + still.stderr, still.stdout + still.stderr  # and still Snakemake's
    return root, env, tmp


_DVC_SCRIPT = textwrap.dedent("""
    import json, sys
    import dvc.repo
    targets = sys.argv[2:]
    with dvc.repo.Repo(".") as repo:
        print(json.dumps(repo.status(targets=targets)))
""")


def _dvc(root: Path, tmp: Path, action: str) -> dict:
    """`dvc status` of DVC_STAGES, via DVC's API in a child process."""
    env = hermetic_env(tmp, PYTHONPATH=str(root / "src"), DVC_SITE_CACHE_DIR=str(tmp / "cache" / "dvc"))
    proc = subprocess.run([sys.executable, "-c", _DVC_SCRIPT, action, *DVC_STAGES], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dvc_cli(root: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = hermetic_env(tmp, PYTHONPATH=str(root / "src"), DVC_SITE_CACHE_DIR=str(tmp / "cache" / "dvc"))
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)


def _dvc_changed(root: Path, tmp: Path) -> dict:
    """`dvc status --json` of the smoke stages. Without targets DVC builds its index once (~15 s here);
    each named target costs seconds more."""
    proc = _dvc_cli(root, tmp, "status", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {k: v for k, v in json.loads(proc.stdout).items() if k.split("@")[1].split("-")[0] == PROFILE}


def test_one_figure_setting_marks_only_the_figure_and_table_stages_in_dvc(results_tree):
    """Acceptance of issue 11.4: DVC stages depend on their own resolved settings, not the profile section.
    The edit first changes settings@smoke (it reads params.yaml); its rerun rewrites results/smoke/settings.json,
    after which exactly the stages whose settings digest changed are marked, as Snakemake reruns them."""
    root, _, tmp = results_tree
    params = root / "params.yaml"
    original = params.read_text()
    edited = original.replace("        samples: {n_per_class: 4}", "        samples: {n_per_class: 5}")  # smoke's grid
    try:
        params.write_text(edited)
        assert edited != original and set(_dvc_changed(root, tmp)) == {"settings@smoke"}
        repro = _dvc_cli(root, tmp, "repro", "--single-item", "settings@smoke")
        assert repro.returncode == 0, repro.stdout + repro.stderr
        changed = _dvc_changed(root, tmp)
        assert set(changed) == {"figures@smoke", "tables@smoke"}, changed
        assert "figures.smoke" in json.dumps(changed["figures@smoke"])
    finally:
        params.write_text(original)
        restored = _dvc_cli(root, tmp, "repro", "--single-item", "settings@smoke")
        assert restored.returncode == 0, restored.stdout + restored.stderr
    assert _dvc_changed(root, tmp) == {}


def test_dvc_metrics_show_lists_the_summary_and_tolerates_absent_profiles(results_tree):
    root, _, tmp = results_tree
    summary = root / "results" / PROFILE / "summary.json"
    placeholder = summary.read_bytes()
    try:
        summary.write_text(json.dumps({"verdicts": {"holds": 2, "fails": 0}, "accuracy": {"digits": {"jem": {"clean": 0.9}}}}))
        shown = _dvc_cli(root, tmp, "metrics", "show", "--json")  # mini and paper have no results here
        assert shown.returncode == 0, shown.stdout + shown.stderr
        data = json.loads(shown.stdout)[""]["data"]
        assert data[f"results/{PROFILE}/summary.json"]["data"]["accuracy"] == {"digits": {"jem": {"clean": 0.9}}}
        assert set(data) == {f"results/{p}/summary.json" for p in ("smoke", "mini", "paper")}  # the only metrics
    finally:
        summary.write_bytes(placeholder)


def _snakemake_jobs(root: Path, env: dict) -> list[dict]:
    proc = snakemake(["-n", "-p", "--cores", "1", TARGET, "--config", f"profile={PROFILE}"], root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return parse_dry_run(proc.stdout + proc.stderr)


TRAIN_AND_AFTER = {"train", "evaluate", "generate", "metrics", "claims", "figures", "tables"}


@pytest.mark.parametrize("module, rules, dvc_stages", [
    ("sampling.py", TRAIN_AND_AFTER, {"train", "evaluate", "generate", "metrics"}),
    ("models.py", TRAIN_AND_AFTER, {"train", "evaluate", "generate", "metrics"}),
    ("figures.py", {"figures", "tables"}, {"figures"}),
])
def test_editing_a_module_reruns_exactly_the_jobs_that_import_it(results_tree, module, rules, dvc_stages):
    """Acceptance of issues 12.1/14: the edit reruns the train jobs and all after them (sampling, models),
    or figures and tables only (figures). DVC reports the stages whose own code changed."""
    root, env, tmp = results_tree
    path = root / "src" / "robust_ebm" / module
    original, stat = path.read_bytes(), path.stat()
    path.write_bytes(original + b"\n# edited\n")
    try:
        jobs = _snakemake_jobs(root, env)
        status = _dvc(root, tmp, "status")
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    ran = {j["rule"] for j in jobs} - {"data"}  # data imports models/sampling through config: it may rerun too
    assert ran == rules, sorted(ran)
    if "train" in rules:
        trained = sorted(o for j in jobs if j["rule"] == "train" for o in j["output"] if o.endswith("model.pt"))
        assert len(trained) == 18, trained  # every smoke method
    changed = {name.split("@")[0] for name in status}
    assert dvc_stages <= changed and changed - {"data"} <= dvc_stages | {"figures", "tables"}, status
    if module == "figures.py":
        assert changed == {"figures"}, status
    assert all(f"src/robust_ebm/{module}" in str(entry) for entry in status.values())


def test_every_stage_depends_on_the_cli_and_its_own_entry_module():
    for stage, entry in [("data", "data.py"), ("train", "train.py"), ("evaluate", "evaluate.py"),
                         ("generate", "generate.py"), ("metrics", "metrics/stage.py"), ("figures", "figures.py"),
                         ("tables", "tables.py")]:
        files = plan.code_files(stage)
        assert {f"src/robust_ebm/{entry}", "src/robust_ebm/cli.py", "src/robust_ebm/__init__.py",
                "src/robust_ebm/tracking.py"} <= set(files), stage
        assert all((ROOT / f).is_file() for f in files)
    assert "src/robust_ebm/sampling.py" in plan.code_files("train")        # via methods/ (jem.py)
    assert "src/robust_ebm/figures.py" not in plan.code_files("train")
    assert "src/robust_ebm/resources/paper_tables.yaml" in plan.code_files("tables")  # data named by path
    assert "src/robust_ebm/bench.py" not in set().union(*map(plan.code_files, plan.STAGES))  # another cmd_


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """plan's closure and digests computed over an editable copy of the package."""
    copy = tmp_path / "robust_ebm"
    shutil.copytree(plan.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(plan, "PACKAGE_DIR", copy)
    plan.stage_modules.cache_clear()
    plan._parse.cache_clear()
    yield copy
    plan.stage_modules.cache_clear()
    plan._parse.cache_clear()


def _edit(copy: Path, rel: str, text: str) -> None:
    (copy / rel).write_text((copy / rel).read_text() + text)
    plan.stage_modules.cache_clear()
    plan._parse.cache_clear()


def test_train_code_digest_follows_its_closure_only(package_copy):
    before = plan.code_digest("train")
    _edit(package_copy, "figures.py", "\n# edited\n")
    assert plan.code_digest("train") == before
    _edit(package_copy, "sampling.py", "\n# edited\n")
    assert plan.code_digest("train") != before


def test_a_new_lazy_import_joins_the_closure(package_copy):
    assert "src/robust_ebm/bench.py" not in plan.code_files("figures")
    _edit(package_copy, "figures.py", "\n\ndef _later():\n    from .bench import run_bench\n")
    assert "src/robust_ebm/bench.py" in plan.code_files("figures")
    assert "src/robust_ebm/bench.py" not in plan.code_files("tables")
    _edit(package_copy, "tables.py", "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import bench\n")
    assert "src/robust_ebm/bench.py" not in plan.code_files("tables")  # never executed


def test_cli_helpers_count_only_for_the_stages_that_reach_them(package_copy):
    _edit(package_copy, "cli.py", "\n\ndef _helper():\n    from . import bench\n")
    assert "src/robust_ebm/bench.py" not in plan.code_files("figures")   # nothing calls it
    cli = package_copy / "cli.py"
    head = next(line + "\n" for line in cli.read_text().splitlines() if line.startswith("def _profile_stage("))
    assert head in cli.read_text()
    cli.write_text(cli.read_text().replace(head, head + "    _helper()\n"))
    _edit(package_copy, "cli.py", "")
    assert "src/robust_ebm/bench.py" in plan.code_files("figures")       # figures and tables use it
    assert "src/robust_ebm/bench.py" not in plan.code_files("train")     # train's path does not


# =========================================================================== resume keyed on code, data, settings

from test_train import final_weights, make_run, make_splits  # noqa: E402  (tiny runs, shared with test_train)


def _weights_equal(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_finished_checkpoint_is_reused_only_under_the_same_key(tmp_path, monkeypatch, capsys):
    run, splits = make_run("pgd_at", epochs=1), make_splits()
    train_splits(run, splits, None, tmp_path)
    old, _ = final_weights(tmp_path)
    same = train_splits(run, splits, None, tmp_path)   # same key: nothing trained, same weights
    assert same["steps"] == 4 and _weights_equal(old, final_weights(tmp_path)[0])
    assert "resuming" in capsys.readouterr().out

    # The measured failure: a code edit (here PGD-AT's loss times 0) rerun by the workflow wrote the old weights.
    real_loss = methods.REGISTRY["pgd_at"].loss

    def zero_loss(self, model, prepared, *, epoch):
        out = real_loss(self, model, prepared, epoch=epoch)
        out.loss = out.loss * 0
        return out

    monkeypatch.setattr(methods.REGISTRY["pgd_at"], "loss", zero_loss)
    monkeypatch.setattr(plan, "code_digest", lambda stage: "edited-code")
    info = train_splits(run, splits, None, tmp_path)
    assert info["complete"] and info["steps"] == 4
    assert not _weights_equal(old, final_weights(tmp_path)[0])
    out = capsys.readouterr().out
    assert out.count("afresh") == 1 and "the train code changed" in out
    assert (tmp_path / "stale" / "checkpoint.pt").is_file() and (tmp_path / "stale" / "model.pt").is_file()
    assert "train code" in json.loads((tmp_path / "stale" / "why.json").read_text())["reason"]


def test_changed_data_starts_afresh(tmp_path, capsys):
    run = make_run(epochs=1, attack=False)
    train_splits(run, make_splits(), None, tmp_path)
    old, _ = final_weights(tmp_path)
    other = make_splits()
    other.train.images[0, 0, 0, 0] ^= 1  # one pixel of the training data differs (a data.py change, say)
    info = train_splits(run, other, None, tmp_path)
    assert info["steps"] == 4 and "the data changed" in capsys.readouterr().out
    assert not _weights_equal(old, final_weights(tmp_path)[0])


def test_changed_training_setting_starts_afresh_instead_of_failing(tmp_path, capsys):
    """Snakemake deletes model.pt before such a rerun; it must train, not raise."""
    train_splits(make_run(epochs=1, attack=False), make_splits(), None, tmp_path, max_steps=2)
    (tmp_path / "model.pt").unlink(missing_ok=True)
    info = train_splits(make_run(epochs=1, attack=False, training={"val_batch_size": 7}), make_splits(), None, tmp_path)
    assert info["complete"] and (tmp_path / "model.pt").is_file() and "the settings changed" in capsys.readouterr().out


def test_checkpoint_without_resume_key_is_not_reused(tmp_path, capsys):
    from robust_ebm.checkpoint import load_checkpoint, save_checkpoint

    run = make_run(epochs=1, attack=False)
    train_splits(run, make_splits(), None, tmp_path, max_steps=2)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    del ckpt["progress"]["resume_key"]  # as written before resume keys existed
    save_checkpoint(tmp_path / "checkpoint.pt", ckpt)
    info = train_splits(run, make_splits(), None, tmp_path)
    assert info["steps"] == 4 and "no resume key" in capsys.readouterr().out


def test_generate_keeps_samples_only_under_the_same_key(tmp_path, monkeypatch):
    from robust_ebm import generate

    out = tmp_path / "samples"
    out.mkdir()
    key = {"code": "a", "settings": "b", "model": "m1", "buffer": None, "data": ["d", "s"]}
    (out / "sgld.npz").write_bytes(b"old")
    (out / "sgld_grid.png").write_bytes(b"old")
    report = {"generators": {"sgld": {"files": {"npz": "sgld.npz", "grid": "sgld_grid.png"}}}, "resume_key": key}
    (out / "generate.json").write_text(json.dumps(report))
    generate._forget_stale(out, out / "generate.json", key)
    assert (out / "sgld.npz").is_file()                   # same key: kept
    generate._forget_stale(out, out / "generate.json", {**key, "model": "m2"})
    assert not any(out.iterdir())                         # another model: nothing kept


# =========================================================================== MLflow run status


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _open(uri, tmp_path, stage, method="jem", seed=0):
    return tracking.open_run(profile="smoke", stage=stage, dataset="digits", method=method, seed=seed,
                             uri=uri, project_dir=tmp_path)


def _status(uri, method="jem", seed=0):
    """(parent status, {stage: latest child status})."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("robust-ebm/smoke/digits")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("robust_ebm_role") == "parent"
                  and r.data.tags["method"] == method and r.data.tags["seed"] == str(seed))
    stages: dict[str, str] = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id:
            stages.setdefault(r.data.tags["stage"], r.info.status)
    return parent.info.status, stages


def test_parent_run_finishes_when_its_stages_have_finished(uri, tmp_path):
    with _open(uri, tmp_path, "train"):
        assert _status(uri)[0] == "RUNNING"
    for stage in ("evaluate", "generate"):
        with _open(uri, tmp_path, stage):
            with _open(uri, tmp_path, "generate" if stage == "evaluate" else "evaluate"):
                pass
            assert _status(uri)[0] == "RUNNING"   # one stage still runs
    with _open(uri, tmp_path, "metrics"):
        pass
    assert _status(uri) == ("FINISHED", dict.fromkeys(("train", "evaluate", "generate", "metrics"), "FINISHED"))


def test_failed_stage_fails_the_parent_until_it_is_rerun(uri, tmp_path):
    with _open(uri, tmp_path, "train"):
        pass
    with pytest.raises(RuntimeError), _open(uri, tmp_path, "evaluate"):
        raise RuntimeError("boom")
    assert _status(uri) == ("FAILED", {"train": "FINISHED", "evaluate": "FAILED"})
    with _open(uri, tmp_path, "generate"):
        pass
    assert _status(uri)[0] == "FAILED"                # another stage finishing does not hide the failure
    with _open(uri, tmp_path, "evaluate"):
        pass
    assert _status(uri)[0] == "FINISHED"


def test_interrupted_stage_is_killed_not_failed(uri, tmp_path):
    with pytest.raises(KeyboardInterrupt), _open(uri, tmp_path, "train"):
        raise KeyboardInterrupt
    assert _status(uri) == ("KILLED", {"train": "KILLED"})


_STAGE_CHILD = textwrap.dedent("""
    import sys, time
    from robust_ebm import cli, train

    def slow_train(run, data_dir, out_dir, tracker=None):
        print("ready", flush=True)
        time.sleep(120)

    train.train_stage = slow_train
    sys.exit(cli.main(["train", "--params", {params!r}, "--profile", "smoke", "--dataset", "digits", "--method",
                       "jem", "--seed", "0", "--data", "unused", "--out", {out!r}]))
""")


def _start_stage(tmp_path, uri) -> subprocess.Popen:
    script = tmp_path / "stage.py"
    script.write_text(_STAGE_CHILD.format(params=str(ROOT / "params.yaml"), out=str(tmp_path / "out")))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT / "src")}
    # SIGINT at its default, as in a stage started from a terminal: a suite run as a background job of a
    # non-interactive shell (`pytest ... &` in a script) has SIGINT ignored, and a child inherits that.
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
    return proc


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signalled_stage_process_ends_its_runs_killed(uri, tmp_path, sig, code):
    proc = _start_stage(tmp_path, uri)
    proc.send_signal(sig)
    assert proc.wait(60) == code, proc.stderr.read()[-3000:]
    assert "interrupted" in proc.stderr.read()
    assert _status(uri) == ("KILLED", {"train": "KILLED"})


def test_sigkilled_stage_is_marked_killed_by_the_next_stage_run(uri, tmp_path):
    proc = _start_stage(tmp_path, uri)
    proc.kill()
    proc.wait(60)
    assert _status(uri) == ("RUNNING", {"train": "RUNNING"})  # a SIGKILL cannot be caught
    with _open(uri, tmp_path, "figures-check", method="other"):  # any later run in the experiment reaps it
        pass
    assert _status(uri) == ("KILLED", {"train": "KILLED"})


# =========================================================================== concurrency


def _logging_worker(uri, project_dir, index):
    methods_ = ["standard", "pgd_at", "jem", "weat_nat"]
    stage = ("train", "evaluate")[index % 2]
    artifact = Path(project_dir) / f"artifact{index}.json"
    artifact.write_text(json.dumps({"index": index}))
    with tracking.open_run(profile="smoke", stage=stage, dataset="digits", method=methods_[index // 2], seed=0,
                           uri=uri, project_dir=project_dir) as t:
        t.log_params({"worker": index, "settings": {f"p{k}": k for k in range(150)}})  # > one params batch
        for step in range(5):
            t.log_metrics({"loss": float(index), "acc": {"clean": step / 10}}, step=step)
        t.log_summary("evaluate", {"columns": {"clean": {"accuracy": index / 10}}})
        t.log_artifact(artifact, artifact_path=stage)


def test_eight_stage_processes_on_one_fresh_sqlite_store(uri, tmp_path):
    from mlflow.tracking import MlflowClient

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_logging_worker, args=(uri, str(tmp_path), i)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * 8
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("robust-ebm/smoke/digits")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if r.data.tags.get("robust_ebm_role") == "parent"]
    assert len(children) == 8 and len(parents) == 4
    for child in children:
        i = int(child.data.params["worker"])
        assert child.info.status == "FINISHED" and len(child.data.params) == 151
        assert [m.value for m in client.get_metric_history(child.info.run_id, "acc.clean")] == [0, .1, .2, .3, .4]
        stage = child.data.tags["stage"]
        assert [a.path for a in client.list_artifacts(child.info.run_id, stage)] == [f"{stage}/artifact{i}.json"]
    assert all(p.info.status == "FINISHED" and set(p.data.metrics) == {"acc/clean"} for p in parents)


def test_two_snakemake_runs_on_one_results_folder_do_not_overlap(tmp_path):
    """Snakemake's directory lock refuses a second invocation whose jobs overlap a running one."""
    root = copy_checkout(tmp_path / "repo")
    shim = tmp_path / "bin"
    shim.mkdir()
    marker = tmp_path / "started"
    (shim / "robust-ebm").write_text(f"#!/bin/sh\ntouch {marker}\nsleep 120\n")
    (shim / "robust-ebm").chmod(0o755)
    env = hermetic_env(tmp_path, PYTHONPATH=str(root / "src"))
    env["PATH"] = f"{shim}{os.pathsep}{env['PATH']}"
    data = f"results/{PROFILE}/data/digits"
    first = subprocess.Popen([str(Path(sys.executable).parent / "snakemake"), "--cores", "1", data, "--config",
                              f"profile={PROFILE}"], cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.2)
        second = snakemake(["--cores", "1", TARGET, "--config", f"profile={PROFILE}"], root, env)
        assert second.returncode != 0 and "cannot be locked" in second.stdout + second.stderr, second.stderr[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


# =========================================================================== kill and resume per method family

FAMILIES = {"AT": "pgd_at", "TRADES-like": "trades", "SGLD": "jem", "PYLD": "jempp", "SAM": "sadajem",
            "EB-JDAT": "ebjdat_jem"}


def family_run(method: str, guard: dict | None = None, training: dict | None = None):
    """The smoke profile's settings of `method`, shrunk to the tiny synthetic data of test_train."""
    from robust_ebm.config import load_params

    base = load_params(ROOT / "params.yaml").profile_config("smoke").run("digits", method, 0)
    tiny = make_run(training=training)
    m = base.method
    m = m.model_copy(update={
        # every family on the same 64 training images in 4 full batches per epoch (TRADES-like methods
        # otherwise train on train + valid with a partial last batch, as their references do)
        "data": m.data.model_copy(update={"batch_size": 16, "holdout": True, "drop_last": True,
                                           **({"px_batch_size": 16} if m.data.px_batch_size is not None else {})}),
        "schedule": m.schedule.model_copy(update={"epochs": 2, "milestones": [1], "warmup_iters": 2}),
        "guard": m.guard.model_copy(update=guard or {}),
        "dynamics": m.dynamics.model_copy(update={"n_fixed": 8, "every_n_epochs": 0}),
        **({"sampler": m.sampler.model_copy(update={"buffer_size": 40})} if m.sampler is not None else {}),
    })
    return tiny.model_copy(update={"method_name": method, "method": m,
                                   "model": ModelConfig(arch="tiny_cnn", width=4)})


def family_data():
    splits = make_splits()
    stats = class_stats(splits.train.images.float() / 255, splits.train.labels, 10, 3)
    return splits, stats


@pytest.mark.parametrize("family", FAMILIES)
def test_family_cut_then_resumed_equals_uninterrupted(family, tmp_path):
    run, (splits, stats) = family_run(FAMILIES[family]), family_data()
    train_splits(run, splits, stats, tmp_path / "ref")
    part = train_splits(run, splits, stats, tmp_path / "cut", max_steps=6)   # mid epoch 2
    assert not part["complete"] and part["steps"] == 6
    train_splits(run, splits, stats, tmp_path / "cut")
    assert _weights_equal(final_weights(tmp_path / "ref")[0], final_weights(tmp_path / "cut")[0])


_KILL_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_reliability_runs import FAMILIES, family_data, family_run
    from robust_ebm import methods
    from robust_ebm.train import train_splits

    cls = methods.REGISTRY[{loss!r}]
    real = cls.loss
    def slow(self, *a, **kw):
        time.sleep(0.1)
        return real(self, *a, **kw)
    cls.loss = slow
    splits, stats = family_data()
    train_splits(family_run({method!r}, training={{"checkpoint_every_steps": 1}}), splits, stats, {out!r})
""")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_sigkill_mid_epoch_then_resume_is_bit_exact(family, tmp_path):
    method = FAMILIES[family]
    run = family_run(method, training={"checkpoint_every_steps": 1})
    out, script = tmp_path / "killed", tmp_path / "child.py"
    script.write_text(_KILL_CHILD.format(tests=str(Path(__file__).parent), loss=run.method.loss, method=method,
                                         out=str(out)))
    sigkill_when(script, out / "checkpoint.pt", ready=lambda p: p["global_step"] >= 5, timeout=300)  # mid epoch 2
    assert not (out / "model.pt").exists()
    splits, stats = family_data()
    train_splits(run, splits, stats, out)
    train_splits(run, splits, stats, tmp_path / "ref")
    assert _weights_equal(final_weights(tmp_path / "ref")[0], final_weights(out)[0])


# =========================================================================== divergence guard per family


def _poisoned(cls, bad_steps, how):
    """`cls` whose first loss() of each listed step (1-based) is NaN/inf, or whose sampler energies explode."""

    class Poisoned(cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.steps, self.poisoned = 0, set()

        def prepare(self, *a, **kw):
            self.steps += 1
            return super().prepare(*a, **kw)

        def loss(self, *a, **kw):
            out = super().loss(*a, **kw)
            hit = self.steps >= 2 if bad_steps == "all" else self.steps in bad_steps
            if hit and self.steps not in self.poisoned:
                self.poisoned.add(self.steps)
                if how == "energy":
                    out.energies = {**out.energies, "E_x/sgld": out.energies["E_x/sgld"] - 1e6}
                else:
                    out.loss = out.loss * float(how)
            return out

    return Poisoned


FAULTS = ["nan", "inf"]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_injected_fault_rolls_back_and_completes(family, fault, tmp_path, monkeypatch):
    from test_train import RecordingTracker

    method = FAMILIES[family]
    run = family_run(method, guard={"max_retries": 2, "remedy": "lr_decay", "lr_factor": 0.5})
    monkeypatch.setitem(methods.REGISTRY, run.method.loss, _poisoned(methods.REGISTRY[run.method.loss], {6}, fault))
    tracker = RecordingTracker()
    splits, stats = family_data()
    info = train_splits(run, splits, stats, tmp_path, tracker)
    assert info["complete"] and info["steps"] == 8
    (retry,) = info["retries"]
    assert retry["step"] == 6 and retry["reason"] == "non-finite loss" and retry["resumed_from_step"] == 4
    assert "lr scaled by 0.5" in retry["change"]
    (logged,) = json.loads((tmp_path / "train.json").read_text())["retries"]   # logged in train.json
    assert {k: v for k, v in logged.items() if k != "value"} == {k: v for k, v in retry.items() if k != "value"}
    assert any("guard/retries" in d for _, d in tracker.metrics) and any("guard.retry1" in t for t in tracker.tags)
    weights, _ = final_weights(tmp_path)
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in ("SGLD", "PYLD", "SAM", "EB-JDAT")])
def test_family_exploding_energy_gap_applies_more_sgld_steps(family, tmp_path, monkeypatch):
    method = FAMILIES[family]
    run = family_run(method, guard={"max_retries": 1, "remedy": "more_sgld_steps", "max_energy_gap": 1e4})
    cls = methods.REGISTRY[run.method.loss]
    monkeypatch.setitem(methods.REGISTRY, run.method.loss, _poisoned(cls, {3}, "energy"))
    splits, stats = family_data()
    info = train_splits(run, splits, stats, tmp_path)
    (retry,) = info["retries"]
    assert "max_energy_gap" in retry["reason"] and retry["step"] == 3 and info["complete"]
    assert retry["change"].startswith("more_sgld_steps") and "nothing to change" not in retry["change"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_persistent_nan_stops_with_a_clear_error_and_no_model(family, tmp_path, monkeypatch):
    method = FAMILIES[family]
    run = family_run(method, guard={"max_retries": 2, "remedy": "reseed"})
    monkeypatch.setitem(methods.REGISTRY, run.method.loss, _poisoned(methods.REGISTRY[run.method.loss], "all", "nan"))
    splits, stats = family_data()
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+ .*non-finite loss.*2 retries"):
        train_splits(run, splits, stats, tmp_path)
    assert not (tmp_path / "model.pt").exists()


# =========================================================================== interrupted Snakemake run (real jobs)

INTERRUPT_METHODS = ("standard", "noise_8")


def _model(root: Path, method: str) -> Path:
    return root / f"results/{PROFILE}/models/digits/{method}/s0/model.pt"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_snakemake_run_then_rerun_redoes_only_unfinished_jobs(sig, tmp_path):
    """Ctrl-C (SIGINT to the process group) or SIGKILL of everything while the first train job runs."""
    root = copy_checkout(tmp_path / "repo")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = hermetic_env(tmp_path, PYTHONPATH=str(root / "src"), MLFLOW_TRACKING_URI=uri)
    targets = [str(_model(root, m).relative_to(root)) for m in INTERRUPT_METHODS]
    args = [str(Path(sys.executable).parent / "snakemake"), "--cores", "1", *targets, "--config", f"profile={PROFILE}"]
    first = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    started = _model(root, INTERRUPT_METHODS[0]).parent / "checkpoint.pt"
    try:
        deadline = time.time() + 900
        while not started.exists():
            assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.05)
        os.killpg(first.pid, sig)  # the step-0 checkpoint is written before the first training step
        first.wait(120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    time.sleep(2)  # let the job processes of the group finish dying
    data_json = root / f"results/{PROFILE}/data/digits/data.json"
    assert json.loads(data_json.read_text())["dataset"] == "digits"      # the finished job's output is intact
    assert not _model(root, INTERRUPT_METHODS[0]).exists()  # no half-trained model passes for done
    if sig == signal.SIGINT:
        assert _status(uri, INTERRUPT_METHODS[0])[0] == "KILLED"

    rerun_args = args[1:] + (["--unlock"] if sig == signal.SIGKILL else [])
    if sig == signal.SIGKILL:  # a killed Snakemake leaves its lock; `--unlock` is the documented remedy
        assert snakemake(rerun_args, root, env).returncode == 0
    rerun = snakemake(args[1:] + ["--rerun-incomplete"], root, env, timeout=1800)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-3000:]
    assert {j["rule"] for j in parse_dry_run(log)} == {"train"}, log[-3000:]   # data is not redone
    for method in INTERRUPT_METHODS:
        model, meta = load_classifier(_model(root, method))
        assert meta["complete"] and meta["epochs_trained"] == 2
    resumed = (root / f"logs/{PROFILE}/train/digits-{INTERRUPT_METHODS[0]}-s0.log").read_text()
    assert "resuming" in resumed and "afresh" not in resumed  # same code, data, settings: the checkpoint is reused
    for method in INTERRUPT_METHODS:
        parent, stages = _status(uri, method)
        assert parent == "FINISHED" and stages == {"train": "FINISHED"}, (method, parent, stages)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"robust-ebm/{PROFILE}/digits")
    statuses = sorted(r.info.status for r in client.search_runs([exp.experiment_id], max_results=1000)
                      if r.data.tags.get("stage") == "train")
    assert statuses == ["FINISHED", "FINISHED", "KILLED"], statuses   # the interrupted run says so
