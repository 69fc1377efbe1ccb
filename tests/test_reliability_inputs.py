"""Bad input gets one clear error naming the problem and the fix, before any long work; nothing
already computed is lost (issue 14 items 3, 4, 8; issue 11 item 2).

Params faults are checked in process (one parametrized case per malformed file) and, for a few
representative files, through each front end: `robust-ebm check`, every stage command and
`snakemake -n` (in a copy of the repository). File faults go through the functions every stage
uses to read its inputs; fallbacks through the stages that take them. docs/reliability.md (bad input)
tabulates these tests.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import tiny_classifier
from repo_copy import ROOT, copy_checkout, hermetic_env, parse_dry_run, snakemake
from robust_ebm import cli, data, prepare, runtime, tables
from robust_ebm.config import ConfigError, TrainingConfig, load_params, validate_run
from robust_ebm.files import BadFileError, load_npz, load_torch
from robust_ebm.methods import build_method
from robust_ebm.metrics import inception, stage as metrics_module
from robust_ebm.models import ModelConfig, load_for_run, save_classifier

RAW = yaml.safe_load((ROOT / "params.yaml").read_text())
RUN_STAGES = ("train", "evaluate", "generate", "metrics")


def write_params(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def edited(edit) -> dict:
    raw = copy.deepcopy(RAW)
    edit(raw)
    return raw


def setter(*keys_and_value):
    """edit(raw): raw[k1][k2]...[kn] = value."""
    *keys, value = keys_and_value

    def edit(raw):
        node = raw
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def deleter(*keys):
    def edit(raw):
        node = raw
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    return edit


# ---------------------------------------------------------------- 3. malformed params files

# (case id, edit of the repository's params, substrings the one error must contain)
PARAMS_CASES = [
    # unknown key at each level
    ("unknown-top-level-key", setter("profil", "smoke"), ["profil: unknown key", "'profile'"]),
    ("unknown-key-in-paths", setter("paths", "inception_weight", "w.pth"),
     ["paths.inception_weight: unknown key", "'inception_weights'"]),
    ("unknown-key-in-dataset", setter("datasets", "cifar10", "n_vaild", 10), ["datasets.cifar10.n_vaild", "'n_valid'"]),
    ("unknown-key-in-method", setter("methods", "jem", "optimizer", {}), ["methods.jem.optimizer", "'optim'"]),
    ("unknown-key-in-attack", setter("methods", "trades", "attack", "epsilon", 0.03),
     ["methods.trades.attack.epsilon", "'eps'"]),
    ("unknown-key-in-sampler", setter("methods", "jem", "sampler", "step", 1.0),
     ["methods.jem.sampler.step", "'step_size'"]),
    ("unknown-key-in-method-params", setter("methods", "trades", "params", "betta", 6.0),
     ["methods.trades.params", "unknown key 'betta'", "Allowed keys: beta"]),
    ("unknown-key-in-profile", setter("profiles", "smoke", "seed", [0]), ["profiles.smoke.seed", "'seeds'"]),
    ("unknown-override-section", setter("profiles", "smoke", "overrides", "metric", {}),
     ["profiles.smoke.overrides", "['metric']", "'metrics'"]),
    ("unknown-key-in-generator", setter("generation", "generators", "jeat_eq17", "sampler", "stepz", 3),
     ["generation.generators.jeat_eq17.sampler.stepz", "'steps'"]),
    ("typo-under-every-method-once", setter("profiles", "smoke", "overrides", "methods", "*", "data", "batchsize", 8),
     ["profile 'smoke'", "methods.*.data.batchsize: unknown key", "'batch_size'", "in 18 methods"]),
    ("typo-under-every-dataset-once", setter("profiles", "mini", "overrides", "datasets", "*", {"n_vaild": 10}),
     ["profile 'mini'", "datasets.*.n_vaild: unknown key", "'n_valid'", "in 6 datasets"]),
    ("typo-under-every-method-of-a-dataset-once", setter("dataset_methods", {"svhn": {"*": {"optim": {"lrr": 1}}}}),
     ["dataset_methods.svhn.*.optim.lrr: unknown key", "'lr'", "in 18 methods"]),
    # wrong type
    ("wrong-type-int", setter("methods", "standard", "data", "batch_size", "big"),
     ["methods.standard.data.batch_size", "valid integer", "'big'"]),
    ("wrong-type-list-for-int", setter("evaluation", "pgd", "steps", [1, 2]), ["evaluation.pgd.steps", "valid integer"]),
    ("wrong-type-fraction", setter("methods", "pgd_at", "attack", "eps", "8 over 255"),
     ["methods.pgd_at.attack.eps", "fraction like '8/255'"]),
    # impossible values
    ("eps-above-one", setter("methods", "pgd_at", "attack", "eps", 2.0), ["methods.pgd_at.attack.eps", "2.0"]),
    ("negative-lr", setter("methods", "standard", "optim", "lr", -0.1), ["methods.standard.optim.lr", "greater than 0"]),
    ("negative-n-valid", setter("datasets", "cifar10", "n_valid", -5), ["datasets.cifar10.n_valid", "greater than or equal"]),
    ("bad-literal", setter("methods", "standard", "optim", "name", "adamw"), ["methods.standard.optim.name", "'sgd'", "'adam'"]),
    ("select-window-after-last-epoch", setter("methods", "standard", "select", "from_epoch", 200),
     ["methods.standard: select.from_epoch=200", "schedule.epochs=200", "lower select.from_epoch"]),
    ("milestone-beyond-epochs", setter("methods", "mart", "schedule", "milestones", [75, 90, 130]),
     ["methods.mart.schedule.milestones", "[130] lie beyond epochs=120"]),
    ("selection-without-validation-split", setter("datasets", "digits", "n_valid", 0),
     ["profiles.smoke.runs.digits", "datasets.digits.n_valid is 0", "select.rule: last", "'jem'"]),
    # unknown method, model, data set, profile, loss
    ("unknown-method-in-runs", setter("profiles", "paper", "runs", "cifar100", ["standard", "jem3"]),
     ["profiles.paper.runs.cifar100", "unknown method 'jem3'", "'jem'"]),
    ("unknown-model", setter("methods", "jem", "model", "wrn99"), ["methods.jem.model", "unknown model 'wrn99'", "'wrn28_10_jem'"]),
    ("unknown-dataset-in-runs", setter("profiles", "smoke", "runs", {"mnist": "all"}),
     ["profiles.smoke.runs.mnist", "unknown dataset 'mnist'", "'digits'"]),
    ("unknown-active-profile", setter("profile", "smok"), ["profile: 'smok' is not a profile", "'smoke'"]),
    ("unknown-loss", setter("methods", "standard", "loss", "standrad"),
     ["methods.standard.loss", "unknown method loss 'standrad'", "standard"]),
    ("unknown-refclf-method", setter("metrics", "refclf", "method", "std"), ["metrics.refclf.method", "unknown method 'std'"]),
    # what a method requires (checked at load time, as building the method would)
    ("sampler-where-the-method-takes-none", setter("methods", "standard", "sampler", copy.deepcopy(RAW["methods"]["jem"]["sampler"])),
     ["methods.standard.sampler", "takes no sampler", "remove the sampler block"]),
    ("attack-where-the-method-takes-none", setter("methods", "jem", "attack", copy.deepcopy(RAW["methods"]["pgd_at"]["attack"])),
     ["methods.jem.attack", "takes no attack", "remove the attack block"]),
    ("attack-for-ebjdat", setter("methods", "ebjdat_jem", "attack", copy.deepcopy(RAW["methods"]["pgd_at"]["attack"])),
     ["methods.ebjdat_jem.attack", "set in params"]),
    ("wrong-attack-objective", setter("methods", "trades", "attack", "objective", "ce"),
     ["methods.trades.attack.objective", "needs objective kl", "'ce'"]),
    ("sampler-on-the-wrong-energy", setter("methods", "jem", "sampler", "energy", "joint"),
     ["methods.jem.sampler.energy", "set sampler.energy: marginal"]),
    ("remedy-needs-a-sampler", setter("methods", "standard", "guard", {"remedy": "more_sgld_steps"}),
     ["methods.standard.guard.remedy", "use lr_decay or reseed"]),
    ("px-stream-setting-ignored", setter("methods", "standard", "data", "px_batch_size", 64),
     ["methods.standard.data.px_batch_size", "no p(x) stream"]),
    # missing required blocks
    ("missing-sampler-block", deleter("methods", "jem", "sampler"), ["methods.jem.sampler", "needs a sampler block"]),
    ("missing-attack-block", deleter("methods", "trades", "attack"), ["methods.trades.attack", "needs an attack block"]),
    ("missing-optim-block", deleter("methods", "standard", "optim"), ["methods.standard.optim: required key is missing"]),
    ("missing-section", deleter("evaluation"), ["evaluation: required key is missing"]),
]


@pytest.mark.parametrize("case, edit, expected", PARAMS_CASES, ids=[c[0] for c in PARAMS_CASES])
def test_malformed_params_give_one_error_naming_key_allowed_values_and_file(tmp_path, case, edit, expected):
    path = write_params(tmp_path / f"{case}.yaml", edited(edit))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    msg = str(info.value)
    assert str(path) in msg, msg  # the file
    for text in expected:
        assert text in msg, f"{text!r} not in:\n{msg}"
    assert "(1 problem)" in msg or "problem" not in msg, msg  # one fault, one line


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("  results: results", "  results: [results", 1))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(path) in str(info.value) and "not valid YAML" in str(info.value) and "line" in str(info.value)


def test_profile_typo_names_file_and_allowed_profiles():
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(ConfigError, match=r"params.yaml: unknown profile 'smok'; allowed: \['mini', 'paper', 'smoke'\]"):
        params.profile_config("smok")


def test_check_rejects_what_building_the_method_rejects(params):
    """The load-time checks are the methods' own (Method.config_problems): a config edited after loading
    is refused by training (validate_run) and by building the method with the same words."""
    prof = params.profile_config("smoke")
    faults = {
        "standard": {"sampler": prof.methods["jem"].sampler},
        "jem": {"sampler": None},
        "trades": {"attack": prof.methods["pgd_at"].attack},  # objective ce, trades needs kl
        "ebjdat_jem": {"attack": prof.methods["pgd_at"].attack},
    }
    for method, update in faults.items():
        run = prof.run("digits", method, 0)
        run.method = run.method.model_copy(update=update)
        with pytest.raises(ConfigError) as at_load:
            validate_run(run)
        with pytest.raises(ValueError) as at_build:
            build_method(run.method, num_classes=10, image_shape=(1, 8, 8), device="cpu", generator=torch.Generator())
        reason = str(at_build.value).split(": ", 2)[-1]
        assert reason in str(at_load.value), (method, str(at_load.value), reason)


# ---------------------------------------------------------------- 3. the front ends


BAD_PARAMS = ("unknown-key-in-method", setter("methods", "jem", "optimizer", {}), "methods.jem.optimizer")


def _stage_args(stage: str, bad: Path, tmp: Path) -> list[str]:
    common = ["--params", str(bad), "--profile", "smoke"]
    run = ["--dataset", "digits", "--method", "jem", "--seed", "0", "--data", str(tmp / "data")]
    model = ["--model", str(tmp / "model.pt")]
    return {
        "check": ["check", *common],
        "data": ["data", *common, "--dataset", "digits", "--out", str(tmp / "out")],
        "train": ["train", *common, *run, "--out", str(tmp / "out")],
        "evaluate": ["evaluate", *common, *run, *model, "--out", str(tmp / "out" / "e.json")],
        "generate": ["generate", *common, *run, *model, "--out", str(tmp / "out")],
        "metrics": ["metrics", *common, *run, *model, "--samples", str(tmp / "s"), "--out", str(tmp / "out" / "m.json")],
        "figures": ["figures", *common, "--results", str(tmp / "r"), "--out", str(tmp / "out")],
        "tables": ["tables", *common, "--results", str(tmp / "r"), "--out", str(tmp / "out")],
    }[stage]


@pytest.mark.parametrize("command", ["check", "data", *RUN_STAGES, "figures", "tables"])
def test_every_command_refuses_bad_params_before_any_work(tmp_path, capsys, command):
    bad = write_params(tmp_path / "bad.yaml", edited(BAD_PARAMS[1]))
    assert cli.main(_stage_args(command, bad, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and BAD_PARAMS[2] in err and str(bad) in err and "'optim'" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()  # no job output started


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    root = copy_checkout(tmp_path_factory.mktemp("repo"))
    return root, hermetic_env(root)


def test_snakemake_refuses_bad_params_and_config_typos(repo_copy):
    root, env = repo_copy
    write_params(root / "bad.yaml", edited(BAD_PARAMS[1]))
    proc = snakemake(["-n", "--configfile", "bad.yaml"], root, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "bad.yaml" in out and BAD_PARAMS[2] in out and "'optim'" in out
    assert "nothing was run" in out and not parse_dry_run(proc.stdout)
    proc = snakemake(["-n", "--config", "profil=smoke"], root, env)  # a typo was silently ignored before
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "unknown --config key(s) ['profil']" in out and "['profile']" in out
    assert not parse_dry_run(proc.stdout)


def test_snakemake_configfile_is_the_params_file_of_every_job(repo_copy):
    root, env = repo_copy
    write_params(root / "other.yaml", edited(setter("profile", "smoke")))  # its own active profile
    proc = snakemake(["-n", "-p", "--configfile", "other.yaml"], root, env)
    assert proc.returncode == 0, proc.stderr
    jobs = [j for j in parse_dry_run(proc.stdout) if (j["command"] or "").startswith("robust-ebm")]
    assert len(jobs) > 50 and all(" --params other.yaml --profile smoke " in j["command"] for j in jobs)


# ---------------------------------------------------------------- 4. bad files


class RunsCode:
    """A pickle that would create a marker file when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_file(kind: str, good: Path, dst: Path) -> Path:
    raw = good.read_bytes()
    if kind == "truncated":
        dst.write_bytes(raw[: len(raw) // 2])
    elif kind == "random-bytes":
        dst.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        dst.write_bytes(b"")
    elif kind == "code-running-pickle":
        torch.save({"state_dict": RunsCode(dst.parent / "PWNED")}, dst)
    elif kind == "plain-pickle":
        dst.write_bytes(pickle.dumps(RunsCode(dst.parent / "PWNED")))
    return dst


TINY = ModelConfig(arch="tiny_cnn", width=4)


def _run(**update):
    base = dict(dataset_name="digits", dataset=SimpleNamespace(num_classes=3, channels=1, image_size=8), model=TINY,
                training=TrainingConfig())
    return SimpleNamespace(**(base | update))


@pytest.mark.parametrize("kind", ["truncated", "random-bytes", "empty", "code-running-pickle", "plain-pickle"])
def test_unreadable_model_file_is_refused_in_one_line(tmp_path, kind):
    good = tmp_path / "good.pt"
    save_classifier(good, tiny_classifier(0), TINY, {"dataset": "digits"})
    bad = _bad_file(kind, good, tmp_path / "model.pt")
    with pytest.raises(BadFileError) as info:
        load_for_run(_run(), bad)
    msg = str(info.value)
    assert str(bad) in msg and "rerun the train stage" in msg and "\n" not in msg
    assert not (tmp_path / "PWNED").exists()  # nothing was executed
    if kind == "code-running-pickle":
        assert "would run code" in msg


@pytest.mark.parametrize("case", ["architecture", "classes", "image-size", "dataset"])
def test_model_of_another_architecture_or_data_set_is_refused(tmp_path, case):
    path = tmp_path / "model.pt"
    classes, size, meta = (4, 8, {}) if case == "classes" else (3, 16, {}) if case == "image-size" else (3, 8, {})
    if case == "dataset":
        meta = {"dataset": "cifar10"}
    save_classifier(path, tiny_classifier(0, classes=classes, size=size), TINY, meta)
    run = _run(model=ModelConfig(arch="tiny_cnn", width=8)) if case == "architecture" else _run()
    with pytest.raises(BadFileError) as info:
        load_for_run(run, path)
    msg = str(info.value)
    expected = {"architecture": "not the expected", "classes": "num_classes=4, not 3",
                "image-size": "image_size=16, not 8", "dataset": "trained on data set 'cifar10', not 'digits'"}[case]
    assert str(path) in msg and expected in msg and "\n" not in msg


def test_truncated_resume_checkpoint_is_refused_and_kept(tmp_path):
    from test_train import make_run, make_splits
    from robust_ebm.train import train_splits

    out = tmp_path / "run"
    train_splits(make_run(epochs=1), make_splits(), None, out, max_steps=1)
    ckpt = out / "checkpoint.pt"
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: len(raw) // 3])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(BadFileError) as info:
        train_splits(make_run(epochs=1), make_splits(), None, out)
    assert str(ckpt) in str(info.value) and "move it away" in str(info.value) and "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing overwritten


def _image_folder(root: Path, fault: str) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    target = root / "train" / "b"
    if fault == "corrupt-image":
        (target / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        return target / "1.png"
    if fault == "truncated-image":
        raw = (target / "1.png").read_bytes()
        (target / "1.png").write_bytes(raw[: len(raw) // 2])
        return target / "1.png"
    if fault == "wrongly-sized-image":
        Image.fromarray(rng.integers(0, 255, (12, 8, 3), dtype=np.uint8)).save(target / "1.png")
        return target / "1.png"
    for f in target.iterdir():  # empty-class-folder
        f.unlink()
    return target


@pytest.mark.parametrize("fault", ["corrupt-image", "truncated-image", "wrongly-sized-image", "empty-class-folder"])
def test_bad_image_folder_is_refused_naming_the_file_and_nothing_is_written(tmp_path, fault):
    bad = _image_folder(tmp_path / "cifar10", fault)
    raw = edited(setter("datasets", "cifar10", "root", str(tmp_path / "cifar10")))
    raw["datasets"]["cifar10"].update(download=False, n_valid=2)
    params = load_params(write_params(tmp_path / "params.yaml", raw))
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "data.json").write_text("earlier result")
    with pytest.raises(data.DataUnavailableError) as info:
        prepare.prepare_stage(params, "paper", "cifar10", out)
    msg = str(info.value)
    assert str(bad) in msg and ("remove" in msg or "add its images" in msg) and "\n" not in msg
    assert sorted(p.name for p in out.iterdir()) == ["data.json"] and (out / "data.json").read_text() == "earlier result"


@pytest.fixture
def metrics_run(tmp_path, monkeypatch):
    """One run's metrics inputs on disk (tiny model, 12 samples, eval energies); tiny splits in memory."""
    g = torch.Generator().manual_seed(0)
    split = lambda n: SimpleNamespace(images=torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),  # noqa: E731
                                      labels=torch.arange(n) % 3)
    monkeypatch.setattr(metrics_module, "load_prepared", lambda d: (SimpleNamespace(train=split(8), valid=split(4), test=split(10)), None))
    save_classifier(tmp_path / "model.pt", tiny_classifier(0), TINY, {"dataset": "digits"})
    save_classifier(tmp_path / "refclf.pt", tiny_classifier(1), TINY, {"dataset": "digits"})
    samples = tmp_path / "samples"
    samples.mkdir()
    np.savez(samples / "sgld.npz", images=torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=g).numpy(),
             labels=np.repeat(np.arange(3), 4).astype(np.int64))
    (samples / "generate.json").write_text(json.dumps({"generators": {"sgld": {"files": {"npz": "sgld.npz"}, "count": 12}}}))
    (tmp_path / "eval.json").write_text("{}")
    e = np.arange(10, dtype=np.float32)
    np.savez(tmp_path / "eval.energies.npz", clean_marginal=e, clean_joint=e + 1, pgd_marginal=e - 1, pgd_joint=e + 5)
    from robust_ebm.config import MetricsConfig, PathsConfig

    metrics = MetricsConfig.model_validate({"inception": {"n_uniform": 12, "n_small": 12, "splits": 2},
                                            "fisher": {"probes": 1, "n_examples": 5}, "energy": {"n_examples": 12},
                                            "batch_size": 8})
    run = _run(metrics=metrics, paths=PathsConfig(results=str(tmp_path / "results")), seed=0, device="cpu",
               profile="smoke", run_name="smoke/digits/jem/s0")
    out = tmp_path / "out" / "m.json"
    out.parent.mkdir()
    out.write_text("earlier result")

    def call(**kw):
        return metrics_module.metrics_stage(run, tmp_path / "data", tmp_path / "model.pt", samples, tmp_path / "refclf.pt",
                                            tmp_path / "eval.json", out, **kw)
    return run, tmp_path, out, call


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)

    def no_network(url, dst):
        raise OSError("offline")
    monkeypatch.setattr(inception, "_download", no_network)


@pytest.mark.parametrize("which", ["eval-energies", "samples"])
def test_truncated_npz_is_refused_and_no_output_is_overwritten(metrics_run, offline, which):
    run, d, out, call = metrics_run
    npz = d / "eval.energies.npz" if which == "eval-energies" else d / "samples" / "sgld.npz"
    raw = npz.read_bytes()
    npz.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BadFileError) as info:
        call()
    msg = str(info.value)
    assert str(npz) in msg and "rerun the " + ("evaluate" if which == "eval-energies" else "generate") + " stage" in msg
    assert "\n" not in msg and out.read_text() == "earlier result" and not out.with_suffix(".energies.npz").exists()


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BadFileError, match="x.npz"):
        load_npz(path, fix="rerun")
    with pytest.raises(FileNotFoundError, match="no such file; rerun"):
        load_torch(tmp_path / "none.pt", fix="rerun")


