"""Side-by-side step timing: the official code vs robust-ebm, same architecture, batch and sampler settings.

Issue 13 item 1. Outside CI. For each method, rounds alternate between the two sides (round r runs
reference then ours when r is even, ours then reference when odd); each round builds its model and
optimiser afresh, runs one untimed warm-up iteration and `--steps` timed ones. The table gives the
median wall time per training iteration of each side over all rounds, the CPU time of the timing
thread (`time.thread_time`, less sensitive to a loaded machine; with one torch thread every kernel
runs in it), and `speed ours/ref` = ref median / ours median (> 1: ours is faster), plus the median of
the per-round ratios (each round's two sides ran back to back, so that ratio is the one to trust on a
shared machine).

Reference side: the official repository's own code, imported at run time from a fetched checkout
(`--refs DIR`, folders `owner+name`, as tests/golden/common.py `Reference.load`: the file's folder on
sys.path, its sibling modules dropped afterwards). Its own model class at `--depth`/`--width`
(default WRN-16-2, for CPU affordability), its own replay buffer, sampler, losses and optimiser:

- jem, jempp, sadajem, ebjdat_jem: the script's unmodified `main()`, run until its optimiser has
  stepped `steps + 1` times (the optimiser class is a subclass that records the time after each
  step and then stops the run). Replaced: `get_data` (random CIFAR-shaped batches in [-1,1], one per
  iteration, already on the CPU), `tqdm` (identity: no progress bar), the module's `args` global where
  `main` or `sample_p_0` read it, and for jempp/sadajem what
  `init_from_centers` builds (setup, untimed: the same MultivariateNormal conditionals with a dense
  3072x3072 scale_tril, without the released function's Cholesky factorisations; `RefMain._init_from_centers`);
  sadajem's tensorboard writer is a no-op. Everything in the loop body is the reference's.
- trades: `train_trades_cifar10.py` parses arguments and downloads CIFAR-10 at import, so its
  `train()` loop body (optimizer.zero_grad(); trades_loss(...); loss.backward(); optimizer.step()) is
  transcribed around the reference's own `trades.trades_loss` and `models/wideresnet.WideResNet`;
  `.cuda()` on tensors is the identity (trades_loss calls it unconditionally).
- ebjdat_jem is EB-JDAT's runnable fork (EB-JDAT-JEM): the JEM++ and SADA-JEM forks crash as released
  (`sampleXadv` called without its `device` argument; docs/provenance_ebjdat.md item 5).

Our side: `robust_ebm.bench.bench_method` (one `train.train_step` per iteration on a fixed random
batch) with the `paper` profile's method settings (sampler steps, buffer size, attack) and the
WRN-16-2 of the same layout (`wrn16_2_jem`, `wrn16_2_jempp`, `wrn16_2`), fp32 on the CPU.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/side_by_side.py --refs /work/refs \
        --methods jem jempp sadajem trades ebjdat_jem --rounds 3 --steps 1 --out docs/side_by_side.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))   # golden.common: finding and importing reference checkouts

import matplotlib  # noqa: E402,F401  imported before any reference load: Reference.load drops modules
import matplotlib.pyplot  # noqa: E402,F401  first imported during a load, and some cannot be imported twice
import numpy  # noqa: E402,F401
import torch  # noqa: E402
import torchvision  # noqa: E402,F401
import tqdm  # noqa: E402,F401

from golden.common import Reference, patched, stub_module  # noqa: E402

METHODS = ("jem", "jempp", "sadajem", "trades", "ebjdat_jem")
REPO = {"jem": "wgrathwohl/JEM", "jempp": "sndnyang/JEMPP", "sadajem": "sndnyang/SADAJEM",
        "trades": "yaodongyu/TRADES", "ebjdat_jem": "jkcjkc/EB-JDAT"}
OUR_MODEL = {"jem": "wrn16_2_jem", "ebjdat_jem": "wrn16_2_jem", "jempp": "wrn16_2_jempp", "sadajem": "wrn16_2_jempp",
             "trades": "wrn16_2"}   # params.yaml models of the references' layouts; depth and width set by --depth/--width
STUBS = {"tensorboardX": stub_module("tensorboardX", SummaryWriter=object), "GPUtil": stub_module("GPUtil")}


class _Stop(Exception):
    """Raised by the timing optimiser once the reference has run its iterations."""


def _timed(base, marks: list, n_iters: int, method: str = "step"):
    """Subclass of `base` recording (wall, thread CPU) after each `method` call; stops after n_iters."""

    def wrapped(self, *a, **k):
        out = getattr(base, method)(self, *a, **k)
        marks.append((time.perf_counter(), time.thread_time()))
        if len(marks) >= n_iters:
            raise _Stop()
        return out

    return type(f"Timed{base.__name__}", (base,), {method: wrapped})


def _intervals(marks: list) -> tuple[list, list]:
    """Per-iteration wall and CPU ms between consecutive optimiser steps (the first iteration is warm-up)."""
    wall = [1000 * (b[0] - a[0]) for a, b in zip(marks, marks[1:])]
    cpu = [1000 * (b[1] - a[1]) for a, b in zip(marks, marks[1:])]
    return wall, cpu


def _sym_batch(n: int, g: torch.Generator):
    return 2 * torch.rand((n, 3, 32, 32), generator=g) - 1, torch.randint(10, (n,), generator=g)


# ----------------------------------------------------------------------------- reference side


COMMON = dict(dataset="cifar10", n_classes=10, n_epochs=1, warmup_iters=-1, clf_only=False, uncond=False,
              class_cond_p_x_sample=False, buffer_size=10000, reinit_freq=0.05, print_every=100,
              plot_uncond=False, plot_cond=False, ckpt_every=10, eval_every=1, load_path=None, dropout_rate=0.0,
              labels_per_class=-1, print_to_log=False, pid="bench", n_valid=0)


def ref_args(name: str, save_dir: str, batch: int, depth: int, width: int) -> argparse.Namespace:
    """The reference script's settings: its argparse defaults under its published train script."""
    arch = dict(depth=depth, width=width, batch_size=batch, save_dir=save_dir, dir_path=save_dir)
    if name == "jem":       # train_wrn_ebm.py:402-446 defaults (README's command changes only lr schedule/warm-up)
        return argparse.Namespace(**COMMON, **arch, lr=1e-4, optimizer="adam", weight_decay=0.0, decay_epochs=[160, 180],
                                  decay_rate=0.3, p_x_weight=1.0, p_y_given_x_weight=1.0, p_x_y_weight=0.0, sigma=0.03,
                                  norm=None, n_steps=20, sgld_lr=1.0, sgld_std=1e-2)
    if name == "jempp":     # scripts/jempp_cifar10.sh over train_jempp.py's defaults
        return argparse.Namespace(**COMMON, **arch, lr=0.1, optimizer="sgd", weight_decay=4e-4, decay_epochs=[50, 100, 125],
                                  decay_rate=0.2, p_x_weight=1.0, p_y_given_x_weight=1.0, p_x_y_weight=0.0, sigma=0.03,
                                  norm="batch", model="yopo", n_steps=10, in_steps=5, pyld_lr=0.2, sgld_lr=0.0,
                                  sgld_std=0.0, eps=1.0, plc="alltrain1", seed=1, gpu_id="0")
    if name == "sadajem":   # scripts/sadajem_cifar10.sh over train_sadajem.py's defaults
        writer = types.SimpleNamespace(add_scalar=lambda *a, **k: None)
        return argparse.Namespace(**COMMON, **arch, lr=0.1, optimizer="sgd", weight_decay=5e-4, decay_epochs=[60, 120, 180],
                                  decay_rate=0.2, px=1.0, pyx=1.0, l2_coeff=0.0, rho=2.0, sigma=0.0, norm="batch",
                                  model="wrn", n_steps=5, sgld_lr=1.0, sgld_std=0.0, init="gm", eps=1.0, seed=1,
                                  gpu_id="0", writer=writer, no_fid=True)
    if name == "ebjdat_jem":  # EB-JDAT-JEM/train.sh over its train_wrn_ebm.py defaults (as tests/golden/gen_ebjdat.py)
        return argparse.Namespace(**COMMON, **arch, lr=1e-5, optimizer="adam", weight_decay=0.0, decay_epochs=[160, 180],
                                  decay_rate=0.3, p_x_weight=0.45, p_y_given_x_weight=0.45, p_x_xadv_weight=0.05,
                                  p_y_given_xadv_weight=0.45, p_x_y_weight=0.0, sigma=0.03, norm=None, n_steps=10,
                                  sgld_lr=1.0, sgld_std=1e-2)
    raise KeyError(name)


