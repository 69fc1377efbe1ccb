"""Golden fixtures of the JEM family: architectures, JEM / JEM++ / SADA-JEM training steps, inits.

Run: python tests/golden/make_golden.py --refs /work/refs --only jem

Every reference function runs as released, in float64 on the CPU, with these minimal patches
(each fixture's `note` repeats the ones it needed):
- `F.avg_pool2d(out, 8)` (or 4) of the reference nets is replaced by a global average pool for the
  small images (12x12, 8x8) of the block-by-block comparison; a second 32x32 input runs the
  unpatched pool and checks the logits.
- the reference's torch RNG calls (`t.randint`, `t.rand`, `t.randn_like`, `np.random.randint`,
  MultivariateNormal sampling) return stored tensors (`_Rng`), which our code receives through
  its generator-free seams (buffer indices, reinit mask, fresh draws, Langevin noise).
- stubs for imports no fixture uses: tensorboardX, GPUtil.
"""

from __future__ import annotations

import types
from pathlib import Path

import matplotlib.pyplot  # noqa: F401  imported once here: Reference.load drops every module first
import numpy as np  # noqa: F401          imported during a load, and torch/torchvision cannot be imported twice
import torch
import torch.nn.functional as F
import torchvision  # noqa: F401
import tqdm  # noqa: F401

from golden import nets
from golden.common import float64, patched, save_fixture, stub_module

from robust_ebm import reference_weights

REPOSITORIES = ("wgrathwohl/JEM", "sndnyang/JEMPP", "sndnyang/SADAJEM", "yaodongyu/TRADES")

STUBS = {"tensorboardX": stub_module("tensorboardX", SummaryWriter=object), "GPUtil": stub_module("GPUtil")}
POOL_NOTE = "F.avg_pool2d replaced by a global average pool for the small-image block comparison only"


def _global_pool_functional():
    """torch.nn.functional with avg_pool2d(out, k) -> global average pool (small images)."""
    ns = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    ns.avg_pool2d = lambda out, kernel: F.adaptive_avg_pool2d(out, 1)
    return ns


# ---------------------------------------------------------------- architectures

def _ref_wrn_jem_blocks(net):
    """JEM / JEM++ / SADA-JEM CCF: f.conv1, f.layer{s}[b]."""
    pairs = [("stem", net.f.conv1)]
    for s in (1, 2, 3):
        pairs += [(f"stage{s}.{j}", b) for j, b in enumerate(getattr(net.f, f"layer{s}"))]
    return pairs


def _ref_trades_blocks(net):
    pairs = [("stem", net.conv1)]
    for s in (1, 2, 3):
        pairs += [(f"stage{s}.{j}", b) for j, b in enumerate(getattr(net, f"block{s}").layer)]
    return pairs


def _ref_resnet_blocks(net):
    pairs = [("stem", net.conv1)]
    for s in (1, 2, 3, 4):
        pairs += [(f"stage{s}.{j}", b) for j, b in enumerate(getattr(net, f"layer{s}"))]
    return pairs


