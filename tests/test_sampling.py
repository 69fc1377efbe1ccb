"""Samplers against their definitions: Langevin stationary laws, PYLD's layer-one step, inits, buffer."""

import io
import math
import pytest
import torch
from torch import nn

from robust_ebm.data import ClassStats
from robust_ebm.energy import marginal_energy
from robust_ebm.sampling import (
    NOISY_DATA_STD,
    ReplayBuffer,
    SamplerConfig,
    init_gaussian,
    init_gm,
    init_noisy_data,
    init_pca,
    init_uniform,
    initialise,
    make_init_fn,
    pyld,
    sampler_energy,
    sgld,
)

MU, SIGMA = 0.3, 0.1


class Quadratic(nn.Module):
    """One class with logit -||x - mu||^2 / (2 sigma^2): E(x) = E(x, 0) = ||x - mu||^2 / (2 sigma^2)."""

    def __init__(self, mu=MU, sigma=SIGMA):
        super().__init__()
        self.mu, self.sigma = mu, sigma
        self.gain = nn.Parameter(torch.ones(()))  # a parameter, to check that sampling leaves .grad alone
        self.modes_seen = []

    def forward(self, x):
        self.modes_seen.append(self.training)
        return -self.gain * ((x - self.mu) ** 2).flatten(1).sum(1, keepdim=True) / (2 * self.sigma**2)


class TinyClassifier(nn.Module):
    """The Classifier contract in miniature: forward(x) = fc(trunk_from_stem(stem(normalize(x)))), [-1,1] inputs."""

    def __init__(self, k=3, c=2, s=4):
        super().__init__()
        torch.manual_seed(0)
        self.normalize = _Symmetric()
        self.stem = nn.Conv2d(c, 4, 3, padding=1)  # linear: the PYLD Hamiltonian is linear in x
        self.body = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(4 * s * s, 8), nn.Tanh())
        self.fc = nn.Linear(8, k)

    def trunk_from_stem(self, h):
        return self.body(h)

    def forward(self, x):
        return self.fc(self.trunk_from_stem(self.stem(self.normalize(x))))


class _Symmetric(nn.Module):
    def forward(self, x):
        return (x - 0.5) / 0.5


