"""Paper-vs-ours tables: every (paper, table) of resources/paper_tables.yaml as
Markdown, CSV and LaTeX, our number beside the published one.

Rows are the paper's rows (data set, method, architecture); per metric three
columns: paper, ours (mean ± std over seeds), ours − paper. Our numbers are
read from the stage outputs results/<P>/{eval,metrics}/<D>/<M>/s<S>.json
through the explicit maps of resources/paper_mapping.yaml (papers.py: paper name -> our key /
JSON field / a method's own generator): nothing is typed in. A cell that cannot be computed
holds the reason instead.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import plan, report
from .models import architecture_name
from .papers import (  # noqa: F401 (tables.METHODS: one owner, papers.py)
    KNOWN_ARCHITECTURES, METHODS, METRICS, PAPER_DATASETS, STAND_INS, load_paper_records, own_generator)

EXTERNAL = "external baseline, not reproduced"

# The JEM-family papers' own IS/FID (metrics.top_confident: the most confident part of the replay buffer),
# ours only, beside Inception IS/FID; the column names carry the ratio (e.g. IS_top10pct).
TOP_CONFIDENT = {"IS": "is", "FID": "fid"}


def _top_confident_columns(profile) -> dict[str, tuple[str, str]]:
    """{paper metric: (column name, dotted path)} of the papers' buffer protocol in this profile."""
    cfg = profile.metrics.top_confident
    label = cfg.label
    if not cfg.enabled:
        return {}
    first = {"IS": cfg.is_ratios[0], "FID": cfg.fid_ratios[0]}
    return {m: (f"{m}_{label(first[m])} (papers' buffer protocol)",
                f"generators.{{generator}}.top_confident.{key}_{label(first[m])}") for m, key in TOP_CONFIDENT.items()}


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
    """Reads results/<P>/{eval,metrics}/<D>/<M>/s<S>.json (and train.json) once each."""

    PATTERNS = {"train": "train_json"}  # kind -> plan.PATTERNS key where they differ

    def __init__(self, results_dir: Path):
        self.root = Path(results_dir)
        self._cache: dict[Path, Any] = {}

    def get(self, kind: str, dataset: str, method: str, seed: int) -> dict | None:
        path = plan.profile_path(self.PATTERNS.get(kind, kind), self.root, dataset=dataset, method=method, seed=seed)
        if path not in self._cache:
            self._cache[path] = json.loads(path.read_text()) if path.is_file() else None
        return self._cache[path]

    def fallbacks(self, profile) -> str:
        """The fallbacks the profile's train/eval/metrics outputs record (runtime.note_fallback), for captions."""
        counts: dict[str, int] = {}
        n = 0
        for dataset, method in profile.runs:
            for seed in profile.seeds:
                for kind in ("train", "eval", "metrics"):
                    data = self.get(kind, dataset, method, seed)
                    n += data is not None
                    for message in (data or {}).get("fallbacks", []):
                        counts[message] = counts.get(message, 0) + 1
        if not counts:
            return ""
        return " Fallbacks: " + "; ".join(f"{m} ({k} of {n} stage outputs)" for m, k in counts.items()) + "."


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
    top_columns = _top_confident_columns(profile)
    stand_ins += [top_columns[m][0] for m in metrics if m in top_columns]
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
        ours_method, method_note = METHODS.get(method, (None, f"method '{method}' not in paper_mapping.yaml methods"))
        ours_dataset = profile.table_datasets.get(dataset)
        generator = own_generator(ours_method) if ours_method else ""
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
        for metric in metrics:
            if metric in top_columns:
                name, path = top_columns[metric]
                spec = profile.generation.generators.get(generator)
                ours[name] = (Cell(reason=why) if why else
                              Cell(reason=f"n/a: {generator} is not a replay buffer (the papers' protocol ranks buffers)")
                              if spec is None or spec.kind != "buffer" else
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
    caption = (_caption(paper, table_id, records[0].get("caption_summary", ""), profile, rows, dataset_notes)
               + results.fallbacks(profile))
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
            "classifier as feature network (a stand-in, not comparable to Inception values)."
            + (f" Columns '(papers' buffer protocol)': the JEM-family papers' own IS/FID, on the replay buffer's "
               f"most confident images per predicted class (IS top {mx.top_confident.is_ratios[0]}, FID top "
               f"{mx.top_confident.fid_ratios[0]}; a ratio >= 1 is a count per class) vs the "
               f"{mx.top_confident.reference} split." if mx.top_confident.enabled else ""))


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
    info = plan.profile_path("data", results_dir, dataset=key) / "data.json"
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


