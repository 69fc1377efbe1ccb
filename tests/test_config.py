"""params.yaml schema: the repository's file loads for every profile and run; bad input names its key."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from robust_ebm.config import ConfigError, RunConfig, load_params, params_from_dict


@pytest.fixture(scope="module")
def raw(repo_root):
    return yaml.safe_load((repo_root / "params.yaml").read_text())


def invalid(raw, edit) -> str:
    """Apply `edit` to a copy of the repo's params and return the ConfigError message."""
    data = copy.deepcopy(raw)
    edit(data)
    with pytest.raises(ConfigError) as info:
        params_from_dict(data)
    return str(info.value)


# ---------------------------------------------------------------- the repository's params.yaml


def test_every_profile_and_run_resolves(params):
    assert set(params.profiles) >= {"smoke", "mini", "paper"}
    for name in params.profiles:
        prof = params.profile_config(name)
        assert prof.runs, f"profile {name} has no runs"
        for dataset, method in prof.runs:
            for seed in prof.seeds:
                run = prof.run(dataset, method, seed)
                assert isinstance(run, RunConfig)
                assert run.model == prof.models[run.method.model]
                assert run.dataset.root is not None
                json.dumps(run.to_dict())  # JSON-able for MLflow / stage outputs


def test_smoke_profile_is_small_and_covers_every_method(params):
    prof = params.profile_config("smoke")
    assert prof.device == "cpu"
    assert {m for _, m in prof.runs} == set(params.methods)
    assert {d for d, _ in prof.runs} == {"digits"}
    for name, method in prof.methods.items():
        assert prof.models[method.model].arch == "tiny_cnn", name
        assert method.schedule.epochs <= (2 if method.sampler else 8), name  # the JEM family's epochs cost most
        assert method.attack is None or method.attack.steps <= 2, name
        assert method.sampler is None or method.sampler.steps <= 2, name
    assert prof.evaluation.autoattack.n_examples <= 32
    assert prof.table_datasets["CIFAR-10"] == "digits"


def test_paper_profile_keeps_the_papers_settings(params):
    prof = params.profile_config("paper")
    assert prof.methods["trades"].params["beta"] == 6.0
    assert prof.methods["jem"].optim.name == "adam"
    assert prof.models[prof.methods["jem"].model].norm == "none"
    assert prof.models[prof.methods["jempp"].model].bn_momentum == 0.9
    assert prof.evaluation.pgd.eps == pytest.approx(8 / 255)
    assert prof.evaluation.ebjdat_scale.eps == pytest.approx(4 / 255)
    assert set(prof.table_datasets) == {"CIFAR-10", "CIFAR-100", "SVHN", "Tiny-ImageNet", "ImageNet-subset-64x64"}
    assert ("cifar100", "ebjdat_sadajem") in prof.runs and ("svhn", "standard") not in prof.runs


def test_histogram_attacks_per_profile(params):
    """WEAT Fig.2's per-attack energies: WEAT's panels with full settings in paper/mini, reduced and tiny in smoke."""
    from robust_ebm.config import WEAT_FIG2_ATTACKS
    from robust_ebm.histogram_attacks import STANDARD, WEAT_FIG2

    paper, mini, smoke = (params.profile_config(p) for p in ("paper", "mini", "smoke"))
    for prof in (paper, mini):
        h = prof.evaluation.histogram_attacks
        assert h.attacks == list(WEAT_FIG2) and h.eps == pytest.approx(8 / 255) and h.step == pytest.approx(2 / 255)
        assert {k: getattr(h, k) for k in STANDARD} == STANDARD and h.apgd_restarts == 1
        assert prof.figures.histograms.attacks[:8] == list(WEAT_FIG2_ATTACKS)
    assert 0 < mini.evaluation.histogram_attacks.n_examples <= paper.evaluation.histogram_attacks.n_examples
    h = smoke.evaluation.histogram_attacks
    assert h.attacks == list(WEAT_FIG2) and h.n_examples <= 16
    assert h.apgd_iters <= 10 and h.fab_iters <= 10 and h.square_queries <= 100 and h.pgd_steps <= 2
    assert set(smoke.figures.histograms.attacks) - {"pgd"} <= set(WEAT_FIG2)


