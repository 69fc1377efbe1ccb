"""The published numbers of the three papers (resources/paper_tables.yaml) and which of our
methods each paper's method name means: read by the tables (paper vs ours) and by the
clean-vs-AutoAttack scatter (published points beside ours).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import yaml

# Paper method name -> (our method key | None, note). None: an external baseline we do not train.
METHODS: dict[str, tuple[str | None, str]] = {
    "standard_training": ("standard", ""), "Normal": ("standard", ""),
    "AT": ("pgd_at", ""), "AT (original robust classifier)": ("pgd_at", ""),
    "SAT": ("pgd_at", ""), "SAT (Madry)": ("pgd_at", ""), "adversarial_training": ("pgd_at", ""),
    "TRADES": ("trades", ""), "MART": ("mart", ""), "MAIL-TR": ("mail_tr", ""),
    "noise_injection_sigma_8_over_255": ("noise_8", ""),
    "noise_injection_sigma_16_over_255": ("noise_16", ""),
    "noise_injection_sigma_24_over_255": ("noise_24", ""),
    "JEAT": ("jeat", ""), "JEM": ("jem", ""), "JEM++": ("jempp", ""), "SADA-JEM": ("sadajem", ""),
    "JEM-family": ("jem", "EB-JDAT's 'JEM-family' row compared with our jem"),
    "WEAT_nat": ("weat_nat", ""), "WEAT_adv": ("weat_adv", ""),
    "WEAT": ("weat_adv", "the paper does not name the WEAT variant; compared with weat_adv"),
    "WEAT (best generation setting)": ("weat_adv", "compared with weat_adv"),
    "WEAT(IF) informative-init sampling": ("weat_adv", "informative (PCA) init: our weat_momentum generator"),
    "EB-JDAT-JEM++": ("ebjdat_jempp", ""), "EB-JDAT-SADAJEM": ("ebjdat_sadajem", ""),
    "EB-JDAT": ("ebjdat_jempp", "Fig.5 ablation of EB-JDAT-JEM++"),
    **{f"EB-JDAT-JEM++ w={w}": (None, "weight ablation of EB-JDAT-JEM++, not in params.yaml (add a method "
                                "with these weights to reproduce it)") for w in ("(0,0,1)", "(0,1,1)", "(1,0.5,1)", "(1,1,1)")},
    "SAT/TRADES analysis": (None, "analysis setting, not a trained model"),
    "all other rows": (None, "rows not recovered from the paper"),
    **{name: (None, "") for name in ("AWP", "Better DM (Wang et al. 2023)", "DHAT-CFA", "GAIR-RST", "Glow",
                                     "Gowal et al. 2021", "IGEBM", "IKL", "LAS-AT", "LAS-AWP", "SCORE")},
}
# A paper's metric names for the two axes of the clean-vs-AutoAttack scatter (EB-JDAT Fig.1).
CLEAN_METRICS = ("clean_accuracy", "accuracy_no_attack")
AUTOATTACK_METRIC = "robust_accuracy_AA"


def load_paper_records() -> list[dict]:
    text = resources.files("robust_ebm").joinpath("resources/paper_tables.yaml").read_text()
    return yaml.safe_load(text)["records"]


@dataclass(frozen=True)
class PublishedPoint:
    """A published (clean, AutoAttack) accuracy pair in %, and the tables that report it."""

    method: str             # the paper's method name
    ours: str | None        # our method key (METHODS), None for a baseline we do not train
    clean: float
    autoattack: float
    sources: tuple[str, ...]  # '<paper> <table_id>'


def published_accuracy_points(dataset: str, records: list[dict] | None = None) -> list[PublishedPoint]:
    """Every row of the papers on `dataset` (the paper's name, e.g. 'CIFAR-10') that reports both clean and
    AutoAttack accuracy; a method reported with the same pair in several tables is one point. Rows that
    METHODS maps to no method of ours *with a note* (weight ablations, analysis settings) are left out:
    only methods and external baselines are points."""
    rows: dict[tuple, dict] = {}
    for r in records if records is not None else load_paper_records():
        ours, note = METHODS.get(r["method"], (None, "not mapped"))
        if r["dataset"] == dataset and r["metric"] in (*CLEAN_METRICS, AUTOATTACK_METRIC) and (ours or not note):
            key = (r["paper"], r["table_id"], r["method"], str(r.get("architecture")))
            rows.setdefault(key, {})[r["metric"]] = r.get("value")
    points: dict[tuple, list[str]] = {}
    for (paper, table_id, method, _), values in rows.items():
        clean = next((values[m] for m in CLEAN_METRICS if isinstance(values.get(m), (int, float))), None)
        aa = values.get(AUTOATTACK_METRIC)
        if isinstance(clean, (int, float)) and isinstance(aa, (int, float)):
            points.setdefault((method, float(clean), float(aa)), []).append(f"{paper} {table_id}")
    return [PublishedPoint(m, METHODS.get(m, (None, ""))[0], c, a, tuple(src)) for (m, c, a), src in points.items()]
