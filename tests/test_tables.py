"""Paper-vs-ours tables on synthetic stage outputs: right numbers in the right cells."""

import csv
import io
import json
import math
import re

import pytest

from robust_ebm.config import load_params
from robust_ebm import tables
from repo_copy import ROOT

ACC = {0: 0.5, 1: 0.7}  # clean accuracy of digits/standard per seed


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def profile():
    smoke = load_params(ROOT / "params.yaml").profile_config("smoke")
    return smoke.model_copy(update={"seeds": [0, 1]})


@pytest.fixture
def results(tmp_path, profile):
    for d, m in profile.runs:
        for s in profile.seeds:
            acc = ACC[s] if m == "standard" else 0.25
            write(tmp_path / "eval" / d / m / f"s{s}.json", {"columns": {
                "clean": {"accuracy": acc, "status": "ok"}, "pgd": {"accuracy": acc / 2, "status": "ok"},
                "energy_attack": {"accuracy": 0.1, "status": "ok"},
                "autoattack": {"accuracy": 0.05 * (s + 1), "status": "ok"},
                "eot": {"accuracy": None, "status": "not applicable: deterministic model"}}})
            gens = {g: {"n_samples": 40, "refclf": {"is_refclf": 2.0 + s, "fid_refclf": 10.0 * (s + 1)}}
                    for g in ("jem_buffer", "jeat_eq17", "jeat_eq16", "weat_momentum", "santurkar_l2")}
            write(tmp_path / "metrics" / d / m / f"s{s}.json", {
                "inception": {"status": "unavailable", "reason": "offline"}, "generators": gens,
                "fisher": {"jfs": 1.0 + s, "mfs": 3.0},
                "energy": {"gap": {"E_xy/clean->pgd": 4.0, "E_xy/clean->generated/jem_buffer": -2.0}}})
    return tmp_path


def build(name, profile, results):
    records = [r for r in tables.load_paper_records() if f"{r['paper']}_{r['table_id']}" == name]
    return tables.build_table(records[0]["paper"], records[0]["table_id"], records, profile,
                              tables.Results(results), {"digits": "digits (smoke stand-in for CIFAR-10)"})


def row(table, dataset, method):
    return next(r for r in table.rows if r["label"]["dataset"] == dataset and r["label"]["method"] == method)


def test_mean_std_and_diff_land_in_the_right_cells(profile, results):
    t = build("JEAT_Tab1", profile, results)
    r = row(t, "CIFAR-10", "standard_training")
    cell = r["ours"]["accuracy_no_attack"]
    assert cell.values == [50.0, 70.0]
    assert cell.mean == pytest.approx(60.0) and cell.std == pytest.approx(math.sqrt(200.0))
    assert r["ours"]["accuracy_normal_attack_CE"].mean == pytest.approx(30.0)  # the PGD column
    paper = r["paper"]["accuracy_no_attack"]
    md = tables.to_markdown(t)
    assert f"60.00 ± {math.sqrt(200):.2f}" in md
    # digits is a stand-in for CIFAR-10: no difference across data sets
    assert "n/a: ours on digits, paper on CIFAR-10" in md and f"{60.0 - paper:.2f}" not in md
    assert "not in profile smoke" in row(t, "CIFAR-100", "standard_training")["ours"]["accuracy_no_attack"].reason


def test_diff_is_ours_minus_paper_on_the_same_data_set(profile, results, monkeypatch):
    monkeypatch.setitem(tables.PAPER_DATASETS, "CIFAR-10", "digits")
    monkeypatch.setattr(tables, "architecture_name", lambda cfg: "WRN-28-10")  # JEAT Tab1's network
    t = build("JEAT_Tab1", profile, results)
    paper = row(t, "CIFAR-10", "standard_training")["paper"]["accuracy_no_attack"]
    assert f"| {60.0 - paper:.2f} |" in tables.to_markdown(t)
    line = next(csv.DictReader(io.StringIO(tables.to_csv(t))))
    assert float(line["accuracy_no_attack_diff"]) == pytest.approx(60.0 - paper, abs=1e-3)


