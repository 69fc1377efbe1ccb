"""Golden fixtures of the generation family: generators, the WEAT PCA init and the buffer selection.

    python tests/golden/make_golden.py --refs DIR --only generate

DIR must hold a checkout of OmnAI-Lab/Robust-Classifiers-under-the-lens-of-EBM *with* its
image_generation/ folder (the /work/refs extraction of commit b58e362 lacks it; a git clone of the
same commit has it), MadryLab/robustness, jkcjkc/EB-JDAT and sndnyang/SADAJEM.

Fixtures (float64, a tiny network shared by both sides, noise injected into the reference):
  gen_weat_pca       WEAT utils_func.sample_x0_pca (sklearn PCA) on fixed class images, np.random.randn injected
  gen_weat_momentum  WEAT utils.new_samples (SGLD with momentum, energy_xy), init and torch noise injected
  gen_santurkar_l2   robustness attacker.Attacker (constraint '2', targeted, use_best), randn_like injected
  gen_jeat_eq         JEAT Eq.16 / Eq.17 written here from the paper (source "paper"), noise from a seeded generator
  gen_buffer_top     EB-JDAT-SADAJEM and SADA-JEM Task/eval_buffer.py cond_is_fid: the images it scores
  gen_weat_cw        torchattacks 3.5.1 CW (WEAT Fig.2's CW panel; the wheel on PYTHONPATH, WEAT's pin)

Our samplers draw their noise from a `torch.Generator`; the fixtures store that seed and the draws
(the tests check that the generator still gives them), and the same draws go into the reference.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401
import numpy as np  # noqa: E402
import pandas  # noqa: E402,F401
import scipy.ndimage  # noqa: F401  imported here once: the references import them lazily, and Reference.load
import sklearn.decomposition  # noqa: F401  drops modules first imported while loading (numpy.fft cannot reload)
import torch
import torchvision  # noqa: F401  (same reason: torchvision registers torch libraries once per process)
import torchvision.datasets  # noqa: F401
import torchvision.transforms  # noqa: F401
from torch import nn

from golden.common import float64, save_fixture, stub_module

WEAT = "OmnAI-Lab/Robust-Classifiers-under-the-lens-of-EBM"
REPOSITORIES = (WEAT, "MadryLab/robustness", "jkcjkc/EB-JDAT", "sndnyang/SADAJEM")
SHAPE = (3, 4, 4)
NUM_CLASSES = 3


class TinyNet(nn.Module):
    """The network both sides run: [0,1] images (N,3,4,4) -> logits (N,3); conv, softplus, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, NUM_CLASSES)

    def forward(self, x):
        return self.fc(nn.functional.softplus(self.conv(x)).flatten(1))

    def classify(self, x):  # the JEM-family name of the logits (eval_buffer.py calls f.classify)
        return self(x)


def tiny_net(state: dict | None = None, seed: int = 0) -> TinyNet:
    """A float64 TinyNet, from `state` or initialised from `seed` (weights scaled up for sharper logits)."""
    torch.manual_seed(seed)
    net = TinyNet().double()
    if state is None:
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(3.0)
    else:
        net.load_state_dict(state)
    return net.eval()


def draws(seed: int, shapes) -> list[torch.Tensor]:
    """The float64 standard normals a torch.Generator seeded `seed` gives, in order (what our code draws)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def saturated_images(n: int, seed: int) -> torch.Tensor:
    """n images in [0,1] on the 1/255 grid, many pixels exactly 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    x = (0.5 + 0.45 * torch.randn((n, *SHAPE), generator=g, dtype=torch.float64)).clamp(0, 1)
    return (x * 255).round() / 255


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def modules(**mods):
    added = {k: v for k, v in mods.items() if k not in sys.modules}
    sys.modules.update(added)
    try:
        yield
    finally:
        for k in added:
            sys.modules.pop(k, None)


# ----------------------------------------------------------------------------- WEAT PCA init

