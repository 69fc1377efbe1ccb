"""IS and FID with the TF-ported Inception-v3 (torch-fidelity), the uniform protocol of our tables.

torch-fidelity's `FeatureExtractorInceptionV3` reproduces the TF1 graph of 2015-12-05 (weights
`weights-inception-2015-12-05-6726825d.pth`), including TF's bilinear resize to 299x299. It takes
uint8 NCHW RGB images, so we feed uint8 and never floats (anchors.md §11, lesson 4):

    FID features: 2048-d pool3;   IS probabilities: softmax of the 1008 'logits_unbiased'.

Weights are never replaced by other weights: when the file cannot be found or downloaded we raise
`InceptionWeightsUnavailable` with instructions. Callers may then compute clearly labelled
stand-in metrics (`metrics.refclf`), never a number called 'fid', and say so (a logged, recorded
fallback). A weights path that is set (params `paths.inception_weights` or the environment
variable) but does not exist is a configuration error, `InceptionWeightsNotFound`: no fallback.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..runtime import atomic_torch_save
from .frechet import feature_stats, frechet_distance_to_stats, inception_score_from_probs

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torch-fidelity's URL_INCEPTION_V3 (tests/test_metrics.py checks they agree), written out so that a metrics job
# without the weights need not import torch-fidelity and torchvision (~1.6 CPU-s) to say where to get them
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
WEIGHTS_ENV = "ROBUST_EBM_INCEPTION_WEIGHTS"
PARAMS_KEY = "paths.inception_weights"


def __getattr__(name: str):
    """`FeatureExtractorInceptionV3`, torch-fidelity's class, imported on first use (with it torchvision)."""
    if name == "FeatureExtractorInceptionV3":
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        return FeatureExtractorInceptionV3
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class InceptionWeightsUnavailable(RuntimeError):
    """The Inception weights file is neither given, cached, nor downloadable."""


class InceptionWeightsNotFound(FileNotFoundError):
    """An explicitly configured Inception weights path does not exist (an error, never a fallback)."""


def hub_weights_path() -> Path:
    """Where torch hub (and torch-fidelity's own download) keeps the file: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _download(url: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dst), progress=True)  # writes a temp file, then renames


def _how_to_supply() -> str:
    return (
        f"Download {WEIGHTS_URL} on a machine with internet and supply it by one of: "
        f"params.yaml `{PARAMS_KEY}: /path/to/{WEIGHTS_FILE}`; "
        f"environment variable {WEIGHTS_ENV}=/path/to/{WEIGHTS_FILE}; "
        f"or copying it to {hub_weights_path()} ($TORCH_HOME/hub/checkpoints/)."
    )


def resolve_inception_weights(path: str | Path | None = None, *, download: bool = True) -> Path:
    """Path of the Inception weights: explicit `path`, else $ROBUST_EBM_INCEPTION_WEIGHTS, else the
    torch hub cache, else torch-fidelity's URL downloaded into that cache."""
    explicit = path or os.environ.get(WEIGHTS_ENV)
    if explicit:
        found = Path(explicit).expanduser()
        if not found.is_file():
            source = f"params `{PARAMS_KEY}`" if path else f"${WEIGHTS_ENV}"
            raise InceptionWeightsNotFound(
                f"Inception weights file {found} (set by {source}) does not exist; fix or unset {source} "
                f"(unset: the torch hub cache {hub_weights_path()}, else a download, else the refclf stand-in)"
            )
        return found
    cached = hub_weights_path()
    if cached.is_file():
        return cached
    reason = "download disabled"
    if download:
        try:
            _download(WEIGHTS_URL, cached)
            return cached
        except Exception as err:  # offline: URLError; proxy: HTTPError; disk: OSError
            reason = f"download failed ({type(err).__name__}: {err})"
    raise InceptionWeightsUnavailable(
        f"Inception weights {WEIGHTS_FILE} are missing: no `{PARAMS_KEY}` in params, no ${WEIGHTS_ENV}, "
        f"not in the torch hub cache {cached}, and {reason}. {_how_to_supply()}"
    )