def _arch_fixture(name, ref, relpath, function, cfg, layout, build_ref, ref_input, ref_pool_module, ref_blocks,
                  ref_logits, *, small: int, n_small: int, extra_note: str = ""):
    """Load our formula weights into the reference class; compare every block and the logits."""
    with float64():
        ours = nets.build(cfg, image_size=small)
        reference = build_ref()
        ref_state = reference_weights.to_reference(ours.state_dict(), layout)
        reference.load_state_dict(ref_state, strict=True)
        x_small, x32 = nets.images(n_small, small, seed=1), nets.images(2, 32, seed=2)
        outputs = {}
        for mode in (("eval", "train") if cfg.norm == "batch" else ("eval",)):
            reference.load_state_dict(ref_state, strict=True)   # fresh running statistics
            reference.train(mode == "train")
            captured, handles = nets.capture(ref_blocks(reference))
            with torch.no_grad(), patched(ref_pool_module, F=_global_pool_functional()):
                logits = ref_logits(reference, ref_input(x_small))
            for h in handles:
                h.remove()
            if mode == ("train" if cfg.norm == "batch" else "eval"):   # BN nets: the batch-statistics pass
                # the first image's outputs (both images enter the batch statistics): halves the file
                outputs["blocks"], outputs["blocks_mode"] = {k: v[:1].clone() for k, v in captured.items()}, mode
            outputs[f"logits_small_{mode}"] = logits
            if mode == "train":
                outputs["running_after_train_forward"] = {
                    k: v.clone() for k, v in reference_weights.from_reference(reference.state_dict(), layout).items()
                    if k.endswith(("running_mean", "running_var"))}
        reference.load_state_dict(ref_state, strict=True)
        reference.eval()
        with torch.no_grad():
            outputs["logits_32_eval"] = ref_logits(reference, ref_input(x32))   # unpatched pooling
        outputs["reference_keys"] = sorted(ref_state)
        outputs["reference_shapes"] = {k: list(v.shape) for k, v in ref_state.items()}
    return save_fixture(
        f"arch_{name}", source=ref.source(relpath, function),
        inputs={"model_config": cfg.model_dump(), "layout": layout, "x_small": x_small, "x32": x32,
                "weight_digest": nets.weight_digest(ours)},
        outputs=outputs, note=f"{POOL_NOTE}. {extra_note}".strip())


def generate_architectures(refs) -> list[Path]:
    out = []
    jem = refs["wgrathwohl/JEM"]
    with float64():
        jem_train = jem.load("train_wrn_ebm.py", stubs=STUBS)
    out.append(_arch_fixture(
        "wrn_jem", jem, "wideresnet.py", "Wide_ResNet / wide_basic via train_wrn_ebm.CCF.classify", nets.JEM_WRN, "jem",
        lambda: jem_train.CCF(16, 1, norm=None, n_classes=10), lambda x: 2 * x - 1, jem_train.wideresnet,
        _ref_wrn_jem_blocks, lambda net, x: net.classify(x), small=12, n_small=2))

    jempp = refs["sndnyang/JEMPP"]
    with float64():
        jempp_train = jempp.load("train_jempp.py", stubs=STUBS)
    jempp_models = jempp_train.get_model_and_buffer.__globals__
    out.append(_arch_fixture(
        "wrn_jempp", jempp, "models/wideresnet_yopo.py", "Wide_ResNet / wide_basic via models/jem_models.CCF(model='yopo')",
        nets.JEMPP_WRN, "jempp",
        lambda: jempp_models["CCF"](16, 1, norm="batch", n_classes=10, model="yopo"), lambda x: 2 * x - 1,
        jempp_models["wideresnet_yopo"], _ref_wrn_jem_blocks, lambda net, x: net.classify(x), small=12, n_small=2))

    sada = refs["sndnyang/SADAJEM"]
    with float64():
        sada_train = sada.load("train_sadajem.py", stubs=STUBS)
    sada_models = sada_train.get_model_and_buffer.__globals__
    out.append(_arch_fixture(
        "wrn_sadajem", sada, "models/wideresnet.py", "Wide_ResNet / wide_basic via models/jem_models.CCF(model='wrn')",
        nets.JEMPP_WRN, "sadajem",
        lambda: sada_models["CCF"](16, 1, norm="batch", n_classes=10, model="wrn"), lambda x: 2 * x - 1,
        sada_models["wideresnet"], _ref_wrn_jem_blocks, lambda net, x: net.classify(x), small=12, n_small=2))

    trades = refs["yaodongyu/TRADES"]
    with float64():
        trades_wrn = trades.load("models/wideresnet.py")
        trades_resnet = trades.load("models/resnet.py")
    out.append(_arch_fixture(
        "wrn_trades", trades, "models/wideresnet.py", "WideResNet / BasicBlock (same file in MART and MAIL)",
        nets.TRADES_WRN, "trades_wrn", lambda: trades_wrn.WideResNet(depth=16, num_classes=10, widen_factor=1),
        lambda x: x, trades_wrn, _ref_trades_blocks, lambda net, x: net(x), small=12, n_small=2))
    out.append(_arch_fixture(
        "resnet18", trades, "models/resnet.py", "ResNet18 (kuangliu; same classes in MART and MAIL resnet.py)",
        nets.RESNET18, "resnet18", lambda: trades_resnet.ResNet18(), lambda x: x, trades_resnet,
        _ref_resnet_blocks, lambda net, x: net(x), small=8, n_small=2))
    return out