def weat_pca(ref) -> Path:
    utils_func = ref.load("image_generation/utils_func.py")
    n_per_class = (12, 9)
    images = torch.cat([saturated_images(n, 10 + c) * (0.6 + 0.4 * c) for c, n in enumerate(n_per_class)])
    images = (images * 255).round() / 255
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    batch, sigma = 5, 0.5   # large enough that the clip to [0,1] acts
    cases, outputs = [], {}
    for k in range(len(n_per_class)):
        for rv in (0.95, 0.6, 0.0095):
            fitted, requested = [], []
            rng = np.random.default_rng(100 * k + int(rv * 1000))

            class RecordingPCA(utils_func.PCA):
                def fit(self, X, y=None):
                    fitted.append(self)
                    return super().fit(X, y)

            def randn(*size):
                requested.append(rng.standard_normal(size))
                return requested[-1]

            with modules(cv2=stub_module("cv2")), patched(utils_func, "PCA", RecordingPCA), \
                    patched(np.random, "randn", randn), float64():
                x0 = utils_func.sample_x0_pca(img_class=images[labels == k].flatten(1), more_variance=True,
                                              img_size=SHAPE[1], n_channels=SHAPE[0], sigma_pca=sigma, batch_size=batch,
                                              N_components=20, retained_variance=rv)
            z = torch.from_numpy(np.stack(requested))
            r = z.shape[1]
            pca = fitted[0]
            key = f"class{k}_rv{rv}"
            cases.append({"key": key, "k": k, "fraction": rv, "z": z})
            outputs[key] = {"x0": x0.double(), "n_components": r, "mean": torch.from_numpy(pca.mean_),
                            "components": torch.from_numpy(pca.components_[:r]),
                            "singular_values": torch.from_numpy(pca.singular_values_[:r])}
    return save_fixture(
        "gen_weat_pca", source=ref.source("image_generation/utils_func.py", "sample_x0_pca"),
        inputs={"images": images, "labels": labels, "sigma_pca": sigma, "cases": cases},
        outputs=outputs,
        note="WEAT's x0 = clip(mu + sum_i (lambda_i z_i sigma_pca) U_i, 0, 1) with sklearn PCA of the class images; "
             "np.random.randn returned the stored z rows (one call per image, in order)")


# ----------------------------------------------------------------------------- WEAT momentum SGLD

class _InjectedNoise(torch.Tensor):
    """The `noise` tensor of WEAT's sample_q_SGLD: each `normal_(0, s)` refills it with s * (the next stored z)."""

    def normal_(self, mean=0.0, std=1.0, *, generator=None):
        z = self._queue.pop(0)
        plain = self.as_subclass(torch.Tensor)
        with torch.no_grad():
            plain.copy_(mean + std * z)
        return plain


def weat_momentum(ref) -> Path:
    with float64():
        utils = ref.load("image_generation/utils.py", stubs={"cv2": stub_module("cv2")})
        net = tiny_net(seed=1)
        per_class = 3
        labels = [0, 2]
        x0 = saturated_images(per_class * len(labels), 20)
        cases, outputs = [], {}
        for name, eta, steps, momentum, eps in (("eval_py", 1.0, 3, 0.0, None), ("momentum", 0.5, 5, 0.5, 0.02)):
            seed = 7 if name == "eval_py" else 8
            z = draws(seed, [(len(x0), *SHAPE)] * steps)     # our sgld: one draw per step over the whole batch
            calls = [[zt[i * per_class:(i + 1) * per_class] for zt in z] for i in range(len(labels))]
            starts = [x0[i * per_class:(i + 1) * per_class] for i in range(len(labels))]

            def get_init_images(**kwargs):
                return starts.pop(0).clone(), []

            class TorchWithInjectedNoise:
                def __getattr__(self, attr):
                    return getattr(torch, attr)

                @staticmethod
                def randn(shape, device=None, **kw):
                    if tuple(shape) == (per_class, *SHAPE):   # `noise`: the Langevin noise of one call
                        t = torch.zeros(shape).as_subclass(_InjectedNoise)
                        t._queue = calls.pop(0)
                        return t
                    return torch.zeros(shape)                 # `flag_noise`: only read by the HM variant

            kwargs = {"momentum": momentum} if momentum else {}
            with patched(utils, "get_init_images", get_init_images), patched(utils, "torch", TorchWithInjectedNoise()):
                _, samples, _ = utils.new_samples(net, label=labels, batch_size=per_class, step_size=eta, n_steps=steps,
                                                  inizialization="random", n_steps_sampling=1, loss="energy_xy",
                                                  buffer=[None], eps=eps, **kwargs)
            cases.append({"name": name, "eta": eta, "steps": steps, "momentum": momentum,
                          "eps": 1.0 if eps is None else eps, "seed": seed, "z": torch.stack(z)})
            outputs[name] = samples.as_subclass(torch.Tensor).detach().double()
    return save_fixture(
        "gen_weat_momentum", source=ref.source("image_generation/utils.py", "new_samples -> sample_q_SGLD"),
        inputs={"net": net.state_dict(), "x0": x0, "labels": torch.tensor(labels).repeat_interleave(per_class),
                "cases": cases, "noise_variance": 0.001},
        outputs=outputs,
        note="v = m v - (eta/2) grad E(x,y); x = clamp(x + clamp(v + sqrt(2 eta) * 0.001 z, -eps, eps), 0, 1); "
             "get_init_images returned x0; the noise tensor's normal_ returned 0.001 * the stored z")