def test_no_diff_against_a_row_that_states_another_architecture(profile, results, monkeypatch):
    monkeypatch.setitem(tables.PAPER_DATASETS, "CIFAR-10", "digits")
    t = build("JEAT_Tab1", profile, results)   # smoke trains a tiny CNN, the paper a WRN-28-10
    r = row(t, "CIFAR-10", "standard_training")
    assert r["diff_blocked"] == "n/a: ours tiny CNN, paper WRN-28-10" and r["label"]["ours"] == "digits/standard (tiny CNN)"
    assert "n/a: ours tiny CNN, paper WRN-28-10" in tables.to_markdown(t)
    assert tables._diff_blocked("SVHN", "svhn", "ResNet-18 (assumed)", "ResNet-18") is None
    assert tables._diff_blocked("SVHN", "svhn", "unknown", "WRN-16-2") is None  # nothing stated to differ


def test_external_baselines_and_unknown_values_say_why(profile, results):
    t = build("EBJDAT_Tab2_sota_at_cifar10", profile, results)
    assert row(t, "CIFAR-10", "AWP")["ours"]["clean_accuracy"].reason == tables.EXTERNAL
    assert row(t, "CIFAR-10", "TRADES")["ours"]["robust_accuracy_AA"].mean == pytest.approx(7.5)


def test_inception_unavailable_points_to_the_stand_in_column(profile, results):
    t = build("JEAT_Tab2", profile, results)
    r = row(t, "CIFAR-10", "JEM")
    assert r["ours"]["FID"].reason == "Inception weights unavailable: refclf stand-in in column FID_refclf"
    assert r["ours"]["FID_refclf"].mean == pytest.approx(15.0)
    assert r["ours"]["JFS"].mean == pytest.approx(1.5)
    gap = row(build("EBJDAT_Tab1_energy_gap", profile, results), "CIFAR-10", "JEM-family")
    assert gap["ours"]["mean_energy_gap_clean_vs_generated"].mean == pytest.approx(-2.0)


def test_missing_results_are_named(profile, tmp_path):
    t = build("WEAT_Tab1_main", profile, tmp_path)
    reason = row(t, "CIFAR-10", "TRADES")["ours"]["clean_accuracy"].reason
    assert reason.startswith("missing eval/digits/trades/s0.json")


def test_stage_writes_every_table_in_four_formats(profile, results, tmp_path):
    out = tmp_path / "tables"
    files = tables.tables_stage(profile, results, out)
    groups = {(r["paper"], r["table_id"]) for r in tables.load_paper_records()}
    assert len(files) == 4 * len(groups) + 1 and (out / "README.md").is_file()
    for paper, table_id in groups:
        name = f"{paper}_{table_id}"
        recs = [r for r in tables.load_paper_records() if (r["paper"], r["table_id"]) == (paper, table_id)]
        rows = list(csv.DictReader(io.StringIO((out / f"{name}.csv").read_text())))
        assert len(rows) == len({(r["dataset"], r["method"], str(r.get("architecture"))) for r in recs})
        for line in rows:  # every cell of ours: a number or a reason
            for metric in {r["metric"] for r in recs}:
                assert line[f"{metric}_ours_mean"] or line[f"{metric}_reason"], (name, metric)
                assert line[f"{metric}_diff"] == ""  # smoke's digits never diff against the papers' data
        tex = "".join(line for line in (out / f"{name}.tex").read_text().splitlines(True) if not line.startswith("%"))
        body = re.sub(r"\\[a-zA-Z]+|\\[_%&#${}]|\$\\pm\$|\$\\to\$", "", tex)
        assert not re.search(r"[_%&#]", body.replace("&", "")), name  # specials are escaped
        assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
        assert tex.count("{") - tex.count(r"\{") == tex.count("}") - tex.count(r"\}")
        assert f"{name}" in (out / "README.md").read_text()
        assert "profile smoke" in (out / f"{name}.md").read_text()


def test_latex_escape():
    assert tables.latex_escape("a_b 50% & $x ± 1") == r"a\_b 50\% \& \$x $\pm$ 1"


def test_every_paper_method_and_metric_is_mapped():
    records = tables.load_paper_records()
    assert {r["method"] for r in records} <= set(tables.METHODS)
    assert {r["metric"] for r in records} <= set(tables.METRICS)
    assert {k for k, _ in tables.METHODS.values() if k} <= set(load_params(ROOT / "params.yaml").methods)


