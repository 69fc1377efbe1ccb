"""Every figure of the three papers, drawn from stage outputs (matplotlib, PNG + PDF).

Plotting functions take arrays and return a matplotlib `Figure` (object API, Agg canvas, no pyplot
state); `figures_stage` finds the stage outputs of a profile and draws whatever is present:

    landscape_{joint,marginal}_<D>_img<i>   E(x0 + a d1 + b d2, y0) and E(...) around a test image (JEAT Fig.2)
    energy_hist_attacks_<D>_<M>_s<S>        E(x), E(x,y): clean vs each attack of figures.histograms.attacks
                                            present in the eval npz, one column each  (WEAT Fig.2)
    energy_hist_clean_adv_gen_<D>_s<S>      E(x,y): clean vs PGD vs generated, per model (EB-JDAT Fig.2)
    dynamics_<D>_<M>_s<S>                   per-epoch curves of dynamics.json           (JEAT Fig.3, WEAT ΔE)
    samples_<D>_<M>_s<S>_<gen>              one row per class                           (JEAT Fig.4-6)
    nearest_ssim_<D>_<M>_s<S>_<gen>         samples and their k nearest training images by SSIM (JEAT Fig.7)
    clean_vs_autoattack_<D>                 clean vs AutoAttack accuracy of every method (EB-JDAT Fig.1)

`figures.json` in the output folder lists every file and the inputs it was drawn from.
"""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from . import energies_file, plan, samples_file
from .data import load_prepared
from .dynamics import columns as dynamics_columns
from .histogram_attacks import LABELS as HISTOGRAM_ATTACK_LABELS
from .landscape import energy_landscape, plane_directions
from .models import load_classifier
from .papers import PublishedPoint, published_accuracy_points
from .runtime import atomic_write_bytes, atomic_write_json, pick_device
from .style import EXTERNAL_COLOUR, EXTERNAL_MARKERS, METHOD_STYLES, dynamics_label, method_style, set_draw

def save_figure(fig: Figure, out_dir: Path, name: str, formats=("png", "pdf")) -> list[Path]:
    """Write `name`.<format> for each format atomically; return their paths."""
    paths = []
    for fmt in formats:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=150, bbox_inches="tight")
        paths.append(atomic_write_bytes(Path(out_dir) / f"{name}.{fmt}", buffer.getvalue()))
    return paths


# ----------------------------------------------------------------------------- energy landscape (JEAT Fig.2)