# ----------------------------------------------------------------------------- Santurkar (robustness)

def santurkar(ref) -> Path:
    root = str(ref.root)
    stubs = {"dill": stub_module("dill"), "cox": stub_module("cox", store=stub_module("cox.store")),
             "cox.store": stub_module("cox.store")}
    before = set(sys.modules)
    sys.path.insert(0, root)
    try:
        with modules(**stubs), float64():
            import robustness.attacker as attacker_mod
            import robustness.attack_steps as steps_mod
            net = tiny_net(seed=2)
            x0 = saturated_images(6, 30)
            target = torch.tensor([0, 1, 2, 0, 1, 2])
            dataset = types.SimpleNamespace(mean=torch.zeros(3), std=torch.ones(3))
            attacker = attacker_mod.Attacker(net, dataset)
            cases, outputs = [], {}
            for name, eps, step, iters, random_start in (("no_start", 1.5, 0.8, 6, False), ("random_start", 1.0, 1.2, 5, True)):
                seed = 11 if random_start else 12
                (r,) = draws(seed, [x0.shape])
                with patched(torch.Tensor, "cuda", lambda self, *a, **k: self), \
                        patched(steps_mod.ch, "randn_like", lambda x: r.clone()):
                    best = attacker(x0.clone(), target, constraint="2", eps=eps, step_size=step, iterations=iters,
                                    random_start=random_start, targeted=True, use_best=True)
                    last = attacker(x0.clone(), target, constraint="2", eps=eps, step_size=step, iterations=iters,
                                    random_start=random_start, targeted=True, use_best=False)
                cases.append({"name": name, "eps": eps, "step": step, "iterations": iters, "random_start": random_start,
                              "seed": seed, "r": r})
                outputs[name] = {"best": best.detach(), "last": last.detach()}
                assert (best - last).abs().max() > 1e-3, f"{name}: use_best changes nothing here; pick other settings"
    finally:
        sys.path.remove(root)
        for key in set(sys.modules) - before:
            if key == "robustness" or key.startswith("robustness."):
                sys.modules.pop(key)
    return save_fixture(
        "gen_santurkar_l2", source=ref.source("robustness/attacker.py", "Attacker.forward (constraint '2', targeted, use_best)"),
        inputs={"net": net.state_dict(), "x0": x0, "target": target, "cases": cases},
        outputs=outputs,
        note="robustness 1.2.1.post2 Attacker with dataset mean 0, std 1 (InputNormalize = clamp to [0,1]); "
             "Tensor.cuda patched to identity (CPU); attack_steps' randn_like returned the stored r; "
             "'last' (use_best=False) shows that the best iterate differs from the last one")


# ----------------------------------------------------------------------------- JEAT Eq.16 / Eq.17 (paper)

def jeat_paper() -> Path:
    """x_{t+1} = x_t - (eta/2) grad_x E(x_t) + sqrt(eta) eps_t, E = E(x,y) (Eq.17) or E(x,y) - E(x) (Eq.16)."""
    with float64():
        net = tiny_net(seed=3)
        x0 = saturated_images(6, 40)
        y = torch.tensor([0, 1, 2, 2, 1, 0])
        cases, outputs = [], {}
        for eq, seed in (("eq17", 21), ("eq16", 22)):
            eta, steps = 0.01, 4
            z = draws(seed, [x0.shape] * steps)
            x = x0.clone()
            for t in range(steps):
                x = x.detach().requires_grad_(True)
                logits = net(x)
                e_xy = -logits.gather(1, y[:, None]).squeeze(1)
                energy = e_xy if eq == "eq17" else e_xy + torch.logsumexp(logits, 1)
                (grad,) = torch.autograd.grad(energy.sum(), x)
                x = x.detach() - eta / 2 * grad + math.sqrt(eta) * z[t]
            cases.append({"eq": eq, "eta": eta, "steps": steps, "seed": seed, "z": torch.stack(z)})
            outputs[eq] = x.detach()
    return save_fixture(
        "gen_jeat_eq", source={"repo": "paper", "commit": "JEAT (Zhu et al., ICCV 2021) Eq.16, Eq.17",
                               "file": "tests/golden/gen_generate.py", "function": "jeat_paper"},
        inputs={"net": net.state_dict(), "x0": x0, "y": y, "cases": cases}, outputs=outputs,
        note="no official code: the formulas written independently of robust_ebm.sampling; no clamp (the paper has none)")


