"""Langevin samplers (SGLD, PYLD), their initialisations and the persistent replay buffer.

Every sampler *descends* an energy from `robust_ebm.energy` on [0,1] images:

    marginal  E(x)            = -logsumexp_k f(x)[k]        (JEM's p(x))
    joint     E(x, y)         = -f(x)[y]                     (JEAT Eq. 17, WEAT)
    ce        E(x, y) - E(x)  = -log p(y|x)                  (JEAT Eq. 16)

Units. The JEM family (JEM, JEM++, SADA-JEM, EB-JDAT) samples in [-1,1]
pixels x' = 2x - 1 and *ascends* f = -E. We descend E in [0,1] pixels with
the [-1,1] map inside the model (`input_range: symmetric`). Two effects add
up: a displacement d' in [-1,1] units is d'/2 in [0,1] units, and the
gradient doubles, grad_x E = -2 grad_x' f. Hence, for a symmetric-input model,

    x' <- x' + s * grad_x' f + t * N(0,I)             ==  x <- x - (s/4) * grad_x E + (t/2) * N(0,I)
    x' <- x' + s * clamp(grad_x' f, -c, c)            ==  x <- x - (s/4) * clamp(grad_x E, -2c, 2c)

(the clipped step moves at most s*c in [-1,1] units = s*c/2 pixels). JEM's
step 1, noise 0.01 become step_size 0.25, noise_std 0.005; JEM++'s PYLD
pyld_lr 0.2, eps 1 become inner_lr 0.05, grad_clip 2; SADA-JEM's step 1,
clip 1 become step_size 0.25, grad_clip 2. `tests/test_sampling.py` checks
both identities on a [-1,1] network.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import trange

from .energy import cross_entropy, joint_energy, marginal_energy
from .runtime import model_mode
from .schema_types import Fraction, Strict

EnergyFn = Callable[[Tensor], Tensor]  # x -> per-sample energies (B,)
InitFn = Callable[[Tensor, "torch.Generator | None"], Tensor]  # (labels, generator) -> images in [0,1]
NOISY_DATA_STD = 50 * 8 / 255  # WEAT's noise-injection init: alpha 50 x epsilon 8/255 (papers.md §3.5)


class SamplerConfig(Strict):
    """SGLD / PYLD settings. Step sizes are in [0,1] pixel units (see the module docstring).

    Each SGLD step, with g = grad_x E (clamped to +-grad_clip per pixel when set):
      decoupled (JEM code):         drift = step_size * g,        noise = noise_std * N(0,I)
      coupled (JEAT Alg. 1, Eq. 17): drift = (step_size / 2) * g,  noise = sqrt(step_size) * N(0,I)
                                     (noise_std is ignored)
      v <- momentum * v - drift;  x <- x + clamp(v + noise, +-update_clip);  x <- clamp(x, 0, 1) if clamp
    With momentum 0 this is exactly the plain form. WEAT's momentum SGLD
    (v <- z v - (eta/2) g; x <- x + clamp(v + sqrt(2 eta) * 0.001 * N(0,I), +-eps)) is
    decoupled with step_size = eta/2, noise_std = sqrt(2 eta) * 0.001, momentum = z, update_clip = eps
    (WEAT already samples in [0,1] pixels: no unit conversion).
    """

    kind: Literal["sgld", "pyld"] = "sgld"
    energy: Literal["marginal", "joint", "ce"] = "marginal"
    steps: int = Field(20, ge=0)
    step_size: Fraction = Field(0.25, gt=0.0, description="JEM's 1.0 in [-1,1] units (module docstring)")
    noise_std: Fraction = Field(0.005, ge=0.0, description="JEM's 0.01 in [-1,1] units")
    coupled: bool = False
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0.0, description="per-pixel clamp of the gradient (JEM++ --eps 1 = 2 here)")
    update_clip: float | None = Field(None, gt=0.0, description="clamp of the whole update (WEAT eps)")
    clamp: bool = True
    inner_steps: int = Field(5, ge=1, description="PYLD inner steps through the stem only")
    inner_lr: Fraction = Field(0.05, gt=0.0, description="PYLD inner step size (JEM++ pyld_lr 0.2 in [-1,1] units)")
    model_mode: Literal["eval", "train"] = "eval"
    buffer_size: int = Field(10000, ge=0)
    reinit_prob: float = Field(0.05, ge=0.0, le=1.0)
    init: Literal["uniform", "gaussian", "pca", "data", "gm"] = "uniform"  # never 'noisy_data': it starts from test images


# ---------------------------------------------------------------- energies


def _energy(logits: Tensor, y: Tensor | None, kind: str) -> Tensor:
    if kind == "marginal":
        return marginal_energy(logits)
    if kind == "joint":
        return joint_energy(logits, y)
    if kind == "ce":
        return cross_entropy(logits, y)
    raise ValueError(f"unknown sampler energy '{kind}'; use 'marginal', 'joint' or 'ce'")


def sampler_energy(model: nn.Module, x: Tensor, y: Tensor | None, kind: str) -> Tensor:
    """Per-sample energy (B,) that a sampler descends: E(x), E(x,y) or E(x,y) - E(x).

    The samplers differentiate its *sum* over the batch: the chains are independent,
    so d(sum_b E_b)/dx_b = dE_b/dx_b.
    """
    return _energy(model(x), y, kind)


def _check_inputs(x0: Tensor, y: Tensor | None, kind: str) -> None:
    if not torch.is_floating_point(x0):
        raise TypeError(f"x0 must be a float tensor of [0,1] images, got {x0.dtype}; convert uint8 with x.float() / 255")
    if kind in ("joint", "ce"):
        if y is None:
            raise ValueError(f"sampler energy '{kind}' needs labels: pass y= (one class per chain), or use energy='marginal'")
        if y.shape != (x0.shape[0],):
            raise ValueError(f"y must have shape ({x0.shape[0]},) to match x0, got {tuple(y.shape)}")


# ---------------------------------------------------------------- random draws


def _source(device: torch.device, generator: torch.Generator | None) -> torch.device:
    """Random numbers are drawn where the generator lives (pass one on the GPU to draw there)."""
    return generator.device if generator is not None else torch.device(device)


def _randn(shape, device, generator=None) -> Tensor:
    return torch.randn(shape, generator=generator, device=_source(device, generator)).to(device)


def _rand(shape, device, generator=None) -> Tensor:
    return torch.rand(shape, generator=generator, device=_source(device, generator)).to(device)


def _randint(high: int, shape, device, generator=None) -> Tensor:
    return torch.randint(high, shape, generator=generator, device=_source(device, generator)).to(device)


# ---------------------------------------------------------------- SGLD


def langevin(
    energy_fn: EnergyFn,
    x0: Tensor,
    cfg: SamplerConfig,
    *,
    generator: torch.Generator | None = None,
    return_trace: bool = False,
    progress: bool = False,
):
    """The SGLD loop on any energy callable (see SamplerConfig for the update rule).

    Returns the detached x_K, and with return_trace also a (steps, B) tensor of
    E(x_t) for t = 0..K-1 (computed anyway for the gradient, so it is free).
    """
    drift_scale = cfg.step_size / 2 if cfg.coupled else cfg.step_size
    noise_scale = math.sqrt(cfg.step_size) if cfg.coupled else cfg.noise_std
    x = x0.detach().clone()
    velocity = torch.zeros_like(x) if cfg.momentum > 0 else None
    trace = []
    with torch.enable_grad():
        for _ in trange(cfg.steps, desc="sgld", leave=False, disable=not progress):
            x.requires_grad_(True)
            energy = energy_fn(x)
            (grad,) = torch.autograd.grad(energy.sum(), x)
            x = x.detach()
            if return_trace:
                trace.append(energy.detach())
            if cfg.grad_clip is not None:
                grad = grad.clamp(-cfg.grad_clip, cfg.grad_clip)
            update = -drift_scale * grad
            if velocity is not None:
                velocity = cfg.momentum * velocity + update
                update = velocity
            if noise_scale > 0:
                update = update + noise_scale * _randn(x.shape, x.device, generator)
            if cfg.update_clip is not None:
                update = update.clamp(-cfg.update_clip, cfg.update_clip)
            x = x + update
            if cfg.clamp:
                x = x.clamp(0.0, 1.0)
    if not return_trace:
        return x
    return x, torch.stack(trace) if trace else x.new_zeros(0, x.shape[0])


def sgld(
    model: nn.Module,
    x0: Tensor,
    cfg: SamplerConfig,
    *,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trace: bool = False,
    progress: bool = False,
):
    """Run `cfg.steps` SGLD steps descending `cfg.energy` of `model` from x0 (images in [0,1]).

    The model is in `cfg.model_mode` while sampling and gets its own mode back
    after; only input gradients are taken, so parameters collect no .grad.
    y is needed for the 'joint' and 'ce' energies and ignored for 'marginal'.
    """
    _check_inputs(x0, y, cfg.energy)
    with model_mode(model, cfg.model_mode):
        return langevin(
            lambda x: sampler_energy(model, x, y, cfg.energy),
            x0,
            cfg,
            generator=generator,
            return_trace=return_trace,
            progress=progress,
        )


# ---------------------------------------------------------------- PYLD


def pyld(
    model: nn.Module,
    x0: Tensor,
    cfg: SamplerConfig,
    *,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trace: bool = False,
    progress: bool = False,
):
    """JEM++ proximal YOPO Langevin (PYLD): `steps` full passes, `inner_steps` cheap ones each.

    Outer step at x: h = stem(normalize(x)), p = dE/dh through the whole network
    (one autograd.grad call w.r.t. h). Inner steps freeze p and move x on the
    layer-one Hamiltonian H(x) = <p, stem(normalize(x))>, whose x-gradient at the
    outer point is exactly grad_x E (chain rule), but costs only the stem:

        x <- clamp(x - inner_lr * clamp(grad_x H(x), +-grad_clip), 0, 1)

    then x += noise_std * N(0,I) once per outer step (JEM++ adds its sgld_std
    there; its default is 0). JEM++'s sgld_lr outer step is 0 in every script and
    is not reproduced. Needs a model with `normalize`, `stem`, `trunk_from_stem`
    and `fc` (the `Classifier` contract). Trace: E at each outer point.
    """
    missing = [a for a in ("normalize", "stem", "trunk_from_stem", "fc") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"pyld needs a Classifier with normalize/stem/trunk_from_stem/fc; {type(model).__name__} lacks {missing}")
    _check_inputs(x0, y, cfg.energy)
    x = x0.detach().clone()
    trace = []
    with model_mode(model, cfg.model_mode), torch.enable_grad():
        for _ in trange(cfg.steps, desc="pyld", leave=False, disable=not progress):
            h = model.stem(model.normalize(x)).detach().requires_grad_(True)
            energy = _energy(model.fc(model.trunk_from_stem(h)), y, cfg.energy)
            (p,) = torch.autograd.grad(energy.sum(), h)
            if return_trace:
                trace.append(energy.detach())
            for _ in range(cfg.inner_steps):
                x.requires_grad_(True)
                hamiltonian = (p * model.stem(model.normalize(x))).sum()
                (grad,) = torch.autograd.grad(hamiltonian, x)
                if cfg.grad_clip is not None:
                    grad = grad.clamp(-cfg.grad_clip, cfg.grad_clip)
                x = x.detach() - cfg.inner_lr * grad
                if cfg.clamp:
                    x = x.clamp(0.0, 1.0)
            if cfg.noise_std > 0:
                x = x + cfg.noise_std * _randn(x.shape, x.device, generator)
                if cfg.clamp:
                    x = x.clamp(0.0, 1.0)
    if not return_trace:
        return x
    return x, torch.stack(trace) if trace else x.new_zeros(0, x.shape[0])


def run_sampler(model, x0, cfg: SamplerConfig, *, y=None, generator=None, return_trace=False, progress=False):
    """`sgld` or `pyld`, as `cfg.kind` says."""
    sampler = pyld if cfg.kind == "pyld" else sgld
    return sampler(model, x0, cfg, y=y, generator=generator, return_trace=return_trace, progress=progress)


# ---------------------------------------------------------------- initialisations
# `stats` is a data.ClassStats: mean (K,C,H,W), basis (K,D,r) orthonormal columns,
# scales (K,r) standard deviations along them, diag_eps, counts (K,); gaussian(k) -> (mean, factor).


def init_uniform(n: int, shape, generator: torch.Generator | None = None, device=None) -> Tensor:
    """U(0,1) pixels (JEM's U(-1,1) in [-1,1] units)."""
    device = device if device is not None else _source("cpu", generator)
    return _rand((n, *shape), device, generator)


def _noisy(x: Tensor, noise_std: float, generator) -> Tensor:
    """clamp(x + noise_std * eps, 0, 1), eps ~ N(0, I) (no draw when noise_std is 0)."""
    if noise_std > 0:
        x = x + noise_std * _randn(x.shape, x.device, generator)
    return x.clamp(0.0, 1.0)


def _class_gaussian(stats, labels: Tensor, rank_of, noise_std: float, generator, device) -> Tensor:
    """x = mean_y + basis_y[:, :r] (scales_y[:r] * z) + noise_std * eps, z, eps ~ N(0,I), clamped to [0,1]."""
    device = torch.device(device) if device is not None else stats.mean.device
    labels = labels.to(device)
    image_shape = tuple(stats.mean.shape[1:])
    x = torch.empty((len(labels), math.prod(image_shape)), device=device)
    for k in labels.unique().tolist():  # one matmul per class: never an (n, D, r) gather
        rows = (labels == k).nonzero().squeeze(1)
        r = rank_of(k)
        basis = stats.basis[k, :, :r].to(device)
        scales = stats.scales[k, :r].to(device)
        z = _randn((len(rows), r), device, generator)
        x[rows] = stats.mean[k].to(device).flatten() + (z * scales) @ basis.T
    return _noisy(x.view(len(labels), *image_shape), noise_std, generator)


def init_gaussian(stats, labels: Tensor, generator: torch.Generator | None = None, device=None) -> Tensor:
    """Class-conditional Gaussian N(mu_y, Sigma_y + diag_eps I), clamped to [0,1]: x = mu_y + A_y z + sqrt(diag_eps) eps.

    JEM++'s "informative" init and SADA-JEM's mixture components (MultivariateNormal(mean, cov + 1e-4 I) in
    [-1,1] units, then clamp: train_jempp.py:162-182, train_sadajem.py:114-136), JEAT Sec. 2.2's
    x0 ~ N(mu_y, Sigma_y) and Santurkar et al.'s seeds. A_y = `stats.gaussian(y)`'s factor: the exact
    biased class covariance when the training images are attached (z has n_y entries), else the stored
    low-rank basis. Same distribution as the reference's Cholesky draw; not the same draws.
    """
    device = torch.device(device) if device is not None else stats.mean.device
    labels = labels.to(device)
    image_shape = tuple(stats.mean.shape[1:])
    x = torch.empty((len(labels), math.prod(image_shape)), device=device)
    for k in labels.unique().tolist():  # one matmul per class
        rows = (labels == k).nonzero().squeeze(1)
        mean, factor = stats.draw_factor(k, device, x.dtype)
        z = _randn((len(rows), factor.shape[1]), device, generator).to(x.dtype)
        x[rows] = mean + z @ factor.T
    return _noisy(x.view(len(labels), *image_shape), math.sqrt(stats.diag_eps), generator)


def weat_pca_draw(mean: Tensor, components: Tensor, singular_values: Tensor, z: Tensor, sigma: float) -> Tensor:
    """WEAT's class-PCA start (image_generation/utils_func.py, sample_x0_pca), flat images (n, D):

        x0 = clip(mu + sum_i (lambda_i * z_i * sigma_pca) U_i, 0, 1),   z ~ N(0, I)

    mean (D,), components (r, D) rows U_i, singular_values (r,) sklearn's lambda_i, z (n, r). No pixel noise
    is added; sigma_pca scales the coefficients (so the std along U_i is sigma_pca * sqrt(n_y - 1) times the
    class's own std there: 0.35x for CIFAR-10's 5,000 images per class).
    """
    return (mean + (sigma * singular_values * z) @ components).clamp(0.0, 1.0)


def init_pca(stats, labels: Tensor, fraction: float = 0.95, sigma: float = 0.005, generator=None, device=None) -> Tensor:
    """WEAT class-wise PCA init (`weat_pca_draw`) with the components WEAT keeps (`data.weat_pca_rank`).

    fraction is WEAT's retained_variance as sample_x0_pca receives it; its eval.py divides the command-line
    value by 100 (default 0.95 -> 0.0095, which keeps no component: x0 = the class mean).
    """
    from .data import weat_pca_rank, weat_pca_singular_values  # data is the one owner of those rules

    device = torch.device(device) if device is not None else stats.mean.device
    labels = labels.to(device)
    image_shape = tuple(stats.mean.shape[1:])
    x = torch.empty((len(labels), math.prod(image_shape)), device=device, dtype=stats.mean.dtype)
    for k in labels.unique().tolist():
        rows = (labels == k).nonzero().squeeze(1)
        r = weat_pca_rank(stats, k, fraction)
        components = stats.basis[k, :, :r].T.to(device)
        z = _randn((len(rows), r), device, generator).to(x.dtype)
        x[rows] = weat_pca_draw(stats.mean[k].to(device).flatten(), components,
                                weat_pca_singular_values(stats, k, r).to(device), z, sigma)
    return x.view(len(labels), *image_shape)


def init_gm(stats, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """SADA-JEM's Gaussian mixture without labels: a class drawn uniformly (np.random.randint(len(conditionals)),
    train_sadajem.py:39-49), then `init_gaussian` of that class. With labels (the replay buffer's class
    blocks, as init_from_centers fills it) `initialise('gm', labels=...)` is `init_gaussian` itself."""
    labels = _randint(stats.mean.shape[0], (n,), device or stats.mean.device, generator)
    return init_gaussian(stats, labels, generator, device)


def _take(images: Tensor, idx: Tensor, device) -> Tensor:
    """images[idx] as float [0,1] images on `device` (images uint8 in [0,255] or float in [0,1])."""
    picked = images[idx].to(device if device is not None else images.device)
    return picked.float() / 255.0 if picked.dtype == torch.uint8 else picked.float()


def init_from_data(images: Tensor, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """n training images drawn with replacement (uint8 in [0,255] or float in [0,1])."""
    return _take(images, _randint(len(images), (n,), images.device, generator), device)


def _draw_of_class(image_labels: Tensor, labels: Tensor, generator) -> Tensor:
    """For each wanted label y, the index of an image of class y, drawn uniformly with replacement."""
    on = image_labels.device
    labels, idx = labels.to(on), torch.empty(len(labels), dtype=torch.long, device=on)
    for k in labels.unique().tolist():
        pool = (image_labels == k).nonzero().squeeze(1)
        if len(pool) == 0:
            raise ValueError(f"init 'noisy_data': no image of class {k} to start from; "
                             f"the images hold classes {image_labels.unique().tolist()}")
        rows = (labels == k).nonzero().squeeze(1)
        idx[rows] = pool[_randint(len(pool), (len(rows),), on, generator)]
    return idx


def init_noisy_data(images: Tensor, image_labels: Tensor, labels: Tensor, noise_std: float = NOISY_DATA_STD,
                    generator: torch.Generator | None = None, device=None) -> Tensor:
    """WEAT's noise-injection init (papers.md §3.5): x0 = clamp(x_y + noise_std * eps, 0, 1), eps ~ N(0, I).

    x_y is an image of the wanted class y, drawn uniformly with replacement from `images` (the test
    split in the generate stage), so each start keeps its label y. WEAT's code
    (image_generation/utils.py, noise_injection_initialization) adds N(0, (alpha * epsilon)^2) with
    alpha 50, epsilon 8/255 (noise_std ~1.57: after the clamp the start is mostly saturated noise
    tilted towards x_y) and takes the class's images in test-set order from the first 1000 test
    images; we draw from the whole split with the caller's generator instead. `images` are uint8
    in [0,255] or float in [0,1]; `image_labels` (N,) their classes.
    """
    x = _take(images, _draw_of_class(image_labels, labels, generator), device)
    return _noisy(x, noise_std, generator)


INIT_KINDS = ("uniform", "gaussian", "pca", "data", "gm", "noisy_data")


def _check_init(kind: str, shape, stats, data, data_labels=None) -> None:
    if kind not in INIT_KINDS:
        raise ValueError(f"unknown init '{kind}'; use one of {INIT_KINDS}")
    if kind in ("gaussian", "pca", "gm") and stats is None:
        raise ValueError(f"init '{kind}' needs class statistics: pass stats=data.class_stats(...) or use init 'uniform'")
    if kind == "data" and data is None:
        raise ValueError("init 'data' needs data=<training images>; or use init 'uniform'")
    if kind == "noisy_data" and (data is None or data_labels is None or data_labels.shape != (len(data),)):
        raise ValueError("init 'noisy_data' needs data=<images> (the test split) and data_labels=<their (N,) classes>")
    if stats is not None and tuple(stats.mean.shape[1:]) != tuple(shape):
        raise ValueError(f"class statistics are for images {tuple(stats.mean.shape[1:])}, the sampler wants {tuple(shape)}")
    if data is not None and tuple(data.shape[1:]) != tuple(shape):
        raise ValueError(f"init data are images {tuple(data.shape[1:])}, the sampler wants {tuple(shape)}")


def initialise(
    kind: str,
    n: int,
    *,
    shape,
    stats=None,
    labels: Tensor | None = None,
    data: Tensor | None = None,
    generator: torch.Generator | None = None,
    device=None,
    pca_fraction: float = 0.95,
    pca_sigma: float = 0.005,
    data_labels: Tensor | None = None,
    noise_std: float = NOISY_DATA_STD,
) -> Tensor:
    """n starting images (n, *shape) in [0,1] of the given kind.

    'gaussian', 'gm' and 'pca' are class-conditional: without labels the classes are
    drawn uniformly (JEM++, SADA-JEM). 'noisy_data' starts from images of the label's class
    in `data` (classes `data_labels`); without labels from any image of `data`.
    'uniform' and 'data' ignore labels.
    """
    _check_init(kind, shape, stats, data, data_labels)
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images")
    if kind == "uniform":
        return init_uniform(n, shape, generator, device)
    if kind == "data":
        return init_from_data(data, n, generator, device)
    if kind == "noisy_data":
        if labels is None:
            labels = data_labels[_randint(len(data_labels), (n,), data_labels.device, generator)]
        return init_noisy_data(data, data_labels, labels, noise_std, generator, device)
    if kind == "gm" and labels is None:
        return init_gm(stats, n, generator, device)
    if labels is None:
        labels = _randint(stats.mean.shape[0], (n,), device or stats.mean.device, generator)
    if kind in ("gaussian", "gm"):
        return init_gaussian(stats, labels, generator, device)
    return init_pca(stats, labels, pca_fraction, pca_sigma, generator, device)


def make_init_fn(cfg: SamplerConfig, *, shape, stats=None, data=None, device=None) -> InitFn:
    """The `init_fn(labels, generator)` a ReplayBuffer needs, for `cfg.init`."""
    def init_fn(labels: Tensor, generator: torch.Generator | None) -> Tensor:
        return initialise(
            cfg.init, len(labels), shape=shape, stats=stats, labels=labels, data=data,
            generator=generator, device=device,
        )

    _check_init(cfg.init, shape, stats, data)  # fail now, not mid-training
    return init_fn


# ---------------------------------------------------------------- replay buffer


def buffer_size_problem(size: int, num_classes: int) -> str | None:
    """Why a replay buffer of `size` rows cannot hold one equal block per class (None: it can)."""
    if size < num_classes or size % num_classes:
        return f"buffer_size {size} must be a positive multiple of num_classes {num_classes} (one block per class)"
    return None


class ReplayBuffer:
    """JEM's persistent buffer of SGLD chains (PCD).

    Rows are split into `num_classes` contiguous blocks (block k holds class k),
    so `sample(n, y)` can draw class-conditionally; unconditional draws pick any
    row. A Bernoulli(reinit_prob) fraction of each draw is replaced by fresh
    `init_fn(labels, generator)` images, labelled with their block's class; only
    those rows are drawn. `storage='uint8'` keeps 1/4 of the memory and rounds every
    stored chain to 1/255 (values must be in [0,1]); 'float64' keeps chains exact in float64 runs. All randomness comes from the
    buffer's own generator, which `state_dict` saves: a resumed buffer continues
    exactly as an uninterrupted one.
    """

    def __init__(
        self,
        size: int,
        shape,
        num_classes: int,
        init_fn: InitFn,
        reinit_prob: float,
        generator: torch.Generator | None = None,
        device="cpu",
        storage: Literal["float32", "uint8", "float64"] = "float32",
    ):
        if problem := buffer_size_problem(size, num_classes):
            raise ValueError(problem)
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"reinit_prob must be in [0,1], got {reinit_prob}")
        if storage not in ("float32", "uint8", "float64"):
            raise ValueError(f"storage must be 'float32', 'uint8' or 'float64', got '{storage}'")
        self.device = torch.device(device)
        if generator is None:  # own, saveable stream, seeded from the global RNG (seed_everything)
            generator = torch.Generator(device=self.device).manual_seed(int(torch.randint(2**62, ())))
        self.size, self.shape, self.num_classes = size, tuple(shape), num_classes
        self.block = size // num_classes
        self.init_fn, self.reinit_prob, self.generator, self.storage = init_fn, reinit_prob, generator, storage
        self.labels = torch.arange(size, device=self.device) // self.block
        self.buffer = torch.empty((size, *self.shape), device=self.device, dtype=self._dtype)
        self.update(torch.arange(size, device=self.device), self._fresh(self.labels))

    @classmethod
    def from_config(cls, cfg: SamplerConfig, *, shape, num_classes: int, stats=None, data=None, generator=None,
                    device="cpu", storage: Literal["float32", "uint8", "float64"] = "float32") -> "ReplayBuffer":
        """The buffer a method's sampler section asks for (size, reinit rate, init kind)."""
        init_fn = make_init_fn(cfg, shape=shape, stats=stats, data=data, device=device)
        return cls(cfg.buffer_size, shape, num_classes, init_fn, cfg.reinit_prob, generator, device, storage)

    @property
    def _dtype(self) -> torch.dtype:
        return {"uint8": torch.uint8, "float32": torch.float32, "float64": torch.float64}[self.storage]

    def __len__(self) -> int:
        return self.size

    def _fresh(self, labels: Tensor) -> Tensor:
        x = self.init_fn(labels, self.generator).to(self.device)
        if x.shape != (len(labels), *self.shape):
            raise ValueError(f"init_fn returned {tuple(x.shape)}, expected {(len(labels), *self.shape)}")
        return x

    def sample(self, n: int, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """n starting points (float32, float64 for that storage, on the buffer's device) and their row indices."""
        if y is None:
            idx = _randint(self.size, (n,), self.device, self.generator)
        else:
            if y.shape != (n,) or int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise ValueError(f"y must be {n} class indices in [0, {self.num_classes}), got shape {tuple(y.shape)}")
            idx = y.to(self.device) * self.block + _randint(self.block, (n,), self.device, self.generator)
        x = self._decode(self.buffer[idx])
        reinit = (_rand((n,), self.device, self.generator) < self.reinit_prob).nonzero().squeeze(1)
        if len(reinit):
            x[reinit] = self._fresh(self.labels[idx[reinit]])
        return x, idx

    def update(self, idx: Tensor, x: Tensor) -> None:
        """Write the chains' new states back (JEM pushes x_K after every sampler call)."""
        x = x.detach().to(self.device)
        if self.storage == "uint8":
            x = (x.clamp(0.0, 1.0) * 255).round()
        self.buffer[idx.to(self.device)] = x.to(self._dtype)

    @property
    def images(self) -> Tensor:
        """The whole buffer as float32 [0,1] images (JEM-family samples for IS/FID)."""
        return self._decode(self.buffer)

    def _decode(self, rows: Tensor) -> Tensor:
        return rows.float() / 255.0 if self.storage == "uint8" else rows.clone()  # float rows keep their dtype

    def state_dict(self) -> dict:
        return {
            "buffer": self.buffer,
            "generator": self.generator.get_state(),
            "num_classes": self.num_classes,
            "storage": self.storage,
        }

    def load_state_dict(self, state: dict) -> None:
        buffer = state["buffer"]
        if tuple(buffer.shape) != (self.size, *self.shape) or state["num_classes"] != self.num_classes:
            raise ValueError(
                f"saved buffer is {tuple(buffer.shape)} with {state['num_classes']} classes, this one is "
                f"{(self.size, *self.shape)} with {self.num_classes}; build the buffer with the run's own settings"
            )
        if state["storage"] != self.storage:
            raise ValueError(f"saved buffer stores {state['storage']}, this one {self.storage}; use the same storage")
        self.buffer.copy_(buffer)
        try:
            self.generator.set_state(state["generator"].cpu())
        except RuntimeError as err:
            raise RuntimeError(
                f"cannot restore the buffer's {self.generator.device} generator from the saved state: resume on the same device type"
            ) from err