def test_generator_method_lists_are_expanded(params):
    prof = params.profile_config("paper")
    gens = prof.generation.generators
    assert "standard" in gens["jeat_eq17"].methods                 # methods: all
    assert "jem" in gens["jem_buffer"].methods and "standard" not in gens["jem_buffer"].methods
    assert "jem_buffer" not in prof.generation.for_method("trades")


# ---------------------------------------------------------------- errors name the key


def test_unknown_key_lists_allowed_keys(raw):
    msg = invalid(raw, lambda d: d["methods"]["trades"]["optim"].update(lr_typo=0.1))
    assert "methods.trades.optim.lr_typo" in msg and "'weight_decay'" in msg


def test_wrong_type(raw):
    msg = invalid(raw, lambda d: d["methods"]["trades"]["data"].update(batch_size="big"))
    assert "methods.trades.data.batch_size" in msg


def test_eps_above_one(raw):
    msg = invalid(raw, lambda d: d["methods"]["trades"]["attack"].update(eps=2.0))
    assert "methods.trades.attack.eps" in msg and "exceeds 1" in msg


def test_negative_steps(raw):
    msg = invalid(raw, lambda d: d["methods"]["pgd_at"]["attack"].update(steps=-3))
    assert "methods.pgd_at.attack.steps" in msg and "greater than or equal to 1" in msg


def test_bad_literal_lists_allowed_values(raw):
    msg = invalid(raw, lambda d: d["methods"]["trades"]["optim"].update(name="rmsprop"))
    assert "methods.trades.optim.name" in msg and "'sgd'" in msg and "'sam'" in msg


def test_unknown_histogram_attack_names_the_valid_ones(raw):
    msg = invalid(raw, lambda d: d["evaluation"]["histogram_attacks"].update(attacks=["apgd_ce", "autoattack"]))
    assert "evaluation.histogram_attacks.attacks" in msg and "unknown attack(s) ['autoattack']" in msg
    assert "valid names: pgd_kl, apgd_ce, apgd_t, apgd_dlr, fab, square, cw_l2, fab_t, cw_linf" in msg
    msg = invalid(raw, lambda d: d["profiles"]["smoke"]["overrides"]["evaluation"]["histogram_attacks"].update(
        attacks=["fgsm"], apgd_iters=0))
    assert "profile 'smoke'" in msg and "unknown attack(s) ['fgsm']" in msg and "histogram_attacks.apgd_iters" in msg


def test_unknown_method_in_profile(raw):
    msg = invalid(raw, lambda d: d["profiles"]["smoke"].update(runs={"digits": ["standard", "nope"]}))
    assert "profiles.smoke.runs.digits" in msg and "'nope'" in msg and "'standard'" in msg


def test_unknown_dataset_in_profile(raw):
    msg = invalid(raw, lambda d: d["profiles"]["smoke"].update(runs={"mnist": "all"}))
    assert "profiles.smoke.runs.mnist" in msg and "'digits'" in msg


def test_unknown_model(raw):
    msg = invalid(raw, lambda d: d["methods"]["jem"].update(model="wrn99"))
    assert "methods.jem.model" in msg and "wrn28_10_jem" in msg


def test_unknown_active_profile(raw):
    msg = invalid(raw, lambda d: d.update(profile="huge"))
    assert "profile" in msg and "'smoke'" in msg


def test_bad_value_inside_a_profile_override(raw):
    msg = invalid(raw, lambda d: d["profiles"]["smoke"]["overrides"]["methods"]["*"].update(optim={"lr": -1.0}))
    assert "profile 'smoke'" in msg and "methods.*.optim.lr" in msg and "(1 problem)" in msg  # once, not per method


def test_unknown_override_section(raw):
    msg = invalid(raw, lambda d: d["profiles"]["smoke"]["overrides"].update(metric={}))
    assert "profiles.smoke.overrides" in msg and "metrics" in msg


def test_every_problem_is_reported_at_once(raw):
    def edit(d):
        d["methods"]["trades"]["attack"]["steps"] = 0
        d["methods"]["mart"]["optim"]["momentum"] = 2.0
    msg = invalid(raw, edit)
    assert "methods.trades.attack.steps" in msg and "methods.mart.optim.momentum" in msg and "2 problems" in msg


def test_method_params_are_checked_by_the_methods_package(raw):
    msg = invalid(raw, lambda d: d["methods"]["trades"]["params"].update(gamma=1.0))
    assert "methods.trades.params" in msg and "gamma" in msg


