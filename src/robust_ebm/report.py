"""How the Snakemake report groups the profile-wide outputs (workflow/rules/summary.smk's report flags):
figures by kind (category) and method or data set (subcategory), read from the figures.json the
figures stage writes beside them; tables by paper, shown inline as their HTML version.

Kept free of plotting imports: the Snakefile imports it at parse time.
"""

from __future__ import annotations

import json
from pathlib import Path

# figures.json "kind" -> what the figures show, in reading order; the report category is
# "Figures – <that>" (no colon: Snakemake turns each category into an RST link target, cut at ':')
FIGURE_KINDS = {
    "accuracy_scatter": "clean vs AutoAttack accuracy",
    "energy_histograms": "energy histograms",
    "landscape": "energy landscapes",
    "dynamics": "training dynamics",
    "samples": "generated samples",
    "nearest_ssim": "nearest training images (SSIM)",
}
FIGURE_CATEGORIES = {kind: f"Figures – {what}" for kind, what in FIGURE_KINDS.items()}
TABLE_CATEGORY = "Tables – paper vs ours"
ALL_RUNS = "all methods"


def figure_entry(figures_dir, name: str) -> dict:
    """The figures.json entry of figure `name` (its file stem)."""
    listing = Path(figures_dir) / "figures.json"
    entries = {e["name"]: e for e in json.loads(listing.read_text())["figures"]}
    if name not in entries:
        raise KeyError(f"figure '{name}' is not listed in {listing}; rerun the figures stage")
    return entries[name]


def figure_category(figures_dir, name: str) -> str:
    kind = figure_entry(figures_dir, name)["kind"]
    if kind not in FIGURE_CATEGORIES:
        raise KeyError(f"figure kind '{kind}' has no report category; add it to robust_ebm.report.FIGURE_CATEGORIES")
    return FIGURE_CATEGORIES[kind]


def figure_subcategory(figures_dir, name: str) -> str:
    """The method the figure shows, or 'all methods' for a figure across methods; with the data set."""
    entry = figure_entry(figures_dir, name)
    return f"{entry.get('dataset', '?')}: {entry.get('method', ALL_RUNS)}"


def figure_labels(figures_dir, name: str) -> dict[str, str]:
    """The columns of the report's result list (the same keys for every figure)."""
    entry = figure_entry(figures_dir, name)
    return {"figure": name, "data set": str(entry.get("dataset", "-")), "method": str(entry.get("method", ALL_RUNS)),
            "seed": str(entry.get("seed", "-"))}


def table_subcategory(name: str) -> str:
    """'JEAT_Tab1' -> 'JEAT' (tables are named <paper>_<table id>)."""
    return name.split("_", 1)[0]