def mapping_errors(raw, edit, tmp_path, capsys) -> str:
    """What `robust-ebm check` says (exit 2) on params.yaml after `edit`."""
    import copy

    import yaml

    from robust_ebm import cli

    data = copy.deepcopy(raw)
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["check", "--params", str(path), "--profile", "smoke", "--skip-inputs"]) == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def raw():
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_check_rejects_a_mapping_that_does_not_fit_params(raw, tmp_path, capsys):
    """paper_mapping.yaml names methods, data sets and generators of params.yaml: `robust-ebm check` (and the
    figures, claims and tables stages) fails on each one params.yaml lacks, naming the mapping key and the fix."""
    def rename_generator(d):
        d["generation"]["generators"]["buffer"] = d["generation"]["generators"].pop("jem_buffer")
    msg = mapping_errors(raw, rename_generator, tmp_path, capsys)
    assert "paper_mapping.yaml does not fit" in msg
    assert "generators.jem: 'jem_buffer' is not a generator of params.yaml" in msg
    msg = mapping_errors(raw, lambda d: d["generation"]["generators"]["jem_buffer"]["methods"].remove("jem"),
                         tmp_path, capsys)
    assert "generators.jem: its own generator 'jem_buffer' does not run for it" in msg
    def mini_without_trades(d):  # a profile that narrows a generator's methods must keep each run's own
        d["profiles"]["mini"]["overrides"]["generation"]["generators"]["jeat_eq16"]["methods"].remove("trades")
    msg = mapping_errors(raw, mini_without_trades, tmp_path, capsys)
    assert "generators.trades: its own generator 'jeat_eq16' does not run for it in profile 'mini'" in msg
    def drop_method(d):
        del d["methods"]["noise_8"]
    msg = mapping_errors(raw, drop_method, tmp_path, capsys)
    assert "methods.noise_injection_sigma_8_over_255: 'noise_8' is not a method of params.yaml" in msg
    assert "set it to null" in msg
    def drop_svhn(d):
        paper = d["profiles"]["paper"]
        for entries, key in [(d["datasets"], "svhn"), (paper["runs"], "svhn"), (paper["table_datasets"], "SVHN"),
                             (paper["overrides"]["dataset_methods"], "svhn")]:
            del entries[key]
    msg = mapping_errors(raw, drop_svhn, tmp_path, capsys)
    assert "datasets.SVHN: 'svhn' is not a data set of params.yaml" in msg


def test_mapping_problems_name_bad_paths_and_a_missing_default(params, monkeypatch):
    from robust_ebm import papers

    mapping = papers._MAPPING
    metrics = dict(mapping.metrics) | {"JFS": papers._Metric(file="metrics", path="fishr.jfs"),
                                       "IS": papers._Metric(file="metrics", path="generators.{gen}.is_inception"),
                                       "robust_accuracy_AA": papers._Metric(file="eval", path="columns.aa.accuracy")}
    generators = {k: v for k, v in mapping.generators.items() if k != papers.DEFAULT_GENERATOR_KEY}
    monkeypatch.setattr(papers, "_MAPPING", mapping.model_copy(update={"metrics": metrics, "generators": generators}))
    problems = "\n".join(papers.mapping_problems(params))
    assert "metrics.JFS.path: 'fishr.jfs' is not a field of the metrics stage's output" in problems
    assert "metrics.IS.path: unknown placeholder(s) ['gen']" in problems
    assert "metrics.robust_accuracy_AA.path: 'columns.aa.accuracy' is not a field of the eval stage's output" in problems
    assert "generators: no 'default' entry" in problems
    with pytest.raises(ValueError, match="no generator for method 'standard'"):
        papers.own_generator("standard")
    assert papers.own_generator("jem") == "jem_buffer"


def _texts(table):
    """Every distinct non-numeric text of the metric and notes cells (what must become a footnote)."""
    n = len(tables.LABEL_COLUMNS)
    return {c for r in table.rows for c in tables._cells(table, r)[n:]
            if c not in ("", "-") and not tables._NUMBER.fullmatch(c)}