# ---------------------------------------------------------------- 8 / 11.2: loud fallbacks, inputs listed by check


def test_configured_but_missing_inception_weights_is_an_error_before_any_work(metrics_run, offline):
    """Acceptance (issue 11.2): the metrics stage with a configured, missing weights path stops with a clear error."""
    run, d, out, call = metrics_run
    missing = d / "nowhere" / "inception.pth"
    run.paths = run.paths.model_copy(update={"inception_weights": str(missing)})
    with pytest.raises(inception.InceptionWeightsNotFound) as info:
        call()
    msg = str(info.value)
    assert str(missing) in msg and "paths.inception_weights" in msg and "does not exist" in msg and "\n" not in msg
    assert out.read_text() == "earlier result"


def test_inception_stand_in_is_a_logged_and_recorded_fallback(metrics_run, offline, caplog):
    run, d, out, call = metrics_run
    with caplog.at_level(logging.WARNING, logger="robust_ebm.fallback"):
        result = call()
    written = json.loads(out.read_text())
    assert written["inception"]["status"] == "unavailable"
    assert metrics_module.INCEPTION_FALLBACK in written["fallbacks"] == result["fallbacks"]
    assert any("Inception weights unavailable" in r.getMessage() for r in caplog.records)


def test_smaller_subset_is_a_logged_and_recorded_fallback(metrics_run, offline, caplog):
    run, d, out, call = metrics_run
    run.metrics = run.metrics.model_copy(update={"fisher": run.metrics.fisher.model_copy(update={"n_examples": 50})})
    with caplog.at_level(logging.WARNING, logger="robust_ebm.fallback"):
        result = call()
    note = "Fisher scores on 10 test images, 50 requested (metrics.fisher.n_examples)"
    assert note in result["fallbacks"] and any(note in r.getMessage() for r in caplog.records)


