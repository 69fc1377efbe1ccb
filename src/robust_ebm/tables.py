"""Paper-vs-ours tables: every (paper, table) of resources/paper_tables.yaml as
Markdown, CSV and LaTeX, our number beside the published one.

Rows are the paper's rows (data set, method, architecture); per metric three
columns: paper, ours (mean ± std over seeds), ours − paper. Our numbers are
read from the stage outputs results/<P>/{eval,metrics}/<D>/<M>/s<S>.json
through the explicit maps below (paper name -> our key / JSON field): nothing
is typed in. A cell that cannot be computed holds the reason instead.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .models import architecture_name

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
EXTERNAL = "external baseline, not reproduced"

# Paper metric -> (our file 'eval'|'metrics', dotted JSON path, scale) or (None, reason, None).
# {generator} is the method's generator (GENERATORS); a path ending in '_inception' takes the
# largest sample count written (is_inception_n<N>).
METRICS: dict[str, tuple[str | None, str, float | None]] = {
    "clean_accuracy": ("eval", "columns.clean.accuracy", 100.0),
    "accuracy_no_attack": ("eval", "columns.clean.accuracy", 100.0),
    "accuracy_normal_attack_CE": ("eval", "columns.pgd.accuracy", 100.0),
    "accuracy_energy_attack_Exy": ("eval", "columns.energy_attack.accuracy", 100.0),
    "robust_accuracy_PGD20": ("eval", "columns.pgd.accuracy", 100.0),
    "robust_accuracy_PGD20_eps8": ("eval", "columns.pgd.accuracy", 100.0),
    "robust_accuracy_AA": ("eval", "columns.autoattack.accuracy", 100.0),
    "IS": ("metrics", "generators.{generator}.is_inception", 1.0),
    "FID": ("metrics", "generators.{generator}.fid_inception", 1.0),
    "JFS": ("metrics", "fisher.jfs", 1.0),
    "MFS": ("metrics", "fisher.mfs", 1.0),
    "mean_energy_gap_clean_vs_PGD20": ("metrics", "energy.gap.E_xy/clean->pgd", 1.0),
    "mean_energy_gap_clean_vs_generated": ("metrics", "energy.gap.E_xy/clean->generated/{generator}", 1.0),
    "robust_accuracy_claimed": (None, "attack unspecified in the paper: compare the PGD-20/AA columns", None),
    "gpu_hours": (None, "hardware-specific: our training seconds are in train.json", None),
    "epochs": (None, "a setting, not a result (params.yaml schedule.epochs)", None),
    "extra_generated_images": (None, "a setting, not a result", None),
    "collapse_epoch": (None, "not measured (training dynamics: figures)", None),
    "best_adv_sampling_steps": (None, "not measured (ablation sweep not in the pipeline)", None),
    "E_x_high_energy_threshold": (None, "a setting of WEAT's analysis, not a result", None),
    "E_x_low_energy_threshold": (None, "a setting of WEAT's analysis, not a result", None),
}
# Stand-in columns (ours only) shown beside Inception IS/FID: features of the reference classifier.
STAND_INS = {"IS": ("IS_refclf", "generators.{generator}.refclf.is_refclf"),
             "FID": ("FID_refclf", "generators.{generator}.refclf.fid_refclf")}
# Which generated set a method's IS/FID comes from (the paper's own procedure, papers.md §3.5).
GENERATORS = {
    "jem": "jem_buffer", "jempp": "jem_buffer", "sadajem": "jem_buffer", "ebjdat_jem": "jem_buffer",
    "ebjdat_jempp": "jem_buffer", "ebjdat_sadajem": "jem_buffer",
    "jeat": "jeat_eq17", "prejeat": "jeat_eq17", "weat_nat": "weat_momentum", "weat_adv": "weat_momentum",
    "pgd_at": "santurkar_l2",
}
DEFAULT_GENERATOR = "jeat_eq16"  # JEAT Fig.4: the "original" generation of a classifier
PAPER_DATASET_STANDIN = {"sklearn_digits": "smoke stand-in"}
# Architectures the papers' rows name exactly; a row that states one is only diffed against the same.
KNOWN_ARCHITECTURES = {"WRN-28-10", "WRN-34-10", "ResNet-18", "PreAct ResNet-18"}


def load_paper_records() -> list[dict]:
    text = resources.files("robust_ebm").joinpath("resources/paper_tables.yaml").read_text()
    return yaml.safe_load(text)["records"]


@dataclass
class Cell:
    """One 'ours' cell: mean/std over seeds, or the reason there is no number."""

    values: list[float] = field(default_factory=list)
    reason: str | None = None

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        n = len(self.values)
        if n < 2:
            return 0.0 if n else None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (n - 1))


def _lookup(obj: Any, path: str) -> Any:
    """Dotted path into nested dicts; a last key 'x_inception' takes the largest 'x_inception_n<N>'."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(obj, dict):
            return None
        if i == len(parts) - 1 and part.endswith("_inception") and part not in obj:
            sizes = [int(k.rsplit("_n", 1)[1]) for k in obj if k.startswith(part + "_n")
                     and k.rsplit("_n", 1)[1].isdigit()]
            part = f"{part}_n{max(sizes)}" if sizes else part
        obj = obj.get(part)
    return obj


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


