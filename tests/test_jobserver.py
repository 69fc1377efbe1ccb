"""The job server (robust_ebm.jobserver): a command run through it is the command run alone."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from robust_ebm import jobserver

pytestmark = pytest.mark.skipif(not jobserver.supported(), reason="the job server needs Linux (fork, SCM_RIGHTS)")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server():
    previous = os.environ.get(jobserver.ENV)
    os.environ.pop(jobserver.ENV, None)
    started = jobserver.start()
    yield started
    jobserver.stop([started])
    if previous is not None:
        os.environ[jobserver.ENV] = previous


def robust_ebm(args, cwd, *, through=None):
    """`python -m robust_ebm args` with or without the server (its socket in the environment)."""
    env = {k: v for k, v in os.environ.items() if k != jobserver.ENV}
    env["PYTHONPATH"] = str(ROOT / "src")
    if through is not None:
        env[jobserver.ENV] = through
    return subprocess.run([sys.executable, "-m", "robust_ebm", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_preloading_is_safe_to_fork():
    """The server's imports start no thread, no CUDA and no MLflow store (none of them survives a fork)."""
    code = ("import importlib, threading, sys; from robust_ebm import jobserver\n"
            "for m in jobserver.PRELOAD: importlib.import_module(m)\n"
            "import torch, mlflow.tracking._tracking_service.utils as u\n"
            "print(threading.active_count(), torch.cuda.is_initialized(), u._tracking_uri)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "False", "None"]


def test_a_stage_through_the_server_writes_the_same_files(server, tmp_path):
    """The data stage (argv, cwd, environment, streams, exit status) through the server and alone."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    args = ["data", "--profile", "smoke", "--dataset", "digits", "--out"]
    alone = robust_ebm([*args, "alone"], tmp_path)
    served = robust_ebm([*args, "served"], tmp_path, through=server.socket_path)
    assert alone.returncode == served.returncode == 0, served.stderr
    assert "running in this process" not in served.stderr  # it did go through the server
    files = sorted(p.relative_to(tmp_path / "alone") for p in (tmp_path / "alone").rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path / "served")
                                     for p in (tmp_path / "served").rglob("*") if p.is_file())
    for f in files:  # byte for byte, torch files (splits, class statistics) included
        alone_file, served_file = tmp_path / "alone" / f, tmp_path / "served" / f
        assert alone_file.read_bytes() == served_file.read_bytes(), f
    assert served.stdout.replace("served", "alone") == alone.stdout


def test_errors_keep_their_exit_status(server, tmp_path):
    bad = robust_ebm(["train", "--profile", "nosuch"], tmp_path, through=server.socket_path)
    assert bad.returncode == 2 and "--dataset" in bad.stderr  # argparse, in the child
    (tmp_path / "params.yaml").write_text("not: [a, params file\n")
    broken = robust_ebm(["check", "--skip-inputs"], tmp_path, through=server.socket_path)
    assert broken.returncode == 2 and "params.yaml" in broken.stderr


def test_without_a_server_on_this_host_the_command_runs_alone(tmp_path):
    out = robust_ebm(["check", "--skip-inputs", "--profile", "smoke", "--params", str(ROOT / "params.yaml")],
                     tmp_path, through=str(tmp_path / "none.sock"))
    assert out.returncode == 0, out.stderr
    assert "no job server" in out.stderr and "running in this process" in out.stderr


@pytest.mark.parametrize("key, value", [("environment", "/another/environment"), ("code", "edited since")])
def test_a_job_the_server_cannot_run_as_it_is_runs_alone(server, tmp_path, key, value):
    """A job in its own (conda) environment, or after a package file was edited, must not run the
    server's imported code."""
    code = ("import sys; import robust_ebm.jobserver as j; real = j._identity; "
            f"j._identity = lambda: {{**real(), {key!r}: {value!r}}}; from robust_ebm.cli import main; "
            f"sys.exit(main(['check', '--skip-inputs', '--profile', 'smoke', '--params', {str(ROOT / 'params.yaml')!r}]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), jobserver.ENV: server.socket_path}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"runs another {key}" in out.stderr and "running in this process" in out.stderr


def test_off_means_every_command_alone(monkeypatch):
    monkeypatch.setenv(jobserver.ENV, jobserver.OFF)
    assert jobserver.requested() is None and jobserver.start() is None


def test_a_long_temporary_directory_still_gives_a_usable_socket(tmp_path, monkeypatch):
    """Unix socket paths are limited to 107 bytes; TMPDIR on cluster nodes is often longer."""
    long_tmp = tmp_path / ("x" * 90)
    long_tmp.mkdir()
    monkeypatch.setattr(jobserver.tempfile, "tempdir", str(long_tmp))
    monkeypatch.delenv(jobserver.ENV, raising=False)
    started = jobserver.start()
    try:
        assert len(started.socket_path) < 108 and jobserver.requested() == started.socket_path
    finally:
        jobserver.stop([started])