# Settings that building the method (methods.base.Method.__init__) rejects, as (method, edit of its
# methods.<m> entry, the key the error names); check (load_params) must reject each one first.
BUILD_REJECTS = [
    ("jem", lambda m: m["sampler"].update(buffer_size=1005), "sampler.buffer_size"),   # 10 classes: one block each
    ("trades", lambda m: m["params"].update(gamma=1.0), "params"),                     # no such TRADES param
    ("trades", lambda m: m.update(sampler={"steps": 5}), "sampler"),                    # TRADES takes no sampler
    ("jeat", lambda m: m["attack"].update(objective="ce"), "attack.objective"),        # JEAT attacks E(x, y)
    ("pgd_at", lambda m: m["data"].update(px_batch_size=64), "data.px_batch_size"),     # no p(x) stream
]


@pytest.mark.parametrize("method, edit, key", BUILD_REJECTS, ids=[f"{m}-{k}" for m, _, k in BUILD_REJECTS])
def test_check_rejects_what_building_the_method_rejects(raw, params, repo_root, tmp_path, capsys, method, edit, key):
    """`robust-ebm check` fails on every setting Method.__init__ fails on, naming the key."""
    import torch

    from robust_ebm import cli
    from robust_ebm.methods import build_method

    data = copy.deepcopy(raw)
    edit(data["methods"][method])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["check", "--params", str(path), "--profile", "paper", "--skip-inputs"]) == 2
    assert f"methods.{method}.{key}:" in capsys.readouterr().err
    good = params.profile_config("paper")
    entry = good.method("cifar10", method).model_dump()
    edit(entry)   # the same edit, outside load_params: a MethodConfig built or edited in code
    bad = type(good.methods[method]).model_validate(entry)   # each setting is valid on its own
    with pytest.raises(ValueError, match=key.split(".")[-1]):
        build_method(bad, num_classes=good.datasets["cifar10"].num_classes, image_shape=(3, 32, 32), stats=None,
                     device="cpu", generator=torch.Generator().manual_seed(0))


def test_no_import_circle(repo_root):
    """The package's modules import each other without a circle, counting imports inside functions and
    under TYPE_CHECKING: the schema modules (attacks, sampling, optim, data, methods, ...) never import config."""
    import ast

    package = repo_root / "src" / "robust_ebm"
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        base = parts[:-1]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = list(base[:len(base) - node.level + 1]) + (node.module.split(".") if node.module else [])
                names = [".".join(target)] if node.module else [".".join([*target, a.name]) for a in node.names]
                graph[name].update(names)
    for name in graph:
        graph[name] = {t if t in graph else t.rsplit(".", 1)[0] for t in graph[name]} & set(graph) - {name}
    done: set[str] = set()

    def visit(node, stack):
        assert node not in stack, "import circle: " + " -> ".join([*stack[stack.index(node):], node])
        if node not in done:
            for target in sorted(graph[node]):
                visit(target, [*stack, node])
            done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert "robust_ebm.methods" in graph["robust_ebm.config"]   # the method registry is imported, not the reverse


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


# ---------------------------------------------------------------- profile resolution


def test_override_merge_order(raw):
    data = copy.deepcopy(raw)
    data["profiles"]["t"] = {"seeds": [3], "runs": {"digits": ["standard", "jem", "mart"]}, "overrides": {"methods": {
        "*": {"optim": {"lr": 0.5}, "sampler": {"steps": 3}, "data": {"px_batch_size": 7}},
        "jem": {"optim": {"lr": 0.25}},
        "mart": {"schedule": {"milestones": [1]}},
    }}}
    params = params_from_dict(data)
    prof = params.profile_config("t")
    std, jem, mart = prof.methods["standard"], prof.methods["jem"], prof.methods["mart"]
    assert std.optim.lr == 0.5 and jem.optim.lr == 0.25             # the named entry wins over "*"
    assert std.optim.momentum == params.methods["standard"].optim.momentum  # deep merge keeps siblings
    assert std.sampler is None and std.data.px_batch_size is None    # "*" never creates a null section
    assert jem.sampler.steps == 3 and jem.sampler.buffer_size == params.methods["jem"].sampler.buffer_size
    assert jem.data.px_batch_size == 7
    assert mart.schedule.milestones == [1]                           # lists replace
    assert params.methods["standard"].optim.lr == raw["methods"]["standard"]["optim"]["lr"]  # base untouched
    assert prof.runs == [("digits", "standard"), ("digits", "jem"), ("digits", "mart")] and prof.seeds == [3]


