"""Snakemake and DVC run the same DAG: same outputs, edges and commands (ecosystem.md §2.4)."""

import pytest

from repo_copy import ROOT, copy_checkout, hermetic_env, parse_dry_run, snakemake

PROFILE = "smoke"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sync")
    return copy_checkout(tmp / "repo"), hermetic_env(tmp)


def snakemake_dag(root, env):
    proc = snakemake(["-n", "-p", "--forceall", "--quiet", "host", "reason", "--cores", "1",
                      f"results/{PROFILE}/tables", "--config", f"profile={PROFILE}"], root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = parse_dry_run(proc.stdout + proc.stderr)
    assert jobs, "no job blocks parsed from snakemake -n -p"
    return {tuple(sorted(j["output"])): (j["input"], j["command"]) for j in jobs}


def dvc_dag(root, monkeypatch):
    import dvc.repo

    for key in ("DVC_SITE_CACHE_DIR", "DVC_NO_ANALYTICS"):
        monkeypatch.setenv(key, "1" if key == "DVC_NO_ANALYTICS" else str(root.parent / "cache" / "dvc"))
    with dvc.repo.Repo(str(root)) as repo:
        stages = [s for s in repo.index.stages if s.addressing.split("@", 1)[1].split("-")[0] == PROFILE]
        # settings@P is DVC's own bookkeeping (Snakemake keeps the same digests as rule params): not a job
        assert [s.name for s in stages if s.name.startswith("settings@")] == [f"settings@{PROFILE}"]
        stages = [s for s in stages if not s.name.startswith("settings@")]
        return {tuple(sorted(str(o.def_path) for o in s.outs)): ([str(d.def_path) for d in s.deps], s.cmd)
                for s in stages}


def edges(dag):
    """(input, output) pairs, inputs restricted to produced files; a directory input stands for
    every produced output beneath it (how DVC links a directory dependency)."""
    produced = {o for outs in dag for o in outs}
    out = set()
    for outs, (inputs, _) in dag.items():
        for i in inputs:
            below = {p for p in produced if p == i or p.startswith(i.rstrip("/") + "/")}
            out |= {(p, o) for p in below for o in outs}
    return out


def test_snakemake_and_dvc_agree(checkout, monkeypatch):
    root, env = checkout
    smk, dvc = snakemake_dag(root, env), dvc_dag(root, monkeypatch)
    assert set(smk) == set(dvc), "different outputs"
    assert edges(smk) == edges(dvc), "different dependency edges"
    assert {o: c for o, (_, c) in smk.items()} == {o: c for o, (_, c) in dvc.items()}, "different commands"
    assert len(smk) >= 7  # data, train, evaluate, generate, metrics, figures, tables


def test_committed_dvc_yaml_is_generated_from_params():
    from robust_ebm.config import load_params
    from robust_ebm.plan import dvc_yaml

    committed = (ROOT / "dvc.yaml").read_text()
    assert committed == dvc_yaml(load_params(ROOT / "params.yaml")), \
        "dvc.yaml is stale: run `robust-ebm dvc-yaml` and commit it"