# ---------------------------------------------------------------- training steps

class _Rng:
    """Stand-in for the reference module's `t` (torch): the RNG calls return stored tensors in order."""

    def __init__(self, **queues):
        self.queues = {k: list(v) for k, v in queues.items()}

    def _pop(self, name, shape=None):
        value = self.queues[name].pop(0)
        if shape is not None:
            assert tuple(value.shape) == tuple(shape), f"{name}: stored {tuple(value.shape)}, asked {tuple(shape)}"
        return value.clone()

    def randint(self, low, high, size):
        return self._pop("randint", size)

    def rand(self, *size):
        return self._pop("rand", size[0] if len(size) == 1 and isinstance(size[0], tuple) else size)

    def randn_like(self, x):
        return self._pop("randn_like", x.shape)

    def __getattr__(self, name):
        return getattr(torch, name)

    def assert_used(self):
        left = {k: len(v) for k, v in self.queues.items() if v}
        assert not left, f"stored draws left unused: {left}"


def _step_inputs(seed: int, n_steps: int, *, noise: bool):
    """Batch, buffer and every random draw of one training step (pixels in [0,1], float64)."""
    g = torch.Generator().manual_seed(seed)
    b, s, k, size = nets.METHOD_BATCH, nets.METHOD_SIZE, nets.METHOD_CLASSES, nets.METHOD_BUFFER
    inputs = {
        "x": nets.images(b, s, seed=seed + 1), "y": torch.tensor([0, 3, 1, 2]),
        "x_px": nets.images(b, s, seed=seed + 2), "buffer": nets.images(size, s, seed=seed + 3),
        "buffer_idx": torch.randperm(size, generator=g)[:b],
        "reinit_u": torch.tensor([0.01, 0.6, 0.03, 0.9], dtype=torch.float64),   # rows 0 and 2 restart (p = 0.05)
        "fresh": nets.images(b, s, seed=seed + 4),          # the init draw of every row; restarted rows use it
        "reinit_prob": 0.05, "num_classes": k, "steps": n_steps,
    }
    if noise:
        inputs["langevin_noise"] = torch.randn((n_steps, b, 3, s, s), generator=g, dtype=torch.float64)
    return inputs


def _sym(x):
    return 2 * x - 1


def _pix(x):
    return (x + 1) / 2


def _rng_for(inputs):
    queues = {"randint": [inputs["buffer_idx"]], "rand": [inputs["reinit_u"]]}
    if "langevin_noise" in inputs:
        queues["randn_like"] = list(inputs["langevin_noise"])
    return _Rng(**queues)


def _grads(net, layout):
    return reference_weights.from_reference(
        {k: p.grad for k, p in net.named_parameters(remove_duplicate=False) if p.grad is not None}, layout)


def _ref_net(build, ours, layout):
    net = build()
    net.load_state_dict(reference_weights.to_reference(ours.state_dict(), layout), strict=True)
    return net.train()


