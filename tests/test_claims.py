"""The claims stage: verdicts computed from hand-made evaluate/metrics outputs (holds, fails,
inconclusive, not measured), the noise model, the claims file, and the landscape statistics it reads."""

import csv
import io
import json

import numpy as np
import pytest
import torch

from robust_ebm import claims as C
from robust_ebm.config import load_params
from robust_ebm.landscape import energy_landscape, landscape_statistics, plane_directions, plane_statistics
from robust_ebm.papers import own_generator
from repo_copy import ROOT
from helpers import tiny_classifier

D = "digits"


@pytest.fixture(scope="module")
def profile():
    return load_params(ROOT / "params.yaml").profile_config("smoke")  # CIFAR-10 -> digits, seeds [0]


def write(root, kind, method, data):
    path = root / kind / D / method / "s0.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def eval_json(clean, pgd, n=360, **other):
    cols = {"clean": clean, "pgd": pgd, **other}
    return {"columns": {k: {"accuracy": v, "n": n, "status": "ok"} for k, v in cols.items()}}


def claim(check, **args):
    return {"id": "t", "paper": "test", "where": "-", "dataset": "any", "statement": "s", "check": check, "args": args}


def verdict(results, check, **args):
    return C.evaluate_claim(claim(check, **args), results, D, 2.0)


# --------------------------------------------------------------------------- noise model


def test_binomial_se_is_never_zero_and_comparisons_decide_only_beyond_z_se():
    assert C.binomial(0.0, 100).se > 0 and C.binomial(1.0, 100).se > 0
    a, b = C.Estimate(0.5, 0.01), C.Estimate(0.4, 0.01)  # difference 0.1, SE 0.014
    assert C.compare(a, b, ">", "", 2.0).verdict == "holds"
    assert C.compare(b, a, ">", "", 2.0).verdict == "fails"
    assert C.compare(a, b, ">", "", 10.0).verdict.startswith("inconclusive")
    assert C.compare(a, C.Estimate(0.4, None), ">", "", 2.0).verdict == "inconclusive (no noise estimate)"
    assert C.compare(a, b, "~", "", 2.0, margin=0.2).verdict == "holds"
    assert C.compare(a, b, "~", "", 2.0, margin=0.01).verdict == "fails"
    assert C.combine([C.Comparison("holds", ""), C.Comparison("fails", "")]) == "fails"
    assert C.pool([C.Estimate(1.0, 0.3), C.Estimate(3.0, 0.4)]) == C.Estimate(2.0, 0.25, None)


# --------------------------------------------------------------------------- accuracy claims


def test_robustness_sanity_claims_hold_fail_or_stay_inconclusive_as_the_counts_say(tmp_path, profile):
    write(tmp_path, "eval", "standard", eval_json(0.97, 0.20))
    write(tmp_path, "eval", "pgd_at", eval_json(0.95, 0.70))
    r = C.Results(tmp_path, profile)
    row = verdict(r, "accuracy_at_least", method="standard", column="clean", threshold=0.9)
    assert row["verdict"] == "holds" and row["runs"] == ["digits/standard/s0"]
    assert verdict(r, "more_robust", better=["pgd_at"], than="standard", column="pgd")["verdict"] == "holds"
    assert verdict(r, "more_robust", better=["standard"], than="pgd_at", column="pgd")["verdict"] == "fails"
    write(tmp_path, "eval", "trades", eval_json(0.95, 0.25, n=16))  # 0.25 vs 0.20 on 16 points: noise
    r = C.Results(tmp_path, profile)
    assert verdict(r, "more_robust", better=["trades"], than="standard", column="pgd")["verdict"].startswith("inconclusive")
    write(tmp_path, "eval", "noise_8", eval_json(0.85, 0.1))
    r = C.Results(tmp_path, profile)
    assert verdict(r, "accuracy_at_least", method="noise_8", column="clean", threshold=0.9)["verdict"] == "fails"


def test_missing_runs_columns_and_methods_are_not_measured_with_the_reason(tmp_path, profile):
    write(tmp_path, "eval", "standard", {"columns": {"clean": {"accuracy": 0.9, "n": 100},
                                                     "autoattack": {"status": "skipped: no autoattack"}}})
    r = C.Results(tmp_path, profile)
    row = verdict(r, "more_robust", better=["pgd_at"], than="standard", column="pgd")
    assert row["verdict"].startswith("not measured (") and "pgd_at" in row["verdict"]
    row = verdict(r, "attack_as_strong", method="standard", attack="autoattack", reference="clean", margin=0.02)
    assert row["verdict"] == "not measured (standard: eval column 'autoattack' has no accuracy (skipped: no autoattack))"
    row = verdict(r, "more_robust", better=["not_a_method"], than="standard", column="clean")
    assert "not_a_method is not run on digits in profile smoke" in row["verdict"]


