"""Golden fixtures of EB-JDAT (jkcjkc/EB-JDAT): one full training step of each fork's own `main()`.

    ebjdat_jem      EB-JDAT-JEM/train_wrn_ebm.py      (train.sh; SGLD in eval mode, Adam, no normalisation)
    ebjdat_jempp    EB-JDAT-JEM++/train_jempp.py      (train.sh; PYLD with BN in train mode, SGD)
    ebjdat_sadajem  EB-JDAT-SADAJEM/train_sadajem.py  (train.sh; SGLD in train mode, adaptive SAM(SGD))

Each fork's `main(args)` runs unmodified for exactly one iteration, on the tiny network of
`ebjdat_net.py` (our Classifier's stem, trunk and head inside the fork's own `CCF`) in float64,
until its optimiser step, which records and stops the run. Only these are replaced:

- data and model: `get_data` returns one fixed batch per stream (the fork's transforms already applied:
  [-1,1] images, + 0.03 N(0,1) on both streams for JEM/JEM++; SADA-JEM adds its p(x) noise in `main`),
  `get_model_and_buffer` / `init_from_centers` return the tiny CCF and a 20-image replay buffer,
  `category_mean` (writes class statistics to disk) does nothing;
- randomness, in the module's namespace only (`t` is a proxy of torch): `t.randint`, `t.rand` (buffer
  rows and the re-initialisation coin), `init_random` (the fresh rows), `t.randn_like` (SGLD noise of
  the JEM fork; SADA-JEM's p(x) noise) and `t.empty_like(..).uniform_` (the x̃ random start) return
  OUR draws: the same numbers our code draws from its generators (seeded with `seed`), in our order;
- `sampleXadv` gets `device='cpu'` where the released JEM++ and SADA-JEM scripts call it without its
  required `device` argument (train_jempp.py:422, train_sadajem.py:360 raise TypeError as released);
- the learning-rate warm-up is off (`warmup_iters -1`): at iteration 0 the code's warm-up sets lr 0,
  which would hide the optimiser; the step runs at the scripts' lr;
- the tiny sizes: batch 8 (SADA-JEM: labelled 8, p(x) 6), buffer 20, the net of `ebjdat_net.py`;
  the JEM++ back-end's class-Gaussian and SADA-JEM's Gaussian-mixture re-initialisation are replaced by
  uniform fresh rows (the two codes draw them with different algorithms; only the coin and the
  replacement are compared).

Outputs (in [-1,1] units, as the reference computes them): x_q (the SGLD/PYLD chain after its steps),
the replay buffer after the step, x̃ (`sampleXadv`), the loss, every parameter gradient (SADA-JEM: of
both SAM passes), the parameters after the optimiser step, and every BN running statistic after the step.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  imported now: Reference.load drops every module first imported during a load
from torch import nn

from golden import ebjdat_net
from golden.common import float64, save_fixture, stub_module

REPOSITORIES = ("jkcjkc/EB-JDAT",)
SIGMA = 0.03          # train.sh --sigma, [-1,1] units
BUFFER_SIZE = 20
REINIT = 0.05         # --reinit_freq default of all three scripts
SHAPE = (3, ebjdat_net.IMAGE_SIZE, ebjdat_net.IMAGE_SIZE)


class _Stop(Exception):
    """Raised by the recording optimiser after the first step."""


class _TorchProxy(types.ModuleType):
    """torch, except for the names in `overrides` (installed as the reference module's `t`)."""

    def __init__(self, overrides: dict):
        super().__init__("torch_proxy")
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(torch, name)


class _Uniform:
    """`t.empty_like(x).uniform_(a, b)` -> a + (b - a) * u, u the next rows of our x̃ start draws."""

    def __init__(self, queue: list, like: torch.Tensor):
        self.queue, self.like = queue, like

    def uniform_(self, low, high):
        n = self.like.shape[0]
        u, self.queue[0] = self.queue[0][:n], self.queue[0][n:]
        return low + (high - low) * u.to(self.like.dtype)


# ----------------------------------------------------------------------------- our draws


def our_draws(seed: int, *, n: int, sgld_noise_steps: int, x_shape) -> dict:
    """The numbers our code draws in one step, in our order (methods/jem.py PersistentSampler,
    sampling.ReplayBuffer, sampling.langevin, methods/ebjdat.code_sampler), from a method generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    own = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=g)))
    init = torch.rand((BUFFER_SIZE, *SHAPE), generator=own)                    # buffer fill (init 'uniform')
    idx = torch.randint(BUFFER_SIZE, (n,), generator=own)
    coin = torch.rand((n,), generator=own)
    k = int((coin < REINIT).sum())
    fresh = torch.rand((k, *SHAPE), generator=own) if k else torch.zeros((0, *SHAPE))
    noise = [torch.randn((n, *SHAPE), generator=g) for _ in range(sgld_noise_steps)]
    u = torch.rand(x_shape, generator=g, dtype=torch.float64)                 # code_sampler's start
    return {"init": init, "idx": idx, "coin": coin, "fresh": fresh, "noise": noise, "u": u}


def pick_seed(n: int, sgld_noise_steps: int, x_shape, start: int) -> int:
    """First seed >= start whose buffer draw has distinct rows (the write-back order of duplicates is
    unspecified on both sides) and at least one re-initialised row (so the fresh-row path runs)."""
    for seed in range(start, start + 10_000):
        d = our_draws(seed, n=n, sgld_noise_steps=0, x_shape=(1,))
        if len(set(d["idx"].tolist())) == n and bool((d["coin"] < REINIT).any()):
            return seed
    raise RuntimeError("no seed found")


# ----------------------------------------------------------------------------- the reference model


class RefBackbone(nn.Module):
    """The fork's `f.f`: stem + trunk; records the stem output like wideresnet_yopo (PYLD reads its .grad)."""

    def __init__(self, stem, trunk):
        super().__init__()
        self.conv1, self.trunk = stem, trunk
        self.layer_one = self.conv1
        self.last_dim = ebjdat_net.WIDTH * 2

    def forward(self, x, feature=True):
        out = self.conv1(x)
        self.layer_one_out = out
        self.layer_one_out.requires_grad_()
        self.layer_one_out.retain_grad()
        return self.trunk(out)


def ref_key(ours: str) -> str:
    """Our state-dict key -> the reference CCF's (ebjdat_net docstring)."""
    head, rest = ours.split(".", 1)
    return {"stem": "f.conv1.", "trunk": "f.trunk.", "fc": "class_output."}[head] + rest


def reference_ccf(ccf_cls, ours: nn.Module, **kw) -> nn.Module:
    """The fork's CCF around a deep copy of our stem, trunk and head (its own WRN is built, then replaced)."""
    ccf = ccf_cls(10, 1, dropout_rate=0.0, n_classes=ebjdat_net.NUM_CLASSES, **kw)
    twin = copy.deepcopy(ours)
    ccf.f = RefBackbone(twin.stem, twin.trunk)
    ccf.class_output = twin.fc
    del ccf.energy_output
    return ccf.double()


def check_mapping(ccf, ours, x) -> float:
    """Architecture check of the key mapping: f.classify(2x - 1) == ours(x) (eval mode, no statistics move)."""
    ccf.eval(), ours.eval()
    with torch.no_grad():
        diff = (ccf.classify((x - 0.5) / 0.5) - ours(x)).abs().max().item()
    ccf.train(), ours.train()
    assert diff < 1e-12, diff
    for key, value in ours.state_dict().items():
        assert torch.equal(ccf.state_dict()[ref_key(key)], value), key
    return diff


# ----------------------------------------------------------------------------- one step of main()


def _main_locals(err: BaseException, module) -> dict:
    tb, found = err.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "main" and tb.tb_frame.f_code.co_filename == module.__file__:
            found = tb.tb_frame.f_locals
        tb = tb.tb_next
    assert found is not None
    return dict(found)


def _recording(base, record: dict, ccf, *, sam: bool = False):
    """Subclass of the reference's optimiser that records grads / parameters / BN statistics, then stops."""

    def snapshot(tag):
        record[tag] = {k: p.grad.detach().clone() for k, p in ccf.named_parameters() if p.grad is not None}

    def finish():
        record["params_after"] = {k: p.detach().clone() for k, p in ccf.named_parameters()}
        record["state_after"] = {k: v.detach().clone() for k, v in ccf.state_dict().items()}
        raise _Stop()

    if sam:
        class Rec(base):
            def first_step(self, zero_grad=False):
                snapshot("grads")
                super().first_step(zero_grad=zero_grad)

            def second_step(self, zero_grad=False):
                snapshot("grads_second")
                super().second_step(zero_grad=False)
                finish()
    else:
        class Rec(base):
            def step(self, closure=None):
                snapshot("grads")
                super().step()
                finish()
    return Rec


def run_main(module, args, *, ccf, buffer, loaders, draws, px_noise=None, sam_module=None) -> dict:
    """Run `module.main(args)` for one iteration with the replacements of the module docstring."""
    record: dict = {}
    n = draws["idx"].shape[0]
    coin_seen, fresh_rows = [], []

    def randint(low, high, size, *a, **k):
        assert (low, high, tuple(size)) == (0, BUFFER_SIZE, (n,)), (low, high, size)
        return draws["idx"].clone()

    def rand(*size, **k):
        assert tuple(size) == (n,), size
        coin_seen.append(True)
        return draws["coin"].clone()

    def init_random(_args, bs, *a, **k):
        assert bs == n
        rows = torch.zeros((bs, *SHAPE), dtype=torch.float64)
        rows[draws["coin"] < REINIT] = 2 * draws["fresh"].double() - 1
        fresh_rows.append(rows)
        return rows

    randn_queue = ([px_noise] if px_noise is not None else []) + [e.double() for e in draws["noise"]]

    def randn_like(x, *a, **k):
        out = randn_queue.pop(0)
        assert out.shape == x.shape, (out.shape, x.shape)
        return out.clone()

    u_queue = [draws["u"].clone()]
    overrides = {"randint": randint, "rand": rand, "randn_like": randn_like,
                 "empty_like": lambda x, *a, **k: _Uniform(u_queue, x)}
    if sam_module is None:
        overrides["optim"] = types.SimpleNamespace(Adam=_recording(torch.optim.Adam, record, ccf),
                                                   SGD=_recording(torch.optim.SGD, record, ccf))
    patches = {
        "t": _TorchProxy(overrides),
        "get_data": lambda *_a, **_k: loaders,
        "init_random": init_random,
        "args": args,
    }
    patches["get_model_and_buffer"] = lambda *_a, **_k: (ccf, buffer)
    if not hasattr(module, "get_sample_q"):  # EB-JDAT-JEM++ / -SADAJEM: informative buffer, released call bug
        patches["init_from_centers"] = lambda *_a, **_k: buffer
        patches["category_mean"] = lambda *_a, **_k: None
        patches["sampleXadv"] = functools.partial(module.sampleXadv, device="cpu")
    if sam_module is not None:
        patches["SAM"] = _recording(module.SAM, record, ccf, sam=True)
    saved = {k: getattr(module, k) for k in patches if hasattr(module, k)}
    stdout, environ = sys.stdout, dict(os.environ)
    for k, v in patches.items():
        setattr(module, k, v)
    try:
        module.main(args)
    except _Stop as err:
        main_locals = _main_locals(err, module)
    else:
        raise RuntimeError("main() finished without an optimiser step")
    finally:
        sys.stdout = stdout
        os.environ.clear()
        os.environ.update(environ)
        for k in patches:
            if k in saved:
                setattr(module, k, saved[k])
            else:
                delattr(module, k)
    assert coin_seen and fresh_rows and not randn_queue and u_queue[0].numel() == 0, "unused injected draws"
    record["locals"] = main_locals
    return record


# ----------------------------------------------------------------------------- the three forks


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**kw)


