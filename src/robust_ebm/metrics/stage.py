"""The metrics stage: IS/FID (Inception, and the reference-classifier stand-in), Fisher scores, energy statistics.

Reads one run's model, its samples (the generate stage's folder, through samples_file), the prepared data
set, the reference classifier and the evaluate stage's energies; writes `out_path` (JSON) and, beside it,
`<out>.energies.npz` with E(x), E(x,y) of each generator's samples (for the figures).

`landscape` (when `metrics.landscape` is set): statistics of E(x,y) and E(x) on a plane around each of
the first n_images test images (robust_ebm.landscape; JEAT Fig.2 as numbers, read by the claims stage).

Every number carries the name of what was computed:
  is_inception_n{N}, is_std_inception_n{N}, fid_inception_n{N}   Inception, N = samples really used
  fid_refclf, is_refclf, class_consistency_refclf                  reference-classifier stand-in
  top_confident.{is,fid}_top<R>pct                                 replay buffers only: the JEM-family papers'
                                                                   own protocol (metrics.buffer_protocol)
When the Inception weights are unavailable, `inception` = {"status": "unavailable", "reason": ...}
and only the `_refclf` numbers exist: the absence is logged as a warning and listed under
"fallbacks" (as is the CPU standing in for the GPU and any subset smaller than requested), and
nothing is substituted silently. A weights path that is set but missing is an error, raised
before any work (inception.InceptionWeightsNotFound).
When the reference classifier is the scored model itself (the run of `metrics.refclf.method`), each
generator's `refclf` is {"status": "not computed: ..."}: its samples were optimised against that network.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import energies_file, plan, samples_file
from ..data import load_prepared
from ..landscape import landscape_statistics
from ..model_sources import is_model_available
from ..models import load_for_run
from ..runtime import atomic_write_json, note_fallback, pick_device, seed_everything
from .buffer_protocol import top_confident_metrics
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

INCEPTION_FALLBACK = ("IS/FID: Inception weights unavailable, so only the *_refclf stand-in (reference-classifier "
                      "features) was computed; supply the weights (see `robust-ebm check`) for Inception IS/FID")


def _reference_images(splits, which: str) -> torch.Tensor:
    parts = {"train": [splits.train], "test": [splits.test], "train+test": [splits.train, splits.test]}[which]
    return torch.cat([torch.as_tensor(p.images) for p in parts])


def _load_samples(samples_dir: Path, *, logits: bool) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                                dict[str, torch.Tensor]]:
    """One read of the generate stage's folder: {generator: (uint8 images, int64 labels)} for every generator
    that produced samples, and, with `logits`, {generator: logits (N,K)} of the replay-buffer generators
    (generate stores them for the papers' top-confident protocol)."""
    fix = f"rerun the generate stage (robust-ebm generate ... --out {samples_dir})"
    samples, buffer_logits = {}, {}
    for name, (record, npz) in samples_file.produced(samples_dir, fix=fix).items():
        arrays = samples_file.read(npz, fix=fix)
        samples[name] = (torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]).long())
        if logits and record.get("kind") == "buffer":
            if "logits" not in arrays:
                raise ValueError(f"{npz} holds no logits (written by an older generate stage); rerun generate")
            buffer_logits[name] = torch.from_numpy(arrays["logits"])
    return samples, buffer_logits


def _eval_energies(eval_path: Path | None) -> dict[str, dict[str, torch.Tensor]]:
    """{column: {"E_x", "E_xy"}} from the evaluate stage's `<eval>.energies.npz`."""
    if eval_path is None:
        return {}
    npz = plan.beside(eval_path, "eval", "eval_energies")
    if not npz.is_file():
        raise FileNotFoundError(f"no {npz} beside {eval_path}; rerun the evaluate stage, which writes both")
    sets = energies_file.read_sets(npz, fix=f"rerun the evaluate stage, which writes {eval_path.name} and {npz.name}")
    return {col: {k: torch.from_numpy(v) for k, v in kinds.items()} for col, kinds in sets.items()}