# Column headers of the human-readable versions (md, tex, html); the CSV keeps the metric keys.
METRIC_LABELS = {
    "clean_accuracy": "Clean acc. (%)", "accuracy_no_attack": "No attack (%)",
    "accuracy_normal_attack_CE": "CE attack (%)", "accuracy_energy_attack_Exy": "E(x,y) attack (%)",
    "robust_accuracy_PGD20": "PGD acc. (%)", "robust_accuracy_PGD20_eps8": "PGD acc., ε 8/255 (%)",
    "robust_accuracy_AA": "AutoAttack acc. (%)", "IS": "IS", "FID": "FID", "JFS": "JFS", "MFS": "MFS",
    "IS_refclf": "IS, ref. classifier", "FID_refclf": "FID, ref. classifier",
    "mean_energy_gap_clean_vs_PGD20": "Energy gap clean→PGD",
    "mean_energy_gap_clean_vs_generated": "Energy gap clean→generated",
    "robust_accuracy_claimed": "Claimed robust acc. (%)", "gpu_hours": "GPU hours", "epochs": "Epochs",
    "extra_generated_images": "Extra generated images", "collapse_epoch": "Collapse epoch",
    "best_adv_sampling_steps": "Best adv. sampling steps",
    "E_x_high_energy_threshold": "E(x) high threshold", "E_x_low_energy_threshold": "E(x) low threshold",
}
LABEL_COLUMNS = ("data set", "method", "architecture", "ours (data set/method)")
_SUBCOLUMNS = ("paper", "ours", "diff")
_NUMBER = re.compile(r"-?\d+(\.\d+)?( ± \d+(\.\d+)?)?")
NO_VALUE = "–"  # a cell without a number; its footnote says why


@dataclass
class Rendered:
    """A table as the readers see it: short cells, every reason once as a numbered footnote.

    groups: (header, sub-headers) per column group, the label columns first and the notes last;
    rows:   per row, (text, footnote numbers) per column; notes: footnote n is notes[n - 1].
    """

    groups: list[tuple[str, list[str]]]
    rows: list[list[tuple[str, list[int]]]]
    notes: list[str]


def render(table: Table) -> Rendered:
    """Split `_cells` into short text and footnotes: a metric cell that is not a number shows NO_VALUE and a
    footnote with its reason; the notes column shows footnote marks only. Equal texts share one footnote."""
    cols = _columns(table)
    groups: list[tuple[str, list[str]]] = [(c, [""]) for c in cols[:len(LABEL_COLUMNS)]]
    for col in cols[len(LABEL_COLUMNS):-1]:
        metric, _, sub = col.rpartition(" ")
        metric, sub = (metric, sub) if sub in _SUBCOLUMNS else (col, "")
        header = METRIC_LABELS.get(metric, metric)
        if groups[-1][0] == header and len(groups) > len(LABEL_COLUMNS):
            groups[-1][1].append(sub)
        else:
            groups.append((header, [sub]))
    groups.append((cols[-1], [""]))
    notes: list[str] = []

    def note(text: str) -> int:
        if text not in notes:
            notes.append(text)
        return notes.index(text) + 1

    rows = []
    for r in table.rows:
        cells = _cells(table, r)
        if len(cells) != len(cols):
            raise ValueError(f"table {table.name}: {len(cells)} cells for {len(cols)} columns")
        out = [(c, []) for c in cells[:len(LABEL_COLUMNS)]]
        for c in cells[len(LABEL_COLUMNS):-1]:
            out.append((c, []) if _NUMBER.fullmatch(c) else (NO_VALUE, [note(c)]))
        out.append(("", [] if cells[-1] in ("", "-") else [note(cells[-1])]))
        rows.append(out)
    return Rendered(groups, rows, notes)


def to_markdown(table: Table) -> str:
    """GitHub Markdown: one header row, reasons as footnotes [^n] under the table."""
    rendered = render(table)
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    header = [g if not sub else f"{g} {sub}" for g, subs in rendered.groups for sub in subs]
    lines = [f"### {table.name}", "", table.caption, "", "| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "".join("---|" if i < len(LABEL_COLUMNS) or i == len(header) - 1 else "--:|"
                           for i in range(len(header)))]
    for row in rendered.rows:
        lines.append("| " + " | ".join(esc(text) + "".join(f"[^{n}]" for n in marks) for text, marks in row) + " |")
    lines += [""] + [f"[^{n}]: {esc(text)}" for n, text in enumerate(rendered.notes, 1)]
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
                  "±": r"$\pm$", "→": r"$\to$", ">": r"\textgreater{}", "<": r"\textless{}",
                  "–": "--", "−": r"$-$", "ε": r"$\varepsilon$", "σ": r"$\sigma$", "Δ": r"$\Delta$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))


