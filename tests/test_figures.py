"""Figures: the energy landscape grid, SSIM neighbours, plotting functions and the figures stage."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import robust_ebm.figures as figures
import robust_ebm.landscape as landscape
from robust_ebm import samples_file
from robust_ebm.config import FiguresConfig
from robust_ebm.energy import joint_energy, marginal_energy
from robust_ebm.models import ModelConfig, save_classifier
from helpers import tiny_classifier


def test_landscape_centre_is_the_image_and_grid_points_are_x0_plus_a_d1_plus_b_d2():
    model = tiny_classifier()
    x0, y0 = torch.rand(1, 8, 8), 2
    d1, d2 = landscape.random_directions(x0.shape, torch.Generator().manual_seed(0))
    assert d1.norm() == pytest.approx(1.0) and d2.norm() == pytest.approx(1.0)
    land = landscape.energy_landscape(model, x0, y0, d1, d2, radius=0.5, grid=5, batch_size=7)
    assert land["E_xy"].shape == land["E_x"].shape == (5, 5) and land["coords"][2] == 0.0
    with torch.no_grad():
        logits = model(x0[None])
        corner = model((x0 - 0.5 * d1 + 0.25 * d2)[None])  # a = coords[0] = -0.5, b = coords[3] = 0.25
    assert land["E_xy"][2, 2] == pytest.approx(joint_energy(logits, torch.tensor([y0])).item(), abs=1e-5)
    assert land["E_x"][2, 2] == pytest.approx(marginal_energy(logits).item(), abs=1e-5)
    assert land["E_xy"][0, 3] == pytest.approx(joint_energy(corner, torch.tensor([y0])).item(), abs=1e-5)


def test_nearest_by_ssim_finds_an_exact_copy_first():
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8, generator=g)
    idx, scores = figures.nearest_by_ssim(pool[[7, 3]], pool, k=4, batch_size=6)
    assert idx[:, 0].tolist() == [7, 3] and torch.allclose(scores[:, 0], torch.ones(2), atol=1e-5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_histogram_range_falls_back_to_the_data_only_when_the_configured_one_misses_it():
    assert figures._hist_range([np.array([-5.0, 0.0, 3.0])], (-40, 20)) == ((-40, 20), False)
    rng, auto = figures._hist_range([np.array([100.0, 120.0, 150.0])], (-40, 20))
    assert auto and rng[0] < 100 and rng[1] > 150  # the full range of the data, padded
    rng, auto = figures._hist_range([np.array([-0.3, -0.2, 0.1])], (-40, 20))  # fills < 10% of the range
    assert auto and rng[1] - rng[0] < 1


def test_histogram_legend_counts_values_outside_the_axis():
    values = {"clean": np.array([-5.0, 0.0, 3.0]), "generated": np.array([-60.0, -50.0, -10.0, 0.0])}
    fig = figures.plot_energy_histograms({"p": ("E", values)}, bins=10, range_=(-40, 20), title="t")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "clean (n 3, mean -0.67)" and labels[1].endswith(", 2 outside the axis)")
    assert figures._bins_for({"a": np.zeros(100), "b": np.zeros(10_000)}, 200) == 20  # n/5 of the smallest set
    assert figures._bins_for({"a": np.zeros(10_000)}, 200) == 200 and figures._bins_for({"a": np.zeros(3)}, 200) == 10


def test_dynamics_plot_handles_gaps_and_spreads_and_rejects_empty_input():
    dyn = {"epoch": [1, 2, 3], "jeat/dx_E_xy/mean": [0.5, None, 0.2], "jeat/dx_E_xy/var": [0.1, None, 0.1],
           "weat/dE_x": [None, None, -0.1], "never": [None, None, None]}
    fig = figures.plot_dynamics(dyn, "t")
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # 'never' and the var companion get no panel
    with pytest.raises(ValueError, match="no plottable"):
        figures.plot_dynamics({"epoch": [1], "x": [None]}, "t")


def test_save_figure_writes_png_and_pdf(tmp_path):
    fig = figures.plot_accuracy_scatter({"pgd_at": [(0.8, 0.45), (0.82, 0.47)], "standard": [(0.95, 0.0)]}, "t")
    paths = figures.save_figure(fig, tmp_path, "scatter")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"


WEAT_FIG2 = ["pgd", "pgd_kl", "apgd_ce", "apgd_t", "apgd_dlr", "fab", "square", "cw_l2"]


def _sets(rng, attacks, n_clean=40, n_adv=10):
    sets = {"clean": {"E_x": rng.normal(-5, 1, n_clean), "E_xy": rng.normal(-3, 1, n_clean)}}
    sets.update({a: {"E_x": rng.normal(-6, 1, n_adv), "E_xy": rng.normal(2, 1, n_adv)} for a in attacks})
    return sets


def test_attack_histograms_have_one_panel_column_per_attack_and_rows_E_x_E_xy(tmp_path):
    sets = _sets(np.random.default_rng(0), WEAT_FIG2)
    labels = {"pgd": "PGD-20"}
    fig = figures.plot_attack_histograms(sets, WEAT_FIG2, bins=20, range_=(-40, 20), title="t", labels=labels)
    assert len(fig.axes) == 2 * len(WEAT_FIG2)
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes} == {(4, 4)}  # 8 attacks: 2 blocks of 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("E(x), PGD-20") and titles[4].startswith("E(x, y), PGD-20")
    assert any("APGD-T" in t for t in titles) and any("CW-L2 (unbounded)" in t for t in titles)
    # 11 attacks wrap into blocks of 6 and 5 columns: each attack's E(x) sits right above its E(x, y)
    eleven = WEAT_FIG2 + ["energy_attack", "ebjdat_scale", "autoattack"]
    fig = figures.plot_attack_histograms(_sets(np.random.default_rng(1), eleven), eleven, bins=20, range_=(-40, 20),
                                         title="t")
    slots = {ax.get_title().split(" [")[0]: ax.get_subplotspec().get_geometry() for ax in fig.axes}
    assert len(slots) == 22 and {g[:2] for g in slots.values()} == {(4, 6)}
    for a in ("PGD", "Square", "E(x,y) attack, PGD", "AutoAttack"):  # no eval entries: names without settings
        above, below = slots[f"E(x), {a}"][2], slots[f"E(x, y), {a}"][2]
        assert below == above + 6, a
    paths = figures.save_figure(fig, tmp_path, "weat_fig2")
    assert [p.read_bytes()[:4] for p in paths] == [b"\x89PNG", b"%PDF"]
    # each attack ran on the first n images: its clean histogram uses those same n
    panels, _ = figures.attack_histogram_panels(sets, ["apgd_t"])
    clean = panels["E(x), APGD-T"][1]["clean"]
    assert len(clean) == 10 and np.array_equal(clean, sets["clean"]["E_x"][:10])
    without_square = {k: v for k, v in sets.items() if k != "square"}
    with pytest.raises(ValueError, match="no energies for \\['square'\\]"):
        figures.plot_attack_histograms(without_square, ["square"], bins=5, range_=(-1, 1), title="t")


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A one-data-set, two-method profile's stage outputs."""
    r = tmp_path / "results" / "smoke"
    g = torch.Generator().manual_seed(0)
    split = lambda n: SimpleNamespace(images=torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),  # noqa: E731
                                      labels=torch.arange(n) % 3)
    splits = SimpleNamespace(train=split(12), valid=split(3), test=split(6), classes=["zero", "one", "two"])
    (r / "data" / "digits").mkdir(parents=True)
    (r / "data" / "digits" / "splits.pt").write_bytes(b"")
    monkeypatch.setattr(figures, "load_prepared", lambda d: (splits, None))
    rng = np.random.default_rng(0)
    for i, method in enumerate(("standard", "jeat")):
        run = r / "models" / "digits" / method / "s0"
        run.mkdir(parents=True)
        save_classifier(run / "model.pt", tiny_classifier(i), ModelConfig(arch="tiny_cnn", width=4), {})
        (run / "dynamics.json").write_text(json.dumps({"epochs": [
            {"epoch": 1, "E_x/clean/mean": -1.0, "E_x/clean/var": 0.1},
            {"epoch": 2, "E_x/clean/mean": -2.0, "E_x/clean/var": 0.2}]}))
        ev = r / "eval" / "digits" / method
        ev.mkdir(parents=True)
        (ev / "s0.json").write_text(json.dumps({"columns": {"clean": {"accuracy": 0.9 - i / 10, "steps": 0},
                                                            "pgd": {"accuracy": 0.2, "steps": 2, "objective": "ce"},
                                                            "autoattack": {"accuracy": 0.1 + i / 5, "steps": None}},
                                                "histogram_attacks": {"apgd_t": {"steps": 10}, "cw_linf": {"steps": 2}}}))
        np.savez(ev / "s0.energies.npz", labels=np.zeros(6), clean_marginal=rng.normal(-5, 1, 6),
                 clean_joint=rng.normal(-3, 1, 6), pgd_marginal=rng.normal(-6, 1, 6), pgd_joint=rng.normal(2, 1, 6))
        (r / "metrics" / "digits" / method).mkdir(parents=True)
        np.savez(r / "metrics" / "digits" / method / "s0.energies.npz", sgld_marginal=rng.normal(-4, 1, 9),
                 sgld_joint=rng.normal(-2, 1, 9), sgld_labels=np.arange(9) % 3)
        samples = r / "samples" / "digits" / method / "s0"
        samples.mkdir(parents=True)
        samples_file.write(samples / "sgld.npz", torch.randint(0, 256, (9, 1, 8, 8), dtype=torch.uint8).numpy(),
                           np.arange(9) % 3)
        samples_file.write_index(samples, {"generators": {  # a skipped generator has no samples to draw
            "sgld": {"files": samples_file.file_names("sgld"), "count": 9, "status": "ok"},
            "buffer": {"files": samples_file.file_names("buffer"), "count": 0, "status": "skipped"}}})
    cfg = FiguresConfig.model_validate({"landscape": {"grid": 5, "radius": 0.5, "n_images": 1},
                                        "samples": {"n_per_class": 3}, "nearest": {"n_images": 2, "k": 3}})
    profile = SimpleNamespace(name="smoke", figures=cfg, run_datasets=["digits"], seeds=[0], device="cpu",
                              methods_for=lambda d: ["standard", "jeat"], table_datasets={"CIFAR-10": "digits"},
                              training=SimpleNamespace(val_pgd=SimpleNamespace(steps=2)))
    return profile, r