def generate_jem_step(refs) -> Path:
    """JEM: PCD-SGLD (train_wrn_ebm.py get_sample_q) + the loss of main() + every gradient."""
    ref = refs["wgrathwohl/JEM"]
    with float64():
        mod = ref.load("train_wrn_ebm.py", stubs=STUBS)
        ours = nets.build(nets.JEM_WRN10, num_classes=nets.METHOD_CLASSES, image_size=nets.METHOD_SIZE)
        inputs = _step_inputs(100, 3, noise=True)
        f = _ref_net(lambda: mod.CCF(10, 1, norm=None, n_classes=nets.METHOD_CLASSES), ours, "jem")
        args = types.SimpleNamespace(batch_size=nets.METHOD_BATCH, n_classes=nets.METHOD_CLASSES, uncond=False,
                                     reinit_freq=inputs["reinit_prob"], sgld_lr=1.0, sgld_std=1e-2,
                                     n_steps=inputs["steps"])
        replay = _sym(inputs["buffer"]).clone()
        rng = _rng_for(inputs)
        with patched(mod, t=rng, init_random=lambda a, bs: _sym(inputs["fresh"]).clone()), \
                patched(mod.wideresnet, F=_global_pool_functional()):
            x_q = mod.get_sample_q(args, "cpu")(f, replay)
            rng.assert_used()
            fp, fq = f(_sym(inputs["x_px"])).mean(), f(x_q).mean()       # main(): lines 321-330
            l_p_x = -(fp - fq)
            ce = torch.nn.CrossEntropyLoss()(f.classify(_sym(inputs["x"])), inputs["y"])
            loss = 1.0 * l_p_x + 1.0 * ce
            f.zero_grad()
            loss.backward()
        outputs = {"x_sgld": _pix(x_q), "buffer_after": _pix(replay), "loss": loss.detach(), "px": l_p_x.detach(),
                   "ce": ce.detach(), "grads": nets.grad_record(_grads(f, "jem"))}
    inputs |= {"model_config": nets.JEM_WRN10.model_dump(), "weight_digest": nets.weight_digest(ours),
               "settings": {"sgld_lr": 1.0, "sgld_std": 1e-2, "p_x_weight": 1.0, "p_y_given_x_weight": 1.0}}
    return save_fixture("jem_step", source=ref.source("train_wrn_ebm.py", "get_sample_q (sample_p_0, sample_q); main() loss"),
                        inputs=inputs, outputs=outputs,
                        note=f"{POOL_NOTE} (8x8 images). t.randint/t.rand/t.randn_like and init_random return the "
                             "stored draws; the loss lines of main() (321-341) are transcribed.")


def generate_jempp_step(refs) -> Path:
    """JEM++: PYLD (train_jempp.py sample_q with Hamiltonian / layer_one), plc alltrain1, BN in train mode."""
    ref = refs["sndnyang/JEMPP"]
    with float64():
        mod = ref.load("train_jempp.py", stubs=STUBS)
        models = mod.get_model_and_buffer.__globals__
        ours = nets.build(nets.JEMPP_WRN10, num_classes=nets.METHOD_CLASSES, image_size=nets.METHOD_SIZE)
        inputs = _step_inputs(200, 3, noise=False)
        f = _ref_net(lambda: models["CCF"](10, 1, norm="batch", n_classes=nets.METHOD_CLASSES, model="yopo"),
                     ours, "jempp")
        args = types.SimpleNamespace(batch_size=nets.METHOD_BATCH, n_classes=nets.METHOD_CLASSES,
                                     reinit_freq=inputs["reinit_prob"], eps=1.0, pyld_lr=0.2, sgld_lr=0.0,
                                     sgld_std=0.0, device="cpu")
        replay = _sym(inputs["buffer"]).clone()
        rng = _rng_for(inputs)
        with patched(mod, t=rng, args=args, init_random=lambda a, bs: _sym(inputs["fresh"]).clone()), \
                patched(models["wideresnet_yopo"], F=_global_pool_functional()):
            fp = f(_sym(inputs["x_px"])).mean()                          # plc alltrain1: before sampling
            x_q = mod.sample_q(f, replay, n_steps=inputs["steps"], in_steps=5, args=args)
            rng.assert_used()
            fq = f(x_q).mean()
            l_p_x = -(fp - fq)
            ce = torch.nn.CrossEntropyLoss()(f.classify(_sym(inputs["x"])), inputs["y"])
            loss = 1.0 * l_p_x + 1.0 * ce
            f.zero_grad()                                                # optim.zero_grad() in main()
            loss.backward()
        outputs = {"x_sgld": _pix(x_q), "buffer_after": _pix(replay), "loss": loss.detach(), "px": l_p_x.detach(),
                   "ce": ce.detach(), "grads": nets.grad_record(_grads(f, "jempp")),
                   "bn_after": nets.bn_state(reference_weights.from_reference(f.state_dict(), "jempp"))}
    inputs |= {"model_config": nets.JEMPP_WRN10.model_dump(), "weight_digest": nets.weight_digest(ours),
               "settings": {"n_steps": 3, "in_steps": 5, "pyld_lr": 0.2, "eps": 1.0, "sgld_lr": 0.0, "sgld_std": 0.0,
                            "plc": "alltrain1"}}
    return save_fixture("jempp_step", source=ref.source("train_jempp.py", "sample_p_0, sample_q (PYLD); main() loss, plc alltrain1"),
                        inputs=inputs, outputs=outputs,
                        note=f"{POOL_NOTE} (8x8 images). t.randint/t.rand and init_random return the stored draws "
                             "(no Langevin noise: sgld_std 0); the loss lines of main() (236-273) are transcribed.")