def test_reasons_are_footnotes_once_each_and_cells_stay_short(profile, results):
    t = build("JEAT_Tab3", profile, results)   # external baselines, unknown values, stand-in data set
    reasons = _texts(t)
    assert len(reasons) >= 4
    md = tables.to_markdown(t)
    body = [line for line in md.splitlines() if line.startswith("| CIFAR-10")]
    notes = [line for line in md.splitlines() if line.startswith("[^")]
    assert len(body) == len(t.rows) and len(notes) == len(reasons)   # one footnote per distinct reason
    assert {line.split("]: ", 1)[1] for line in notes} == reasons
    assert not any(reason in line for line in body for reason in reasons)  # cells hold marks, not texts
    cells = [c.strip() for line in body for c in line.strip("|").split("|")]
    assert max(len(re.sub(r"\[\^\d+\]", "", c)) for c in cells) <= 25  # labels, numbers or '–'
    glow = next(line for line in body if "| Glow |" in line)
    external = next(i for i, line in enumerate(notes, 1) if line.endswith(f"]: {tables.EXTERNAL}"))
    assert glow.count(f"–[^{external}]") == 2  # both 'ours' cells of an external baseline point at one note
    csv_line = next(r for r in csv.DictReader(io.StringIO(tables.to_csv(t))) if r["method"] == "Glow")
    assert csv_line["clean_accuracy_reason"] == tables.EXTERNAL   # the CSV keeps the full text


def test_latex_is_booktabs_with_grouped_headers_and_table_notes(profile, results):
    t = build("JEAT_Tab3", profile, results)
    tex = tables.to_latex(t)
    lines = tex.splitlines()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert lines.count(rule) == 1, rule
    assert r"\hline" not in tex and r"\caption{" in tex and r"\label{tab:JEAT-Tab3}" in tex
    assert lines.index(r"\toprule") < lines.index(r"\midrule") < lines.index(r"\bottomrule")
    spec = re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1)
    groups = [m for m in t.metrics if m in tables.METRICS]
    assert spec == "llll" + "rrr" * len(groups) + "l"       # numbers right-aligned, texts left
    assert tex.count(r"\multicolumn{3}{c}") == len(groups) and tex.count(r"\cmidrule(lr)") == len(groups)
    assert r"\multicolumn{3}{c}{Clean acc. (\%)}" in tex
    items = re.findall(r"^\\item\[(\d+)\] (.*)$", tex, flags=re.M)
    assert [int(n) for n, _ in items] == list(range(1, len(_texts(t)) + 1))
    assert {int(n) for n in re.findall(r"\\tnote\{(\d+)\}", tex)} == set(range(1, len(items) + 1))
    header_row = next(line for line in lines if line.startswith("data set &"))
    assert header_row.count("&") == len(spec) - 1
    assert all(line.count(" & ") == len(spec) - 1 for line in lines if line.startswith("CIFAR-10 &"))
    assert r"\begin{threeparttable}" in tex and r"\end{tablenotes}" in tex


def test_html_version_shows_grouped_headers_and_numbered_notes(profile, results):
    t = build("JEAT_Tab3", profile, results)
    html = tables.to_html(t)
    assert html.count('<th colspan="3">') == len([m for m in t.metrics if m in tables.METRICS])
    assert html.count("<li id=") == len(_texts(t)) and html.count("<tr>") == len(t.rows) + 2


def test_readme_lists_the_figures_by_kind(profile, results, tmp_path):
    figs = results / "figures"
    figs.mkdir()
    entries = [{"name": "dynamics_digits_jem_s0", "kind": "dynamics"}, {"name": "clean_vs_autoattack_digits",
                                                                        "kind": "accuracy_scatter"}]
    (figs / "figures.json").write_text(json.dumps({"figures": entries}))
    for e in entries:
        (figs / f"{e['name']}.png").write_bytes(b"")
    readme = [p for p in tables.tables_stage(profile, results, tmp_path / "t") if p.name == "README.md"][0].read_text()
    scatter, dynamics = readme.index("### Clean vs AutoAttack accuracy"), readme.index("### Training dynamics")
    assert scatter < readme.index("(../figures/clean_vs_autoattack_digits.png)") < dynamics
    assert dynamics < readme.index("(../figures/dynamics_digits_jem_s0.png)")