def test_a_partly_measured_claim_is_inconclusive_and_names_what_is_missing(tmp_path, profile):
    write(tmp_path, "eval", "standard", eval_json(0.97, 0.20))
    write(tmp_path, "eval", "weat_adv", eval_json(0.95, 0.70, autoattack=0.6))
    for m in ("standard", "trades"):
        write(tmp_path, "eval", m, eval_json(0.95, 0.5, autoattack=0.5))
    row = verdict(C.Results(tmp_path, profile), "at_least_as_robust", better=["weat_nat", "weat_adv"], than="trades",
                  column="autoattack")
    assert row["verdict"].startswith("inconclusive (") and "weat_nat" in row["verdict"]
    assert any(c.startswith("weat_adv − trades (autoattack): +0.1") and c.endswith("holds") for c in row["comparisons"])


# --------------------------------------------------------------------------- metrics-based claims


def stat(mean, std=0.1, n=16):
    return {"mean": mean, "std": std, "n": n}


def metrics_json(*, flat=1.0, level=0.0, jfs=5.0, mfs=4.0, delta_pgd=2.0, gen_mean=None, is_=(2.0, 0.05), fid=10.0,
                 refclf=True, method="standard"):
    land = {k: {"mean_abs_delta": stat(flat), "mean_energy": stat(level), "centre_energy": stat(level),
                "centre_rank": stat(0.5)} for k in ("E_xy", "E_x")}
    gen = {"n_samples": 40, "refclf": ({"is_refclf": is_[0], "is_std_refclf": is_[1], "fid_refclf": fid, "n": 40}
                                       if refclf else {"status": "not computed: self"})}
    summary = {"clean": {"E_xy": stat(0.0, 1.0, 128), "E_x": stat(0.0, 1.0, 128)}}
    if gen_mean is not None:
        summary[f"generated/{own_generator(method)}"] = {"E_xy": stat(gen_mean, 1.0, 40), "E_x": stat(gen_mean, 1.0, 40)}
    delta = {f"{k}/clean-{a}": stat(delta_pgd, 0.5, 128) for k in ("E_xy", "E_x") for a in ("pgd", "apgd_ce")}
    delta["E_x/clean-apgd_t"] = stat(-1.0, 0.5, 16)
    return {"inception": {"status": "unavailable", "reason": "offline"},
            "generators": {"jeat_eq17": gen, "jeat_eq16": {**gen, "refclf": {**gen["refclf"], "is_refclf": 1.0}}
                           if refclf else gen},
            "fisher": {"jfs": jfs, "mfs": mfs, "jfs_std": 1.0, "mfs_std": 1.0, "n": 100},
            "energy": {"summary": summary, "delta": delta}, "landscape": land}


def test_landscape_fisher_and_energy_gap_claims(tmp_path, profile):
    write(tmp_path, "metrics", "standard", metrics_json(flat=3.0, level=1.0, jfs=9.0, delta_pgd=-5.0, gen_mean=8.0))
    write(tmp_path, "metrics", "pgd_at", metrics_json(flat=1.0, level=-1.0, jfs=5.0, delta_pgd=-0.5, gen_mean=8.0,
                                                      method="pgd_at"))
    write(tmp_path, "metrics", "jeat", metrics_json(flat=1.0, level=-3.0, jfs=6.0))
    r = C.Results(tmp_path, profile)
    assert verdict(r, "landscape_flatter_and_lower", flatter=["pgd_at"], than="standard")["verdict"] == "holds"
    row = verdict(r, "landscape_flatter_and_lower", flatter=["jeat"], than="pgd_at")  # lower, but not flatter
    assert row["verdict"].startswith("inconclusive") and any("flatness" in c for c in row["comparisons"])
    assert verdict(r, "fisher_order", descending=["standard", "pgd_at", "jeat"], scores=["jfs"])["verdict"] == "fails"
    assert verdict(r, "energy_gap_narrower", narrower=["pgd_at"], than="standard", sets=["adversarial"])["verdict"] == "holds"
    row = verdict(r, "energy_gap_narrower", narrower=["pgd_at"], than="standard", sets=["generated"])
    assert row["verdict"].startswith("inconclusive")  # the same gap
    write(tmp_path, "metrics", "jeat", {"fisher": {"jfs": 1.0}})  # an older metrics output: no landscape
    row = verdict(C.Results(tmp_path, profile), "landscape_flatter_and_lower", flatter=["jeat"], than="pgd_at")
    assert row["verdict"].startswith("not measured (jeat: no landscape statistics")


def test_attack_energy_shift_reads_the_paired_differences(tmp_path, profile):
    write(tmp_path, "metrics", "standard", metrics_json(delta_pgd=2.0))
    r = C.Results(tmp_path, profile)
    assert verdict(r, "attack_energy_shift", method="standard", attacks=["pgd", "apgd_ce"], direction="lower")["verdict"] == "holds"
    assert verdict(r, "attack_energy_shift", method="standard", attacks=["apgd_t"], direction="higher")["verdict"] == "holds"
    row = verdict(r, "attack_energy_shift", method="standard", attacks=["apgd_t", "fab_t"], direction="higher")
    assert row["verdict"].startswith("inconclusive (not measured: fab_t")
    assert verdict(r, "attack_energy_shift", method="standard", attacks=["pgd"], direction="higher")["verdict"] == "fails"