class Results:
    """Reads results/<P>/{eval,metrics}/<D>/<M>/s<S>.json once each."""

    def __init__(self, results_dir: Path):
        self.root = Path(results_dir)
        self._cache: dict[Path, Any] = {}

    def get(self, kind: str, dataset: str, method: str, seed: int) -> dict | None:
        path = self.root / kind / dataset / method / f"s{seed}.json"
        if path not in self._cache:
            self._cache[path] = json.loads(path.read_text()) if path.is_file() else None
        return self._cache[path]


def our_cell(results: Results, profile, dataset: str, method: str, metric_path: tuple, generator: str) -> Cell:
    """Mean over the profile's seeds of one JSON field, or why it is missing."""
    kind, path, scale = metric_path
    path = path.format(generator=generator)
    cell = Cell()
    for seed in profile.seeds:
        data = results.get(kind, dataset, method, seed)
        if data is None:
            return Cell(reason=f"missing {kind}/{dataset}/{method}/s{seed}.json (stage not run or failed)")
        if kind == "metrics" and "inception" in path and data.get("inception", {}).get("status") != "ok":
            stand_in = next((n for m, (n, _) in STAND_INS.items() if f"{m.lower()}_inception" in path), "")
            return Cell(reason=f"Inception weights unavailable: refclf stand-in in column {stand_in}")
        value = _lookup(data, path)
        if _number(value) is None:
            column = _lookup(data, path.rsplit(".", 1)[0]) if "." in path else None
            status = column.get("status") if isinstance(column, dict) else None
            return Cell(reason=status if status and status != "ok" else f"no value at '{path}' in {kind} output")
        cell.values.append(_number(value) * scale)
    return cell


def _fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _ours_text(cell: Cell) -> str:
    if cell.reason:
        return cell.reason
    if len(cell.values) > 1:
        return f"{_fmt(cell.mean)} ± {_fmt(cell.std)}"
    return _fmt(cell.mean)


# The papers' data sets and our keys for the same data: a diff is only computed on the same data.
PAPER_DATASETS = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "SVHN": "svhn",
                  "Tiny-ImageNet": "tinyimagenet", "ImageNet-subset-64x64": "imagenet64"}


def _diff_blocked(dataset: str, ours_dataset: str, paper_arch: str, ours_arch: str) -> str | None:
    """Why ours - paper would compare unlike things (another data set, or another stated architecture), else None."""
    if ours_dataset != PAPER_DATASETS.get(dataset):
        return f"n/a: ours on {ours_dataset}, paper on {dataset}"
    stated = paper_arch.removesuffix(" (assumed)")
    if stated in KNOWN_ARCHITECTURES and stated != ours_arch:
        return f"n/a: ours {ours_arch}, paper {stated}"
    return None


@dataclass
class Table:
    paper: str
    table_id: str
    caption: str
    metrics: list[str]               # column groups, in order of first appearance (+ stand-ins)
    rows: list[dict]                 # {'label': {...}, 'paper': {metric: value|None}, 'ours': {metric: Cell}}

    @property
    def name(self) -> str:
        return f"{self.paper}_{self.table_id}"