COMMON = dict(dataset="cifar10", n_classes=10, n_epochs=1, warmup_iters=-1, clf_only=False, uncond=False,
              class_cond_p_x_sample=False, buffer_size=BUFFER_SIZE, reinit_freq=REINIT, print_every=100,
              plot_uncond=False, plot_cond=False, ckpt_every=10, eval_every=1, load_path=None, dropout_rate=0.0,
              width=1, depth=10, sigma=SIGMA, pid="golden", n_valid=0)


def fork_settings(name: str, save_dir: str, n: int) -> argparse.Namespace:
    """train.sh of each fork over the script's argparse defaults (file:line in docs/provenance_ebjdat.md)."""
    if name == "ebjdat_jem":
        return _args(**COMMON, save_dir=save_dir, lr=1e-5, optimizer="adam", weight_decay=0.0,
                     decay_epochs=[160, 180], decay_rate=0.3, batch_size=n, p_x_weight=0.45, p_y_given_x_weight=0.45,
                     p_x_xadv_weight=0.05, p_y_given_xadv_weight=0.45, p_x_y_weight=0.0, n_steps=10, sgld_lr=1.0,
                     sgld_std=1e-2, norm=None)
    if name == "ebjdat_jempp":
        return _args(**COMMON, save_dir=save_dir, dir_path=save_dir, lr=0.01, optimizer="sgd", weight_decay=4e-4,
                     decay_epochs=[40, 80, 120], decay_rate=0.2, batch_size=n, p_x_weight=1.0, p_y_given_x_weight=1.0,
                     p_x_xadv_weight=0.1, p_y_given_xadv_weight=1.0, p_x_y_weight=0.0, n_steps=10, in_steps=5,
                     pyld_lr=0.2, sgld_lr=0.0, sgld_std=0.0, eps=1.0, plc="alltrain1", model="yopo", norm="batch",
                     seed=1, gpu_id="0")
    if name == "ebjdat_sadajem":
        writer = types.SimpleNamespace(add_scalar=lambda *a, **k: None)
        return _args(**COMMON, save_dir=save_dir, dir_path=save_dir, lr=0.01, optimizer="sgd", weight_decay=5e-4,
                     decay_epochs=[50, 100, 150], decay_rate=0.2, batch_size=n, px=1.0, pyx=1.0, l2_coeff=0.0,
                     rho=2.0, p_x_xadv_weight=0.1, p_y_given_xadv_weight=1.0, n_steps=10, in_steps=5, sgld_lr=1.0,
                     sgld_std=0.0, init="gm", model="wrn", norm="batch", seed=1, gpu_id="0", writer=writer,
                     no_fid=True, eps=1.0)
    raise KeyError(name)


