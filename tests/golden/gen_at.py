"""Golden fixtures of the adversarial-training baselines, produced by the official codes.

    python tests/golden/make_golden.py --refs /work/refs --only at

One training step of each method on a tiny kuangliu ResNet (the references' own `ResNet.forward`,
`_make_layer` and `BasicBlock`, built with widths 4 and 8 instead of 64..512; our weights loaded by a
key mapping, which is itself the architecture check), float64, 8 images of 3x8x8 with saturated
pixels. The PGD start noise is drawn exactly as `robust_ebm.attacks` draws it from a seeded generator
and injected into the reference (its module-level `torch.randn` / `torch.FloatTensor(...).uniform_`
/ `ch.rand_like` patched), so both sides start from the same point.

Stored per method: weights, batch, noise seed and tensor, epoch, the reference's settings (read from its
argparse defaults / README), and the outputs: adversarial example, loss, every parameter gradient,
BatchNorm buffers after the step. Per attack: CE PGD evaluation (WEAT pgd_attack.py = TRADES
pgd_attack_cifar10.py), CW-margin PGD (MAIL train.py cwloss), Madry's Linf PGD (robustness.attacker).
Schedules: TRADES/MART/MAIL adjust_learning_rate per epoch, WEAT's OneCycleLR as its main.py builds it,
JEM's warm-up and decay statements run per iteration.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from golden.at_net import NUM_CLASSES, reference_key, tiny_resnet
from golden.common import Reference, float64, save_fixture, stub_module

REPOSITORIES = ("yaodongyu/TRADES", "YisenWang/MART", "QizhouWang/MAIL",
                "OmnAI-Lab/Robust-Classifiers-under-the-lens-of-EBM", "MadryLab/robustness", "wgrathwohl/JEM")
WEAT = "OmnAI-Lab/Robust-Classifiers-under-the-lens-of-EBM"
WEAT_DIR = "Adversarial ML"

BATCH, SHAPE = 8, (3, 8, 8)
NOISE_SEED = 7


def initial_weights(fc_scale: float = 150.0) -> dict[str, torch.Tensor]:
    """Seeded float64 weights with non-trivial BatchNorm affine parameters and running statistics.

    fc_scale: the classifier weights are multiplied by it, for confident, input-sensitive logits (MART's
    1.0000001 and 1e-12 constants then change the loss by more than 1e-8)."""
    with float64():
        torch.manual_seed(0)
        model = tiny_resnet()
        g = torch.Generator().manual_seed(1)
        for name, t in model.state_dict().items():
            if "running_var" in name:
                t.copy_(1.0 + 0.5 * torch.rand(t.shape, generator=g, dtype=t.dtype))
            elif "running_mean" in name or (".norm" in name or name.startswith("trunk.norm")) and t.is_floating_point():
                base = 1.0 if name.endswith("weight") else 0.0
                t.copy_(base + 0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype))
            elif name.startswith("fc."):
                t.mul_(fc_scale)
    return {k: v.clone() for k, v in model.state_dict().items()}


def reference_net(resnet_module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The reference's ResNet class (forward, _make_layer, BasicBlock) with tiny widths and our weights."""
    net = resnet_module.ResNet.__new__(resnet_module.ResNet)
    nn.Module.__init__(net)
    block = resnet_module.BasicBlock
    net.in_planes = 4
    net.conv1 = nn.Conv2d(3, 4, kernel_size=3, stride=1, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(4)
    net.layer1 = net._make_layer(block, 4, 1, stride=1)
    net.layer2 = net._make_layer(block, 8, 1, stride=2)
    net.layer3, net.layer4 = nn.Sequential(), nn.Sequential()
    net.linear = nn.Linear(8, NUM_CLASSES)
    mapped = {reference_key(k): v for k, v in weights.items()}
    missing = set(net.state_dict()) ^ set(mapped)
    if missing:
        raise KeyError(f"key mapping does not cover the reference ResNet: {sorted(missing)}")
    net.load_state_dict(mapped)
    return net.double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 images with many pixels exactly 0 and 1 (the random start leaves the box there) and labels."""
    g = torch.Generator().manual_seed(3)
    x = (1.6 * torch.rand((BATCH, *SHAPE), generator=g, dtype=torch.float64) - 0.3).clamp(0.0, 1.0)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    return x, y


def unit_normal_draw(shape) -> torch.Tensor:
    """The N(0, I) draw behind attacks._random_start('normal') from Generator().manual_seed(NOISE_SEED) (float64);
    the references scale it themselves (0.001 * torch.randn(...))."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(NOISE_SEED), dtype=torch.float64)


def uniform_start(shape, eps: float) -> torch.Tensor:
    """What attacks._random_start('uniform', linf) draws from Generator().manual_seed(NOISE_SEED)."""
    return eps * (2 * torch.rand(shape, generator=torch.Generator().manual_seed(NOISE_SEED), dtype=torch.float64) - 1)


# ---------------------------------------------------------------- running reference code

class _Injected:
    """Stands in for `torch.randn(...)` / `torch.FloatTensor(...)`: hands out the stored tensor."""

    def __init__(self, value):
        self.value = value

    def cuda(self):
        return self.value

    def to(self, *_a, **_k):
        return self.value

    def uniform_(self, *_a):
        return _Injected(self.value)

    def detach(self):
        return self.value


class TorchWithNoise(types.ModuleType):
    """The torch module, except that randn / FloatTensor return the injected start noise (checked shapes)."""

    def __init__(self, noise: torch.Tensor):
        super().__init__("torch")
        self._noise, self.draws = noise, 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def _take(self, shape):
        if tuple(shape) != tuple(self._noise.shape):
            raise AssertionError(f"reference drew noise of shape {tuple(shape)}, stored {tuple(self._noise.shape)}")
        self.draws += 1
        return _Injected(self._noise.clone())

    def randn(self, *shape, **_k):
        return self._take(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)

    def FloatTensor(self, *shape):  # noqa: N802 (the reference's spelling)
        return self._take(shape)

    def rand_like(self, t):   # Madry's LinfStep.random_perturb: the stored U[0,1) draw
        return self._take(t.shape).value


@contextlib.contextmanager
def cpu_cuda():
    """`.cuda()` on tensors is the identity (the references call it unconditionally)."""
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


def record_inputs(net: nn.Module) -> list[tuple[bool, torch.Tensor]]:
    """(training?, input) of every forward of `net`, in order."""
    calls: list[tuple[bool, torch.Tensor]] = []
    net.register_forward_pre_hook(lambda m, inp: calls.append((m.training, inp[0].detach().clone())))
    return calls


def argparse_defaults(path: Path) -> dict:
    """`dest -> default` of every parser.add_argument(...) in a reference script (read, not run)."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            name = max((a.value for a in node.args if isinstance(a, ast.Constant)), key=len)
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if default is not None:
                out[name.lstrip("-").replace("-", "_")] = eval(compile(ast.Expression(default), str(path), "eval"))  # noqa: S307
    return out


def function_from(path: Path, names: tuple[str, ...], namespace: dict) -> dict:
    """Execute only the named top-level functions of a reference script (its module level needs data/GPUs)."""
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    if {n.name for n in body} != set(names):
        raise KeyError(f"{path}: functions {sorted(set(names) - {n.name for n in body})} not found")
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace


def statements_from(path: Path, source_start: str) -> types.CodeType:
    """Compile the first `if` statement of a reference script whose test starts with `source_start`."""
    text = path.read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.If) and ast.get_source_segment(text, node.test).startswith(source_start):
            return compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
    raise KeyError(f"{path}: no `if {source_start}` statement")


def step_outputs(net: nn.Module, loss: torch.Tensor) -> dict:
    """loss, every parameter gradient and every BatchNorm buffer, under OUR names."""
    ours = {reference_key(k): k for k in tiny_resnet().state_dict()}
    net.zero_grad(set_to_none=True)
    loss.backward()
    grads = {ours[k]: p.grad.detach().clone() for k, p in net.named_parameters()}
    buffers = {ours[k]: b.detach().clone() for k, b in net.named_buffers()}
    return {"loss": loss.detach().clone(), "grads": grads, "bn_buffers": buffers}


# ---------------------------------------------------------------- one training step per method

def _step(ref: Reference, loss_file: str, resnet_file: str, call, *, name: str, function: str, settings: dict,
          epoch: int, extra_inputs: dict | None = None, note: str = "") -> Path:
    weights = initial_weights()
    x, y = batch()
    noise = unit_normal_draw(x.shape)
    with float64(), cpu_cuda():
        module = ref.load(loss_file)
        resnet = ref.load(resnet_file)
        module.torch = TorchWithNoise(noise)
        net = reference_net(resnet, weights).train()
        calls = record_inputs(net)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        loss = call(module, net, x, y, optimizer)
        if module.torch.draws != 1:
            raise AssertionError(f"{function} drew start noise {module.torch.draws} times, expected once")
        train_calls = [inp for training, inp in calls if training]
        x_adv = train_calls[1]    # train-mode forwards: x, x_adv (, x)
        outputs = step_outputs(net, loss) | {"x_adv": x_adv, "train_forwards": torch.tensor(len(train_calls))}
    inputs = {"weights": weights, "x": x, "y": y, "noise": noise, "noise_seed": NOISE_SEED, "epoch": epoch,
              "settings": settings} | (extra_inputs or {})
    return save_fixture(name, source=ref.source(loss_file, function), inputs=inputs, outputs=outputs, note=note)


def gen_trades(ref: Reference) -> Path:
    a = argparse_defaults(ref.root / "train_trades_cifar10.py")
    settings = {"epsilon": float(a["epsilon"]), "step_size": float(a["step_size"]), "num_steps": int(a["num_steps"]),
                "beta": float(a["beta"])}
    call = lambda m, net, x, y, opt: m.trades_loss(  # noqa: E731
        model=net, x_natural=x, y=y, optimizer=opt, step_size=settings["step_size"], epsilon=settings["epsilon"],
        perturb_steps=settings["num_steps"], beta=settings["beta"])
    return _step(ref, "trades.py", "models/resnet.py", call, name="at_trades", function="trades_loss",
                 settings=settings, epoch=1, note="train_trades_cifar10.py argparse defaults")


def gen_mart(ref: Reference) -> Path:
    a = argparse_defaults(ref.root / "train_resnet.py")
    settings = {"epsilon": float(a["epsilon"]), "step_size": float(a["step_size"]), "num_steps": int(a["num_steps"]),
                "beta": float(a["beta"]), "lr": a["lr"], "weight_decay": a["weight_decay"], "epochs": a["epochs"]}
    call = lambda m, net, x, y, opt: m.mart_loss(  # noqa: E731
        model=net, x_natural=x, y=y, optimizer=opt, step_size=settings["step_size"], epsilon=settings["epsilon"],
        perturb_steps=settings["num_steps"], beta=settings["beta"])
    return _step(ref, "mart.py", "resnet.py", call, name="at_mart", function="mart_loss", settings=settings,
                 epoch=1, note="train_resnet.py (ResNet-18 recipe) argparse defaults")


def mail_readme_weights(ref: Reference) -> tuple[float, float]:
    """bias, slope of the README's `python train.py --method mail_trades --bias B --slope S`."""
    found = re.search(r"--method mail_trades --bias (\S+)\s+--slope (\S+)", (ref.root / "README.md").read_text())
    if not found:
        raise KeyError("MAIL README: no `--method mail_trades --bias .. --slope ..` command")
    return float(found.group(1)), float(found.group(2))


def gen_mail(ref: Reference) -> list[Path]:
    """Both phases: at_loss (TRADES) at 0-based epoch 75 and mail_loss at 76 (train.py:91 `epoch <= 75`)."""
    a = argparse_defaults(ref.root / "train.py")
    bias, slope = mail_readme_weights(ref)
    settings = {"epsilon": float(a["epsilon"]), "step_size": float(a["step_size"]), "num_steps": int(a["num_steps"]),
                "beta": float(a["beta"]), "bias": bias, "slope": slope, "method": "mail_trades"}
    common = dict(step_size=settings["step_size"], epsilon=settings["epsilon"], perturb_steps=settings["num_steps"],
                  beta=settings["beta"], method=settings["method"])
    paths = []
    for epoch0, file, function in ((75, "at_loss.py", "at_loss"), (76, "mail_loss.py", "mail_loss")):
        extra = {"bias": bias, "slope": slope} if function == "mail_loss" else {}
        call = lambda m, net, x, y, opt, f=function, e=extra: getattr(m, f)(  # noqa: E731
            model=net, x_natural=x, y=y, optimizer=opt, **e, **common)
        paths.append(_step(ref, file, "resnet.py", call, name=f"at_mail_{function}", function=function,
                           settings=settings, epoch=epoch0 + 1, extra_inputs={"reference_epoch0": epoch0},
                           note="train.py argparse defaults; bias/slope from README (mail_trades)"))
    return paths


def gen_weat(ref: Reference) -> list[Path]:
    folder = ref.root / WEAT_DIR
    parser_mod = ref.load(f"{WEAT_DIR}/parser.py")
    args = parser_mod.get_parser().parse_args([])
    settings = {"epsilon": args.epsilon, "step_size": args.step_size, "num_steps": args.num_steps, "beta": args.beta}
    paths = []
    for variant in ("nat", "adv"):
        function = f"WEAT_{variant}"

        def call(m, net, x, y, opt, f=function):
            return getattr(m, f)(model=net, x_natural=x, y=y, optimizer=opt, step_size=settings["step_size"],
                                 epsilon=settings["epsilon"], perturb_steps=settings["num_steps"], beta=settings["beta"])

        weights = initial_weights()
        x, y = batch()
        noise = unit_normal_draw(x.shape)
        with float64(), cpu_cuda():
            module = ref.load(f"{WEAT_DIR}/WEAT_loss.py")
            resnet = ref.load(f"{WEAT_DIR}/models/resnet.py")
            module.torch = TorchWithNoise(noise)
            net = reference_net(resnet, weights).train()
            calls = record_inputs(net)
            loss = call(module, net, x, y, torch.optim.SGD(net.parameters(), lr=0.1))
            train_calls = [inp for training, inp in calls if training]
            outputs = step_outputs(net, loss) | {"x_adv": train_calls[1], "train_forwards": torch.tensor(len(train_calls))}
        assert folder.is_dir()
        inputs = {"weights": weights, "x": x, "y": y, "noise": noise, "noise_seed": NOISE_SEED, "epoch": 1,
                  "settings": settings}
        paths.append(save_fixture(f"at_weat_{variant}", source=ref.source(f"{WEAT_DIR}/WEAT_loss.py", function),
                                  inputs=inputs, outputs=outputs, note="parser.py defaults (what main.py runs)"))
    return paths


def gen_pgd_at(ref: Reference, trades: Reference) -> Path:
    """Madry's Attacker + LinfStep (random start, last iterate) in eval mode, then CE on x_adv in train mode.

    The network is the tiny kuangliu ResNet of TRADES' models/resnet.py (Madry's cifar ResNet is the same
    architecture; its package-relative imports keep it from loading alone).
    """
    root = str(ref.root)
    stubs = {"dill": stub_module("dill"), "cox": stub_module("cox"), "cox.store": stub_module("cox.store")}
    added = {k: v for k, v in stubs.items() if k not in sys.modules}
    sys.modules.update(added)
    sys.path.insert(0, root)
    try:
        attacker = importlib.import_module("robustness.attacker")
        steps = importlib.import_module("robustness.attack_steps")
    finally:
        sys.path.remove(root)
        for key in [k for k in sys.modules if k == "robustness" or k.startswith("robustness.")] + list(added):
            sys.modules.pop(key, None)
    settings = {"eps": 8 / 255, "step_size": 2 / 255, "iterations": 10, "random_start": True, "use_best": False,
                "should_normalize": False}
    weights = initial_weights()
    x, y = batch()
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(NOISE_SEED), dtype=torch.float64)
    with float64(), cpu_cuda():
        steps.ch = TorchWithNoise(u)
        net = reference_net(trades.load("models/resnet.py"), weights)
        dataset = SimpleNamespace(mean=torch.zeros(3, dtype=torch.float64), std=torch.ones(3, dtype=torch.float64))
        attack = attacker.Attacker(net, dataset)
        net.eval()   # AttackerModel.forward: self.eval() around the attack (attacker.py:310-314)
        # should_normalize=False: InputNormalize (mean 0, std 1 here) is only clamp(x', 0, 1) before the model, and
        # torch 2.x's clamp backward zeroes the gradient of pixels lying exactly on the box boundary, which would
        # freeze them; that subgradient choice is no step of Madry's PGD (docs/provenance_at.md)
        x_adv = attack(x, y, constraint="inf", eps=settings["eps"], step_size=settings["step_size"],
                       iterations=settings["iterations"], random_start=True, use_best=False,
                       should_normalize=False).detach()
        if steps.ch.draws != 1:
            raise AssertionError(f"Madry's attack drew {steps.ch.draws} random starts, expected one")
        net.train()
        loss = nn.CrossEntropyLoss()(net(x_adv), y)   # robustness/train.py _model_loop: train_criterion(output, target)
        outputs = step_outputs(net, loss) | {"x_adv": x_adv}
    inputs = {"weights": weights, "x": x, "y": y, "uniform": u, "noise_seed": NOISE_SEED, "epoch": 1,
              "settings": settings}
    return save_fixture("at_pgd_at", source=[ref.source("robustness/attacker.py", "Attacker.forward"),
                                             ref.source("robustness/attack_steps.py", "LinfStep"),
                                             trades.source("models/resnet.py", "ResNet (tiny widths)")],
                        inputs=inputs, outputs=outputs,
                        note="Madry PGD with random_start=1, use_best=0 (library defaults: 0 and 1; see provenance_at.md)")