def test_sample_quality_says_its_source_and_cannot_score_the_reference_classifier(tmp_path, profile):
    write(tmp_path, "metrics", "standard", metrics_json(refclf=False))
    write(tmp_path, "metrics", "pgd_at", metrics_json(is_=(3.0, 0.05), fid=5.0))
    write(tmp_path, "metrics", "jeat", metrics_json(is_=(4.0, 0.05), fid=20.0))  # IS better, FID worse
    r = C.Results(tmp_path, profile)
    row = verdict(r, "sample_quality_order", ascending=["standard", "pgd_at", ["jeat"]], generator="jeat_eq17")
    assert "reference-classifier stand-in" in row["quantity"] and "Inception unavailable" in row["quantity"]
    assert "IS and FID disagree" in row["verdict"] and "standard/jeat_eq17: no stand-in scores" in row["verdict"]
    row = verdict(r, "generator_better", methods=["pgd_at"], better="jeat_eq17", worse="jeat_eq16")
    assert row["verdict"] == "holds"  # IS 3.0 vs 1.0 (SE 0.035 each); equal FIDs do not disagree


def test_the_stage_writes_every_claim_once_in_three_formats(tmp_path, profile):
    write(tmp_path, "eval", "standard", eval_json(0.97, 0.20))
    write(tmp_path, "eval", "pgd_at", eval_json(0.95, 0.70))
    files = C.claims_stage(profile, tmp_path, tmp_path / "out")
    assert [f.name for f in files] == ["claims.json", "claims.csv", "claims.md", "summary.json"]
    doc = json.loads(files[0].read_text())
    summary = json.loads(files[3].read_text())  # DVC's metrics: verdict counts and pooled accuracies, measured only
    assert summary["verdicts"] == doc["summary"]
    assert summary["accuracy"]["digits"] == {"standard": {"clean": 0.97, "pgd": 0.2}, "pgd_at": {"clean": 0.95, "pgd": 0.7}}
    ids = [c["id"] for c in C.load_claims()[0]]
    assert [r["id"] for r in doc["claims"]] == ids  # smoke: one data set, so one row per claim
    by_id = {r["id"]: r for r in doc["claims"]}
    assert by_id["sanity_standard_clean"]["verdict"] == "holds"
    assert by_id["sanity_pgd_at_more_robust"]["verdict"] == "holds"
    assert by_id["jeat_fisher_order"]["verdict"].startswith("not measured (no metrics output")
    assert sum(doc["summary"].values()) == len(ids) and doc["summary"]["holds"] == 2
    rows = list(csv.DictReader(io.StringIO(files[1].read_text())))
    assert [r["id"] for r in rows] == ids and set(rows[0]) == set(C.COLUMNS)
    md = files[2].read_text()
    assert all(f"| {i} |" in md for i in ids) and "## Verdicts" in md


def test_a_claim_on_a_data_set_the_profile_does_not_map_is_not_measured(tmp_path, profile):
    bad = claim("more_robust", better=["pgd_at"], than="standard", column="pgd") | {"dataset": "SVHN"}
    assert C._datasets(bad, profile) == "profile smoke maps no data set to SVHN (table_datasets)"


def test_claims_file_is_valid_and_unknown_checks_are_rejected(tmp_path):
    claims, z = C.load_claims()
    assert z == 2.0 and {c["paper"] for c in claims} == {"sanity", "JEAT", "WEAT", "EB-JDAT"}
    (tmp_path / "c.yaml").write_text("claims:\n- {id: a, paper: p, where: w, dataset: any, statement: s, check: nope}\n")
    with pytest.raises(ValueError, match="unknown check 'nope'"):
        C.load_claims(tmp_path / "c.yaml")


# --------------------------------------------------------------------------- landscape statistics (metrics stage)


def test_plane_statistics_of_a_known_grid():
    values = np.array([[3.0, 0.0, 3.0], [0.0, 1.0, 0.0], [3.0, 0.0, 3.0]])
    s = plane_statistics(values)
    assert s == {"mean_abs_delta": pytest.approx(12 / 9), "mean_energy": pytest.approx(13 / 9),
                 "centre_energy": 1.0, "centre_rank": pytest.approx(4 / 9)}
    with pytest.raises(ValueError, match="odd square grid"):
        plane_statistics(np.zeros((4, 4)))


def test_landscape_statistics_are_those_of_the_figures_planes():
    model = tiny_classifier()
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    out = landscape_statistics(model, x, y, radius=0.5, grid=5)
    land = energy_landscape(model, x[1], 1, *plane_directions(x[1].shape, 1), 0.5, 5)
    expected = plane_statistics(land["E_xy"])["mean_abs_delta"]
    assert out["E_xy"]["mean_abs_delta"]["values"][1] == pytest.approx(expected)
    assert out["E_x"]["centre_rank"]["n"] == 3 and out["n_images"] == 3