# ----------------------------------------------------------------------------- buffer top-confident selection

def buffer_top(refs) -> Path:
    with float64():
        net = tiny_net(seed=4)
        buffer = (saturated_images(200, 50) * 2 - 1)      # the JEM family's buffer lives in [-1, 1]
        args = types.SimpleNamespace(n_classes=NUM_CLASSES)
        ratios = (0.1, 0.9, 7, 100000)
        outputs, sources = {}, []
        for repo, rel, returns in (("jkcjkc/EB-JDAT", "EB-JDAT-SADAJEM/Task/eval_buffer.py", 2),
                                   ("sndnyang/SADAJEM", "Task/eval_buffer.py", 3)):
            scored = []

            def eval_is_fid(images, *rest, **kw):
                scored.append(images.detach().clone())
                return (0.0,) * returns

            task = stub_module("Task")
            task.eval_buffer = stub_module("Task.eval_buffer", eval_is_fid=eval_is_fid)
            module = refs[repo].load(rel)
            with modules(Task=task, **{"Task.eval_buffer": task.eval_buffer}):
                for ratio in ratios:
                    module.cond_is_fid(net, buffer.clone(), args, "cpu", ratio=ratio, eval="fid")
            rows = {tuple(b.flatten().tolist()): i for i, b in enumerate(buffer)}
            outputs[repo] = {str(r): torch.tensor([rows[tuple(im.flatten().tolist())] for im in s], dtype=torch.long)
                             for r, s in zip(ratios, scored)}
            sources.append(refs[repo].source(rel, "cond_is_fid"))
    return save_fixture(
        "gen_buffer_top", source=sources,
        inputs={"net": net.state_dict(), "buffer": buffer, "ratios": list(ratios), "num_classes": NUM_CLASSES},
        outputs=outputs,
        note="cond_is_fid's eval_is_fid replaced by a recorder; outputs are the buffer rows of the images the reference "
             "scores, in its order (per predicted class, the top ratio by max softmax; ratio >= 1 is a count)")


# ----------------------------------------------------------------------------- WEAT Fig.2's CW panel (torchattacks)

def weat_cw() -> Path:
    """torchattacks 3.5.1 CW (WEAT's robustbench.yml pin) as WEAT's notebook calls it: CW(model, c=1, kappa=0,
    steps, lr=0.01). torchattacks is no project dependency: put its wheel on PYTHONPATH to regenerate this."""
    try:
        import torchattacks
    except ImportError as err:
        raise ImportError("gen_weat_cw needs torchattacks 3.5.1 importable (pip download torchattacks==3.5.1 "
                          "--no-deps; unzip the wheel; add it to PYTHONPATH)") from err
    if torchattacks.__version__ != "3.5.1":
        raise ImportError(f"gen_weat_cw needs torchattacks 3.5.1 (WEAT's pin), found {torchattacks.__version__}")
    with float64():
        net = tiny_net(seed=7)   # small margins: c = 1 breaks some points
        x = saturated_images(8, 60)
        with torch.no_grad():
            y = net(x).argmax(1)
        y[:2] = (y[:2] + 1) % NUM_CLASSES     # two misclassified points
        cases, outputs = [], {}
        for name, steps, lr in (("weat_call", 10, 0.01), ("stronger", 30, 0.05)):
            adv = torchattacks.CW(net, c=1, kappa=0, steps=steps, lr=lr)(x.clone(), y)
            cases.append({"name": name, "steps": steps, "lr": lr})
            outputs[name] = adv.detach()
        assert (outputs["stronger"] - x).abs().max() > 1e-3, "no image changed: pick other settings"
    return save_fixture(
        "gen_weat_cw", source={"repo": "Harry24k/adversarial-attacks-pytorch", "commit": "torchattacks 3.5.1 (PyPI wheel)",
                               "file": "torchattacks/attacks/cw.py", "function": "CW.forward (c=1, kappa=0)"},
        inputs={"net": net.state_dict(), "x": x, "y": y, "cases": cases}, outputs=outputs,
        note="WEAT Fig.2's CW panel: Adam in tanh space, best misclassified iterate by L2, early stop on a cost rise")


def generate(refs) -> list[Path]:
    return [weat_pca(refs[WEAT]), weat_momentum(refs[WEAT]), santurkar(refs["MadryLab/robustness"]), jeat_paper(),
            buffer_top(refs), weat_cw()]
