"""Short training probes for JEAT on the mini profile (issue 10 item 3): why does JEAT stay at chance?

Each probe trains one method (mini profile: real CIFAR-10, 10k training images, WRN-16-2) for a few
hundred steps from the same seed and the same batch order, with settings overridden from the command
line, and logs every `--every` steps: window means of train CE, the p(x) term (= mean E(x_pos) − mean
E(x_sgld), the energy gap), |loss|, the gradient norm before the optimiser step, the learning rate, and
the clean accuracy of 500 held-out (validation) images. Outside CI; one CPU thread.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/jeat_probes.py --name jeat_default --method jeat \
        --steps 300 --out docs/jeat_probes.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from robust_ebm import data
from robust_ebm.config import load_params
from robust_ebm.optim import LRSchedule
from robust_ebm.train import Streams, build_parts


def load_data(prof, cache: Path):
    """The mini profile's train/valid splits (cached as uint8 tensors: the JPEG read takes a minute)."""
    if cache.exists():
        d = torch.load(cache)
        return data.TensorSplit(d["xt"], d["yt"]), data.TensorSplit(d["xv"], d["yv"])
    splits = data.load_splits(prof.dataset("cifar10"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"xt": splits.train.images, "yt": splits.train.labels, "xv": splits.valid.images,
                "yv": splits.valid.labels}, cache)
    return splits.train, splits.valid


def configure(prof, a):
    """The mini profile's MethodConfig for a.method with the probe's overrides."""
    m = prof.method("cifar10", a.method)
    upd = {}
    optim = m.optim.model_copy(update={k: v for k, v in {"lr": a.lr}.items() if v is not None})
    upd["optim"] = optim
    sch = {"warmup_iters": a.warmup} if a.warmup is not None else {}
    upd["schedule"] = m.schedule.model_copy(update=sch)
    if m.sampler is not None:
        s = {k: v for k, v in {"steps": a.sgld_steps, "step_size": a.sgld_step, "noise_std": a.sgld_noise}.items()
             if v is not None}
        upd["sampler"] = m.sampler.model_copy(update=s)
    if m.attack is not None and a.eps is not None:
        upd["attack"] = m.attack.model_copy(update={"eps": a.eps / 255, "step": a.eps / 255})
    if a.p_x is not None:
        upd["params"] = {**m.params, "p_x": a.p_x}
    return m.model_copy(update=upd)


@torch.no_grad()
def clean_accuracy(model, valid, n: int) -> float:
    model.eval()
    x, y = valid.images[:n].float().div(255), valid.labels[:n].long()
    acc = sum((model(x[i:i + 250]).argmax(1) == y[i:i + 250]).sum().item() for i in range(0, n, 250)) / n
    model.train()
    return acc


