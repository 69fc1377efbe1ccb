"""Generation stage: class-conditional and unconditional samples from a classifier read as an EBM.

Each generator in params (`generation.generators`) is one of three kinds
(papers.md §3.5); the algorithms are plain functions below:

    sgld          `langevin_samples`: Langevin dynamics from `sampling`, the sampler
                  config selects the paper's form
                    JEAT Eq.17  energy joint, coupled   x' = x - (η/2)∇E(x,y) + √η ε,  init gaussian N(μ_y, Σ_y)
                    JEAT Eq.16  energy ce,    coupled   x' = x - (η/2)∇[E(x,y) - E(x)] + √η ε
                    WEAT        energy joint, momentum ζ: v' = ζv - (η/2)∇E(x,y), x' = x + clamp(v' + noise, ±1),
                                init pca (WEAT's class PCA, sampling.init_pca); eval.py's ζ is 0
                    JEM         energy marginal (unconditional), init uniform
    targeted_pgd  `targeted_pgd_samples`: Santurkar et al. 2019, class-Gaussian seeds then robustness's
                  targeted L2 PGD on CE keeping each image's best (lowest-CE) iterate, `robustness_targeted_l2`
                  (recalled settings ε 30, step 0.5, 60 steps [R])
    buffer        `buffer_samples`: the replay buffer train saves beside model.pt (plan.PATTERNS["replay_buffer"],
                  a declared input); a run whose method keeps none has zero images there, and a buffer
                  generator on it is a configuration error (`check_buffer`)

Inits (`sampling.initialise`, inputs from `init_inputs`): uniform, gaussian (class Gaussian),
pca (WEAT class PCA), data (training images) and noisy_data (WEAT's noise injection: a test
image of the class + N(0, noise_std^2), clamped; the only init that reads the test split).

Conditional generators label each image with its class; unconditional ones
(energy marginal, and buffers saved without labels) with the model's
prediction. Outputs in `out_dir` (samples_file.py, their one writer and reader): `<name>.npz` (images uint8
(N,C,H,W), labels int64; buffers also `logits` float32 (N,K) of the float images, for the papers'
top-confident IS/FID protocol), `<name>_grid.png` (one row per class) and the index `generate.json`.

A rerun into the same `out_dir` keeps the generators already finished there
only when generate.json's `resume_key` (code of this stage's import closure,
settings, model file, data files, replay buffer) is unchanged; otherwise the
earlier files are deleted and every generator runs again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import plan, samples_file
from .attacks import AttackConfig
from .config import ConfigError
from .data import load_prepared
from .files import BadFileError, load_torch
from .inference import batched_outputs
from .model_sources import is_model_available
from .models import load_for_run
from .runtime import atomic_write_bytes, model_mode, pick_device
from .sampling import SamplerConfig, initialise, pyld, sgld

BUFFER_FILE = Path(plan.PATTERNS["replay_buffer"]).name  # train writes it beside model.pt
GRID_COLUMNS = 10
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- algorithms


def class_labels(num_classes: int, n_per_class: int) -> Tensor:
    """0,0,...,1,1,...: n_per_class labels of every class, in class order."""
    return torch.arange(num_classes).repeat_interleave(n_per_class)


def _chunks(labels: Tensor, batch_size: int, desc: str):
    for start in tqdm(range(0, len(labels), batch_size), desc=desc, unit="batch", leave=False):
        yield labels[start : start + batch_size]


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(1)


def init_inputs(spec, splits, stats) -> dict:
    """The keyword arguments of `sampling.initialise` for a generator's init (GeneratorSpec `spec`):
    class statistics and init settings always, training images for 'data', and test images with
    their labels for 'noisy_data' (WEAT starts its noise-injection chains from test images)."""
    inputs = {"stats": stats, "pca_fraction": spec.pca_fraction, "pca_sigma": spec.pca_sigma, "noise_std": spec.noise_std}
    if spec.init == "data":
        inputs["data"] = splits.train.images
    elif spec.init == "noisy_data":
        inputs |= {"data": splits.test.images, "data_labels": splits.test.labels}
    return inputs


def langevin_samples(
    model: nn.Module,
    labels: Tensor,
    sampler: SamplerConfig,
    init: str,
    *,
    shape: tuple[int, int, int],
    batch_size: int = 100,
    device: torch.device = torch.device("cpu"),
    generator: torch.Generator | None = None,
    **init_kwargs,
) -> tuple[Tensor, Tensor]:
    """Run SGLD/PYLD from `init` for every label; return images in [0,1] (CPU) and their labels.

    `init_kwargs` go to `sampling.initialise` (stats, data, data_labels, pca_fraction, pca_sigma,
    noise_std; see `init_inputs`). With `sampler.energy == 'marginal'` the chain ignores y (JEM's
    p(x)); `labels` then only drive class-wise inits, and the returned labels are predictions.
    """
    step = pyld if sampler.kind == "pyld" else sgld
    conditional = sampler.energy != "marginal"
    images, out_labels = [], []
    for y in _chunks(labels, batch_size, f"sgld {sampler.energy}"):
        x0 = initialise(init, len(y), shape=shape, labels=y, generator=generator, device=device, **init_kwargs)
        yd = y.to(device)
        x = step(model, x0, sampler, y=yd if conditional else None, generator=generator).clamp(0, 1)
        images.append(x.cpu())
        out_labels.append(y if conditional else _predict(model, x).cpu())
    return torch.cat(images), torch.cat(out_labels)


def robustness_targeted_l2(model: nn.Module, x0: Tensor, target: Tensor, *, eps: float, step_size: float,
                           iterations: int, random_start: bool = False,
                           generator: torch.Generator | None = None) -> Tensor:
    """Targeted L2 PGD on CE as MadryLab/robustness runs it (attacker.Attacker.forward, constraint '2',
    targeted=True, use_best=True, the defaults of Santurkar et al.'s generation):

        random start (optional): x = clamp(x0 + eps * r / (||r|| + 1e-10), 0, 1), r ~ N(0, I)
        each iteration, with l = CE(f(clamp(x, 0, 1)), target) per example:
            keep x as the best iterate of its example if l is strictly below the best so far
            g = grad_x( -mean(l) ),  x = x + step_size * g / (||g||_2 + 1e-10)           (attack_steps.L2Step.step)
            x = clamp(x0 + renorm_2(x - x0, maxnorm=eps), 0, 1)                           (L2Step.project)
        after the loop the last iterate competes too; returns the best iterate (lowest CE) of each example.
    """
    def losses_at(x):
        return F.cross_entropy(model(x.clamp(0.0, 1.0)), target, reduction="none")

    orig = x0.detach()
    x = orig
    if random_start:
        r = torch.randn(orig.shape, generator=generator, device=generator.device if generator else orig.device)
        r = r.to(orig)
        x = (orig + eps * r / (r.flatten(1).norm(dim=1).view(-1, *[1] * (orig.dim() - 1)) + 1e-10)).clamp(0.0, 1.0)
    best_loss = best_x = None

    def keep_best(losses, x):
        nonlocal best_loss, best_x
        if best_loss is None:
            best_loss, best_x = losses.detach().clone(), x.detach().clone()
        else:
            better = losses < best_loss
            best_x[better], best_loss[better] = x[better].detach(), losses[better].detach()

    with model_mode(model, "eval"), torch.enable_grad():
        for _ in range(iterations):
            x = x.clone().detach().requires_grad_(True)
            losses = losses_at(x)
            (grad,) = torch.autograd.grad(-losses.mean(), [x])
            with torch.no_grad():
                keep_best(losses, x)
                norm = grad.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
                x = x + grad / (norm + 1e-10) * step_size
                x = (orig + (x - orig).renorm(p=2, dim=0, maxnorm=eps)).clamp(0.0, 1.0)
        with torch.no_grad():
            keep_best(losses_at(x), x)
    return best_x


def targeted_pgd_samples(
    model: nn.Module,
    labels: Tensor,
    attack: AttackConfig,
    init: str,
    *,
    shape: tuple[int, int, int],
    batch_size: int = 100,
    device: torch.device = torch.device("cpu"),
    generator: torch.Generator | None = None,
    **init_kwargs,
) -> tuple[Tensor, Tensor]:
    """Santurkar et al.: seeds x0 ~ init (class Gaussian, clamped), then `robustness_targeted_l2` towards class y.

    `attack` carries eps, step, steps and random_start ('none' or 'normal', robustness's L2 random start);
    `init_kwargs` go to `sampling.initialise`, as in `langevin_samples`.
    """
    if not attack.targeted or attack.norm != "l2" or attack.objective != "ce" or attack.random_start == "uniform":
        raise ValueError("a targeted_pgd generator is robustness's targeted L2 PGD on CE: set attack.norm 'l2', "
                         "objective 'ce', targeted true, random_start 'none' or 'normal'")
    images = []
    for y in _chunks(labels, batch_size, "targeted pgd"):
        x0 = initialise(init, len(y), shape=shape, labels=y, generator=generator, device=device, **init_kwargs)
        yd = y.to(device)
        images.append(robustness_targeted_l2(model, x0, yd, eps=attack.eps, step_size=attack.step,
                                             iterations=attack.steps, random_start=attack.random_start == "normal",
                                             generator=generator).cpu())
    return torch.cat(images), labels.clone()


def find_buffer(model_path: Path, meta: dict) -> Path | None:
    """The replay buffer saved by training: meta['buffer'] (relative to the checkpoint) or replay_buffer.pt beside it."""
    candidates = []
    info = meta.get("buffer")
    if isinstance(info, dict):
        info = info.get("path")
    if isinstance(info, str) and info:
        candidates.append(Path(info) if Path(info).is_absolute() else model_path.parent / info)
    candidates.append(plan.beside(model_path.parent, "model_dir", "replay_buffer"))
    return next((c for c in candidates if c.is_file()), None)


def load_buffer(path: Path) -> dict:
    """A saved replay buffer: {"images": float [0,1] (N,C,H,W), optional "labels"; train's also "method" and
    "empty" (why N is 0)}; BadFileError when it is none."""
    state = load_torch(path, fix=BUFFER_FIX)
    images = state.get("images") if isinstance(state, dict) else None
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise BadFileError(f"{path} is not a replay buffer (a dict with 'images' of shape (N,C,H,W)); {BUFFER_FIX}")
    return state


def check_buffer(generators: list[str], method: str, path: Path) -> int:
    """The number of images in the replay buffer that the `buffer` generators draw; ConfigError naming the method
    and the fix when it has none (a method without SGLD samples: its training writes an empty buffer)."""
    state = load_buffer(path)
    if len(state["images"]) == 0:
        why = state.get("empty") or "it holds zero images"
        names = ", ".join(f"'{g}'" for g in generators)
        raise ConfigError(f"generator {names} (kind buffer) reads the replay buffer of method '{method}', which is "
                          f"empty ({path}: {why}); for this method use a generator of kind sgld instead (e.g. init "
                          f"uniform, sampler energy marginal: JEM's p(x) sampling), i.e. leave '{method}' out of "
                          f"`methods` of {names} in params.yaml generation.generators")
    return len(state["images"])


def buffer_samples(model: nn.Module, path: Path, *, batch_size: int = 100, device=torch.device("cpu")) -> tuple[Tensor, Tensor]:
    """Images of a saved replay buffer (`load_buffer`); predictions label those saved without labels."""
    state = load_buffer(path)
    images = state["images"].float().clamp(0, 1)
    labels = state.get("labels")
    if labels is None:
        (labels,) = batched_outputs(model, lambda xb: _predict(model, xb.to(device)), images, batch_size=batch_size,
                                    desc=None)
    return images, labels.long().view(-1)


# ----------------------------------------------------------------------------- files


def to_uint8(images: Tensor) -> np.ndarray:
    """[0,1] floats -> uint8 (round to nearest)."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def sample_logits(model: nn.Module, images: Tensor, *, batch_size: int = 100, device=torch.device("cpu")) -> Tensor:
    """f(x) of float [0,1] images (CPU float32, model in eval mode): what the JEM-family papers' buffer protocol
    ranks by (metrics.buffer_protocol), taken here on the float buffer as their cond_is_fid does, before uint8
    storage."""
    return batched_outputs(model, lambda xb: model(xb.to(device)).float(), images, batch_size=batch_size, desc=None)[0]


def save_grid(path: Path, images: np.ndarray, labels: np.ndarray, num_classes: int, columns: int = GRID_COLUMNS) -> None:
    """PNG with one row per class: its first `columns` images, black where a class has fewer; 2-pixel black
    borders, grey images as RGB (the layout of torchvision's make_grid(padding=2), which is not imported:
    torchvision costs a generate job ~1.4 CPU-s)."""
    pad, (channels, height, width) = 2, images.shape[1:]
    grid = np.zeros((num_classes * (height + pad) + pad, columns * (width + pad) + pad, 3), dtype=np.uint8)
    for c in range(num_classes):
        for i, image in enumerate(images[labels == c][:columns]):
            y, x = pad + c * (height + pad), pad + i * (width + pad)
            grid[y : y + height, x : x + width] = image.transpose(1, 2, 0)  # 1 channel broadcasts to 3
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------- the stage


def generator_seed(seed: int, name: str) -> int:
    """A seed per generator that does not depend on which other generators ran (resume-safe)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def generate_stage(run, data_dir, model_path, out_dir, tracker=None, source=None) -> dict:
    """Run every generator whose `methods` list holds this run's method; skip those already on disk.
    `source`: how to read --model (models.load_for_run)."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    if not is_model_available(model_path):
        raise FileNotFoundError(f"no checkpoint at {model_path}; train first or pass --model with a load_classifier-compatible file")
    gen_cfg = run.generation
    method = run.method_name
    chosen = gen_cfg.for_method(method)

    fallbacks: list[str] = []
    device = pick_device(run.device, fallbacks)
    model, meta = load_for_run(run, model_path, device, source=source)
    splits, stats = load_prepared(data_dir)
    shape = tuple(splits.test.images.shape[1:])
    num_classes = int(getattr(model, "num_classes", int(splits.test.labels.max()) + 1))
    labels = class_labels(num_classes, gen_cfg.n_per_class)

    buffer_path = find_buffer(model_path, meta)
    buffer_generators = [name for name, spec in chosen.items() if spec.kind == "buffer"]
    if buffer_generators and buffer_path is not None:  # before any work: an empty buffer is a settings error
        buffer_length = check_buffer(buffer_generators, method, buffer_path)
    json_path = samples_file.index_path(out_dir)
    key = resume_key(run, data_dir, model_path, buffer_path)
    _forget_stale(out_dir, json_path, key)
    report = {"method": method, "model_path": str(model_path), "seed": run.seed, "n_per_class": gen_cfg.n_per_class,
              "num_classes": num_classes, "generators": {}, "fallbacks": fallbacks, "resume_key": key}
    for name, spec in chosen.items():
        files = samples_file.file_names(name)
        npz, grid = out_dir / files["npz"], out_dir / files["grid"]
        record = {"kind": spec.kind, "init": spec.init, "files": files,
                  "pca": {"fraction": spec.pca_fraction, "sigma": spec.pca_sigma} if spec.init == "pca" else None,
                  "noise_std": spec.noise_std if spec.init == "noisy_data" else None,
                  "sampler": spec.sampler.model_dump(mode="json") if spec.sampler else None,
                  "attack": spec.attack.model_dump(mode="json") if spec.attack else None}
        if spec.kind == "buffer" and buffer_path is None:
            report["generators"][name] = {**record, "status": f"skipped: no replay buffer beside {model_path.name} "
                                          f"(a model trained elsewhere; the train stage writes {BUFFER_FILE})", "count": 0}
            continue
        expected = len(labels) if spec.kind != "buffer" else buffer_length
        if samples_file.count(npz) == expected and grid.is_file():
            earlier = _previous(json_path, name, {**record, "count": expected})
            report["generators"][name] = {**earlier, "status": "ok (found on disk, not rerun)"}
            continue
        t0 = time.time()
        generator = torch.Generator(device=device).manual_seed(generator_seed(run.seed, name))
        common = {"shape": shape, "batch_size": gen_cfg.batch_size, "device": device, "generator": generator,
                  **init_inputs(spec, splits, stats)}
        if spec.kind == "sgld":
            images, ys = langevin_samples(model, labels, spec.sampler, spec.init, **common)
        elif spec.kind == "targeted_pgd":
            images, ys = targeted_pgd_samples(model, labels, spec.attack, spec.init, **common)
        extra = {}
        if spec.kind == "buffer":
            images, ys = buffer_samples(model, buffer_path, batch_size=gen_cfg.batch_size, device=device)
            record["buffer_path"] = str(buffer_path)
            extra["logits"] = sample_logits(model, images, batch_size=gen_cfg.batch_size, device=device).numpy()
        as_uint8, ys = to_uint8(images), ys.numpy()
        samples_file.write(npz, as_uint8, ys, **extra)
        save_grid(grid, as_uint8, ys, num_classes)
        record.update(status="ok", count=len(ys), seconds=round(time.time() - t0, 3),
                      class_counts=np.bincount(ys, minlength=num_classes).tolist())
        report["generators"][name] = record
        samples_file.write_index(out_dir, report)  # progress survives a crash in the next generator
        if tracker is not None:  # one image series per generator, the same key for every method
            tracker.log_image(grid, f"samples/{name}")
    samples_file.write_index(out_dir, report)
    if tracker is not None:
        tracker.log_metrics({f"generate/{n}_seconds": r["seconds"] for n, r in report["generators"].items() if r.get("seconds")})
    return report


def _file_digest(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def resume_key(run, data_dir, model_path, buffer_path) -> dict:
    """What finished generators on disk were made from; they are kept only while it is unchanged.
    settings: plan.run_settings_digest, the generate job's Snakemake rerun trigger."""
    data_dir = Path(data_dir)
    return {"code": plan.code_digest("generate"), "settings": plan.run_settings_digest(run, "generate"),
            "model": _file_digest(model_path), "buffer": _file_digest(buffer_path),
            "data": [_file_digest(data_dir / name) for name in ("splits.pt", "class_stats.pt")]}


def _forget_stale(out_dir: Path, json_path: Path, key: dict) -> None:
    """Delete the files of an earlier run into `out_dir` whose resume key differs (logged in one line)."""
    try:
        earlier = json.loads(json_path.read_text())
    except (OSError, ValueError):
        earlier = None
    if earlier is None and not any(out_dir.glob(samples_file.file_names("*")["npz"])):
        return
    old = (earlier or {}).get("resume_key")
    if old == key:
        return
    changed = [k for k in key if not isinstance(old, dict) or old.get(k) != key[k]]
    log.info("not reusing the samples in %s: %s changed since they were made; deleting them", out_dir,
             ", ".join(changed) if isinstance(old, dict) else "their resume key is missing")
    names = {f for r in ((earlier or {}).get("generators") or {}).values() for f in (r.get("files") or {}).values()}
    patterns = samples_file.file_names("*").values()  # every generator's files, those of no record too
    for path in [*(out_dir / n for n in names), *(p for g in patterns for p in out_dir.glob(g)), json_path]:
        path.unlink(missing_ok=True)


BUFFER_FIX = "rerun the train stage, which writes it beside model.pt"


def _previous(json_path: Path, name: str, fallback: dict) -> dict:
    """The record of a generator finished by an earlier run (its seconds and counts), else `fallback`."""
    try:
        return json.loads(json_path.read_text())["generators"][name]
    except (OSError, ValueError, KeyError):
        return fallback