def test_figures_stage_draws_every_figure_present_and_lists_them(results, tmp_path):
    profile, r = results
    out = tmp_path / "figs"
    files = figures.figures_stage(profile, r, out)
    listing = json.loads((out / "figures.json").read_text())
    names = {e["name"] for e in listing["figures"]}
    assert names == {
        "landscape_joint_digits_img0", "landscape_marginal_digits_img0",
        "energy_hist_attacks_digits_standard_s0", "energy_hist_attacks_digits_jeat_s0",
        "energy_hist_clean_adv_gen_digits_s0",
        "dynamics_digits_standard_s0", "dynamics_digits_jeat_s0",
        "samples_digits_standard_s0_sgld", "samples_digits_jeat_s0_sgld",
        "nearest_ssim_digits_standard_s0_sgld", "nearest_ssim_digits_jeat_s0_sgld",
        "clean_vs_autoattack_digits"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in files) and len(files) == 2 * len(names) + 1
    gen_entry = next(e for e in listing["figures"] if e["name"] == "energy_hist_clean_adv_gen_digits_s0")
    assert any(i.endswith("metrics/digits/jeat/s0.energies.npz") for i in gen_entry["inputs"])


def test_figures_stage_skips_what_is_missing(results, tmp_path):
    profile, r = results
    for npz in (r / "eval").rglob("*.npz"):
        npz.unlink()
    names = {e["name"] for e in json.loads((figures.figures_stage(profile, r, tmp_path / "f")[-1]).read_text())["figures"]}
    assert not any(n.startswith("energy_hist") for n in names) and "clean_vs_autoattack_digits" in names
    with pytest.raises(FileNotFoundError, match="no results folder"):
        figures.figures_stage(profile, tmp_path / "nowhere", tmp_path / "f")


