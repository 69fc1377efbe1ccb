"""`robust-ebm digest`: a profile's stage outputs -> small JSON + Markdown (hand-made results, no training)."""

import json
from types import SimpleNamespace

from robust_ebm.cli import main
from robust_ebm.digest import digest, lookup


def _write(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _results(root):
    """results/<profile> with one finished run (a) and one that only trained (b)."""
    _write(root / "models/d/a/s0/train.json", {"seconds": 60.0, "selected_epoch": 5})
    _write(root / "eval/d/a/s0.json", {"seconds": 30.0, "columns": {
        "clean": {"n": 10, "accuracy": 0.9, "per_image": list(range(100))},
        "pgd": {"n": 10, "accuracy": 0.4}}})
    _write(root / "samples/d/a/s0/generate.json", {"generators": {"g1": {"seconds": 5.0}, "g2": {"seconds": 7.0}}})
    _write(root / "metrics/d/a/s0.json", {"seconds": 2.0, "fisher": {"jfs": 1.5, "mfs": 2.5},
                                           "energy": {"gap": {"E_xy/clean->pgd": 0.75}},
                                           "generators": {"g1": {"refclf": {"fid_refclf": 3.25, "is_refclf": 4.5}}}})
    _write(root / "models/d/b/s0/train.json", {"seconds": 10.0})
    (root / "claims.md").write_text("# claims\n")


def test_digest_gathers_each_run_and_its_cost(tmp_path):
    results, out = tmp_path / "results/p", tmp_path / "digest"
    _results(results)
    profile = SimpleNamespace(name="p", runs=[("d", "a"), ("d", "b"), ("d", "c")], seeds=[0])
    digest(results, profile, out)

    a = json.loads((out / "d-a-s0.json").read_text())
    assert a["evaluate"]["columns"]["pgd"]["accuracy"] == 0.4
    assert a["evaluate"]["columns"]["clean"]["per_image"] == "<100 values left out>"
    assert a["seconds"] == {"train": 60.0, "evaluate": 30.0, "generate": 12.0, "metrics": 2.0, "total": 104.0}
    assert a["stages_missing"] == []
    b = json.loads((out / "d-b-s0.json").read_text())
    assert b["stages_missing"] == ["evaluate", "generate", "metrics"]
    about = json.loads((out / "digest.json").read_text())
    assert about["runs"] == ["d/a/s0", "d/b/s0"] and about["not_run"] == ["d/c/s0"]
    assert about["machine"]["cores"] >= 1 and about["date"]
    readme = (out / "README.md").read_text()
    assert "| d/a/s0 | 90.00 | 40.00 | – | – | 1.50 | 2.50 | 0.75 | g1 3.25 / 4.50 | 60 | 30 | 12 | 2 |  |" in readme
    assert "Not run: d/c/s0." in readme
    assert (out / "claims.md").read_text() == "# claims\n" and not (out / "claims.json").exists()
    assert not list(out.glob("*.npz")) and not list(out.glob("*.pt"))


def test_lookup_is_none_for_a_missing_key():
    assert lookup({"a": {"b": 1}}, "a.b") == 1
    assert lookup({"a": {"b": 1}}, "a.c") is None and lookup({"a": 1}, "a.b") is None


def test_digest_command_on_the_smoke_profile_with_nothing_run(tmp_path, capsys):
    assert main(["digest", "--profile", "smoke", "--results", str(tmp_path / "none"), "--out", str(tmp_path / "d")]) == 0
    about = json.loads((tmp_path / "d/digest.json").read_text())
    assert about["runs"] == [] and len(about["not_run"]) == 18 and about["profile"] == "smoke"