# ---------------------------------------------------------------- attacks alone (evaluation PGD)

def gen_pgd_eval(weat: Reference) -> Path:
    """WEAT pgd_attack.py _pgd_whitebox (= TRADES pgd_attack_cifar10.py): CE, uniform start NOT clipped."""
    a = weat.load(f"{WEAT_DIR}/parser.py").get_parser().parse_args([])
    settings = {"epsilon": a.attack_epsilon, "num_steps": a.attack_num_steps, "step_size": a.attack_step_size}
    weights = initial_weights()
    x, y = batch()
    noise = uniform_start(x.shape, settings["epsilon"])
    with float64(), cpu_cuda():
        module = weat.load(f"{WEAT_DIR}/pgd_attack.py")
        module.torch = TorchWithNoise(noise)
        net = reference_net(weat.load(f"{WEAT_DIR}/models/resnet.py"), weights).eval()
        calls = record_inputs(net)
        module._pgd_whitebox(net, x, y, settings["epsilon"], settings["num_steps"], settings["step_size"], "cpu")
        x_adv = calls[-1][1]
    inputs = {"weights": weights, "x": x, "y": y, "noise": noise, "noise_seed": NOISE_SEED, "settings": settings}
    return save_fixture("at_pgd_eval_ce", source=weat.source(f"{WEAT_DIR}/pgd_attack.py", "_pgd_whitebox"),
                        inputs=inputs, outputs={"x_adv": x_adv}, note="parser.py attack-* defaults")