def test_figures_stage_draws_a_column_for_each_listed_attack_present(results, tmp_path, monkeypatch):
    """Default figures.histograms.attacks = WEAT Fig.2's set: a run with per-attack energies gets one column
    per attack present; a run with only the old columns keeps its single PGD column."""
    profile, r = results
    npz = r / "eval" / "digits" / "standard" / "s0.energies.npz"
    with np.load(npz) as f:
        data = dict(f)
    rng = np.random.default_rng(1)
    for name in ("apgd_t", "cw_l2"):  # on the first 4 of the 6 evaluated images
        data |= {f"{name}_marginal": rng.normal(-7, 1, 4), f"{name}_joint": rng.normal(3, 1, 4),
                 f"{name}_correct": np.zeros(4, dtype=bool)}
    np.savez(npz, **data)
    drawn, real = {}, figures.plot_attack_histograms

    def spy(sets, attacks, **kw):
        fig = real(sets, attacks, **kw)
        drawn[kw["title"].split("(")[1].split(")")[0]] = (attacks, len(fig.axes))  # '...: JEAT (jeat), ...' 
        return fig

    monkeypatch.setattr(figures, "plot_attack_histograms", spy)
    for other in ("_landscapes", "_samples", "_scatter"):  # not under test here: keep it fast
        monkeypatch.setattr(figures, other, lambda *a, **k: None)
    profile.figures = profile.figures.model_copy(update={"formats": ["png"]})
    figures.figures_stage(profile, r, tmp_path / "figs")
    assert drawn == {"standard": (["pgd", "apgd_t", "cw_l2"], 6), "jeat": (["pgd"], 2)}