def build_table(paper: str, table_id: str, records: list[dict], profile, results: Results,
                dataset_notes: dict[str, str]) -> Table:
    """One paper table: rows as the paper's, each metric resolved against our results."""
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    stand_ins = [STAND_INS[m][0] for m in metrics if m in STAND_INS]
    runs = set(profile.runs)
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["dataset"], r["method"], str(r.get("architecture")))
        row = rows.setdefault(key, {"paper": {}, "ours": {}, "notes": set(), "units": {}})
        if r["metric"] in row["paper"]:
            row["notes"].add(f"duplicate record for {r['metric']}: first kept")
            continue
        row["paper"][r["metric"]] = r.get("value")
        row["units"][r["metric"]] = r.get("unit") or ""
        if r.get("value") is None:
            row["notes"].add("published value unknown" + (f" ({r['note']})" if r.get("note") else ""))
    out_rows = []
    for (dataset, method, arch), row in rows.items():
        ours_method, method_note = METHODS.get(method, (None, f"method '{method}' not in tables.METHODS"))
        ours_dataset = profile.table_datasets.get(dataset)
        generator = GENERATORS.get(ours_method or "", DEFAULT_GENERATOR)
        if ours_method is None:
            why = method_note or EXTERNAL
        elif ours_dataset is None:
            why = f"data set {dataset} not in profile {profile.name}"
        elif (ours_dataset, ours_method) not in runs:
            why = f"not run in profile {profile.name}"
        else:
            why = None
        ours = {}
        for metric in metrics:
            mapped = METRICS.get(metric, (None, f"metric '{metric}' not mapped", None))
            if metric not in row["paper"]:
                ours[metric] = Cell(reason="not in the paper's row")
            elif why:
                ours[metric] = Cell(reason=why)
            elif mapped[0] is None:
                ours[metric] = Cell(reason=mapped[1])
            else:
                ours[metric] = our_cell(results, profile, ours_dataset, ours_method, mapped, generator)
        for metric in metrics:
            if metric in STAND_INS:
                name, path = STAND_INS[metric]
                ours[name] = (Cell(reason=why) if why else
                              our_cell(results, profile, ours_dataset, ours_method, ("metrics", path, 1.0), generator))
        notes = sorted(row["notes"]) + ([method_note] if method_note and ours_method else [])
        if ours_method and any(m in STAND_INS or "generated" in m for m in metrics):
            notes.append(f"samples: {generator}")
        ours_arch = None if why else architecture_name(profile.models[profile.method(ours_dataset, ours_method).model])
        out_rows.append({
            "label": {"dataset": dataset, "method": method, "architecture": arch,
                      "ours": f"{ours_dataset}/{ours_method} ({ours_arch})" if not why else "-"},
            "paper": row["paper"], "units": row["units"], "ours": ours, "notes": "; ".join(notes),
            "diff_blocked": None if why else _diff_blocked(dataset, ours_dataset, arch, ours_arch),
        })
    caption = _caption(paper, table_id, records[0].get("caption_summary", ""), profile, rows, dataset_notes)
    return Table(paper, table_id, caption, metrics + stand_ins, out_rows)


def protocol_text(profile) -> str:
    """The evaluation protocol of the profile, from its resolved config (pixel units)."""
    ev, mx = profile.evaluation, profile.metrics
    pgd, aa = ev.pgd, ev.autoattack
    n = "all" if ev.n_examples is None else f"first {ev.n_examples}"
    aa_n = "the same" if aa.n_examples is None else f"first {aa.n_examples}"
    return (f"Attacks on {n} test images: PGD-{pgd.steps} {pgd.norm} on {pgd.objective}, eps {pgd.eps * 255:.3g}/255, "
            f"step {pgd.step * 255:.3g}/255 (pixel units); AutoAttack {aa.version} {aa.norm} eps {aa.eps * 255:.3g}/255 "
            f"on {aa_n} images. IS/FID: Inception (torch-fidelity TF port), up to {mx.inception.n_uniform} samples "
            f"vs the {mx.inception.reference} split; *_refclf columns use the profile's '{mx.refclf.method}' "
            "classifier as feature network (a stand-in, not comparable to Inception values).")


def _caption(paper, table_id, summary, profile, rows, dataset_notes) -> str:
    used = sorted({d for d, _, _ in rows})
    ds = []
    for d in used:
        key = profile.table_datasets.get(d)
        ds.append(f"{d} -> {dataset_notes.get(key, key)}" if key else f"{d} -> not in this profile")
    seeds = ", ".join(map(str, profile.seeds))
    return (f"{paper} {table_id}: {summary}. Ours: profile {profile.name}; data sets: {'; '.join(ds)}; "
            f"seeds [{seeds}] (n={len(profile.seeds)}, mean ± std). {protocol_text(profile)} "
            "diff = ours - paper, only where both are on the same data set.")


def dataset_note(profile, key: str, results_dir: Path) -> str:
    """'digits (smoke stand-in for CIFAR-10)', 'cifar10 (JPEG q75 ImageFolder copy ...)'."""
    cfg = profile.datasets.get(key)
    paper_names = [p for p, k in profile.table_datasets.items() if k == key]
    bits = []
    if cfg is not None and cfg.source == "sklearn_digits":
        bits.append(f"{profile.name} stand-in for {', '.join(paper_names) or 'the papers data sets'}")
    info = Path(results_dir) / "data" / key / "data.json"
    if info.is_file():
        note = json.loads(info.read_text()).get("note")
        if note:
            bits.append(str(note))
    return f"{key} ({'; '.join(bits)})" if bits else key


# --------------------------------------------------------------------------- rendering


def _columns(table: Table) -> list[str]:
    cols = ["data set", "method", "architecture", "ours (data set/method)"]
    for m in table.metrics:
        cols += [f"{m} paper", f"{m} ours", f"{m} diff"] if m in METRICS else [f"{m} ours"]
    return cols + ["notes"]


