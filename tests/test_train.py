"""The training loop on a tiny CNN and a few dozen synthetic 8x8 images (CPU, seconds)."""

import functools
import json
import signal
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import sigkill_when
from robust_ebm import methods, plan
from robust_ebm.attacks import AttackConfig
from robust_ebm.checkpoint import load_checkpoint
from robust_ebm.data import Splits, TensorSplit
from robust_ebm.divergence import TrainingDiverged
from robust_ebm.dynamics import columns as dynamics_columns
from robust_ebm.config import DatasetConfig, MethodConfig, RunConfig, TrainingConfig, load_params
from robust_ebm.methods.standard import Standard
from robust_ebm.models import ModelConfig, load_classifier
from robust_ebm.train import Trainer, train_splits

OUTPUTS = ("model.pt", "checkpoint.pt", "train.json", "dynamics.json", "replay_buffer.pt")


def make_run(loss="standard", epochs=2, select="last", attack=True, training=None, guard=None, seed=0,
             dynamics=0) -> RunConfig:
    method = MethodConfig(
        loss=loss, model="tiny",
        data={"batch_size": 16, "augment": "flip"},
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        schedule={"name": "multistep", "epochs": epochs, "milestones": [1], "warmup_iters": 2},
        attack=AttackConfig(steps=1, step=4 / 255) if attack and loss != "standard" else None,  # standard takes none
        select={"rule": select}, guard=guard or {}, dynamics={"every_n_epochs": dynamics, "n_fixed": 8, "every_n_steps": 2})
    return base_run().model_copy(update=dict(
        profile="test", dataset_name="synthetic",
        dataset=DatasetConfig(source="sklearn_digits", num_classes=10, channels=1, image_size=8, n_valid=32, n_test=8),
        method_name=loss, method=method, model=ModelConfig(arch="tiny_cnn", width=4), seed=seed, device="cpu",
        training=TrainingConfig(val_n_examples=16, val_pgd=AttackConfig(steps=1), log_every_steps=2,
                                grid_every_epochs=0, **(training or {}))))


@functools.lru_cache(maxsize=1)
def base_run() -> RunConfig:
    """The smoke profile's run from the repository's params.yaml (supplies the sections training ignores)."""
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    return params.profile_config("smoke").run("digits", "standard", 0)


class Poison:
    """A split whose every attribute access fails: proves the test split is never read."""

    def __getattr__(self, name):
        raise AssertionError(f"the training loop read the test split ({name})")


def make_splits(n_train=64, n_valid=32):
    g = torch.Generator().manual_seed(123)

    def split(n):
        labels = torch.arange(n) % 10
        base = (labels.float() / 9).view(-1, 1, 1, 1) * 200 + 20
        images = (base + 30 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 255).to(torch.uint8)
        return TensorSplit(images, labels)

    return Splits(train=split(n_train), valid=split(n_valid), test=Poison(), classes=[str(k) for k in range(10)])


class RecordingTracker:
    def __init__(self):
        self.metrics, self.params, self.artifacts, self.tags = [], [], [], []

    def log_metrics(self, d, step=None):
        self.metrics.append((step, d))

    def log_params(self, d):
        self.params.append(d)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(str(path))

    def log_image(self, path, key, step=0):
        self.artifacts.append(str(path))

    def set_tags(self, d):
        self.tags.append(d)


def final_weights(out_dir):
    model, meta = load_classifier(Path(out_dir) / "model.pt")
    return model.state_dict(), meta