def locate_weights(path: str | Path | None) -> tuple[bool, str]:
    """(usable, where / what is missing and how to supply it) without downloading: `robust-ebm check`'s line.

    An explicit path that does not exist raises InceptionWeightsNotFound, as in the metrics stage."""
    try:
        return True, f"found: {resolve_inception_weights(path, download=False)}"
    except InceptionWeightsUnavailable:
        return False, (f"not found (params `{PARAMS_KEY}` and ${WEIGHTS_ENV} unset; not in the torch hub cache "
                       f"{hub_weights_path()}); the metrics stage will try a download, else IS/FID fall back to the "
                       f"*_refclf stand-in (a recorded fallback). {_how_to_supply()}")


def load_inception(weights: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """torch-fidelity's Inception-v3 with the given weights, eval mode, returning (pool3, logits_unbiased)."""
    try:
        net = __getattr__("FeatureExtractorInceptionV3")(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights)
        )
    except RuntimeError as err:  # load_state_dict key/shape mismatch
        raise InceptionWeightsUnavailable(
            f"{weights} is not a torch-fidelity InceptionV3 state dict ({err}). {_how_to_supply()}"
        ) from err
    return net.to(device)


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) with C in {1, 3} -> uint8 (N, 3, H, W). Resizing is the extractor's own."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"Inception expects uint8 images (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}; "
            "convert [0,1] floats with (x * 255).round().to(torch.uint8)"
        )
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def inception_outputs(net, images: torch.Tensor, *, batch_size: int = 64, desc: str = "inception"):
    """(pool3 features (N, 2048), p(y|x) (N, 1008)) as float64 CPU tensors."""
    device = next(net.parameters()).device
    feats, probs = [], []
    for batch in tqdm(torch.split(images, batch_size), desc=desc, leave=False):
        pool, logits = net(to_inception_input(batch).to(device))
        feats.append(pool.double().cpu())
        probs.append(torch.softmax(logits.double(), dim=1).cpu())
    return torch.cat(feats), torch.cat(probs)


@dataclass
class ReferenceStats:
    """Gaussian fit of the reference set's features; `key` identifies images + weights."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    key: str


def _reference_key(images: torch.Tensor, weights: Path) -> str:
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(f"{tuple(images.shape)}|{Path(weights).name}|{Path(weights).stat().st_size}".encode())
    return digest.hexdigest()[:16]


def reference_stats(
    net, images: torch.Tensor, *, weights: str | Path, cache_dir: str | Path | None = None, batch_size: int = 64
) -> ReferenceStats:
    """Inception statistics of real images, cached in `cache_dir` under a hash of the images and weights."""
    key = _reference_key(images.cpu(), Path(weights))
    cache = Path(cache_dir) / f"inception_ref_{key}.pt" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        return ReferenceStats(saved["mu"].numpy(), saved["sigma"].numpy(), int(saved["n"]), key)
    feats, _ = inception_outputs(net, images, batch_size=batch_size, desc="inception (reference)")
    mu, sigma = feature_stats(feats)
    if cache is not None:
        atomic_torch_save({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma), "n": len(images)}, cache)
    return ReferenceStats(mu, sigma, len(images), key)


def inception_metrics(
    images: torch.Tensor,
    reference: torch.Tensor | ReferenceStats,
    *,
    weights: str | Path,
    splits: int = 10,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    net=None,
) -> dict:
    """IS (mean, std over splits) and FID of uint8 `images` against uint8 `reference` images or their stats."""
    net = net if net is not None else load_inception(weights, device)
    if isinstance(reference, torch.Tensor):
        reference = reference_stats(net, reference, weights=weights, cache_dir=cache_dir, batch_size=batch_size)
    feats, probs = inception_outputs(net, images, batch_size=batch_size, desc="inception (samples)")
    is_mean, is_std = inception_score_from_probs(probs, splits)
    return {
        "is": is_mean,
        "is_std": is_std,
        "fid": frechet_distance_to_stats(feats, reference.mu, reference.sigma),
        "n": len(images),
        "n_ref": reference.n,
        "protocol": {
            "network": "torch-fidelity InceptionV3 (TF 2015-12-05 port), TF1 bilinear resize to 299, uint8 input",
            "weights": str(weights),
            "is_from": "softmax(logits_unbiased), 1008 classes",
            "fid_from": "pool3, 2048-d",
            "splits": splits,
            "reference_key": reference.key,
        },
    }