def _cells(table: Table, row: dict) -> list[str]:
    lab = row["label"]
    out = [lab["dataset"], lab["method"], lab["architecture"], lab["ours"]]
    for m in table.metrics:
        cell = row["ours"][m]
        if m in METRICS:
            paper = row["paper"].get(m)
            paper_text = _fmt(_number(paper)) if _number(paper) is not None else (
                "published value unknown" if m in row["paper"] else "not in the paper's row")
            if _number(paper) is None or cell.mean is None:
                diff = "n/a: " + ("no published value" if _number(paper) is None else "no value of ours")
            else:
                diff = row["diff_blocked"] or _fmt(cell.mean - paper)
            out += [paper_text, _ours_text(cell), diff]
        else:
            out.append(_ours_text(cell))
    return out + [row["notes"] or "-"]


def to_markdown(table: Table) -> str:
    cols = _columns(table)
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = [f"### {table.name}", "", table.caption, "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(c) for c in _cells(table, r)) + " |" for r in table.rows]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Machine-readable: numbers in their own columns (paper, ours mean/std/n, diff), reasons apart."""
    header = ["paper", "table_id", "dataset", "method", "architecture", "ours"]
    for m in table.metrics:
        header += [f"{m}_paper", f"{m}_ours_mean", f"{m}_ours_std", f"{m}_n_seeds", f"{m}_diff", f"{m}_reason"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for r in table.rows:
        line = [table.paper, table.table_id, *r["label"].values()]
        for m in table.metrics:
            cell, paper = r["ours"][m], _number(r["paper"].get(m))
            comparable = cell.mean is not None and paper is not None and not r["diff_blocked"]
            diff = cell.mean - paper if comparable else None
            reason = cell.reason or ("" if paper is not None or m not in METRICS else "published value unknown")
            line += [_fmt(paper, 4), _fmt(cell.mean, 4), _fmt(cell.std, 4), len(cell.values),
                     _fmt(diff, 4), reason]
        writer.writerow(line)
    return buf.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "→": r"$\to$", ">": r"\textgreater{}", "<": r"\textless{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))


def to_latex(table: Table) -> str:
    cols = _columns(table)
    lines = [r"\begin{table}[t]", r"\centering", r"\scriptsize",
             rf"\caption{{{latex_escape(table.caption)}}}", rf"\label{{tab:{latex_escape(table.name)}}}",
             r"\begin{tabular}{" + "l" * len(cols) + "}", r"\hline",
             " & ".join(latex_escape(c) for c in cols) + r" \\", r"\hline"]
    lines += [" & ".join(latex_escape(c) for c in _cells(table, r)) + r" \\" for r in table.rows]
    lines += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the stage


def tables_stage(profile_cfg, results_dir, out_dir) -> list[Path]:
    """Write <out>/<paper>_<table>.{md,csv,tex} for every paper table, and <out>/README.md."""
    from .runtime import atomic_write_text

    results_dir, out_dir = Path(results_dir), Path(out_dir)
    records = load_paper_records()
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["paper"], r["table_id"]), []).append(r)
    results = Results(results_dir)
    notes = {k: dataset_note(profile_cfg, k, results_dir) for k in set(profile_cfg.table_datasets.values())}
    written, index = [], []
    for (paper, table_id), recs in groups.items():
        table = build_table(paper, table_id, recs, profile_cfg, results, notes)
        for suffix, render in ((".md", to_markdown), (".csv", to_csv), (".tex", to_latex)):
            written.append(atomic_write_text(out_dir / f"{table.name}{suffix}", render(table)))
        n_ours = sum(1 for r in table.rows for c in r["ours"].values() if c.reason is None)
        index.append(f"| {paper} | {table_id} | [md]({table.name}.md) [csv]({table.name}.csv) "
                     f"[tex]({table.name}.tex) | {len(table.rows)} | {n_ours} |")
    figures_dir = results_dir / "figures"
    figures = sorted(figures_dir.glob("*.png")) if figures_dir.is_dir() else []
    readme = [f"# Tables and figures of profile `{profile_cfg.name}`", "",
              f"Seeds: {profile_cfg.seeds}. {protocol_text(profile_cfg)}", "",
              "| paper | table | files | rows | cells of ours with a number |", "|---|---|---|---|---|", *index,
              "", "## Figures", ""]
    readme += [f"- [{p.stem}](../figures/{p.name})" for p in figures] or ["(no figures found)"]
    claims = results_dir / "claims.json"
    readme += ["", "## Claims", ""]
    if claims.is_file():
        counts = json.loads(claims.read_text()).get("summary", {})
        readme.append("The papers' claims checked on these results: [claims.md](../claims.md) "
                      "([csv](../claims.csv), [json](../claims.json)); "
                      + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".")
    else:
        readme.append("(no claims.json: run the claims stage, `robust-ebm claims`)")
    written.append(atomic_write_text(out_dir / "README.md", "\n".join(readme) + "\n"))
    return written
