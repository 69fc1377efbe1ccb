"""benchmarks/side_by_side.py: argument checks, merging, and a one-step run on a tiny network.

The run needs fetched reference checkouts (env ROBUST_EBM_REFS, else ../refs beside the checkout's
folder); without them it is skipped. No timing is asserted: only that both sides ran and were reported.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFS = Path(os.environ.get("ROBUST_EBM_REFS") or REPO.parent / "refs")


@pytest.fixture(scope="module")
def sbs():
    spec = importlib.util.spec_from_file_location("side_by_side", REPO / "benchmarks" / "side_by_side.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments_are_checked(sbs):
    a = sbs.parse_args(["--refs", "x"])
    assert a.methods == list(sbs.METHODS) and (a.batch, a.depth, a.width, a.threads) == (64, 16, 2, 1)
    with pytest.raises(SystemExit):
        sbs.parse_args([])                                   # neither --refs nor --merge
    with pytest.raises(SystemExit):
        sbs.parse_args(["--refs", "x", "--steps", "0"])
    with pytest.raises(SystemExit):
        sbs.parse_args(["--refs", "x", "--methods", "nope"])


def test_missing_checkout_names_the_repository(sbs, tmp_path):
    with pytest.raises(FileNotFoundError, match="wgrathwohl/JEM"):
        sbs.main(["--refs", str(tmp_path), "--methods", "jem", "--rounds", "1", "--steps", "1"])


def _row(method, ref, ours):
    return {"method": method, "ref_ms": ref, "ours_ms": ours, "speed_ours_over_ref": ref / ours, "round_ratio_median": 1.0,
            "ref_cpu_ms": ref, "ours_cpu_ms": ours, "speed_cpu_ours_over_ref": ref / ours}


def test_merge_joins_rows_and_keeps_each_run(sbs, tmp_path):
    for i, method in enumerate(("jem", "trades")):
        (tmp_path / f"{i}.json").write_text(json.dumps({"started": str(i), "references": {method: "c"},
                                                        "rows": [_row(method, 30.0 + i, 20.0)]}))
    out = tmp_path / "all.json"
    result = sbs.main(["--merge", str(tmp_path / "0.json"), str(tmp_path / "1.json"), "--out", str(out)])
    assert [r["method"] for r in result["rows"]] == ["jem", "trades"] and len(result["runs"]) == 2
    assert json.loads(out.read_text())["references"] == {"jem": "c", "trades": "c"}


@pytest.mark.skipif(not (REFS / "wgrathwohl+JEM").is_dir() or not (REFS / "yaodongyu+TRADES").is_dir(),
                    reason=f"reference checkouts not found under {REFS} (set ROBUST_EBM_REFS)")
def test_one_step_of_each_side_on_a_tiny_network(sbs, tmp_path):
    out = tmp_path / "sbs.json"
    result = sbs.main(["--refs", str(REFS), "--methods", "jem", "trades", "--rounds", "2", "--steps", "1",
                       "--batch", "2", "--depth", "10", "--width", "1", "--out", str(out)])
    written = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["speed_ours_over_ref"]) for r in written] == \
        [(r["method"], r["speed_ours_over_ref"]) for r in result["rows"]]
    for row in result["rows"]:
        assert len(row["ref_wall_ms"]) == len(row["ours_wall_ms"]) == 2 and len(row["round_ratios"]) == 2
        assert row["ref_ms"] > 0 and row["ours_ms"] > 0 and row["speed_ours_over_ref"] > 0
        assert row["ref_commit"] == result["references"][row["repo"]]
    jem = result["rows"][0]
    assert jem["ref_settings"]["n_steps"] == jem["ours_settings"]["sampler"]["steps"] == 20   # same chain length