def generate_sadajem_step(refs) -> Path:
    """SADA-JEM: SGLD (train_sadajem.py sample_q), the two SAM passes of main() with sam.py, BN statistics."""
    ref = refs["sndnyang/SADAJEM"]
    with float64():
        mod = ref.load("train_sadajem.py", stubs=STUBS)
        models = mod.get_model_and_buffer.__globals__
        ours = nets.build(nets.JEMPP_WRN10, num_classes=nets.METHOD_CLASSES, image_size=nets.METHOD_SIZE)
        inputs = _step_inputs(300, 3, noise=False)
        f = _ref_net(lambda: models["CCF"](10, 1, norm="batch", n_classes=nets.METHOD_CLASSES, model="wrn"),
                     ours, "sadajem")
        args = types.SimpleNamespace(batch_size=nets.METHOD_BATCH, n_classes=nets.METHOD_CLASSES,
                                     reinit_freq=inputs["reinit_prob"], sgld_lr=1.0, sgld_std=0.0, init="gm",
                                     device="cpu")
        settings = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "rho": 2.0, "adaptive": True, "n_steps": 3,
                    "sgld_lr": 1.0, "sgld_std": 0.0, "px": 1.0, "pyx": 1.0, "l2_coeff": 0.0}
        optim = mod.SAM(f.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4, rho=2.0,
                        adaptive=True)
        replay = _sym(inputs["buffer"]).clone()
        rng = _rng_for(inputs)
        x_px, x_lab = _sym(inputs["x_px"]), _sym(inputs["x"])
        with patched(mod, t=rng, args=args, init_random=lambda a, bs: _sym(inputs["fresh"]).clone()), \
                patched(models["wideresnet"], F=_global_pool_functional()):
            mod.enable_running_stats(f)                                  # main() lines 201-262, transcribed
            fp = f(x_px).mean()
            x_q = mod.sample_q(f, replay, n_steps=inputs["steps"], args=args)
            rng.assert_used()
            fq = f(x_q).mean()
            l_p_x = -(fp - fq)
            ce = torch.nn.CrossEntropyLoss()(f.classify(x_lab), inputs["y"])
            loss = 1.0 * l_p_x + ce
            optim.zero_grad()
            loss.backward()
            grads_first = _grads(f, "sadajem")
            optim.first_step(zero_grad=True)
            mod.disable_running_stats(f)
            second = -(f(x_px).mean() - f(x_q).mean()) + torch.nn.CrossEntropyLoss()(f.classify(x_lab), inputs["y"])
            second.backward()
            grads_second = _grads(f, "sadajem")
            optim.second_step(zero_grad=True)
        state = reference_weights.from_reference(f.state_dict(), "sadajem")
        outputs = {"x_sgld": _pix(x_q), "buffer_after": _pix(replay), "loss": loss.detach(), "px": l_p_x.detach(),
                   "ce": ce.detach(), "loss_second": second.detach(),
                   "grads": nets.grad_record(grads_first), "grads_second": nets.grad_record(grads_second),
                   "params_after": nets.grad_record({k: v for k, v in state.items() if k in dict(ours.named_parameters())}),
                   "bn_after": nets.bn_state(state)}
    inputs |= {"model_config": nets.JEMPP_WRN10.model_dump(), "weight_digest": nets.weight_digest(ours),
               "settings": settings}
    return save_fixture("sadajem_step", source=[ref.source("train_sadajem.py", "sample_p_0, sample_q; main() SAM step"),
                                                ref.source("sam.py", "SAM.first_step, SAM.second_step")],
                        inputs=inputs, outputs=outputs,
                        note=f"{POOL_NOTE} (8x8 images). t.randint/t.rand and init_random return the stored draws "
                             "(sgld_std 0); the step of main() (lines 196-262) is transcribed, calling the "
                             "reference sample_q, SAM and enable/disable_running_stats.")


