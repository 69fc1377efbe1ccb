"""The smoke profile end to end through Snakemake, on a copy of the checkout (marker `pipeline`).

Runs `snakemake --cores 2 results/tables --config profile=smoke`, then checks the
tables, figures and MLflow runs, and that deleting one evaluate output makes
Snakemake plan exactly that job and what depends on it.
"""

import csv
import io
import json
import shutil

import pytest

from robust_ebm.claims import load_claims
from robust_ebm.config import load_params
from robust_ebm.plan import Plan
from robust_ebm.tables import load_paper_records
from repo_copy import copy_checkout, hermetic_env, parse_dry_run, snakemake

pytestmark = pytest.mark.pipeline
PROFILE = "smoke"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    root = copy_checkout(tmp / "repo")
    env = hermetic_env(tmp)
    # a hang guard, not a timing: the DAG takes minutes on two quiet cores, several times that on a loaded machine
    proc = snakemake(["--cores", "2", "results/tables", "--config", f"profile={PROFILE}"], root, env, timeout=2700)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return root, env, env["MLFLOW_TRACKING_URI"]


def test_tables_link_to_the_profile_and_hold_every_paper_table(run):
    root, _, _ = run
    link = root / "results" / "tables"
    assert link.is_symlink() and link.resolve() == (root / "results" / PROFILE / "tables").resolve()
    groups = {}
    for r in load_paper_records():
        groups.setdefault(f"{r['paper']}_{r['table_id']}", []).append(r)
    numbers = 0
    for name, recs in groups.items():
        for suffix in ("md", "csv", "tex", "html"):
            assert (link / f"{name}.{suffix}").is_file(), f"{name}.{suffix}"
        rows = list(csv.DictReader(io.StringIO((link / f"{name}.csv").read_text())))
        assert len(rows) == len({(r["dataset"], r["method"], str(r.get("architecture"))) for r in recs})
        for row in rows:
            for metric in {r["metric"] for r in recs}:
                assert row[f"{metric}_ours_mean"] or row[f"{metric}_reason"]
                numbers += bool(row[f"{metric}_ours_mean"])
    assert numbers > 0, "no table cell of ours holds a number"
    assert (link / "README.md").is_file()


def test_every_figure_kind_is_drawn(run):
    root, _, _ = run
    figures = root / "results" / PROFILE / "figures"
    listing = json.loads((figures / "figures.json").read_text())["figures"]
    pngs = sorted(p.name for p in figures.glob("*.png"))
    kinds = ("landscape_joint", "landscape_marginal", "energy_hist_attacks", "energy_hist_clean_adv_gen",
             "dynamics", "samples", "nearest_ssim", "clean_vs_autoattack")
    for kind in kinds:  # JEAT Fig.2-7, WEAT Fig.2, EB-JDAT Fig.1-2
        assert any(name.startswith(kind) for name in pngs), f"no {kind} figure among {pngs[:10]}..."
    listed = {f for entry in listing for f in entry["files"]}
    assert set(pngs) <= listed, "figures.json lists every figure"


def test_claims_are_checked_and_the_smoke_models_learn(run):
    """Every claim has a row and a verdict; the sanity claims hold: standard >= 90% clean, PGD-AT more
    robust than standard under PGD (the smoke models mean something)."""
    root, _, _ = run
    res = root / "results" / PROFILE
    for suffix in ("md", "csv", "json"):
        assert (res / f"claims.{suffix}").is_file()
    rows = {r["id"]: r for r in json.loads((res / "claims.json").read_text())["claims"]}
    assert set(rows) == {c["id"] for c in load_claims()[0]}
    verdicts = ("holds", "fails", "inconclusive (", "not measured (")
    assert all(r["verdict"].startswith(verdicts) for r in rows.values()), [r["verdict"] for r in rows.values()]
    assert rows["sanity_standard_clean"]["verdict"] == "holds", rows["sanity_standard_clean"]
    assert rows["sanity_pgd_at_more_robust"]["verdict"] == "holds", rows["sanity_pgd_at_more_robust"]
    measured = [r for r in rows.values() if not r["verdict"].startswith("not measured")]
    assert len(measured) >= len(rows) // 2, "most claims are measurable on smoke"
    assert "claims.md" in (root / "results" / "tables" / "README.md").read_text()


def test_mlflow_has_one_parent_per_method_and_seed_with_metrics_and_artifacts(run):
    root, _, uri = run
    from mlflow.tracking import MlflowClient

    plan = Plan(load_params(root / "params.yaml"), PROFILE)
    client = MlflowClient(tracking_uri=uri)
    for dataset in plan.datasets:
        exp = client.get_experiment_by_name(f"robust-ebm/{PROFILE}/{dataset}")
        runs = client.search_runs([exp.experiment_id], max_results=5000)
        parents = [r for r in runs if r.data.tags.get("robust_ebm_role") == "parent"]
        keys = sorted((r.data.tags["method"], r.data.tags["seed"]) for r in parents)
        expected = sorted({(m, str(s)) for d, m, s in plan.runs + plan.reference_runs if d == dataset})
        assert keys == expected, "exactly one parent run per (method, seed)"
        for parent in parents:
            method = parent.data.tags["method"]
            assert {"acc/clean", "acc/pgd", "acc/autoattack", "val_selected/clean_acc"} <= set(parent.data.metrics), method
            assert parent.data.params["method"] == method and "method.optim.lr" in parent.data.params, method
            children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
            assert all(c.info.status == "FINISHED" for c in children)
            assert parent.info.status == "FINISHED", parent.data.tags["method"]  # not left RUNNING (issue 14)
            assert any(client.list_artifacts(c.info.run_id) for c in children)


def test_interrupted_run_reruns_only_the_lost_job_and_its_dependents(run):
    """As if killed while evaluating trades: its output and everything downstream are missing."""
    root, env, _ = run
    res = root / "results" / PROFILE
    lost = [res / "eval/digits/trades/s0.json", res / "eval/digits/trades/s0.energies.npz",
            res / "metrics/digits/trades/s0.json", res / "metrics/digits/trades/s0.energies.npz"]
    for path in lost:
        path.unlink()
    for folder in (res / "figures", res / "tables"):
        shutil.rmtree(folder)
    for suffix in ("md", "csv", "json"):
        (res / f"claims.{suffix}").unlink()
    (root / "results" / "tables").unlink()
    proc = snakemake(["-n", "-p", "--quiet", "host", "reason", "--cores", "1", "results/tables",
                      "--config", f"profile={PROFILE}"], root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = parse_dry_run(proc.stdout + proc.stderr)
    assert sorted(j["rule"] for j in jobs) == ["claims", "evaluate", "figures", "link_tables", "metrics", "tables"]
    assert all("trades" in " ".join(j["output"]) for j in jobs if j["rule"] in ("evaluate", "metrics"))