def _panel_grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    """(rows, columns) for n panels, at most `max_cols` per row."""
    cols = min(max_cols, n)
    return -(-n // cols), cols


def plot_landscapes(panels: dict[str, dict], kind: str, title: str) -> Figure:
    """One contour panel per model; `panels` maps model name -> energy_landscape output. kind: E_xy | E_x."""
    label = {"E_xy": "E(x, y)", "E_x": "E(x)"}[kind]
    n_rows, n_cols = _panel_grid(len(panels))
    fig = Figure(figsize=(4.0 * n_cols, 3.6 * n_rows), layout="constrained")
    for i, (name, land) in enumerate(panels.items()):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        c = land["coords"]
        cs = ax.contourf(c, c, land[kind].T, levels=30, cmap="viridis")  # darker = lower energy
        fig.colorbar(cs, ax=ax, label=label)
        ax.plot([0], [0], marker="*", color="tab:blue", markersize=14, markeredgecolor="white", label="x0 (test image)")
        ax.set(title=name, xlabel="a (direction d1, L2)", ylabel="b (direction d2, L2)")
        ax.legend(loc="upper right", fontsize=7)
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- energy histograms

def _hist_range(arrays, configured: tuple[float, float]) -> tuple[tuple[float, float], bool]:
    """The configured range, unless it holds less than half the values or the values fill less than a
    tenth of it (a smoke- or mini-sized model): then the data's full range, padded by 5%."""
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return tuple(configured), False
    inside = np.mean((values >= configured[0]) & (values <= configured[1]))
    lo, hi = float(values.min()), float(values.max())
    if inside >= 0.5 and hi - lo >= 0.1 * (configured[1] - configured[0]):
        return tuple(configured), False
    pad = 0.05 * max(hi - lo, 1e-6)
    return (lo - pad, hi + pad), True


def _bins_for(sets: dict, bins: int) -> int:
    """The configured bin count, capped at n/5 of the smallest set (at least 10) so small sets are not spikes."""
    n = min((len(v) for v in sets.values()), default=0)
    return max(10, min(bins, n // 5))


def plot_energy_histograms(panels: dict[str, tuple[str, dict[str, np.ndarray]]], *, bins: int,
                           range_: tuple[float, float], title: str, max_cols: int = 4,
                           panel_size: tuple[float, float] = (3.8, 3.0)) -> Figure:
    """Overlaid histograms, one panel per entry of `panels` = {panel title: (x label, {set name: energies})}
    in row-major order; an entry None leaves its slot empty. Set names are those of `style.set_colour`.

    `range_` is used unless it does not fit the values (`_hist_range`; the panel then says "range from data");
    `bins` is capped at n/5 of the panel's smallest set (`_bins_for`; the y label gives the count used).
    """
    n_rows, n_cols = _panel_grid(len(panels), max_cols)
    fig = Figure(figsize=(panel_size[0] * n_cols, panel_size[1] * n_rows), layout="constrained")
    for i, (panel, entry) in enumerate(panels.items()):
        if entry is None:  # an empty slot that keeps the next row aligned
            continue
        xlabel, sets = entry
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        rng, auto = _hist_range(sets.values(), range_)
        panel_bins = _bins_for(sets, bins)
        for name, values in sets.items():  # a set's colour is fixed by its name (style.set_draw), in every panel
            values = np.asarray(values, dtype=float)
            outside = int(np.sum((values < rng[0]) | (values > rng[1])))
            ax.hist(values, bins=panel_bins, range=rng, **set_draw(name),
                    label=f"{name} (n {len(values)}, mean {np.nanmean(values):.2f}"
                          + (f", {outside} outside the axis)" if outside else ")"))
        ax.set_title(panel + (" [range from data]" if auto else ""), fontsize=8 if n_cols > 4 else 10)
        ax.set(xlabel=xlabel, ylabel=f"count ({panel_bins} bins)")
        below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.3)} if len(sets) > 2 else {}
        ax.legend(fontsize=7, **below)  # more than clean-vs-adversarial: below the axes, not over the bars
    fig.suptitle(title)
    return fig


_PGD_NAMES = {"pgd": "PGD-{steps}", "energy_attack": "E(x,y) attack, PGD-{steps}", "eot": "EOT PGD-{steps}",
              "ebjdat_scale": "PGD-{steps} at ε {eps}/255 (EB-JDAT scale)", "pgd_kl": "TRADES-KL PGD-{steps}",
              "cw_linf": "CW-Linf PGD-{steps}"}
_ITERATIVE = {"apgd_ce", "apgd_t", "apgd_dlr", "fab", "fab_t", "cw_l2"}


def attack_label(name: str, entry: dict | None) -> str:
    """The name of an evaluate column or histogram attack with the settings that ran, read from its entry in
    the eval JSON ("columns" or "histogram_attacks"): 'PGD-2' in smoke, 'PGD-20' in the paper profile.
    Without an entry (an eval JSON from before the entries existed) the name carries no step count."""
    steps = (entry or {}).get("steps")
    if name == "autoattack":
        return "AutoAttack"
    if name in _PGD_NAMES:
        if not steps:
            return _PGD_NAMES[name].replace("-{steps}", "").format(eps="?")
        return _PGD_NAMES[name].format(steps=steps, eps=f"{entry.get('eps_pixel', float('nan')) * 255:.3g}")
    label = HISTOGRAM_ATTACK_LABELS.get(name, name)  # keeps "(untargeted)", "(not in WEAT Fig.2)", ...
    if steps and name in _ITERATIVE:
        return f"{label}, {steps} iter."
    if steps and name == "square":
        return f"{label}, {steps} queries"
    return label


def eval_entries(eval_json: dict) -> dict[str, dict]:
    """{column or histogram attack: its entry} of an eval JSON."""
    return {**(eval_json.get("histogram_attacks") or {}), **(eval_json.get("columns") or {})}


def attack_histogram_panels(sets: dict[str, dict[str, np.ndarray]], attacks: list[str],
                            per_row: int = 6, labels: dict[str, str] | None = None) -> tuple[dict, int]:
    """Panels of WEAT Fig.2 and the number of columns: for each block of up to `per_row` attacks,
    a row E(x) over a row E(x,y), one column per attack, clean vs adversarial (None = empty slot).

    Every attack ran on the first n evaluated images (n = its own length), so the clean
    histogram of its panel is drawn from those same n images. `labels`: attack -> panel name
    (`attack_label` of its eval JSON entry; default: the name without settings).
    """
    labels = {a: (labels or {}).get(a) or attack_label(a, None) for a in attacks}
    blocks = -(-len(attacks) // per_row)
    cols = -(-len(attacks) // blocks)  # balanced: 8 attacks -> 2 blocks of 4, 11 -> 6 and 5
    panels: dict = {}
    for start in range(0, len(attacks), cols):
        block = attacks[start:start + cols]
        for kind, label in (("E_x", "E(x)"), ("E_xy", "E(x, y)")):
            for a in block:
                adv = sets[a][kind]
                panels[f"{label}, {labels[a]}"] = (label, {"clean": sets["clean"][kind][: len(adv)],
                                                           "adversarial": adv})
            panels.update({f"empty {kind} {start} {i}": None for i in range(cols - len(block))})
    return panels, cols


def plot_attack_histograms(sets: dict[str, dict[str, np.ndarray]], attacks: list[str], *, bins: int,
                           range_: tuple[float, float], title: str, labels: dict[str, str] | None = None) -> Figure:
    """WEAT Fig.2: per block of up to 6 attacks, rows E(x) and E(x,y); clean blue, adversarial vermillion."""
    missing = [a for a in ["clean", *attacks] if a not in sets]
    if missing:
        raise ValueError(f"no energies for {missing}; the evaluate stage's npz holds {sorted(sets)}")
    panels, cols = attack_histogram_panels(sets, attacks, labels=labels)
    return plot_energy_histograms(panels, bins=bins, range_=range_, title=title, max_cols=cols,
                                  panel_size=(3.2, 2.6) if cols > 4 else (3.8, 3.0))


# ----------------------------------------------------------------------------- dynamics

_SPREAD = ("/var", "_var", "/std", "_std")


def plot_dynamics(dynamics: dict[str, list], title: str, *, colour: str = "#000000",
                  divergence_attack: str = "PGD") -> Figure:
    """One panel per curve of a dynamics.json, titled and labelled by `style.dynamics_label`;
    '<k>/var' or '<k>/std' companions shade ±1 std. `colour`: the method's colour."""
    epochs = np.asarray(dynamics.get("epoch") or range(1, 1 + max(len(v) for v in dynamics.values())), dtype=float)

    def series(key):
        return np.array([np.nan if v is None else v for v in dynamics[key]], dtype=float)

    curves = [k for k, v in dynamics.items() if k != "epoch" and not k.endswith(_SPREAD)
              and isinstance(v, list) and len(v) == len(epochs) and np.isfinite(series(k)).any()]
    if not curves:
        raise ValueError(f"no plottable curves in dynamics (keys {sorted(dynamics)})")
    n_cols = min(3, len(curves))
    n_rows = -(-len(curves) // n_cols)
    fig = Figure(figsize=(4.2 * n_cols, 2.9 * n_rows), layout="constrained")
    for i, key in enumerate(curves):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        y = series(key)
        ok = np.isfinite(y)
        panel_title, ylabel = dynamics_label(key, divergence_attack)
        ax.plot(epochs[ok], y[ok], marker="o", markersize=3, color=colour, label="mean over the epoch")
        base = key[: -len("/mean")] if key.endswith("/mean") else key[: -len("_mean")] if key.endswith("_mean") else key
        for suffix in _SPREAD:
            if base + suffix in dynamics:
                s = series(base + suffix)
                std = np.sqrt(s) if "var" in suffix else s
                ax.fill_between(epochs[ok], (y - std)[ok], (y + std)[ok], alpha=0.25, color=colour, label="±1 std")
                break
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_title(panel_title, fontsize=9)
        ax.set(xlabel="epoch", ylabel=ylabel)
        if len(epochs) <= 10:
            ax.set_xticks(epochs)
        if ax.collections:  # a ±1 std band: say what the line and the band are
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- samples and nearest neighbours

def _imshow_grid(ax, images_uint8: torch.Tensor, nrow: int) -> None:
    grid = make_grid(images_uint8.float() / 255, nrow=nrow, padding=1, pad_value=1.0)
    ax.imshow(grid.permute(1, 2, 0).numpy().clip(0, 1), interpolation="nearest")
    ax.set_xticks([])


def plot_sample_grid(images: torch.Tensor, labels: torch.Tensor, n_per_class: int, class_names: list[str],
                     title: str) -> Figure:
    """Rows = classes (first `n_per_class` samples of each), as in JEAT Fig.4-6."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    rows, names = [], []
    for k, name in enumerate(class_names):
        chosen = images[labels == k][:n_per_class]
        if len(chosen):
            pad = torch.full((n_per_class - len(chosen), *images.shape[1:]), 255, dtype=images.dtype)
            rows.append(torch.cat([chosen, pad]))
            names.append(name)
    if not rows:
        raise ValueError("no samples to draw")
    grid_images = torch.cat(rows)
    h = images.shape[-2] + 1
    fig = Figure(figsize=(0.55 * n_per_class + 1.2, 0.55 * len(rows) + 0.8))
    ax = fig.add_subplot()
    _imshow_grid(ax, grid_images, n_per_class)
    ax.set_yticks([1 + h * (i + 0.5) for i in range(len(names))], names, fontsize=7)
    ax.set_title(title, fontsize=9)
    return fig


def _ssim_kernel(size: int) -> int:
    """torchmetrics' default 11x11 Gaussian window, shrunk to the largest odd size that fits small images."""
    return min(11, size if size % 2 else size - 1)


@torch.no_grad()
def nearest_by_ssim(queries: torch.Tensor, pool: torch.Tensor, k: int, *, batch_size: int = 1024):
    """Indices (Q, k) and SSIM scores (Q, k) of the `k` pool images most similar to each query (uint8 in)."""
    q01, p01 = queries.float() / 255, pool.float() / 255
    kernel = _ssim_kernel(min(queries.shape[-2:]))
    scores = torch.empty(len(queries), len(pool))
    for i, q in enumerate(tqdm(q01, desc="SSIM nearest", leave=False)):
        for j in range(0, len(pool), batch_size):
            chunk = p01[j:j + batch_size]
            scores[i, j:j + len(chunk)] = structural_similarity_index_measure(
                q.expand_as(chunk), chunk, data_range=1.0, kernel_size=kernel, reduction="none")
    top = scores.topk(min(k, len(pool)), dim=1)
    return top.indices, top.values


def plot_nearest(queries: torch.Tensor, neighbours: torch.Tensor, scores: torch.Tensor, title: str) -> Figure:
    """Each row: a generated image, then its nearest training images (SSIM in the column titles)."""
    q, k = neighbours.shape[:2]
    fig = Figure(figsize=(1.0 * (k + 1) + 0.5, 1.1 * q + 0.6), layout="constrained")
    for r in range(q):
        row = [queries[r]] + list(neighbours[r])
        for c, img in enumerate(row):
            ax = fig.add_subplot(q, k + 1, r * (k + 1) + c + 1)
            ax.imshow((img.float() / 255).permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title("generated" if c == 0 else f"SSIM {scores[r, c - 1]:.2f}", fontsize=6)
    fig.suptitle(title, fontsize=9)
    return fig


# ----------------------------------------------------------------------------- accuracy scatter (EB-JDAT Fig.1)

def _short_source(source: str) -> str:
    """'EBJDAT Tab2_sota_at_cifar10' -> 'EBJDAT Tab2' (the table's number, as a reader looks it up)."""
    paper, _, table = source.partition(" ")
    return f"{paper} {table.split('_')[0]}"


def plot_accuracy_scatter(points: dict[str, list[tuple[float, float]]], title: str,
                          published: list[PublishedPoint] = (), published_note: str = "") -> Figure:
    """Clean vs AutoAttack accuracy (%), EB-JDAT Fig.1: per method of ours (fractions in `points`) its seeds
    as small dots and their mean as a filled marker; `published` points (%) hollow in the same style, a
    dashed line from ours to the paper's value of the same method; baselines we do not train hollow grey.
    Every marker is named in the legend beside the axes (no text over the points)."""
    fig = Figure(figsize=(9.0, 8.0), layout="constrained")
    ax = fig.add_subplot()
    ours_handles, paper_handles = [], []
    means = {}
    order = list(METHOD_STYLES)  # the legend lists methods by family, in every profile the same way
    by_family = sorted(points.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    for method, pairs in by_family:
        st = method_style(method)
        arr = 100 * np.asarray(pairs, dtype=float)
        mean = means[method] = arr.mean(0)
        ax.scatter(arr[:, 0], arr[:, 1], s=12, alpha=0.45, color=st.colour, marker=st.marker, linewidths=0)
        ours_handles.append(ax.scatter([mean[0]], [mean[1]], s=90, color=st.colour, marker=st.marker,
                                       edgecolors="white", linewidths=0.6, zorder=3,
                                       label=f"{st.label} (n={len(arr)})"))
    external = iter(EXTERNAL_MARKERS * 3)
    for p in published:
        if p.ours is not None:
            st = method_style(p.ours)
            colour, marker, name = st.colour, st.marker, st.label
        else:
            colour, marker, name = EXTERNAL_COLOUR, next(external), p.method
        paper_handles.append(ax.scatter([p.clean], [p.autoattack], s=70, facecolors="none", edgecolors=colour,
                                        marker=marker, linewidths=1.4, zorder=2,
                                        label=f"{name} [{', '.join(_short_source(t) for t in p.sources)}]"))
        if p.ours in means:
            ax.plot([means[p.ours][0], p.clean], [means[p.ours][1], p.autoattack], color=colour,
                    linestyle="--", linewidth=0.8, alpha=0.5, zorder=1)
    ax.set(xlabel="clean accuracy (%)", ylabel="AutoAttack accuracy (%)")
    ax.grid(alpha=0.3)
    fig.legend(handles=ours_handles, loc="outside right upper", fontsize=7, title_fontsize=8,
               title="ours: mean over seeds (filled),\nseeds (small)")
    if paper_handles:
        fig.legend(handles=paper_handles, loc="outside lower center", fontsize=7, title_fontsize=8, ncols=3,
                   title="published (hollow; dashed line: from ours to the paper's value of the same method)")
    fig.suptitle(title)
    if published_note:
        ax.set_title("\n".join(textwrap.wrap(published_note, 110)), fontsize=7)
    return fig


# ----------------------------------------------------------------------------- the stage

class _Record:
    """Collects written files, their inputs and what they show (data set, method, seed) for figures.json."""

    def __init__(self, out_dir: Path, formats):
        self.out_dir, self.formats, self.entries, self.files = out_dir, formats, [], []

    def add(self, fig: Figure, name: str, kind: str, inputs: list[Path], **about) -> None:
        paths = save_figure(fig, self.out_dir, name, self.formats)
        self.files += paths
        self.entries.append({"name": name, "kind": kind, **about, "files": [p.name for p in paths],
                             "inputs": [str(p) for p in inputs]})


ENERGIES_FIX = "rerun the stage that wrote it (evaluate or metrics)"


def _run_file(key: str, results_dir: Path, dataset: str, method: str, seed: int) -> Path:
    """A run's stage output (plan.PATTERNS `key`) in the profile's results folder."""
    return plan.profile_path(key, results_dir, dataset=dataset, method=method, seed=seed)


def figures_stage(profile_cfg, results_dir, out_dir) -> list[Path]:
    """Draw every figure whose inputs exist under `results_dir` (one profile); write figures.json."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"no results folder {results_dir}; run the pipeline's earlier stages first")
    fc = profile_cfg.figures
    record = _Record(out_dir, fc.formats)
    device = pick_device(profile_cfg.device)
    for dataset in profile_cfg.run_datasets:
        methods = profile_cfg.methods_for(dataset)
        runs = [(m, s) for m in methods for s in profile_cfg.seeds]
        splits = None
        data_dir = plan.profile_path("data", results_dir, dataset=dataset)
        if (data_dir / "splits.pt").is_file():
            splits, _ = load_prepared(data_dir)
        _landscapes(record, fc, results_dir, dataset, methods, profile_cfg.seeds[0], splits, device, data_dir)
        _histograms(record, fc, results_dir, dataset, runs, profile_cfg.seeds)
        for method, seed in runs:
            tag = f"{dataset}_{method}_s{seed}"
            dyn_path = _run_file("dynamics", results_dir, dataset, method, seed)
            if dyn_path.is_file():
                dynamics = dynamics_columns(json.loads(dyn_path.read_text()))
                if len(dynamics.get("epoch", [])) > 0:
                    divergence = f"PGD-{profile_cfg.training.val_pgd.steps}"  # WEAT ΔE's x* (training.val_pgd)
                    title = (f"Energy dynamics during training: {method_style(method).label} ({method}), "
                             f"{dataset}, seed {seed}")
                    record.add(plot_dynamics(dynamics, title, colour=method_style(method).colour,
                                             divergence_attack=divergence),
                               f"dynamics_{tag}", "dynamics", [dyn_path], dataset=dataset, method=method, seed=seed)
            _samples(record, fc, results_dir, dataset, method, seed, splits, data_dir)
        _scatter(record, results_dir, dataset, runs, profile_cfg.table_datasets)
    atomic_write_json(out_dir / "figures.json", {"profile": profile_cfg.name, "figures": record.entries})
    return record.files + [out_dir / "figures.json"]


def _landscapes(record, fc, results_dir, dataset, methods, seed, splits, device, data_dir) -> None:
    models = {m: _run_file("model", results_dir, dataset, m, seed) for m in methods}
    models = {m: p for m, p in models.items() if p.is_file()}
    if splits is None or not models:
        return
    lc = fc.landscape
    loaded = {m: load_classifier(p, map_location=device)[0].to(device) for m, p in models.items()}
    x_all = splits.test.images[: lc.n_images].float() / 255
    for i, (x0, y0) in enumerate(zip(x_all, splits.test.labels[: lc.n_images])):
        d1, d2 = plane_directions(x0.shape, i)  # same plane for every model (and for metrics' landscape statistics)
        panels = {m: energy_landscape(model, x0, int(y0), d1, d2, lc.radius, lc.grid) for m, model in loaded.items()}
        for kind, word in (("E_xy", "joint"), ("E_x", "marginal")):
            title = (f"{'E(x,y)' if kind == 'E_xy' else 'E(x)'} around test image {i} (class {splits.classes[int(y0)]}), "
                     f"{dataset}, seed {seed}; plane radius {lc.radius:.3g} (L2)")
            record.add(plot_landscapes(panels, kind, title), f"landscape_{word}_{dataset}_img{i}", "landscape",
                       list(models.values()) + [data_dir], dataset=dataset, seed=seed)


def _histograms(record, fc, results_dir, dataset, runs, seeds) -> None:
    hc = fc.histograms
    per_seed: dict[int, dict] = {}
    for method, seed in runs:
        eval_npz = _run_file("eval_energies", results_dir, dataset, method, seed)
        if not eval_npz.is_file():
            continue
        sets = energies_file.read_sets(eval_npz, fix=ENERGIES_FIX)
        attacks = [a for a in hc.attacks if a in sets]
        eval_json = _run_file("eval", results_dir, dataset, method, seed)
        entries = eval_entries(json.loads(eval_json.read_text())) if eval_json.is_file() else {}
        labels = {a: attack_label(a, entries.get(a)) for a in hc.attacks}
        if "clean" in sets and attacks:
            title = (f"Energies of clean vs adversarial test images: {method_style(method).label} ({method}), "
                     f"{dataset}, seed {seed}")
            record.add(plot_attack_histograms(sets, attacks, bins=hc.bins, range_=hc.range, labels=labels, title=title),
                       f"energy_hist_attacks_{dataset}_{method}_s{seed}", "energy_histograms",
                       [eval_npz] + ([eval_json] if entries else []), dataset=dataset, method=method, seed=seed)
        gen_npz = _run_file("metrics_energies", results_dir, dataset, method, seed)
        if "clean" in sets:
            col = {"clean": sets["clean"]["E_xy"]}
            if hc.attacks[0] in sets:
                col[f"adversarial ({labels[hc.attacks[0]]})"] = sets[hc.attacks[0]]["E_xy"]
            inputs = [eval_npz] + ([eval_json] if entries else [])
            if gen_npz.is_file():
                for name, gen in energies_file.read_sets(gen_npz, fix=ENERGIES_FIX).items():
                    col[f"generated ({name})"] = gen["E_xy"]
                inputs.append(gen_npz)
            if len(col) > 1:
                per_seed.setdefault(seed, {})[method] = (col, inputs)
    for seed, by_method in per_seed.items():
        panels = {f"{method_style(m).label} ({m})": ("E(x, y)", col) for m, (col, _) in by_method.items()}
        record.add(plot_energy_histograms(panels, bins=hc.bins, range_=hc.range,
                                          title=f"E(x, y) of clean, adversarial and generated images, {dataset}, seed {seed}"),
                   f"energy_hist_clean_adv_gen_{dataset}_s{seed}", "energy_histograms",
                   [p for _, inputs in by_method.values() for p in inputs], dataset=dataset, seed=seed)


def _samples(record, fc, results_dir, dataset, method, seed, splits, data_dir) -> None:
    samples_dir = _run_file("samples", results_dir, dataset, method, seed)
    if not samples_file.index_path(samples_dir).is_file():
        return  # not generated (yet): skipped, as every missing input is
    found = samples_file.produced(samples_dir, fix="rerun the generate stage").values()
    for npz in sorted((npz for _, npz in found), key=lambda p: p.name):
        f = samples_file.read(npz, fix="rerun the generate stage")
        images, labels = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"]).long()
        if len(images) == 0:
            continue
        classes = splits.classes if splits is not None else [str(k) for k in range(int(labels.max()) + 1)]
        tag = f"{dataset}_{method}_s{seed}_{npz.stem}"
        record.add(plot_sample_grid(images, labels, fc.samples.n_per_class, classes,
                                    f"Samples '{npz.stem}' of {method} ({dataset}, seed {seed}), one row per class"),
                   f"samples_{tag}", "samples", [npz], dataset=dataset, method=method, seed=seed)
        if splits is not None and (fc.nearest.generators == "all" or npz.stem in fc.nearest.generators):
            queries = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: fc.nearest.n_images]]
            idx, scores = nearest_by_ssim(queries, splits.train.images, fc.nearest.k)
            record.add(plot_nearest(queries, splits.train.images[idx], scores,
                                    f"'{npz.stem}' samples of {method} and their {fc.nearest.k} nearest training images (SSIM)"),
                       f"nearest_ssim_{tag}", "nearest_ssim", [npz, data_dir],
                       dataset=dataset, method=method, seed=seed)


def _scatter(record, results_dir, dataset, runs, table_datasets: dict[str, str]) -> None:
    points, inputs = {}, []
    for method, seed in runs:
        path = _run_file("eval", results_dir, dataset, method, seed)
        if not path.is_file():
            continue
        cols = json.loads(path.read_text()).get("columns", {})
        clean, aa = cols.get("clean", {}).get("accuracy"), cols.get("autoattack", {}).get("accuracy")
        if clean is not None and aa is not None:
            points.setdefault(method, []).append((clean, aa))
            inputs.append(path)
    if not points:
        return
    paper_sets = [p for p, ours in table_datasets.items() if ours == dataset]  # profile.table_datasets
    published = [pt for name in paper_sets for pt in published_accuracy_points(name)]
    note = (f"Published: {', '.join(paper_sets)} as reported (the papers' networks and budgets); ours: {dataset}. "
            "Where the data set or network differs, compare positions, not values." if paper_sets else
            f"No published points: no paper data set maps to {dataset} in the profile's table_datasets.")
    record.add(plot_accuracy_scatter(points, f"Clean vs AutoAttack accuracy, {dataset}", published, note),
               f"clean_vs_autoattack_{dataset}", "accuracy_scatter", inputs, dataset=dataset)