def _subset(n_total: int, n: int, seed: int) -> torch.Tensor:
    """A fixed random subset of n indices (generated files are stored class by class)."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


def _inception_for(images, reference, cfg, *, weights, net, seed, batch_size, fallbacks=None) -> dict:
    """Uniform (n_uniform) and small (n_small) protocols, named by the number of samples really used."""
    out, protocols = {}, {}
    for protocol, requested in (("uniform", cfg.n_uniform), ("small", cfg.n_small)):
        n = min(requested, len(images))
        note = "" if n == requested else f"only {len(images)} samples available, {requested} requested"
        if note:
            note_fallback(fallbacks, f"IS/FID {protocol} protocol on {n} samples, {requested} requested "
                          "(metrics.inception; fewer were generated)")
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


def metrics_stage(run, data_dir, model_path, samples_dir, refclf_path, eval_path, out_path, tracker=None,
                  source=None) -> dict:
    """Score one run; see the module docstring for what is written. `source`: how to read --model
    (models.load_for_run; the reference classifier is always a file of this project)."""
    cfg = run.metrics
    model_path, samples_dir, out_path = Path(model_path), Path(samples_dir), Path(out_path)
    eval_path = Path(eval_path) if eval_path else None
    if out_path.suffix != ".json":
        raise ValueError(f"--out must end in .json (got {out_path}); sample energies go beside it as <name>.energies.npz")
    if not is_model_available(model_path):
        raise FileNotFoundError(f"no checkpoint at {model_path}; train first")
    if cfg.refclf.enabled and not (refclf_path and Path(refclf_path).is_file()):
        raise FileNotFoundError(
            f"reference classifier {refclf_path} not found; train method '{cfg.refclf.method}' on this data set "
            "first, or set metrics.refclf.enabled: false")
    if eval_path is not None and not eval_path.is_file():
        raise FileNotFoundError(f"no evaluation result at {eval_path}; run the evaluate stage first")
    try:  # before any work: a configured but missing weights path raises InceptionWeightsNotFound here
        weights, missing_weights = resolve_inception_weights(run.paths.inception_weights), None
    except InceptionWeightsUnavailable as err:
        weights, missing_weights = None, err
    samples, buffer_logits = _load_samples(samples_dir, logits=cfg.top_confident.enabled)
    eval_sets = _eval_energies(eval_path)

    t0 = time.time()
    fallbacks: list[str] = []
    device = pick_device(run.device, fallbacks)
    seed_everything(run.seed)
    model, _ = load_for_run(run, model_path, device, source=source)
    self_referenced = cfg.refclf.enabled and _same_file(refclf_path, model_path)
    refclf = None
    if cfg.refclf.enabled and not self_referenced:
        refclf = load_for_run(run, refclf_path, device, own_model=False)[0]
    splits, _ = load_prepared(data_dir)
    reference = _reference_images(splits, cfg.inception.reference)
    result = {"run": run.run_name, "model_path": str(model_path), "samples_dir": str(samples_dir),
              "reference_set": cfg.inception.reference, "generators": {}}

    net, unavailable, top_ref = None, missing_weights, None
    if weights is not None:
        try:
            net = load_inception(weights, device)
        except InceptionWeightsUnavailable as err:  # a file that is not the Inception weights
            unavailable = err
    if net is not None:
        cache_dir = plan.file_path("inception_cache", results=run.paths.results, profile=run.profile)
        ref_stats = reference_stats(net, reference, weights=weights, batch_size=cfg.batch_size,
                                    cache_dir=cache_dir)
        result["inception"] = {"status": "ok", "weights": str(weights), "splits": cfg.inception.splits,
                               "n_ref": ref_stats.n, "network": "torch-fidelity InceptionV3 (TF 2015-12-05 port)"}
        if buffer_logits:  # the papers' buffer protocol compares with its own real set (CIFAR-10 train+test)
            top_ref = reference_stats(net, _reference_images(splits, cfg.top_confident.reference), weights=weights,
                                      batch_size=cfg.batch_size,
                                      cache_dir=cache_dir)
    else:
        result["inception"] = {"status": "unavailable", "reason": str(unavailable)}
        note_fallback(fallbacks, INCEPTION_FALLBACK)

    refclf_ref = None
    if refclf is not None:
        if samples:  # the reference features are the same for every generator: once per stage
            refclf_ref = refclf_reference_stats(refclf, reference, batch_size=cfg.batch_size)
    sets = dict(eval_sets)
    sample_energies = {}
    for name, (images, labels) in samples.items():
        entry = {"n_samples": len(images)}
        if net is not None:
            entry.update(_inception_for(images, ref_stats, cfg.inception, weights=weights, net=net,
                                        seed=run.seed, batch_size=cfg.batch_size, fallbacks=fallbacks))
        if name in buffer_logits:
            entry["top_confident"] = (
                top_confident_metrics(images, buffer_logits[name], cfg.top_confident, top_ref, net=net,
                                      batch_size=cfg.batch_size)
                if net is not None else {"status": "not computed: Inception weights unavailable"})
        if refclf is not None:
            idx = _subset(len(images), min(cfg.inception.n_uniform, len(images)), run.seed)
            entry["refclf"] = refclf_metrics(refclf, images[idx], labels[idx], ref_stats=refclf_ref,
                                             splits=cfg.inception.splits, batch_size=cfg.batch_size)
        elif self_referenced:
            entry["refclf"] = {"status": SELF_REFERENCED}
        if cfg.energy.n_examples > len(images):
            note_fallback(fallbacks, f"energy statistics of generated samples on {len(images)} images, "
                          f"{cfg.energy.n_examples} requested (metrics.energy.n_examples)")
        idx = _subset(len(images), min(cfg.energy.n_examples, len(images)), run.seed)
        energies = compute_energies(model, images[idx], labels[idx], batch_size=cfg.batch_size)
        sets[f"generated/{name}"] = energies
        sample_energies.update(energies_file.entries(name, energies["E_x"], energies["E_xy"], labels=labels[idx]))
        result["generators"][name] = entry

    n_fisher = min(cfg.fisher.n_examples, len(splits.test.labels))
    if n_fisher < cfg.fisher.n_examples:
        note_fallback(fallbacks, f"Fisher scores on {n_fisher} test images, {cfg.fisher.n_examples} requested "
                      "(metrics.fisher.n_examples)")
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

    energies_path = energies_file.write(plan.beside(out_path, "metrics", "metrics_energies"), sample_energies)
    result["energies_file"] = energies_path.name
    result["fallbacks"] = fallbacks
    result["seconds"] = round(time.time() - t0, 3)
    atomic_write_json(out_path, result)
    if tracker is not None:  # the caller logs the numbers of `result` (tracking.stage_numbers): no settings
        tracker.log_artifact(out_path)
    return result