def test_two_epochs_write_every_output(tmp_path, capsys):
    tracker = RecordingTracker()
    summary = train_splits(make_run("pgd_at", dynamics=1), make_splits(), None, tmp_path, tracker)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pgd_at epoch")]
    assert [line.split(";")[0] for line in lines] == ["pgd_at epoch 1/2", "pgd_at epoch 2/2"]  # one log line per epoch
    assert all("val n=16: clean" in line and "PGD-1" in line and "img/s" in line for line in lines)
    for name in OUTPUTS:
        assert (tmp_path / name).exists(), name
    info = json.loads((tmp_path / "train.json").read_text())
    assert info == json.loads(json.dumps(summary))
    assert info["epochs"] == 2 and info["steps"] == 8 and info["complete"] and info["retries"] == []
    assert [v["epoch"] for v in info["val"]] == [1, 2]
    assert all(0 <= v["pgd_acc"] <= v["clean_acc"] + 1e-9 <= 1 + 1e-9 for v in info["val"])
    records = json.loads((tmp_path / "dynamics.json").read_text())["epochs"]
    assert len({frozenset(r) for r in records}) == 1  # every record has every key (what `dvc plots` needs)
    dyn = dynamics_columns({"epochs": records})
    assert dyn["epoch"] == [1, 2]
    for key in ("E_xy/adv/mean", "jeat/dx_E_xy/mean", "jeat/dtheta_E_x/var", "weat/dE_x"):
        assert len(dyn[key]) == 2 and all(v is not None for v in dyn[key]), key
    # a PGD step that raises CE on average raises E(x,y) - E(x); Δx of E(x,y) is an ascent on CE here
    _, meta = final_weights(tmp_path)
    assert meta["epoch"] == 2 and meta["select_rule"] == "last" and meta["method"] == "pgd_at"
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")   # weights_only load works
    assert ckpt["progress"]["epoch"] == 2
    buffer = torch.load(tmp_path / "replay_buffer.pt", weights_only=True)  # PGD-AT draws no samples: zero images
    assert buffer["images"].shape == (0, 1, 8, 8) and buffer["method"] == "pgd_at" and "pgd_at" in buffer["empty"]
    assert meta["buffer"] == "replay_buffer.pt"
    assert not tracker.params  # settings are logged where the MLflow run is opened (tracking.open_stage_run)
    assert any("train/ce_adv" in d and "train/loss" in d for _, d in tracker.metrics)
    assert any("val/pgd_acc" in d for _, d in tracker.metrics)


def test_rerun_of_finished_run_is_a_noop(tmp_path):
    run, splits = make_run(epochs=1, attack=False), make_splits()
    train_splits(run, splits, None, tmp_path)
    w1, _ = final_weights(tmp_path)
    info = train_splits(run, splits, None, tmp_path)
    w2, _ = final_weights(tmp_path)
    assert info["steps"] == 4 and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path, capsys):
    train_splits(make_run(epochs=1, attack=False), make_splits(), None, tmp_path, max_steps=2)
    info = train_splits(make_run(epochs=1, attack=False, seed=1), make_splits(), None, tmp_path)
    assert info["complete"] and info["steps"] == 4  # all 4 steps of seed 1, none from the seed-0 checkpoint
    assert "afresh" in capsys.readouterr().out and (tmp_path / "stale" / "checkpoint.pt").is_file()


def test_run_files_are_named_by_the_plan(tmp_path, monkeypatch):
    """Train writes (and a fresh start moves aside) the files plan.PATTERNS names, whatever their names."""
    keys = ("model", "train_json", "dynamics", "checkpoint", "replay_buffer")
    for key in keys:
        monkeypatch.setitem(plan.PATTERNS, key, plan.PATTERNS[key].replace("/s{seed}/", "/s{seed}/renamed_"))
    names = [Path(plan.PATTERNS[key]).name for key in keys]
    train_splits(make_run(epochs=1, attack=False), make_splits(), None, tmp_path, max_steps=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("renamed_")) == sorted(names)
    assert not any((tmp_path / name).exists() for name in OUTPUTS)
    train_splits(make_run(epochs=1, attack=False, seed=1), make_splits(), None, tmp_path)  # not resumed: moved aside
    assert all((tmp_path / "stale" / name).is_file() for name in names)


def test_max_steps_then_resume_equals_uninterrupted(tmp_path):
    run, splits = make_run("pgd_at"), make_splits()
    train_splits(run, splits, None, tmp_path / "ref")
    part = train_splits(run, splits, None, tmp_path / "cut", max_steps=6)
    assert not part["complete"] and part["steps"] == 6
    train_splits(run, splits, None, tmp_path / "cut")
    ref, _ = final_weights(tmp_path / "ref")
    cut, _ = final_weights(tmp_path / "cut")
    assert all(torch.equal(ref[k], cut[k]) for k in ref)
    assert json.loads((tmp_path / "ref" / "dynamics.json").read_text()) == \
        json.loads((tmp_path / "cut" / "dynamics.json").read_text())


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_train import make_run, make_splits
    from robust_ebm import methods, plan
    from robust_ebm.methods.pgd_at import PGDAT
    from robust_ebm.train import train_splits

    class Slow(PGDAT):
        def loss(self, model, prepared, *, epoch):
            time.sleep(0.1)
            return super().loss(model, prepared, epoch=epoch)

    methods.REGISTRY["pgd_at"] = Slow
    train_splits(make_run("pgd_at", training={{"checkpoint_every_steps": 1}}), make_splits(), None, {out!r})
