"""The metrics stage: IS/FID (Inception, and the reference-classifier stand-in), Fisher scores, energy statistics.

Reads one run's model, its samples (`generate.json` + `<generator>.npz`), the prepared data set, the
reference classifier and the evaluate stage's energies; writes `out_path` (JSON) and, beside it,
`<out>.energies.npz` with E(x), E(x,y) of each generator's samples (for the figures).

`landscape` (when `metrics.landscape` is set): statistics of E(x,y) and E(x) on a plane around each of
the first n_images test images (robust_ebm.landscape; JEAT Fig.2 as numbers, read by the claims stage).

Every number carries the name of what was computed:
  is_inception_n{N}, is_std_inception_n{N}, fid_inception_n{N}   Inception, N = samples really used
  fid_refclf, is_refclf, class_consistency_refclf                  reference-classifier stand-in
When the Inception weights are unavailable, `inception` = {"status": "unavailable", "reason": ...}
and only the `_refclf` numbers exist: the absence is written down, nothing is substituted silently.
When the reference classifier is the scored model itself (the run of `metrics.refclf.method`), each
generator's `refclf` is {"status": "not computed: ..."}: its samples were optimised against that network.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..data import load_prepared
from ..landscape import landscape_statistics
from ..models import load_classifier
from ..runtime import atomic_write_bytes, atomic_write_json, pick_device, seed_everything
from .energy_stats import compute_energies, energy_report
from .fisher import fisher_scores
from .inception import (
    InceptionWeightsUnavailable,
    inception_metrics,
    load_inception,
    reference_stats,
    resolve_inception_weights,
)
from .refclf import refclf_metrics, refclf_reference_stats

EVAL_SET_SUFFIXES = ("_marginal", "_joint")


def _reference_images(splits, which: str) -> torch.Tensor:
    parts = {"train": [splits.train], "test": [splits.test], "train+test": [splits.train, splits.test]}[which]
    return torch.cat([torch.as_tensor(p.images) for p in parts])


def _load_samples(samples_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{generator: (uint8 images, int64 labels)} for every generator that produced samples."""
    index = samples_dir / "generate.json"
    if not index.is_file():
        raise FileNotFoundError(f"no {index}; run the generate stage first (robust-ebm generate ... --out {samples_dir})")
    samples = {}
    for name, record in json.loads(index.read_text())["generators"].items():
        npz = samples_dir / record.get("files", {}).get("npz", f"{name}.npz")
        if record.get("count", 0) == 0 or not npz.is_file():
            continue  # e.g. a buffer generator skipped for a method without a replay buffer
        with np.load(npz) as f:
            samples[name] = (torch.from_numpy(f["images"]), torch.from_numpy(f["labels"]).long())
    return samples


def _eval_energies(eval_path: Path | None) -> dict[str, dict[str, torch.Tensor]]:
    """{column: {"E_x", "E_xy"}} from the evaluate stage's `<eval>.energies.npz`."""
    if eval_path is None:
        return {}
    npz = eval_path.with_suffix(".energies.npz")
    if not npz.is_file():
        raise FileNotFoundError(f"no {npz} beside {eval_path}; rerun the evaluate stage, which writes both")
    sets = {}
    with np.load(npz) as f:
        for key in f.files:
            if key.endswith("_marginal") and f"{key[:-9]}_joint" in f.files:
                col = key[: -len("_marginal")]
                sets[col] = {"E_x": torch.from_numpy(f[key]), "E_xy": torch.from_numpy(f[f"{col}_joint"])}
    return sets