# ----------------------------------------------------------------------------- style, names, report

from matplotlib.colors import to_hex  # noqa: E402

from robust_ebm import papers, report, style  # noqa: E402
from robust_ebm.config import load_params  # noqa: E402
from repo_copy import ROOT  # noqa: E402


def test_every_method_has_a_distinct_colour_blind_safe_style():
    methods = list(load_params(ROOT / "params.yaml").methods)
    assert set(style.METHOD_STYLES) == set(methods) and len(methods) == 18
    styles = [style.method_style(m) for m in methods]
    assert len({s.colour for s in styles}) == 18 and len({(s.colour, s.marker) for s in styles}) == 18
    assert len({s.label for s in styles}) == 18
    rgb = lambda h: np.array([int(h[i:i + 2], 16) / 255 for i in (1, 3, 5)])  # noqa: E731
    gaps = [np.linalg.norm(rgb(a.colour) - rgb(b.colour)) for i, a in enumerate(styles) for b in styles[i + 1:]]
    assert min(gaps) > 0.15  # no two methods a near-identical colour
    for family, members in {s.family: [t for t in styles if t.family == s.family] for s in styles}.items():
        assert len({s.marker for s in members}) == len(members), family  # the marker tells a family apart
    hues = {style.OKABE_ITO[hue] for hue, _ in style.FAMILIES.values()}
    assert hues <= set(style.OKABE_ITO.values())
    with pytest.raises(KeyError, match="no figure style; add it to robust_ebm.style.FAMILIES"):
        style.method_style("new_method")


def _mean_marker(fig, label):
    """(facecolour hex, marker path vertices) of the legend-labelled mean marker of a method."""
    coll = next(c for c in fig.axes[0].collections if c.get_label().startswith(label + " (n="))
    return to_hex(coll.get_facecolor()[0]), coll.get_paths()[0].vertices.round(6).tolist()