# ---------------------------------------------------------------- informative / Gaussian-mixture init

class _Files:
    """Stand-in for the reference module's `t`: t.save / t.load go to a dict instead of files."""

    def __init__(self):
        self.files = {}

    def save(self, obj, path):
        self.files[Path(path).name] = obj.clone()

    def load(self, path_or_obj, path=None):
        if path is not None:          # category_mean's `t.load(covs, path)` (train_jempp.py:159): meant t.save
            self.save(path_or_obj, path)
            return None
        return self.files[Path(path_or_obj).name].clone()

    def __getattr__(self, name):
        return getattr(torch, name)


def _conditionals_record(conditionals, p):
    return {"loc": torch.stack([d.loc for d in conditionals]),
            "cov_diag": torch.stack([d.covariance_matrix.diagonal() for d in conditionals]),
            "cov_probes": torch.stack([d.covariance_matrix @ p for d in conditionals])}


def generate_informative_init(refs) -> Path:
    """JEM++ category_mean + init_from_centers, SADA-JEM init_from_centers: the class Gaussians' parameters."""
    jempp, sada = refs["sndnyang/JEMPP"], refs["sndnyang/SADAJEM"]
    k, n = 2, 6
    images = (nets.images(k * n, 32, seed=400) * 255).round().to(torch.uint8)
    labels = torch.arange(k).repeat_interleave(n)[torch.randperm(k * n, generator=torch.Generator().manual_seed(5))]
    p = nets.probes(3 * 32 * 32)
    with float64():
        mod = jempp.load("train_jempp.py", stubs=STUBS)
        files = _Files()
        args = types.SimpleNamespace(dataset="cifar10", n_classes=k, buffer_size=2 * k, device="cpu")
        x_sym = _sym(images.double() / 255)
        loader = [(x_sym[:7], labels[:7]), (x_sym[7:], labels[7:])]       # dload_train: [-1,1] batches
        with patched(mod, t=files, conditionals=[]):
            mod.category_mean(loader, args)
            buffer = mod.init_from_centers(args)
            jempp_record = _conditionals_record(mod.conditionals, p)
        smod = sada.load("train_sadajem.py", stubs=STUBS)
        version = torch.__version__.split(".")[1]
        sfiles = _Files()
        sfiles.files = {f"{name}": v for name, v in files.files.items()}   # the same statistics files
        with patched(smod, t=sfiles, conditionals=[]):
            smod.init_from_centers(args)
            sada_record = _conditionals_record(smod.conditionals, p)
    same = max((jempp_record[key] - sada_record[key]).abs().max().item() for key in jempp_record)
    assert same == 0.0, f"SADA-JEM's init_from_centers differs from JEM++'s by {same}"
    return save_fixture(
        "informative_init",
        source=[jempp.source("train_jempp.py", "category_mean, init_from_centers"),
                sada.source("train_sadajem.py", "init_from_centers (multi_center.py category_mean: same lines)")],
        inputs={"images": images, "labels": labels, "num_classes": k},   # probes: nets.probes(3072)
        outputs=jempp_record | {"buffer_in_range": bool(buffer.abs().max() <= 1), "sada_equal": True},
        note=("t.save/t.load of the reference module write to a dict (category_mean's t.load(covs, path) at "
              "train_jempp.py:159 is a bug for t.save; patched so); the loader yields un-augmented [-1,1] images "
              f"(the reference's dload_train would add crop/flip and sigma noise). covariance stored as diag and "
              f"cov @ probes. SADA-JEM's init_from_centers (torch minor {version} path) gives identical parameters."))


def generate(refs) -> list[Path]:
    return generate_architectures(refs) + [generate_jem_step(refs), generate_jempp_step(refs),
                                           generate_sadajem_step(refs), generate_informative_init(refs)]