FORKS = {
    # name: (folder, script, batch norm, labelled batch, p(x) batch, SGLD noise draws per step, seed search start)
    "ebjdat_jem": ("EB-JDAT-JEM", "train_wrn_ebm.py", False, 8, 8, 10, 100),
    "ebjdat_jempp": ("EB-JDAT-JEM++", "train_jempp.py", True, 8, 8, 0, 200),
    "ebjdat_sadajem": ("EB-JDAT-SADAJEM", "train_sadajem.py", True, 8, 6, 0, 300),
}
STUBS = {"tensorboardX": stub_module("tensorboardX", SummaryWriter=object)}


def generate_fork(ref, name: str) -> Path:
    folder, script, batch_norm, n_lab, n_px, noise_steps, start = FORKS[name]
    seed = pick_seed(n_px, noise_steps, (n_lab, *SHAPE), start)
    draws = our_draws(seed, n=n_px, sgld_noise_steps=noise_steps, x_shape=(n_lab, *SHAPE))
    state = ebjdat_net.initial_state(batch_norm, seed=7)
    x_lab, x_px = ebjdat_net.images(n_lab, seed=11), ebjdat_net.images(n_px, seed=12)
    y_lab = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6][:n_lab])
    g = torch.Generator().manual_seed(13)
    noise_lab = torch.randn((n_lab, *SHAPE), generator=g, dtype=torch.float64)
    noise_px = torch.randn((n_px, *SHAPE), generator=g, dtype=torch.float64)

    sym = lambda x: (x - 0.5) / 0.5  # noqa: E731  the forks' Normalize((.5,)*3, (.5,)*3)
    if name == "ebjdat_sadajem":   # labelled batch clean; p(x) noise added by main() (train_sadajem.py:323)
        ref_lab, ref_px, px_noise = sym(x_lab), sym(x_px), noise_px
    else:                          # noise inside the train transform (train_wrn_ebm.py:144, utils.py:89)
        ref_lab, ref_px, px_noise = sym(x_lab) + SIGMA * noise_lab, sym(x_px) + SIGMA * noise_px, None
    ref_px_noisy = sym(x_px) + SIGMA * noise_px  # what the p(x) term sees, all three forks

    with float64(), tempfile.TemporaryDirectory() as tmp:
        module = ref.load(f"{folder}/{script}", stubs=STUBS)
        ours = ebjdat_net.build(batch_norm)
        ours.load_state_dict(state)
        if name == "ebjdat_jem":
            ccf = reference_ccf(module.CCF, ours, norm=None)
        else:
            ccf = reference_ccf(module.get_model_and_buffer.__globals__["CCF"], ours, norm="batch",
                                model="yopo" if name == "ebjdat_jempp" else "wrn")
        mapping_diff = check_mapping(ccf, ours, (ref_lab + 1) / 2)
        buffer = 2 * draws["init"].double() - 1
        if name == "ebjdat_sadajem":
            loaders = (iter([(ref_px.clone(), torch.zeros(n_px, dtype=torch.long), torch.arange(n_px))]),
                       [(ref_lab.clone(), y_lab.clone(), torch.arange(n_lab))], [], [])
        else:
            loaders = ([(ref_px.clone(), torch.zeros(n_px, dtype=torch.long))], iter([(ref_lab.clone(), y_lab.clone())]),
                       [], [])
        args = fork_settings(name, tmp, n_px)
        record = run_main(module, args, ccf=ccf, buffer=buffer, loaders=loaders, draws=draws, px_noise=px_noise,
                          sam_module=module if name == "ebjdat_sadajem" else None)
    loc = record["locals"]
    loss = loc["loss"] if name == "ebjdat_sadajem" else loc["L"]
    back = {ref_key(k): k for k in state}
    ours_keys = lambda d: {back[k]: v for k, v in d.items() if k in back}  # noqa: E731
    outputs = {
        "x_sgld": loc["x_q"].detach(), "x_tilde": loc["xadv_lab"].detach(), "buffer": buffer,
        "loss": loss.detach(), "grads": ours_keys(record["grads"]),
        "params_after": ours_keys(record["params_after"]), "state_after": ours_keys(record["state_after"]),
    }
    if "grads_second" in record:
        outputs["grads_second"] = ours_keys(record["grads_second"])
    inputs = {
        "state": state, "x": (ref_lab + 1) / 2, "y": y_lab, "x_px": (ref_px_noisy + 1) / 2, "seed": seed,
        "buffer_size": BUFFER_SIZE, "batch_norm": batch_norm,
        "injected": {"buffer_init": draws["init"], "idx": draws["idx"], "coin": draws["coin"],
                     "fresh": draws["fresh"], "sgld_noise": torch.stack(draws["noise"]) if draws["noise"] else
                     torch.zeros(0), "u": draws["u"], "px_noise": noise_px, "lab_noise": noise_lab},
        "settings": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, type(None)))
                     and k not in ("save_dir", "dir_path")},
        "mapping_diff": mapping_diff,
    }
    note = (f"One step of {folder}/{script} main() (train.sh settings) on the tiny net of tests/golden/ebjdat_net.py; "
            "all values in [-1,1] units except inputs x, x_px (ours, [0,1]). See gen_ebjdat.py docstring for "
            "every replacement (data, model, RNG injection, device arg, warm-up off, uniform fresh rows).")
    return save_fixture(name, source=ref.source(f"{folder}/{script}", "main (one iteration)"),
                        inputs=inputs, outputs=outputs, note=note)


def generate(refs) -> list[Path]:
    ref = refs["jkcjkc/EB-JDAT"]
    return [generate_fork(ref, name) for name in FORKS]