def gen_pgd_cw(mail: Reference) -> Path:
    """MAIL train.py _pgd_whitebox(loss_fn='cw'): PGD-20 on -relu(f_y - max_{j≠y} f_j + 50), uniform start."""
    settings = {"epsilon": float(argparse_defaults(mail.root / "train.py")["epsilon"]), "num_steps": 20,
                "step_size": 0.003}
    weights = initial_weights(fc_scale=40.0)   # no wrong class leads by cwloss' confidence 50 (train.py:141)
    x, y = batch()
    noise = uniform_start(x.shape, settings["epsilon"])
    with float64(), cpu_cuda():
        from torch import optim
        from torch.autograd import Variable
        proxy = TorchWithNoise(noise)
        ns = function_from(mail.root / "train.py", ("cwloss", "_pgd_whitebox"),
                           {"torch": proxy, "nn": nn, "optim": optim, "Variable": Variable, "device": "cpu",
                            "args": SimpleNamespace(epsilon=settings["epsilon"])})
        net = reference_net(mail.load("resnet.py"), weights).eval()
        calls = record_inputs(net)
        ns["_pgd_whitebox"](net, x, y, epsilon=settings["epsilon"], num_steps=settings["num_steps"],
                            step_size=settings["step_size"], loss_fn="cw")
        x_adv = calls[-1][1]
    inputs = {"weights": weights, "x": x, "y": y, "noise": noise, "noise_seed": NOISE_SEED, "settings": settings}
    return save_fixture("at_pgd_eval_cw", source=mail.source("train.py", "_pgd_whitebox(loss_fn='cw'), cwloss"),
                        inputs=inputs, outputs={"x_adv": x_adv}, note="MAIL's evaluation defaults")