def test_cpu_for_gpu_is_a_logged_and_recorded_fallback(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    record: list[str] = []
    with caplog.at_level(logging.WARNING, logger="robust_ebm.fallback"):
        assert runtime.pick_device("auto", record).type == "cpu"
        assert runtime.pick_device("cpu", record).type == "cpu"  # asked for: no fallback
    assert record == [runtime.CPU_FALLBACK] and any(runtime.CPU_FALLBACK in r.getMessage() for r in caplog.records)


def test_table_captions_repeat_the_fallbacks(tmp_path, params):
    profile = params.profile_config("smoke")
    for i, (d, m) in enumerate(profile.runs):
        path = tmp_path / "metrics" / d / m / "s0.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"inception": {"status": "unavailable"}, "generators": {},
                                    "fallbacks": [metrics_module.INCEPTION_FALLBACK] + ([runtime.CPU_FALLBACK] if i < 2 else [])}))
    records = [r for r in tables.load_paper_records() if r["paper"] == "JEAT"]
    table = tables.build_table(records[0]["paper"], records[0]["table_id"],
                               [r for r in records if r["table_id"] == records[0]["table_id"]], profile,
                               tables.Results(tmp_path), {})
    n = len(profile.runs)
    assert f"Fallbacks: {metrics_module.INCEPTION_FALLBACK} ({n} of {n} stage outputs)" in table.caption
    assert f"{runtime.CPU_FALLBACK} (2 of {n} stage outputs)" in table.caption