SCRIPT = {"jem": "train_wrn_ebm.py", "jempp": "train_jempp.py", "sadajem": "train_sadajem.py",
          "ebjdat_jem": "EB-JDAT-JEM/train_wrn_ebm.py"}


class RefMain:
    """The reference script's `main()`, run for 1 + steps iterations per round (module docstring)."""

    def __init__(self, name: str, ref: Reference, *, batch: int, depth: int, width: int, threads: int, workdir: Path):
        self.name, self.ref, self.batch, self.threads, self.workdir = name, ref, batch, threads, workdir
        self.args = ref_args(name, str(workdir / name), batch, depth, width)
        (workdir / name).mkdir(parents=True, exist_ok=True)
        with _chdir(workdir):
            self.module = ref.load(SCRIPT[name], stubs=STUBS)
        torch.set_num_threads(threads)          # train_jempp.py / train_sadajem.py call t.set_num_threads(2) at import
        self.settings = {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, list, type(None)))
                         and k not in ("save_dir", "dir_path")}
        self._centers = None

    def _init_from_centers(self, *_a, **_k):
        """Setup only (untimed): the class Gaussians `init_from_centers` builds, without its Cholesky factorisations.

        The released function factorises ten 3072x3072 covariances and draws the 10000-image buffer from
        them (minutes on a loaded CPU, per round). What a training iteration pays for is `init_random`,
        which draws `batch` samples per iteration from `conditionals`: each a dense 3072x3072 scale_tril
        times a normal vector. So the conditionals here are the same MultivariateNormal class with a dense
        scale_tril (sqrt(0.1 + 1e-4) I, stored dense: same cost per draw as any covariance), the buffer
        uniform in [-1,1]; built once and reused by later rounds.
        """
        from torch.distributions.multivariate_normal import MultivariateNormal

        if self._centers is None:
            d = 3 * 32 * 32
            conds = [MultivariateNormal(torch.zeros(d), scale_tril=(0.1 + 1e-4) ** 0.5 * torch.eye(d), validate_args=False)
                     for _ in range(self.args.n_classes)]
            self._centers = (2 * torch.rand((self.args.buffer_size, 3, 32, 32)) - 1, conds)
        buffer, conds = self._centers
        self.module.conditionals[:] = conds
        return buffer.clone()

    def _loaders(self, n_iters: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        px = [_sym_batch(self.batch, g) for _ in range(n_iters + 1)]
        lab = [_sym_batch(self.batch, g) for _ in range(n_iters + 1)]
        if self.name == "sadajem":   # enumerate(dload_train_labeled); dload_train.__next__() (utils.py:151-154)
            idx = torch.arange(self.batch)
            return iter([(x, y, idx) for x, y in px]), [(x, y, idx) for x, y in lab], [], []
        return px, iter(lab), [], []   # enumerate(dload_train); dload_train_labeled.__next__()

    def run(self, steps: int, seed: int) -> tuple[list, list]:
        marks: list = []
        n = steps + 1
        m = self.module
        patches = {"get_data": lambda *_a, **_k: self._loaders(n, seed), "tqdm": lambda it, *a, **k: it,
                   "args": self.args}
        if hasattr(m, "init_from_centers"):
            patches["init_from_centers"] = self._init_from_centers
        optim_patches = {}
        if self.name == "sadajem":
            patches["SAM"] = _timed(m.SAM, marks, n, "second_step")
        else:
            optim_patches = {"Adam": _timed(torch.optim.Adam, marks, n), "SGD": _timed(torch.optim.SGD, marks, n)}
        stdout = sys.stdout
        torch.set_num_threads(self.threads)
        try:
            with patched(m, **patches), patched(torch.optim, **optim_patches), _chdir(self.workdir):
                m.main(self.args)
        except _Stop:
            pass
        else:
            raise RuntimeError(f"{self.name}: main() returned before {n} optimiser steps")
        finally:
            if sys.stdout is not stdout:          # EB-JDAT-JEM's main() sends stdout to its log file
                sys.stdout.close()
                sys.stdout = stdout
        return _intervals(marks)


class RefTrades:
    """TRADES: train()'s loop body around the reference's trades_loss and WideResNet (module docstring)."""

    settings = {"epsilon": 0.031, "num_steps": 10, "step_size": 0.007, "beta": 6.0, "lr": 0.1, "momentum": 0.9,
                "weight_decay": 2e-4}   # train_trades_cifar10.py:16-37 defaults

    def __init__(self, name: str, ref: Reference, *, batch: int, depth: int, width: int, threads: int, workdir: Path):
        self.ref, self.batch, self.depth, self.width, self.threads = ref, batch, depth, width, threads
        self.trades = ref.load("trades.py")
        self.wrn = ref.load("models/wideresnet.py")
        self.settings = dict(self.settings, depth=depth, width=width, batch_size=batch)

    def run(self, steps: int, seed: int) -> tuple[list, list]:
        torch.set_num_threads(self.threads)
        s = self.settings
        g = torch.Generator().manual_seed(seed)
        model = self.wrn.WideResNet(depth=self.depth, num_classes=10, widen_factor=self.width)
        optimizer = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
        batches = [(torch.rand((self.batch, 3, 32, 32), generator=g), torch.randint(10, (self.batch,), generator=g))
                   for _ in range(steps + 1)]
        marks = []
        with patched(torch.Tensor, cuda=lambda self, *a, **k: self):
            model.train()
            for data, target in batches:                  # train_trades_cifar10.py:73-89
                optimizer.zero_grad()
                loss = self.trades.trades_loss(model=model, x_natural=data, y=target, optimizer=optimizer,
                                               step_size=s["step_size"], epsilon=s["epsilon"],
                                               perturb_steps=s["num_steps"], beta=s["beta"])
                loss.backward()
                optimizer.step()
                marks.append((time.perf_counter(), time.thread_time()))
        return _intervals(marks)


@contextlib.contextmanager
def _chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# ----------------------------------------------------------------------------- our side


class Ours:
    """robust_ebm.bench.bench_method with the paper profile's settings on the WRN of the same layout."""

    def __init__(self, name: str, *, batch: int, depth: int, width: int, threads: int, params: Path):
        from robust_ebm.config import load_params
        from robust_ebm.models import ModelConfig

        prof = load_params(params).profile_config("paper")
        self.cfg = prof.method("cifar10", name)
        base = prof.models[OUR_MODEL[name]].model_dump()
        self.model = ModelConfig(**(base | {"depth": depth, "width": width}))
        self.name, self.batch, self.threads = name, batch, threads
        self.channels_last = prof.training.channels_last   # as `robust-ebm train` runs it (params `training:`)
        sampler = self.cfg.sampler.model_dump() if self.cfg.sampler else None
        attack = self.cfg.attack.model_dump() if self.cfg.attack else None
        self.settings = {"loss": self.cfg.loss, "model": self.model.model_dump(), "sampler": sampler, "attack": attack,
                         "params": self.cfg.params, "optim": self.cfg.optim.model_dump(),
                         "channels_last": self.channels_last}

    def run(self, steps: int, seed: int) -> tuple[list, list]:
        from robust_ebm.bench import bench_method

        torch.set_num_threads(self.threads)
        row = bench_method(self.name, self.cfg, self.model, batch=self.batch, device=torch.device("cpu"), steps=steps,
                           warmup=1, precision="fp32", seed=seed, channels_last=self.channels_last)
        return row["step_ms"], row["step_cpu_ms"]


# ----------------------------------------------------------------------------- driver


def measure(name: str, ref_side, ours, rounds: int, steps: int, log=print, on_round=None) -> dict:
    """Interleaved rounds (ref, ours / ours, ref / ...); medians and ratios (`on_round(row)` after each round)."""
    sides = {"ref": ref_side, "ours": ours}
    wall = {"ref": [], "ours": []}
    cpu = {"ref": [], "ours": []}
    round_ratio, round_cpu_ratio = [], []
    for r in range(rounds):
        order = ("ref", "ours") if r % 2 == 0 else ("ours", "ref")
        this = {}
        for side in order:
            w, c = sides[side].run(steps, seed=r)
            wall[side] += w
            cpu[side] += c
            this[side] = (statistics.median(w), statistics.median(c))
            log(f"  {name} round {r} {side:<4} wall {statistics.median(w):9.0f} ms  cpu {statistics.median(c):9.0f} ms",
                flush=True)
        round_ratio.append(this["ref"][0] / this["ours"][0])
        round_cpu_ratio.append(this["ref"][1] / this["ours"][1])
        if on_round is not None and r + 1 < rounds:
            on_round(_summary(name, wall, cpu, round_ratio, round_cpu_ratio) | {"partial_rounds": r + 1})
    return _summary(name, wall, cpu, round_ratio, round_cpu_ratio)


def _summary(name, wall, cpu, round_ratio, round_cpu_ratio) -> dict:
    med = {s: statistics.median(wall[s]) for s in wall}
    med_cpu = {s: statistics.median(cpu[s]) for s in cpu}
    return {"method": name, "ref_ms": med["ref"], "ours_ms": med["ours"], "ref_cpu_ms": med_cpu["ref"],
            "ours_cpu_ms": med_cpu["ours"], "speed_ours_over_ref": med["ref"] / med["ours"],
            "speed_cpu_ours_over_ref": med_cpu["ref"] / med_cpu["ours"],
            "round_ratio_median": statistics.median(round_ratio), "round_ratios": round_ratio,
            "round_cpu_ratios": round_cpu_ratio, "ref_wall_ms": wall["ref"], "ours_wall_ms": wall["ours"],
            "ref_cpu_ms_all": cpu["ref"], "ours_cpu_ms_all": cpu["ours"]}


def format_table(rows: list[dict]) -> str:
    head = (f"{'method':<12}{'ref ms':>10}{'ours ms':>10}{'speed':>8}{'rounds':>8}"
            f"{'ref cpu':>10}{'ours cpu':>10}{'cpu speed':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<12}{r['ref_ms']:>10.0f}{r['ours_ms']:>10.0f}{r['speed_ours_over_ref']:>8.2f}"
                     f"{r['round_ratio_median']:>8.2f}{r['ref_cpu_ms']:>10.0f}{r['ours_cpu_ms']:>10.0f}"
                     f"{r['speed_cpu_ours_over_ref']:>10.2f}")
    lines.append("speed = ref median / ours median (> 1: ours faster); rounds = median of per-round ratios; "
                 "cpu = thread CPU time")
    return "\n".join(lines)


def machine() -> dict:
    """robust_ebm.digest.machine (CPU, cores, Python, torch, GPU), plus the host and its load."""
    from robust_ebm.digest import machine as project_machine

    return project_machine() | {"host": platform.node(), "loadavg": os.getloadavg()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--refs", help="folder of reference checkouts named owner+name")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="instead of measuring: join the rows of earlier "
                   "--out files (runs of method subsets, e.g. in parallel processes) into one table / --out")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per method")
    p.add_argument("--steps", type=int, default=2, help="timed iterations per round and side (after 1 warm-up)")
    p.add_argument("--batch", type=int, default=64, help="labelled batch and p(x) batch")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on both sides")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args(argv)
    if not a.refs and not a.merge:
        p.error("--refs DIR is required (or --merge JSON ...)")
    if a.rounds < 1 or a.steps < 1 or a.batch < 1 or a.threads < 1:
        p.error("--rounds, --steps, --batch and --threads must be >= 1")
    return a


def merge(files: list[str]) -> dict:
    """One result from several --out files: every run's header kept under `runs`, rows joined."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    return {"runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs],
            "references": {k: v for r in runs for k, v in r["references"].items()},
            "rows": [row for r in runs for row in r["rows"]]}


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.merge:
        result = merge(a.merge)
        print(format_table(result["rows"]))
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        return result
    torch.set_num_threads(a.threads)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    rows, refs, result = [], {}, {}

    def write(rows_now):
        from robust_ebm.tracking import git_commit

        result.clear()
        result.update({"started": started, "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "project_commit": git_commit(ROOT), "machine": machine(), "loadavg_before": load_before,
                       "settings": {k: v for k, v in vars(a).items() if k not in ("refs", "out", "params")},
                       "references": dict(refs), "rows": rows_now})
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="side_by_side_") as tmp:
        for name in a.methods:
            repo = REPO[name]
            ref = Reference(repo, Path(a.refs) / repo.replace("/", "+"))
            kw = dict(batch=a.batch, depth=a.depth, width=a.width, threads=a.threads)
            ref_side = (RefTrades if name == "trades" else RefMain)(name, ref, workdir=Path(tmp), **kw)
            ours = Ours(name, params=Path(a.params), **kw)
            print(f"{name}: {repo}@{ref.commit[:10]} vs robust-ebm ({ours.cfg.loss}), WRN-{a.depth}-{a.width}, "
                  f"batch {a.batch}, {a.threads} thread(s)", flush=True)
            refs[repo] = ref.commit
            about = {"repo": repo, "ref_commit": ref.commit, "ref_settings": ref_side.settings,
                     "ours_settings": ours.settings}
            row = measure(name, ref_side, ours, a.rounds, a.steps,
                          on_round=lambda partial, about=about: write(rows + [partial | about]))   # a killed run keeps its rounds
            rows.append(row | about)
            write(rows)
    print(format_table(rows))
    return result


if __name__ == "__main__":
    main()
