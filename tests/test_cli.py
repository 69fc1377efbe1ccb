"""The command line: instant help, clear user errors, check/dvc-yaml subcommands, log files."""

import json
import subprocess
import sys

import pytest

from robust_ebm import cli
from repo_copy import ROOT


def test_help_does_not_import_torch():
    code = ("import sys; from robust_ebm.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules and 'mlflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "robust_ebm", "--help"], capture_output=True, text=True, check=True)
    for stage in ("data", "train", "evaluate", "generate", "metrics", "figures", "tables", "bench", "check", "dvc-yaml"):
        assert stage in out.stdout


def test_every_stage_takes_explicit_paths():
    parser = cli.build_parser()
    args = parser.parse_args(["metrics", "--profile", "smoke", "--dataset", "digits", "--method", "jem", "--seed", "0",
                              "--data", "d", "--model", "m.pt", "--samples", "s", "--refclf", "r.pt",
                              "--eval", "e.json", "--out", "o.json"])
    assert (args.seed, args.samples, args.refclf, args.func) == (0, "s", "r.pt", cli.cmd_metrics)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--dataset", "digits"])  # --method, --seed, --data, --out missing


def test_config_error_is_one_paragraph_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text((ROOT / "params.yaml").read_text().replace("profile: paper", "profile: nonsense", 1))
    assert cli.main(["check", "--params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "nonsense" in err and "Traceback" not in err


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_check", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["check"])


def test_check_prints_the_plan(capsys):
    assert cli.main(["check", "--params", str(ROOT / "params.yaml"), "--profile", "smoke", "--jobs"]) == 0
    out = capsys.readouterr().out
    assert "profile smoke" in out and "robust-ebm train --params" in out


def test_dvc_yaml_check_detects_a_stale_file(tmp_path, capsys):
    out = tmp_path / "dvc.yaml"
    params = str(ROOT / "params.yaml")
    assert cli.main(["dvc-yaml", "--params", params, "--out", str(out)]) == 0
    assert cli.main(["dvc-yaml", "--params", params, "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "# edited\n")
    with pytest.raises(SystemExit, match="out of date"):
        cli.main(["dvc-yaml", "--params", params, "--out", str(out), "--check"])


def test_log_option_tees_output_to_a_file(tmp_path):
    log = tmp_path / "logs" / "x.log"
    code = (f"import sys; from robust_ebm import cli; sys.exit(cli.main(['check', '--params', {str(ROOT / 'params.yaml')!r},"
            f" '--profile', 'smoke', '--log', {str(log)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "profile smoke" in proc.stdout and "profile smoke" in log.read_text()


def test_settings_writes_every_jobs_settings_digest(tmp_path, capsys):
    """DVC's settings@P step: results/P/settings.json = plan.Plan.settings_file (the Snakemake digests)."""
    from robust_ebm.config import load_params
    from robust_ebm.plan import Plan

    out = tmp_path / "smoke" / "settings.json"
    assert cli.main(["settings", "--params", str(ROOT / "params.yaml"), "--profile", "smoke", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    plan = Plan(load_params(ROOT / "params.yaml"), "smoke")
    assert written == plan.settings_file()
    job = plan.job("figures", profile="smoke")
    assert written["figures"]["smoke"] == plan.settings("figures", **job.wildcards)