def _stats(scales, k=2, shape=(1, 2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    basis = torch.stack([torch.linalg.qr(torch.randn(d, d, generator=g))[0] for _ in range(k)])
    mean = 0.5 + 0.05 * torch.randn(k, *shape, generator=g)
    scales = torch.tensor(scales).expand(k, d).clone()
    return ClassStats(mean, basis, scales, torch.full((k,), 10), scales.pow(2).sum(1), diag_eps=1e-6)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ Langevin dynamics


def test_coupled_sgld_samples_the_boltzmann_gaussian():
    # E = |x-mu|^2/(2 s^2), so exp(-E) = N(mu, s^2). Coupled step: d' = (1 - a/(2 s^2)) d + sqrt(a) xi,
    # stationary Var = s^2 / (1 - a/(4 s^2)) -> s^2 as a -> 0 (here 0.5 % above).
    cfg = SamplerConfig(energy="marginal", coupled=True, step_size=0.02 * SIGMA**2, steps=1500, clamp=False)
    x = sgld(Quadratic(), torch.rand(2000, 4, generator=_gen()), cfg, generator=_gen(1))
    n = x.numel()
    assert abs(x.mean().item() - MU) < 4 * SIGMA / math.sqrt(n)
    assert x.var().item() == pytest.approx(SIGMA**2, rel=4 * math.sqrt(2 / n) + 0.005)


def test_decoupled_sgld_has_its_own_stationary_variance():
    # d' = (1 - s/sigma^2) d + t xi  =>  Var = (1 - s/sigma^2)^2 Var + t^2  =>  Var = t^2 / (1 - (1 - s/sigma^2)^2),
    # which is not sigma^2: JEM's de-coupled step and noise do not sample exp(-E).
    step, noise = 0.1 * SIGMA**2, 0.01
    cfg = SamplerConfig(coupled=False, step_size=step, noise_std=noise, steps=300, clamp=False)
    x = sgld(Quadratic(), torch.rand(2000, 4, generator=_gen()), cfg, generator=_gen(1))
    theory = noise**2 / (1 - (1 - step / SIGMA**2) ** 2)
    assert x.var().item() == pytest.approx(theory, rel=4 * math.sqrt(2 / x.numel()))
    assert abs(x.mean().item() - MU) < 4 * math.sqrt(theory / x.numel())


def test_momentum_recursion_and_energy_descent():
    model, step, m = Quadratic(), 1e-3, 0.5
    cfg = SamplerConfig(step_size=step, noise_std=0.0, momentum=m, steps=2, clamp=False)
    x0 = torch.rand(5, 3, generator=_gen())
    grad = lambda x: (x - MU) / SIGMA**2  # noqa: E731
    v1 = -step * grad(x0)
    x1 = x0 + v1
    x2 = x1 + m * v1 - step * grad(x1)
    torch.testing.assert_close(sgld(model, x0, cfg), x2)

    noisy = cfg.model_copy(update={"noise_std": 0.01, "steps": 30})
    x = sgld(model, x0, noisy, generator=_gen(1))
    assert marginal_energy(model(x)).mean() < 0.1 * marginal_energy(model(x0)).mean()


def test_gradient_and_update_clips():
    model, x0 = Quadratic(sigma=0.01), torch.rand(4, 6, generator=_gen())
    grad = (x0 - MU) / 0.01**2
    cfg = SamplerConfig(step_size=1e-5, noise_std=0.0, steps=1, clamp=False, grad_clip=50.0)
    torch.testing.assert_close(sgld(model, x0, cfg), x0 - 1e-5 * grad.clamp(-50, 50))
    cfg = SamplerConfig(step_size=1e-3, noise_std=0.0, steps=1, clamp=False, update_clip=0.01)
    torch.testing.assert_close(sgld(model, x0, cfg), x0 + (-1e-3 * grad).clamp(-0.01, 0.01))
    cfg = SamplerConfig(step_size=1.0, noise_std=0.0, steps=1, clamp=True)
    out = sgld(model, x0, cfg)
    assert out.min() >= 0 and out.max() <= 1


def test_sgld_restores_mode_accumulates_no_grad_and_returns_detached():
    model = Quadratic().train()
    cfg = SamplerConfig(steps=3, model_mode="eval")
    x, trace = sgld(model, torch.rand(4, 3, generator=_gen()), cfg, generator=_gen(), return_trace=True)
    assert model.modes_seen == [False] * 3 and model.training
    assert model.gain.grad is None and not x.requires_grad
    assert trace.shape == (3, 4)
    torch.testing.assert_close(trace[0], sampler_energy(model, torch.rand(4, 3, generator=_gen()), None, "marginal"))


def test_mode_restored_after_error_and_labels_checked_first():
    class Boom(Quadratic):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        sgld(model, torch.rand(2, 3), SamplerConfig(model_mode="eval"))
    assert model.training
    with pytest.raises(ValueError, match="needs labels"):
        sgld(Quadratic(), torch.rand(2, 3), SamplerConfig(energy="joint"))


def test_joint_and_ce_energies():
    net, x = TinyClassifier(), torch.rand(5, 2, 4, 4, generator=_gen())
    y = torch.tensor([0, 1, 2, 0, 1])
    logits = net(x)
    torch.testing.assert_close(sampler_energy(net, x, y, "joint"), -logits[torch.arange(5), y])
    torch.testing.assert_close(
        sampler_energy(net, x, y, "ce"), torch.nn.functional.cross_entropy(logits, y, reduction="none")
    )


def test_jem_step_converts_from_symmetric_units():
    # JEM: x' <- x' + 1.0 * grad_x' f(x') with x' = 2x - 1, f = logsumexp; ours: step 0.25 on E in [0,1] units.
    net, x = TinyClassifier(), torch.rand(3, 2, 4, 4, generator=_gen())
    xs = (2 * x - 1).requires_grad_(True)
    f = torch.logsumexp(net.fc(net.body(net.stem(xs))), 1).sum()
    jem = xs + 1.0 * torch.autograd.grad(f, xs)[0]
    ours = sgld(net, x, SamplerConfig(step_size=0.25, noise_std=0.0, steps=1, clamp=False))
    torch.testing.assert_close(2 * ours - 1, jem.detach())


# ------------------------------------------------------------------ PYLD


def test_pyld_inner_steps_are_clipped_gradient_steps():
    # Linear stem: grad_x <p, stem(normalize(x))> = J^T p = grad_x E(x0) for every inner step.
    net, x0 = TinyClassifier(), torch.rand(3, 2, 4, 4, generator=_gen())
    x = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(marginal_energy(net(x)).sum(), x)
    cfg = SamplerConfig(kind="pyld", steps=1, inner_steps=3, inner_lr=0.01, noise_std=0.0, clamp=False)
    torch.testing.assert_close(pyld(net, x0, cfg), x0 - 3 * 0.01 * g)
    clipped = cfg.model_copy(update={"grad_clip": 0.5 * g.abs().max().item()})
    c = clipped.grad_clip
    torch.testing.assert_close(pyld(net, x0, clipped), x0 - 3 * 0.01 * g.clamp(-c, c))
    assert net.stem.weight.grad is None


def test_pyld_converts_from_jempp_units():
    # JEM++: x' <- x' + 0.2 * clamp(grad_x' <p_f, conv1(x')>, -1, 1), p_f = df/dh; ours: inner_lr 0.05, grad_clip 2.
    net, x = TinyClassifier(), torch.rand(3, 2, 4, 4, generator=_gen())
    xs = 2 * x - 1
    h = net.stem(xs).detach().requires_grad_(True)
    (p_f,) = torch.autograd.grad(torch.logsumexp(net.fc(net.body(h)), 1).sum(), h)
    xs = xs.requires_grad_(True)
    (g,) = torch.autograd.grad((p_f * net.stem(xs)).sum(), xs)
    jempp = (xs + 0.2 * g.clamp(-1, 1)).clamp(-1, 1)
    cfg = SamplerConfig(kind="pyld", steps=1, inner_steps=1, inner_lr=0.05, grad_clip=2.0, noise_std=0.0)
    torch.testing.assert_close(2 * pyld(net, x, cfg) - 1, jempp.detach())


def test_pyld_lowers_energy_and_restores_mode():
    net = TinyClassifier().train()
    x0 = torch.rand(8, 2, 4, 4, generator=_gen())
    cfg = SamplerConfig(kind="pyld", steps=5, inner_steps=2, inner_lr=0.02, noise_std=0.0, model_mode="eval")
    x, trace = pyld(net, x0, cfg, return_trace=True)
    with torch.no_grad():
        assert marginal_energy(net(x)).mean() < marginal_energy(net(x0)).mean()
    assert trace.shape == (5, 8) and net.training
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(TypeError, match="stem"):
        pyld(Quadratic(), torch.rand(2, 3), cfg)


# ------------------------------------------------------------------ initialisations


def test_init_gaussian_matches_class_mean_and_covariance():
    stats = _stats([0.1, 0.08, 0.06, 0.05, 0.04, 0.03])
    labels = torch.ones(20000, dtype=torch.long)
    x = init_gaussian(stats, labels, _gen()).flatten(1)
    u, s = stats.basis[1], stats.scales[1]
    cov = u @ torch.diag(s**2) @ u.T + stats.diag_eps * torch.eye(6)
    torch.testing.assert_close(x.mean(0), stats.mean[1].flatten(), atol=4 * 0.1 / math.sqrt(20000), rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=5e-4, rtol=0)


def test_init_pca_is_weats_formula_with_the_components_weat_keeps():
    # variances 0.0064, 0.0016, tiny...: 80 % in the first, 99.8 % in the first two. WEAT keeps the leading
    # components whose cumulative share is still below the fraction: 1 for 95 %, none for eval.py's 0.0095.
    stats = _stats([0.08, 0.04, 0.004, 0.001, 0.0005, 0.0001])  # 10 images per class: lambda_i = 3 * scale_i
    x = init_pca(stats, torch.zeros(4000, dtype=torch.long), fraction=0.95, sigma=0.1, generator=_gen())
    coeff = (x.flatten(1) - stats.mean[0].flatten()) @ stats.basis[0]
    assert coeff[:, 0].std() == pytest.approx(0.1 * 3 * 0.08, rel=0.1)   # sigma_pca * singular value
    torch.testing.assert_close(coeff[:, 1:], torch.zeros_like(coeff[:, 1:]), atol=1e-5, rtol=0)  # no added noise
    mean_only = init_pca(stats, torch.ones(3, dtype=torch.long), fraction=0.0095, generator=_gen())
    torch.testing.assert_close(mean_only, stats.mean[1].expand(3, -1, -1, -1).clamp(0, 1))


def test_inits_are_images_in_unit_range_and_check_their_inputs():
    stats = _stats([0.3] * 6)
    for x in (init_uniform(7, (1, 2, 3), _gen()), init_gm(stats, 7, _gen()), init_gaussian(stats, torch.zeros(7, dtype=torch.long))):
        assert x.shape == (7, 1, 2, 3) and x.min() >= 0 and x.max() <= 1
    data = torch.randint(0, 256, (10, 1, 2, 3), dtype=torch.uint8)
    x = initialise("data", 5, shape=(1, 2, 3), data=data, generator=_gen())
    assert ((x * 255).round().to(torch.uint8).unsqueeze(1) == data.unsqueeze(0)).flatten(2).all(2).any(1).all()
    with pytest.raises(ValueError, match="class statistics"):
        initialise("gaussian", 3, shape=(1, 2, 3))
    with pytest.raises(ValueError, match="sampler wants"):
        initialise("gm", 3, shape=(3, 2, 2), stats=stats)


def _class_images(per_class=5, k=3, shape=(1, 2, 3), seed=0):
    """uint8 images whose pixels lie in class k's band [60k + 40, 60k + 80) (classes tell apart), labels."""
    labels = torch.arange(k).repeat_interleave(per_class)
    offsets = torch.randint(0, 40, (len(labels), *shape), generator=_gen(seed))
    return (60 * labels.view(-1, 1, 1, 1) + 40 + offsets).to(torch.uint8), labels


def test_init_noisy_data_starts_from_an_image_of_the_wanted_class():
    images, image_labels = _class_images()
    wanted = torch.tensor([2, 0, 1, 1, 2, 0, 0])
    x = initialise("noisy_data", 7, shape=(1, 2, 3), labels=wanted, data=images, data_labels=image_labels,
                   noise_std=0.0, generator=_gen())
    assert x.shape == (7, 1, 2, 3) and x.dtype == torch.float32
    same = ((x * 255).round().to(torch.uint8).unsqueeze(1) == images.unsqueeze(0)).flatten(2).all(2)  # (7, N)
    assert same.any(1).all()                                                   # each start is a data image...
    assert torch.equal(image_labels[same.float().argmax(1)], wanted)          # ...of the wanted class
    again = init_noisy_data(images, image_labels, wanted, 0.0, generator=_gen())
    assert torch.equal(x, again)                                              # one generator, one draw
    unlabelled = initialise("noisy_data", 4, shape=(1, 2, 3), data=images, data_labels=image_labels, noise_std=0.0)
    assert ((unlabelled * 255).round().to(torch.uint8).unsqueeze(1) == images.unsqueeze(0)).flatten(2).all(2).any(1).all()


def test_init_noisy_data_default_noise_is_weats_and_is_clamped():
    images, image_labels = _class_images()
    x = initialise("noisy_data", 2000, shape=(1, 2, 3), labels=torch.ones(2000, dtype=torch.long),
                   data=images, data_labels=image_labels, generator=_gen())   # default noise_std
    assert NOISY_DATA_STD == pytest.approx(50 * 8 / 255)
    assert x.min() == 0 and x.max() == 1                                      # clamped, and the clamp bites:
    saturated = ((x == 0) | (x == 1)).float().mean()                           # P(|x + N(0, 1.57^2) - 0.5| > 0.5)
    assert saturated == pytest.approx(0.74, abs=0.03)                          # for pixels near 0.5


def test_init_noisy_data_averages_to_the_image_for_small_noise():
    image = torch.rand((1, 1, 2, 3), generator=_gen(3)) * 0.6 + 0.2            # away from the clamp
    images = torch.cat([image, torch.zeros_like(image)])                        # class 1: one image; class 0: black
    n, std = 4000, 0.05
    x = init_noisy_data(images, torch.tensor([1, 0]), torch.ones(n, dtype=torch.long), std, generator=_gen())
    torch.testing.assert_close(x.mean(0), image[0], atol=4 * std / math.sqrt(n), rtol=0)
    assert x.std(0).mean() == pytest.approx(std, rel=0.05)


def test_init_noisy_data_checks_its_inputs():
    images, image_labels = _class_images()
    with pytest.raises(ValueError, match="data_labels"):
        initialise("noisy_data", 3, shape=(1, 2, 3), labels=torch.zeros(3, dtype=torch.long), data=images)
    with pytest.raises(ValueError, match="no image of class 5"):
        initialise("noisy_data", 2, shape=(1, 2, 3), labels=torch.tensor([0, 5]), data=images, data_labels=image_labels)
    with pytest.raises(ValueError, match="Input should be"):   # training samplers never start from test images
        SamplerConfig(init="noisy_data")


# ------------------------------------------------------------------ replay buffer


class CountingUniform:
    def __init__(self, shape):
        self.shape, self.calls = shape, []

    def __call__(self, labels, generator):
        self.calls.append(labels.clone())
        return init_uniform(len(labels), self.shape, generator)


def test_reinit_fraction_and_only_reinit_rows_are_drawn():
    init = CountingUniform((2,))
    buf = ReplayBuffer(1000, (2,), 1, init, reinit_prob=0.1, generator=_gen())
    buf.update(torch.arange(1000), torch.full((1000, 2), 2.0))  # a value no init produces
    x, _ = buf.sample(4000)
    fresh = (x[:, 0] != 2.0).float()
    assert fresh.mean().item() == pytest.approx(0.1, abs=4 * math.sqrt(0.1 * 0.9 / 4000))
    assert len(init.calls[-1]) == int(fresh.sum())  # draws only the re-initialised rows


def test_class_conditional_sampling_uses_the_class_block():
    init = CountingUniform((2,))
    buf = ReplayBuffer(100, (2,), 5, init, reinit_prob=0.5, generator=_gen())
    x, idx = buf.sample(50, torch.full((50,), 3))
    assert ((idx >= 60) & (idx < 80)).all()
    assert (init.calls[-1] == 3).all()
    with pytest.raises(ValueError, match="multiple of num_classes"):
        ReplayBuffer(101, (2,), 5, init, reinit_prob=0.5)


def test_buffer_resumes_exactly_through_torch_save():
    def make(seed):
        return ReplayBuffer(60, (1, 2, 2), 3, CountingUniform((1, 2, 2)), 0.3, generator=_gen(seed), storage="uint8")

    run = make(0)
    x, idx = run.sample(16)
    run.update(idx, x * 0.5)
    blob = io.BytesIO()
    torch.save(run.state_dict(), blob)
    blob.seek(0)
    resumed = make(123)
    resumed.load_state_dict(torch.load(blob, weights_only=True))
    y = torch.tensor([0, 2, 1, 1])
    (xa, ia), (xb, ib) = run.sample(4, y), resumed.sample(4, y)
    assert torch.equal(ia, ib) and torch.equal(xa, xb)
    assert torch.equal(run.images, resumed.images)


def test_make_init_fn_feeds_the_buffer_with_class_gaussians():
    stats = _stats([0.05] * 6, k=3)
    cfg = SamplerConfig(init="gaussian", buffer_size=300, reinit_prob=0.0)
    buf = ReplayBuffer.from_config(cfg, shape=(1, 2, 3), num_classes=3, stats=stats, generator=_gen())
    block_means = buf.images.view(3, 100, -1).mean(1)
    torch.testing.assert_close(block_means, stats.mean.flatten(1), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="class statistics"):
        make_init_fn(SamplerConfig(init="pca"), shape=(1, 2, 3))


def test_pyld_first_inner_step_is_the_full_gradient_on_a_real_classifier():
    # At the outer point grad_x <p, stem(normalize(x))> = grad_x E(x) by the chain rule, for any stem.
    from robust_ebm.models import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch="tiny_cnn", width=4, norm="batch", input_range="symmetric")
    net = build_model(cfg, num_classes=3, in_channels=1, image_size=8).train()
    x0, y = torch.rand(4, 1, 8, 8, generator=_gen()), torch.tensor([0, 1, 2, 0])
    sampler = SamplerConfig(kind="pyld", energy="joint", steps=1, inner_steps=1, inner_lr=0.1, noise_std=0.0, clamp=False)
    out = pyld(net, x0, sampler, y=y)
    assert net.training
    x = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(sampler_energy(net.eval(), x, y, "joint").sum(), x)
    torch.testing.assert_close(out, x0 - 0.1 * g)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_buffer_and_sgld_draw_on_the_gpu():
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    stats = _stats([0.05] * 6, k=3)
    cfg = SamplerConfig(init="gm", buffer_size=30, reinit_prob=0.5, steps=2)
    buf = ReplayBuffer.from_config(cfg, shape=(1, 2, 3), num_classes=3, stats=stats, generator=gen, device=device)
    x0, idx = buf.sample(8)
    x = sgld(Quadratic().to(device), x0, cfg, generator=gen)
    buf.update(idx, x)
    assert x.device.type == "cuda" and buf.images.device.type == "cuda"