def probe(a, save=None) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    prof = load_params("params.yaml").profile_config("mini")
    train, valid = load_data(prof, Path(a.cache))
    m = configure(prof, a)
    run = prof.run("cifar10", a.method, 0)
    device = torch.device("cpu")
    model, method, optimizer, _ = build_parts(m, run.model, num_classes=10, image_shape=tuple(train.images.shape[1:]),
                                              stats=None, device=device, seed=0)
    streams = Streams(train, m.data, needs_px=method.needs_px_stream, seed=0, device=device)
    schedule = LRSchedule(optimizer, m.schedule, steps_per_epoch=streams.steps_per_epoch)
    skip_sampler = a.method == "jeat" and m.params.get("p_x", 1.0) == 0.0
    if skip_sampler:  # p(x) weight 0: the SGLD samples have no gradient; skip the chains (same CE trajectory)
        method.sampler.sample = lambda model, n: torch.zeros(n, *train.images.shape[1:])
    split_grad = a.method == "jeat" and not skip_sampler
    settings = {"method": a.method, "model": m.model, "data": m.data.model_dump(), "optim": m.optim.model_dump(),
                "schedule": m.schedule.model_dump(), "attack": m.attack.model_dump() if m.attack else None,
                "sampler": m.sampler.model_dump() if m.sampler else None, "params": m.params,
                "steps": a.steps, "seed": 0, "sampler_skipped": skip_sampler}
    rows, window, step, t0, status = [], [], 0, time.time(), "ok"
    rows.append({"step": 0, "val_acc": clean_accuracy(model, valid, a.n_val)})
    model.train()
    epoch = 0
    while step < a.steps and status == "ok":
        for batch in streams.epoch(epoch):
            prepared = method.prepare(model, batch, epoch=epoch)
            out = method.loss(model, prepared, epoch=epoch)
            loss = out.loss
            if not torch.isfinite(loss) or abs(loss.item()) > 1e8:
                status = f"diverged at step {step + 1}: loss {loss.item():.3g}"
                break
            split = {}
            if split_grad:  # the CE and p(x) gradients separately (the net has no BatchNorm: forwards are pure)
                params = [p for p in model.parameters()]
                w = method.params
                grads = {}
                for term, only in (("ce", {"p_x": 0.0, "p_y_given_x": 1.0}), ("px", {"p_x": 1.0, "p_y_given_x": 0.0})):
                    method.params = w.model_copy(update=only)
                    grads[term] = torch.autograd.grad(method.loss(model, prepared, epoch=epoch).loss, params)
                method.params = w
                for p, gc, gx in zip(params, grads["ce"], grads["px"]):
                    p.grad = w.p_y_given_x * gc + w.p_x * gx
                split = {f"gnorm_{t}": torch.norm(torch.stack([g.norm() for g in grads[t]])).item() for t in grads}
            else:
                loss.backward()
            gnorm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = schedule.get_last_lr()[0]
            schedule.step()
            step += 1
            e = out.energies
            pos = e.get("E_x/adv", e.get("E_x/px", e.get("E_x/clean")))
            rec = {"ce": out.terms.get("ce_adv", out.terms.get("ce", float("nan"))), "px": out.terms.get("px", float("nan")),
                   "loss": loss.item(), "gnorm": gnorm, "lr": lr, "E_pos": pos.mean().item(),
                   "E_sgld": e["E_x/sgld"].mean().item() if "E_x/sgld" in e and not skip_sampler else float("nan"),
                   **split}
            window.append(rec)
            if step % a.every == 0 or step == a.steps:
                row = {"step": step, **{k: sum(r[k] for r in window) / len(window) for k in window[0]},
                       "gnorm_max": max(r["gnorm"] for r in window), "val_acc": clean_accuracy(model, valid, a.n_val),
                       "sec": round(time.time() - t0, 1)}
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
                if save is not None:  # partial results survive a stopped probe
                    save({"name": a.name, "settings": settings, "status": f"running (stopped after step {step}?)",
                          "seconds": round(time.time() - t0, 1), "rows": rows})
                window = []
            if step >= a.steps:
                break
        epoch += 1
    if status != "ok":
        print(status, flush=True)
        if window:
            rows.append({"step": step, **{k: sum(r[k] for r in window) / len(window) for k in window[0]},
                         "val_acc": clean_accuracy(model, valid, a.n_val), "sec": round(time.time() - t0, 1)})
    return {"name": a.name, "settings": settings, "status": status, "seconds": round(time.time() - t0, 1), "rows": rows}


COLUMNS = ("step", "lr", "ce", "px", "E_pos", "E_sgld", "gnorm", "gnorm_ce", "gnorm_px", "gnorm_max", "val_acc", "sec")


def tables(path: Path) -> str:
    """One markdown table per probe in the JSON (window means over the steps since the previous row)."""
    parts = []
    for r in json.loads(path.read_text())["probes"]:
        cols = [c for c in COLUMNS if any(c in row for row in r["rows"][1:])]
        lines = [f"#### {r['name']} ({r['status']}, {r['seconds']:.0f} s)", "",
                 "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in r["rows"]:
            cells = []
            for c in cols:
                v = row.get(c)
                cells.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                             f"{v:.3g}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", action="store_true", help="print the markdown tables of --out and exit")
    p.add_argument("--name")
    p.add_argument("--method", default="jeat", choices=["jeat", "jem", "standard", "prejeat"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--sgld-steps", type=int)
    p.add_argument("--sgld-step", type=float)
    p.add_argument("--sgld-noise", type=float)
    p.add_argument("--eps", type=float, help="attack eps (and step) in /255 units")
    p.add_argument("--p-x", type=float)
    p.add_argument("--cache", default="/tmp/jeat_probe_data.pt")
    p.add_argument("--out", default="docs/jeat_probes.json")
    a = p.parse_args()
    out = Path(a.out)
    if a.tables:
        print(tables(out), end="")
        return
    if not a.name:
        p.error("--name is required for a probe")

    def save(result):
        allres = json.loads(out.read_text()) if out.exists() else {"probes": []}
        allres["probes"] = [r for r in allres["probes"] if r["name"] != a.name] + [result]
        out.write_text(json.dumps(allres, indent=1))

    save(probe(a, save))


if __name__ == "__main__":
    main()