def test_a_method_looks_the_same_in_every_figure_and_profile():
    """Stable: the style depends on the method's name only, not on which other methods a profile runs."""
    everyone = {m: [(0.5, 0.2)] for m in style.METHOD_STYLES}
    few = {"jem": [(0.6, 0.3)], "standard": [(0.9, 0.0)]}
    a, b = figures.plot_accuracy_scatter(everyone, "t"), figures.plot_accuracy_scatter(few, "t")
    shuffled = figures.plot_accuracy_scatter(dict(reversed(everyone.items())), "t")
    assert [t.get_text() for t in shuffled.legends[0].get_texts()] == [t.get_text() for t in a.legends[0].get_texts()]
    jem = style.method_style("jem")
    assert _mean_marker(a, jem.label) == _mean_marker(b, jem.label)
    assert _mean_marker(a, jem.label)[0] == jem.colour.lower()
    dyn = figures.plot_dynamics({"epoch": [1, 2], "E_x/clean/mean": [1.0, 2.0]}, "t", colour=jem.colour)
    assert to_hex(dyn.axes[0].get_lines()[0].get_color()) == jem.colour.lower()


def test_published_points_are_hollow_labelled_and_linked_to_ours():
    points = papers.published_accuracy_points("CIFAR-10")
    sada = [p for p in points if p.method == "EB-JDAT-SADAJEM"]
    assert {(p.clean, p.autoattack) for p in sada} == {(90.37, 66.12), (90.39, 66.3)}  # same pair in 2 tables: 1 point
    assert next(p for p in sada if p.clean == 90.39).sources == ("EBJDAT Tab3_generated_data_AT", "EBJDAT Tab5_unified")
    assert not any("w=" in p.method for p in points)  # weight ablations are not methods
    assert {p.ours for p in points} >= {"jem", "jempp", "sadajem", "jeat", None}
    jem_paper = next(p for p in points if p.ours == "jem")
    awp = next(p for p in points if p.method == "AWP")
    fig = figures.plot_accuracy_scatter({"jem": [(0.5, 0.1), (0.7, 0.3)]}, "t", [jem_paper, awp], "note")
    ax = fig.axes[0]
    hollow = {c.get_label(): c for c in ax.collections if c.get_facecolor().size == 0 or c.get_facecolor()[0][3] == 0}
    assert set(hollow) == {"JEM [EBJDAT Tab5]", "AWP [EBJDAT Tab2]"}
    assert to_hex(hollow["JEM [EBJDAT Tab5]"].get_edgecolor()[0]) == style.method_style("jem").colour.lower()
    assert to_hex(hollow["AWP [EBJDAT Tab2]"].get_edgecolor()[0]) == style.EXTERNAL_COLOUR.lower()
    link = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(link) == 1 and np.allclose(link[0].get_xydata(), [[60.0, 20.0], [jem_paper.clean, jem_paper.autoattack]])
    legend_texts = {t.get_text() for legend in fig.legends for t in legend.get_texts()}
    assert {"JEM (n=2)", "JEM [EBJDAT Tab5]", "AWP [EBJDAT Tab2]"} <= legend_texts
    assert not ax.texts  # names live in the legends, never as overlapping text on the axes


def test_attack_names_come_from_the_settings_that_ran():
    assert figures.attack_label("pgd", {"steps": 2}) == "PGD-2"
    assert figures.attack_label("pgd", {"steps": 20}) == "PGD-20"
    assert figures.attack_label("pgd", None) == "PGD"  # no entry: no made-up step count
    assert figures.attack_label("cw_linf", {"steps": 2}) == "CW-Linf PGD-2"
    assert figures.attack_label("apgd_t", {"steps": 10}) == "APGD-T, 10 iter."
    assert figures.attack_label("square", {"steps": 100}) == "Square, 100 queries"
    assert figures.attack_label("ebjdat_scale", {"steps": 2, "eps_pixel": 4 / 255}) == "PGD-2 at ε 4/255 (EB-JDAT scale)"