def to_latex(table: Table) -> str:
    """booktabs + threeparttable: grouped headers (\\multicolumn, \\cmidrule), numbers right-aligned,
    reasons as \\tnote footnotes under the table."""
    rendered = render(table)
    spec = "".join("l" if not subs[0] and (i < len(LABEL_COLUMNS) or i == len(rendered.groups) - 1) else "r" * len(subs)
                   for i, (_, subs) in enumerate(rendered.groups))
    top, sub, rules, col = [], [], [], 1
    for header, subs in rendered.groups:
        if subs == [""]:
            top.append("")
            sub.append(latex_escape(header))
        else:
            top.append(rf"\multicolumn{{{len(subs)}}}{{c}}{{{latex_escape(header)}}}")
            sub += [latex_escape(x) for x in subs]
            rules.append(rf"\cmidrule(lr){{{col}-{col + len(subs) - 1}}}")
        col += len(subs)
    body = [" & ".join(latex_escape(text) + "".join(rf"\tnote{{{n}}}" for n in marks) for text, marks in row) + r" \\"
            for row in rendered.rows]
    lines = [r"% needs \usepackage{booktabs,threeparttable}", r"\begin{table}[t]", r"\centering", r"\scriptsize",
             r"\begin{threeparttable}", rf"\caption{{{latex_escape(table.caption)}}}",
             rf"\label{{tab:{table.name.replace('_', '-')}}}", r"\begin{tabular}{" + spec + "}", r"\toprule",
             " & ".join(top) + r" \\", " ".join(rules), " & ".join(sub) + r" \\", r"\midrule", *body,
             r"\bottomrule", r"\end{tabular}"]
    if rendered.notes:
        lines += [r"\begin{tablenotes}", r"\scriptsize",
                  *[rf"\item[{n}] {latex_escape(text)}" for n, text in enumerate(rendered.notes, 1)],
                  r"\end{tablenotes}"]
    lines += [r"\end{threeparttable}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    """A self-contained HTML page of the table (what the Snakemake report shows inline)."""
    from html import escape

    rendered = render(table)
    top, sub = [], []
    for header, subs in rendered.groups:
        if subs == [""]:
            top.append(f'<th rowspan="2">{escape(header)}</th>')
        else:
            top.append(f'<th colspan="{len(subs)}">{escape(header)}</th>')
            sub += [f"<th>{escape(x)}</th>" for x in subs]
    marks = lambda ns: "".join(f'<sup><a href="#n{n}">{n}</a></sup>' for n in ns)  # noqa: E731
    body = ["<tr>" + "".join(f'<td class="{"num" if i >= len(LABEL_COLUMNS) else "lab"}">{escape(text)}{marks(ns)}</td>'
                             for i, (text, ns) in enumerate(row)) + "</tr>" for row in rendered.rows]
    notes = [f'<li id="n{n}">{escape(text)}</li>' for n, text in enumerate(rendered.notes, 1)]
    style = ("body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse} "
             "th,td{padding:2px 6px;border-bottom:1px solid #ccc} td.num{text-align:right} "
             "thead{border-top:2px solid #000;border-bottom:1px solid #000} tbody{border-bottom:2px solid #000}")
    return "\n".join([
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{escape(table.name)}</title>",
        f"<style>{style}</style></head><body>", f"<h3>{escape(table.name)}</h3>", f"<p>{escape(table.caption)}</p>",
        "<table><thead>", "<tr>" + "".join(top) + "</tr>", "<tr>" + "".join(sub) + "</tr>", "</thead><tbody>",
        *body, "</tbody></table>", "<ol>", *notes, "</ol>", "</body></html>"]) + "\n"


# --------------------------------------------------------------------------- the stage


def _figure_index(figures_dir: Path, pngs: list[Path]) -> list[str]:
    """Links to the figures, one section per kind (as in the Snakemake report), from figures.json."""
    listing = figures_dir / "figures.json"
    if not listing.is_file():
        return [f"- [{p.stem}](../figures/{p.name})" for p in pngs]
    names = {p.stem for p in pngs}
    entries = [e for e in json.loads(listing.read_text())["figures"] if e["name"] in names]
    sections = {**report.FIGURE_KINDS,
                **{e["kind"]: f"other ({e['kind']})" for e in entries if e["kind"] not in report.FIGURE_CATEGORIES}}
    lines = []
    for kind, title in sections.items():
        links = [f"- [{e['name']}](../figures/{e['name']}.png)" for e in entries if e["kind"] == kind]
        lines += [f"### {title[0].upper() + title[1:]}", "", *links, ""] if links else []
    return lines


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
        for suffix, writer in ((".md", to_markdown), (".csv", to_csv), (".tex", to_latex), (".html", to_html)):
            written.append(atomic_write_text(out_dir / f"{table.name}{suffix}", writer(table)))
        n_ours = sum(1 for r in table.rows for c in r["ours"].values() if c.reason is None)
        index.append(f"| {paper} | {table_id} | [md]({table.name}.md) [csv]({table.name}.csv) "
                     f"[tex]({table.name}.tex) | {len(table.rows)} | {n_ours} |")
    figures_dir = plan.profile_path("figures", results_dir)
    figures = sorted(figures_dir.glob("*.png")) if figures_dir.is_dir() else []
    readme = [f"# Tables and figures of profile `{profile_cfg.name}`", "",
              f"Seeds: {profile_cfg.seeds}. {protocol_text(profile_cfg)}", "",
              "| paper | table | files | rows | cells of ours with a number |", "|---|---|---|---|---|", *index,
              "", "## Figures", ""]
    readme += _figure_index(figures_dir, figures) or ["(no figures found)"]
    claims = plan.profile_path("claims_json", results_dir)
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