def _subset(n_total: int, n: int, seed: int) -> torch.Tensor:
    """A fixed random subset of n indices (generated files are stored class by class)."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


def _inception_for(images, reference, cfg, *, weights, net, seed, batch_size) -> dict:
    """Uniform (n_uniform) and small (n_small) protocols, named by the number of samples really used."""
    out, protocols = {}, {}
    for protocol, requested in (("uniform", cfg.n_uniform), ("small", cfg.n_small)):
        n = min(requested, len(images))
        note = "" if n == requested else f"only {len(images)} samples available, {requested} requested"
        protocols[protocol] = {"requested": requested, "n": n, "keys_suffix": f"inception_n{n}", "note": note}
        if f"fid_inception_n{n}" in out:
            continue
        res = inception_metrics(images[_subset(len(images), n, seed)], reference, weights=weights, net=net,
                                splits=min(cfg.splits, n), batch_size=batch_size)
        out.update({f"is_inception_n{n}": res["is"], f"is_std_inception_n{n}": res["is_std"],
                    f"fid_inception_n{n}": res["fid"]})
    return {**out, "n_ref": reference.n, "protocols": protocols}


SELF_REFERENCED = ("not computed: the reference classifier is this run's own model, and the samples were "
                   "optimised against it, so its features and class scores would rate its own samples")


def _same_file(a, b) -> bool:
    """Whether paths a and b name the same file (the reference classifier is the model being scored)."""
    a, b = Path(a), Path(b)
    return a.is_file() and b.is_file() and (a.resolve() == b.resolve() or a.samefile(b))


def metrics_stage(run, data_dir, model_path, samples_dir, refclf_path, eval_path, out_path, tracker=None) -> dict:
    """Score one run; see the module docstring for what is written."""
    cfg = run.metrics
    model_path, samples_dir, out_path = Path(model_path), Path(samples_dir), Path(out_path)
    eval_path = Path(eval_path) if eval_path else None
    if out_path.suffix != ".json":
        raise ValueError(f"--out must end in .json (got {out_path}); sample energies go beside it as <name>.energies.npz")
    if not model_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {model_path}; train first")
    if cfg.refclf.enabled and not (refclf_path and Path(refclf_path).is_file()):
        raise FileNotFoundError(
            f"reference classifier {refclf_path} not found; train method '{cfg.refclf.method}' on this data set "
            "first, or set metrics.refclf.enabled: false")
    if eval_path is not None and not eval_path.is_file():
        raise FileNotFoundError(f"no evaluation result at {eval_path}; run the evaluate stage first")
    samples = _load_samples(samples_dir)
    eval_sets = _eval_energies(eval_path)

    t0 = time.time()
    device = pick_device(run.device)
    seed_everything(run.seed)
    splits, _ = load_prepared(data_dir)
    reference = _reference_images(splits, cfg.inception.reference)
    model, _ = load_classifier(model_path, map_location=device)
    model.to(device).eval()
    result = {"run": run.run_name, "model_path": str(model_path), "samples_dir": str(samples_dir),
              "reference_set": cfg.inception.reference, "generators": {}}

    try:
        weights = resolve_inception_weights(run.paths.inception_weights)
        net = load_inception(weights, device)
        ref_stats = reference_stats(net, reference, weights=weights, batch_size=cfg.batch_size,
                                    cache_dir=Path(run.paths.results) / run.profile / "cache" / "inception")
        result["inception"] = {"status": "ok", "weights": str(weights), "splits": cfg.inception.splits,
                               "n_ref": ref_stats.n, "network": "torch-fidelity InceptionV3 (TF 2015-12-05 port)"}
    except InceptionWeightsUnavailable as err:
        net = None
        result["inception"] = {"status": "unavailable", "reason": str(err)}

    self_referenced = cfg.refclf.enabled and _same_file(refclf_path, model_path)
    refclf, refclf_ref = None, None
    if cfg.refclf.enabled and not self_referenced:
        refclf = load_classifier(refclf_path, map_location=device)[0].to(device).eval()
        if samples:  # the reference features are the same for every generator: once per stage
            refclf_ref = refclf_reference_stats(refclf, reference, batch_size=cfg.batch_size)
    sets = dict(eval_sets)
    sample_energies = {}
    for name, (images, labels) in samples.items():
        entry = {"n_samples": len(images)}
        if net is not None:
            entry.update(_inception_for(images, ref_stats, cfg.inception, weights=weights, net=net,
                                        seed=run.seed, batch_size=cfg.batch_size))
        if refclf is not None:
            idx = _subset(len(images), min(cfg.inception.n_uniform, len(images)), run.seed)
            entry["refclf"] = refclf_metrics(refclf, images[idx], labels[idx], ref_stats=refclf_ref,
                                             splits=cfg.inception.splits, batch_size=cfg.batch_size)
        elif self_referenced:
            entry["refclf"] = {"status": SELF_REFERENCED}
        idx = _subset(len(images), min(cfg.energy.n_examples, len(images)), run.seed)
        energies = compute_energies(model, images[idx], labels[idx], batch_size=cfg.batch_size)
        sets[f"generated/{name}"] = energies
        sample_energies.update({f"{name}_marginal": energies["E_x"].numpy(), f"{name}_joint": energies["E_xy"].numpy(),
                                f"{name}_labels": labels[idx].numpy()})
        result["generators"][name] = entry

    n_fisher = min(cfg.fisher.n_examples, len(splits.test.labels))
    result["fisher"] = fisher_scores(model, torch.as_tensor(splits.test.images[:n_fisher]),
                                     torch.as_tensor(splits.test.labels[:n_fisher]).long(),
                                     probes=cfg.fisher.probes, batch_size=cfg.batch_size,
                                     generator=torch.Generator().manual_seed(run.seed))
    if cfg.landscape is not None:
        n_land = min(cfg.landscape.n_images, len(splits.test.labels))
        result["landscape"] = landscape_statistics(
            model, torch.as_tensor(splits.test.images[:n_land]).float() / 255,
            torch.as_tensor(splits.test.labels[:n_land]).long(), radius=cfg.landscape.radius,
            grid=cfg.landscape.grid, batch_size=cfg.batch_size)
    if "clean" in sets:
        result["energy"] = energy_report(sets, reference="clean", paired=tuple(eval_sets))
    else:
        result["energy"] = {"status": "no clean energies: evaluate stage output not given"}

    energies_path = out_path.with_suffix(".energies.npz")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **sample_energies)
    atomic_write_bytes(energies_path, buffer.getvalue())
    result["energies_file"] = energies_path.name
    result["seconds"] = round(time.time() - t0, 3)
    atomic_write_json(out_path, result)
    if tracker is not None:
        tracker.log_metrics({"metrics": {k: result[k] for k in ("generators", "fisher", "energy", "landscape") if k in result}})
        tracker.log_artifact(out_path)
    return result