""")


def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), out=str(out)))
    returncode = sigkill_when(script, out / "checkpoint.pt", timeout=60,
                              ready=lambda p: p["epoch"] == 1 and 0 < p["step_in_epoch"] < 3)   # mid epoch 2
    assert returncode == -signal.SIGKILL and not (out / "model.pt").exists()
    run = make_run("pgd_at", training={"checkpoint_every_steps": 1})
    train_splits(run, make_splits(), None, out)
    train_splits(run, make_splits(), None, tmp_path / "ref")
    resumed, _ = final_weights(out)
    ref, _ = final_weights(tmp_path / "ref")
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)


class NanAt(Standard):
    """Standard training whose loss is NaN at the loss() calls listed in `bad` (1-based)."""

    bad: set = set()

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = 0

    def loss(self, model, prepared, *, epoch):
        self.calls += 1
        out = super().loss(model, prepared, epoch=epoch)
        if self.calls in self.bad or (self.bad == {"all"} and self.calls >= 3):
            out.loss = out.loss * float("nan")
        return out


def test_injected_nan_rolls_back_and_completes(tmp_path, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "nan_at", NanAt)
    monkeypatch.setattr(NanAt, "bad", {6})
    tracker = RecordingTracker()
    run = make_run("nan_at", attack=False, guard={"max_retries": 2, "remedy": "lr_decay", "lr_factor": 0.5})
    info = train_splits(run, make_splits(), None, tmp_path, tracker)
    assert info["complete"] and info["steps"] == 8
    (retry,) = info["retries"]
    assert retry["step"] == 6 and retry["reason"] == "non-finite loss" and retry["remedy"] == "lr_decay"
    assert retry["resumed_from_step"] == 4          # the end-of-epoch-1 checkpoint
    weights, _ = final_weights(tmp_path)
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert any("guard/retries" in d for _, d in tracker.metrics)
    # the remedy persisted: the learning rate of the last step is half the unguarded one
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["state"]["schedule"]["scale"] == pytest.approx(0.5)


def test_repeated_nan_raises_training_diverged(tmp_path, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "nan_at", NanAt)
    monkeypatch.setattr(NanAt, "bad", {"all"})
    run = make_run("nan_at", attack=False, guard={"max_retries": 2, "remedy": "reseed"})
    with pytest.raises(TrainingDiverged) as err:
        train_splits(run, make_splits(), None, tmp_path)
    msg = str(err.value)
    assert "test/synthetic/nan_at/s0" in msg and "diverged at step 1 " in msg and "nan" in msg and "reseed" in msg
    assert not (tmp_path / "model.pt").exists()


def test_abs_loss_guard(tmp_path, monkeypatch):
    run = make_run(attack=False, guard={"max_abs_loss": 1e-6, "max_retries": 0})
    with pytest.raises(TrainingDiverged, match="max_abs_loss"):
        train_splits(run, make_splits(), None, tmp_path)


def test_select_rule_keeps_best_epoch_from_from_epoch(tmp_path):
    run = make_run(epochs=4, select="best_val_pgd", attack=False)
    run.method.select.from_epoch = 2
    trainer = Trainer(run, make_splits(), None, tmp_path)
    for epoch, acc in [(1, 0.9), (2, 0.3), (3, 0.5), (4, 0.4)]:
        for w in trainer.model.parameters():
            w.data.fill_(float(epoch))
        trainer._select(epoch, {"clean_acc": 1 - acc, "pgd_acc": acc})
    assert trainer.progress["best_epoch"] == 3 and trainer.progress["best_metric"] == 0.5
    assert all(torch.all(v == 3.0) for k, v in trainer.best_state.items() if k.endswith("weight"))


def test_selected_weights_are_written(tmp_path):
    info = train_splits(make_run(epochs=3, select="best_val_clean", attack=False), make_splits(), None, tmp_path)
    accs = [v["clean_acc"] for v in info["val"]]
    best = accs.index(max(accs)) + 1
    _, meta = final_weights(tmp_path)
    assert info["selected_epoch"] == best == meta["epoch"] and meta["val"]["clean_acc"] == max(accs)


def test_bad_config_fails_before_training(tmp_path):
    run = make_run(epochs=2, select="best_val_clean", attack=False)
    run.method.select.from_epoch = 5
    with pytest.raises(ValueError, match="from_epoch=5 is not below"):
        train_splits(run, make_splits(), None, tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()