# ---------------------------------------------------------------- learning-rate schedules

def _adjust(path: Path, extra_params: tuple[str, ...] = ()):
    """The reference's adjust_learning_rate(optimizer, epoch, ...) with its argparse lr."""
    ns = function_from(path, ("adjust_learning_rate",), {"args": SimpleNamespace(**argparse_defaults(path))})
    group = {"lr": None}
    opt = SimpleNamespace(param_groups=[group])

    def lr_at(epoch):
        ns["adjust_learning_rate"](opt, epoch, *[None] * len(extra_params))
        return group["lr"]
    return lr_at


def gen_schedules(trades: Reference, mart: Reference, mail: Reference, weat: Reference, jem: Reference) -> Path:
    out, settings = {}, {}
    # TRADES / MART: `for epoch in range(1, epochs + 1): adjust_learning_rate(optimizer, epoch)`
    for key, ref, script in (("trades", trades, "train_trades_cifar10.py"), ("mart", mart, "train_resnet.py")):
        a = argparse_defaults(ref.root / script)
        lr_at = _adjust(ref.root / script)
        out[key] = torch.tensor([lr_at(e) for e in range(1, a["epochs"] + 1)], dtype=torch.float64)
        settings[key] = {"lr": a["lr"], "epochs": a["epochs"], "epoch_base": 1}
    # MAIL: `for epoch in range(args.epochs): adjust_learning_rate(optimizer, epoch, model, args.method)`
    a = argparse_defaults(mail.root / "train.py")
    lr_at = _adjust(mail.root / "train.py", ("model", "method"))
    out["mail"] = torch.tensor([lr_at(e) for e in range(a["epochs"])], dtype=torch.float64)
    settings["mail"] = {"lr": a["lr"], "epochs": a["epochs"], "epoch_base": 0}
    # WEAT: initialize_optimizer_and_scheduler(args, model, len(trainset)), scheduler.step() per batch
    wargs = weat.load(f"{WEAT_DIR}/parser.py").get_parser().parse_args([])
    ns = function_from(weat.root / WEAT_DIR / "main.py", ("initialize_optimizer_and_scheduler",),
                       {"optim": torch.optim, "torch": torch, "np": np})
    model = nn.Linear(1, 1)
    n_train = 50000
    opt, sched = ns["initialize_optimizer_and_scheduler"](wargs, model, n_train)
    total = sched.total_steps
    lrs, moms = [], []
    for i in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        if i + 1 < total:   # OneCycleLR refuses a step past total_steps
            opt.step()
            sched.step()
    keep = sorted(set(range(0, total, 97)) | set(range(total - 5, total)) | set(range(0, 5)))
    out["weat_steps"] = torch.tensor(keep)
    out["weat_lr"] = torch.tensor([lrs[i] for i in keep], dtype=torch.float64)
    out["weat_momentum"] = torch.tensor([moms[i] for i in keep], dtype=torch.float64)
    settings["weat"] = {"lr": wargs.lr, "epochs": wargs.epochs, "batch_size": wargs.batch_size, "n_train": n_train,
                        "momentum": wargs.momentum, "weight_decay": wargs.weight_decay, "total_steps": total}
    # JEM: per epoch `if epoch in args.decay_epochs: ...`, per iteration `if cur_iter <= args.warmup_iters: ...`
    script = jem.root / "train_wrn_ebm.py"
    decay, warm = statements_from(script, "epoch in args.decay_epochs"), statements_from(script, "cur_iter <= args.warmup_iters")
    jargs = SimpleNamespace(lr=1e-4, decay_epochs=[3, 4], decay_rate=0.3, warmup_iters=8, n_epochs=5)  # warm-up ends first
    steps_per_epoch = 4
    group = {"lr": jargs.lr}
    env = {"args": jargs, "optim": SimpleNamespace(param_groups=[group]), "print": lambda *a, **k: None}
    jem_lrs, cur_iter = [], 0
    for epoch in range(jargs.n_epochs):
        env["epoch"] = epoch
        exec(decay, env)  # noqa: S102
        for _ in range(steps_per_epoch):
            env["cur_iter"] = cur_iter
            exec(warm, env)  # noqa: S102
            jem_lrs.append(group["lr"])
            cur_iter += 1
    out["jem"] = torch.tensor(jem_lrs, dtype=torch.float64)
    settings["jem"] = vars(jargs) | {"steps_per_epoch": steps_per_epoch}
    sources = [trades.source("train_trades_cifar10.py", "adjust_learning_rate"),
               mart.source("train_resnet.py", "adjust_learning_rate"), mail.source("train.py", "adjust_learning_rate"),
               weat.source(f"{WEAT_DIR}/main.py", "initialize_optimizer_and_scheduler"),
               jem.source("train_wrn_ebm.py", "warm-up and decay statements of the training loop")]
    return save_fixture("at_schedules", source=sources, inputs={"settings": settings}, outputs=out,
                        note="WEAT: every 97th step plus the first and last five of the OneCycleLR run")


def generate(refs: dict[str, Reference]) -> list[Path]:
    trades, mart, mail = refs["yaodongyu/TRADES"], refs["YisenWang/MART"], refs["QizhouWang/MAIL"]
    weat, madry, jem = refs[WEAT], refs["MadryLab/robustness"], refs["wgrathwohl/JEM"]
    return [gen_trades(trades), gen_mart(mart), *gen_mail(mail), *gen_weat(weat), gen_pgd_at(madry, trades),
            gen_pgd_eval(weat), gen_pgd_cw(mail), gen_schedules(trades, mart, mail, weat, jem)]