def test_histogram_sets_keep_their_colour_in_every_panel():
    rng = np.random.default_rng(0)
    panels = {"a": ("E", {"clean": rng.normal(size=50), "adversarial (PGD-2)": rng.normal(size=50)}),
              "b": ("E", {"generated (jem_buffer)": rng.normal(size=50), "clean": rng.normal(size=50)}),
              "c": ("E", {"adversarial (PGD-2)": rng.normal(size=50), "generated (jeat_eq17)": rng.normal(size=50)})}
    fig = figures.plot_energy_histograms(panels, bins=10, range_=(-3, 3), title="t")
    seen = {}
    for ax in fig.axes:
        for patch, text in zip(ax.get_legend().get_patches(), ax.get_legend().get_texts()):
            colour = patch.get_facecolor() if patch.get_fill() else patch.get_edgecolor()
            seen.setdefault(text.get_text().split(" (n ")[0], set()).add(to_hex(colour))
    assert all(c == {style.set_colour(name).lower()} for name, c in seen.items()) and len(seen) == 4
    assert len({c.pop() for c in seen.values()}) == 4
    assert style.set_colour("clean") == style.SET_COLOURS["clean"] != style.set_colour("adversarial (APGD-T)")
    generators = load_params(ROOT / "params.yaml").generation.generators
    assert set(generators) == set(style.GENERATOR_COLOURS)  # every generator of params has its own colour
    assert len(set(style.GENERATOR_COLOURS.values()) | set(style.SET_COLOURS.values())) == len(generators) + 2
    assert style.set_colour("generated (new_one)") == style.set_colour("generated (new_one)") in style.RESERVE_COLOURS
    with pytest.raises(KeyError, match="has no colour"):
        style.set_colour("denoised")


def test_dynamics_panels_have_readable_titles_and_units():
    keys = ["E_x/clean/mean", "E_xy/adv/mean", "E_x/sgld/mean", "jeat/dx_E_xy/mean", "jeat/dtheta_E_x/mean",
            "weat/dE_x", "weat/dE_xy"]
    for key in keys:
        title, ylabel = style.dynamics_label(key, "PGD-2")
        assert key not in title and "/" not in title.replace("8/255", "") and ylabel.endswith("[logit units]"), key
    assert "x* = PGD-2" in style.dynamics_label("weat/dE_x", "PGD-2")[0]
    dyn = {"epoch": [1, 2], **{k: [0.1, 0.2] for k in keys}}
    fig = figures.plot_dynamics(dyn, "t", divergence_attack="PGD-2")
    assert [ax.get_title() for ax in fig.axes] == [style.dynamics_label(k, "PGD-2")[0] for k in keys]


def test_figures_stage_names_attacks_by_their_settings_and_groups_the_report(results, tmp_path, monkeypatch):
    profile, r = results
    for other in ("_landscapes", "_samples"):  # not under test here: keep it fast
        monkeypatch.setattr(figures, other, lambda *a, **k: None)
    profile.figures = profile.figures.model_copy(update={"formats": ["png"]})
    titles = []
    real = figures.plot_energy_histograms
    monkeypatch.setattr(figures, "plot_energy_histograms",
                        lambda panels, **kw: titles.extend(panels) or real(panels, **kw))
    out = tmp_path / "figs"
    figures.figures_stage(profile, r, out)
    assert "E(x), PGD-2" in titles and not any("PGD-20" in t for t in titles)
    listing = json.loads((out / "figures.json").read_text())["figures"]
    for entry in listing:
        assert report.figure_category(out, entry["name"]) in report.FIGURE_CATEGORIES.values()
        assert set(report.figure_labels(out, entry["name"])) == {"figure", "data set", "method", "seed"}
    assert report.figure_subcategory(out, "dynamics_digits_jeat_s0") == "digits: jeat"
    assert report.figure_subcategory(out, "clean_vs_autoattack_digits") == "digits: all methods"
    assert report.figure_category(out, "dynamics_digits_jeat_s0") == "Figures – training dynamics"
    assert not any(":" in c for c in [*report.FIGURE_CATEGORIES.values(), report.TABLE_CATEGORY])  # RST targets
    with pytest.raises(KeyError, match="not listed"):
        report.figure_entry(out, "nothing")
    smk = (ROOT / "workflow" / "rules" / "summary.smk").read_text()
    assert 'patterns=["{name}.html"]' in smk and "report_groups.figure_category(output[0], wildcards.name)" in smk
    assert report.table_subcategory("EBJDAT_Tab2_sota_at_cifar10") == "EBJDAT"