def test_env_sets_data_root_and_tracking_uri(params, monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUST_EBM_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x.db")
    run = params.profile_config("mini").run("cifar10", "standard", 0)
    assert run.dataset.root == str(tmp_path / "cifar10")
    assert run.tracking.uri == "sqlite:////tmp/x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert params.profile_config("mini").tracking.uri == "sqlite:///mlflow.db"


def test_explicit_dataset_root_wins(raw, monkeypatch, tmp_path):
    data = copy.deepcopy(raw)
    data["datasets"]["cifar10"]["root"] = "/data/my-cifar"
    monkeypatch.setenv("ROBUST_EBM_DATA_ROOT", str(tmp_path))
    assert params_from_dict(data).profile_config("paper").dataset("cifar10").root == "/data/my-cifar"


def test_unknown_names_at_resolution(params):
    with pytest.raises(ConfigError, match="allowed"):
        params.profile_config("nope")
    with pytest.raises(ConfigError, match="unknown method"):
        params.profile_config("smoke").run("digits", "nope", 0)


def test_selection_window_must_fit_the_schedule(raw):
    msg = invalid(raw, lambda d: d["methods"]["pgd_at"]["schedule"].update(epochs=50))
    assert "methods.pgd_at" in msg and "select.from_epoch=90" in msg


def test_training_on_the_holdout_forbids_selecting_on_it(raw):
    msg = invalid(raw, lambda d: d["methods"]["trades"]["select"].update(rule="best_val_pgd"))
    assert "methods.trades" in msg and "data.holdout is false" in msg and "select.rule: last" in msg


# ---------------------------------------------------------------- per-dataset method settings


def test_paper_profile_gives_weat_its_svhn_learning_rate(params):
    prof = params.profile_config("paper")
    for method in ("weat_nat", "weat_adv"):
        on_svhn, on_cifar = prof.run("svhn", method, 0).method, prof.run("cifar10", method, 0).method
        assert on_svhn.optim.lr == 0.01 and on_cifar.optim.lr == 0.1 == prof.methods[method].optim.lr
        assert on_svhn.model_copy(update={"optim": on_cifar.optim}) == on_cifar  # nothing else differs
    assert prof.run("svhn", "trades", 0).method == prof.methods["trades"]       # other methods untouched


def test_dataset_method_merge_order(raw):
    """methods.M < profile "*" < profile M < dataset "*" < dataset M; a profile's dataset_methods on top."""
    data = copy.deepcopy(raw)
    data["dataset_methods"] = {"digits": {
        "*": {"optim": {"lr": 0.3, "momentum": 0.5}, "schedule": {"epochs": 7, "milestones": [3]}, "select": {"from_epoch": 0},
              "sampler": {"steps": 9}},
        "jem": {"optim": {"lr": 0.4}},
    }}
    data["profiles"]["t"] = {"seeds": [0], "runs": {"digits": ["standard", "jem"], "svhn": ["jem"]}, "overrides": {
        "methods": {"*": {"optim": {"lr": 0.1, "weight_decay": 0.01}}, "jem": {"optim": {"lr": 0.2, "nesterov": True}}},
        "dataset_methods": {"digits": {"*": {"schedule": {"epochs": 5, "milestones": [3]}}, "standard": {"optim": {"momentum": 0.6}}}},
    }}
    prof = params_from_dict(data).profile_config("t")
    std, jem = prof.method("digits", "standard"), prof.method("digits", "jem")
    assert (std.optim.lr, jem.optim.lr) == (0.3, 0.4)                  # dataset "*" < dataset M, both beat the profile
    assert std.optim.weight_decay == jem.optim.weight_decay == 0.01    # profile "*" where no data-set setting
    assert jem.optim.nesterov is True and jem.optim.momentum == 0.5    # profile M, then dataset "*" (deep merge)
    assert std.optim.momentum == 0.6                                   # the profile's dataset_methods on top
    assert std.schedule.epochs == jem.schedule.epochs == 5             # ...also for the data set's "*"
    assert std.sampler is None and jem.sampler.steps == 9              # a data set's "*" never creates a section
    other = prof.method("svhn", "jem")                                 # other data sets: the profile's methods
    assert other == prof.methods["jem"] and (other.optim.lr, other.schedule.epochs) == (0.2, 200)
    assert prof.run("digits", "jem", 0).method == jem and prof.run("svhn", "jem", 0).method == other


def test_dataset_methods_unknown_keys_name_the_valid_ones(raw):
    msg = invalid(raw, lambda d: d.update(dataset_methods={"mnist": {"jem": {}}}))
    assert "dataset_methods.mnist" in msg and "unknown dataset 'mnist'" in msg and "'svhn'" in msg
    msg = invalid(raw, lambda d: d.update(dataset_methods={"svhn": {"weat": {}}}))
    assert "dataset_methods.svhn.weat" in msg and "'weat_adv'" in msg and "'*'" in msg
    msg = invalid(raw, lambda d: d["profiles"]["paper"]["overrides"]["dataset_methods"]["svhn"].update(nope={}))
    assert "profile 'paper'" in msg and "dataset_methods.svhn.nope" in msg and "'weat_nat'" in msg


def test_dataset_methods_values_are_validated_per_pair(raw):
    msg = invalid(raw, lambda d: d.update(dataset_methods={"svhn": {"weat_adv": {"optim": {"lr": -1}}}}))
    assert msg.startswith("params is invalid") and "dataset_methods.svhn.weat_adv.optim.lr" in msg
    msg = invalid(raw, lambda d: d.update(dataset_methods={"svhn": {"trades": {"optim": {"lr_typo": 1}}}}))
    assert "dataset_methods.svhn.trades.optim.lr_typo" in msg and "'momentum'" in msg
    msg = invalid(raw, lambda d: d.update(dataset_methods={"svhn": {"trades": {"model": "wrn99"}}}))
    assert "dataset_methods.svhn.trades.model" in msg and "'resnet18'" in msg
    msg = invalid(raw, lambda d: d["profiles"]["paper"]["overrides"]["dataset_methods"]["svhn"].update(
        weat_adv={"select": {"rule": "best_val_pgd"}}))
    assert "profile 'paper'" in msg and "dataset_methods.svhn.weat_adv" in msg and "data.holdout is false" in msg


def test_run_names_unknown_datasets(params):
    prof = params.profile_config("paper")
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnist'.*'svhn'"):
        prof.run("mnist", "weat_adv", 0)
    with pytest.raises(ConfigError, match=r"unknown method 'weat'.*'weat_adv'"):
        prof.method("svhn", "weat")


# ---------------------------------------------------------------- generators


def test_noisy_data_generator_init(raw):
    data = copy.deepcopy(raw)
    data["generation"]["generators"]["weat_noise"] = {"kind": "sgld", "init": "noisy_data", "sampler": {"energy": "joint"}}
    spec = params_from_dict(data).profile_config("paper").generation.generators["weat_noise"]
    assert spec.noise_std == pytest.approx(50 * 8 / 255)                # WEAT's default (papers.md §3.5)
    data["generation"]["generators"]["weat_noise"]["noise_std"] = "16/255"
    assert params_from_dict(data).generation.generators["weat_noise"].noise_std == pytest.approx(16 / 255)
    msg = invalid(data, lambda d: d["generation"]["generators"]["weat_noise"].update(noise_std=-0.1))
    assert "generation.generators.weat_noise.noise_std" in msg
    msg = invalid(raw, lambda d: d["generation"]["generators"]["weat_momentum"].update(noise_std=0.1))
    assert "generation.generators.weat_momentum.noise_std" in msg and "only read by init 'noisy_data'" in msg
    msg = invalid(raw, lambda d: d["generation"]["generators"]["weat_momentum"].update(init="noisy"))
    assert "generation.generators.weat_momentum.init" in msg and "'noisy_data'" in msg


def test_a_buffer_generator_on_a_method_without_sampler_is_refused_at_load(raw):
    """`robust-ebm check` rejects what generate would: a standard-trained run saves an empty replay buffer."""
    msg = invalid(raw, lambda d: d["generation"]["generators"]["jem_buffer"]["methods"].append("trades"))
    assert "generation.generators.jem_buffer" in msg and "'trades' has none (no sampler)" in msg
    msg = invalid(raw, lambda d: d["generation"]["generators"]["jem_buffer"].update(methods="all"))
    assert "'standard' has none" in msg