def test_check_lists_data_weights_and_device_and_what_is_missing(tmp_path, capsys, monkeypatch, offline):
    monkeypatch.setenv("ROBUST_EBM_DATA_ROOT", str(tmp_path / "data"))
    raw = edited(setter("datasets", "cifar10", "download", False))
    path = write_params(tmp_path / "params.yaml", raw)
    assert cli.main(["check", "--params", str(path), "--profile", "mini"]) == 2
    captured = capsys.readouterr()
    out = captured.out
    assert f"data set cifar10: MISSING (looked for {tmp_path / 'data' / 'cifar10'}/train/<class>/*" in out
    assert "Inception weights: not found" in out and "paths.inception_weights" in out
    assert "device (auto):" in out
    assert "InputsMissing" in captured.err and "data set cifar10" in captured.err
    assert cli.main(["check", "--params", str(path), "--profile", "smoke"]) == 0  # digits ship with scikit-learn
    assert "data set digits: ships with scikit-learn" in capsys.readouterr().out
    raw["paths"]["inception_weights"] = str(tmp_path / "missing.pth")
    write_params(path, raw)
    assert cli.main(["check", "--params", str(path), "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "InceptionWeightsNotFound" in err and str(tmp_path / "missing.pth") in err and "paths.inception_weights" in err


def test_truncated_npz_read_by_figures_is_refused(tmp_path):
    from robust_ebm import energies_file, figures

    path = tmp_path / "s0.energies.npz"
    np.savez(path, clean_marginal=np.zeros(100), clean_joint=np.zeros(100))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BadFileError, match=r"s0.energies.npz cannot be read.*rerun the stage that wrote it"):
        energies_file.read_sets(path, fix=figures.ENERGIES_FIX)


def test_no_config_class_declares_a_field_twice():
    """A second declaration silently wins in a class body (MetricsConfig.batch_size had two defaults)."""
    import ast

    tree = ast.parse((ROOT / "src" / "robust_ebm" / "config.py").read_text())
    twice = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        names = [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
        twice += [f"{cls.name}.{n}" for n in set(names) if names.count(n) > 1]
    assert twice == []
