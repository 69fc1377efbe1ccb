"""The job plan: jobs, paths, reference classifier, commands, dvc.yaml."""

import pytest
import yaml

from robust_ebm.config import load_params
from robust_ebm.plan import STAGES, Plan, dvc_yaml, shell_command
from repo_copy import ROOT


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def test_every_profile_plans_every_stage_under_its_own_results_dir(params):
    outputs = {}
    for name in params.profiles:
        plan = Plan(params, name)
        assert {j.stage for j in plan.jobs} == set(STAGES)
        for job in plan.jobs:
            assert all(o.startswith(f"{plan.results}/{name}/") for o in job.outputs)
            outputs.setdefault(name, set()).update(job.outputs)
    names = list(outputs)
    for i, a in enumerate(names):  # profiles never write the same file
        for b in names[i + 1:]:
            assert not outputs[a] & outputs[b]


def test_job_counts_follow_runs_and_seeds(params):
    plan = Plan(params, "smoke")
    runs = [(d, m, s) for d, m in plan.config.runs for s in plan.config.seeds]
    assert plan.runs == runs
    count = lambda stage: sum(j.stage == stage for j in plan.jobs)  # noqa: E731
    assert count("evaluate") == count("generate") == count("metrics") == len(runs)
    assert count("train") == len(runs) + len(plan.reference_runs)
    assert count("data") == len({d for d, _, _ in runs})


def test_every_metrics_job_has_a_planned_reference_classifier(params):
    for name in params.profiles:
        plan = Plan(params, name)
        models = {o for j in plan.jobs if j.stage == "train" for o in j.outputs}
        for job in (j for j in plan.jobs if j.stage == "metrics"):
            w = job.wildcards
            ref = f"{plan.results}/{name}/models/{w['dataset']}/{plan.refclf_method}/s{w['seed']}/model.pt"
            assert ref in job.inputs and ref in models


def test_reference_runs_are_added_train_only(params):
    plan = Plan(params, "paper")
    for d, m, s in plan.reference_runs:
        assert m == plan.refclf_method and (d, m, s) not in plan.runs
        assert not [j for j in plan.jobs if j.stage == "evaluate" and j.wildcards == {
            "profile": "paper", "dataset": d, "method": m, "seed": s}]


def test_command_names_every_input_and_output(params):
    plan = Plan(params, "smoke")
    job = plan.job("metrics", profile="smoke", dataset="digits", method="jem", seed="0")
    for path in [*job.outputs[:1], *(i for i in job.inputs if not i.startswith("src/") and "energies" not in i)]:
        assert f" {path}" in job.command
    assert job.command.startswith("robust-ebm metrics --params params.yaml --profile smoke")
    assert f"--log {job.log}" in job.command


def test_templates_render_to_the_concrete_command(params):
    plan = Plan(params, "smoke")
    job = plan.job("train", profile="smoke", dataset="digits", method="trades", seed=0)
    smk = plan.template("train", "snakemake")["command"]
    assert smk.format(wildcards=type("W", (), job.wildcards)) == job.command
    dvc = plan.template("train", "dvc")["command"]
    for k, v in job.wildcards.items():
        dvc = dvc.replace("${item." + k + "}", str(v))
    assert dvc == job.command


def test_settings_digest_changes_only_with_what_the_job_reads(params):
    plan = Plan(params, "smoke")
    w = dict(profile="smoke", dataset="digits", method="jem", seed=0)
    assert plan.settings("train", **w) == plan.settings("train", **w)
    assert plan.settings("train", **w) != plan.settings("train", **{**w, "method": "jempp"})


def test_unknown_job_and_profile_are_clear_errors(params):
    plan = Plan(params, "smoke")
    with pytest.raises(KeyError, match="plans no train job"):
        plan.job("train", profile="smoke", dataset="cifar10", method="jem", seed=0)
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        Plan(params, "nope")


def test_dvc_yaml_lists_every_job_of_every_profile(params):
    doc = yaml.safe_load(dvc_yaml(params))["stages"]
    for name in params.profiles:
        plan = Plan(params, name)
        for job in plan.jobs:
            items = doc[job.stage]["foreach"]
            assert job.name in items
    assert doc["claims"]["do"]["metrics"] == ["results/${item}/summary.json"]  # the only metrics: small and flat
    assert all("metrics" not in doc[s]["do"] for s in doc if s != "claims")
    assert doc["train"]["do"]["plots"][0] == {
        "results/${item.profile}/models/${item.dataset}/${item.method}/s${item.seed}/dynamics.json":
            {"x": "epoch", "y": "weat/dE_x", "title": "energy divergence ΔE(x) per epoch (dynamics.json)"}}
    assert "refclf" not in shell_command("metrics", {}, refclf=False)


def test_rerun_digests_change_only_for_the_stages_that_read_a_setting():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    from robust_ebm.config import params_from_dict

    def digests(mutate):
        r = yaml.safe_load(yaml.safe_dump(raw))
        mutate(r)
        plan = Plan(params_from_dict(r), "smoke")
        return {s: plan.settings(s, dataset="digits", method="trades", seed="0") for s in
                ("train", "evaluate", "generate", "metrics", "figures", "claims")}

    base = digests(lambda r: None)
    figures = digests(lambda r: r["figures"]["histograms"].update(bins=100))  # not overridden by smoke
    assert [s for s in base if base[s] != figures[s]] == ["figures"]
    landscape = digests(lambda r: r["profiles"]["smoke"]["overrides"]["metrics"]["landscape"].update(grid=7))
    assert [s for s in base if base[s] != landscape[s]] == ["metrics", "figures", "claims"]  # figures list metrics too
    lr = digests(lambda r: r["methods"]["trades"]["optim"].update(lr=0.05))
    assert [s for s in base if base[s] != lr[s]] == ["train"]
    evaluation = digests(lambda r: r["evaluation"]["pgd"].update(random_start="none"))  # not overridden by smoke
    assert [s for s in base if base[s] != evaluation[s]] == ["evaluate"]
    histograms = digests(lambda r: r["evaluation"]["histogram_attacks"].update(seed=1))  # WEAT Fig.2 energies
    assert [s for s in base if base[s] != histograms[s]] == ["evaluate"]
    panels = digests(lambda r: r["profiles"]["smoke"]["overrides"]["figures"]["histograms"].update(attacks=["pgd"]))
    assert [s for s in base if base[s] != panels[s]] == ["figures"]


def test_a_dataset_only_setting_reruns_only_that_data_sets_train_jobs():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    from robust_ebm.config import params_from_dict

    jobs = [("cifar10", "weat_adv"), ("cifar10", "trades"), ("svhn", "weat_adv"), ("svhn", "trades")]

    def digests(mutate):
        r = yaml.safe_load(yaml.safe_dump(raw))
        mutate(r)
        plan = Plan(params_from_dict(r), "paper")
        out = {(s, d, m): plan.settings(s, dataset=d, method=m, seed="0") for s in ("train", "evaluate", "generate", "metrics")
               for d, m in jobs}
        return out | {(s,): plan.settings(s) for s in ("figures", "tables")}

    def changed(mutate):
        before, after = digests(lambda r: None), digests(mutate)
        return sorted(k for k in before if before[k] != after[k])

    def svhn(r):
        return r["profiles"]["paper"]["overrides"]["dataset_methods"]["svhn"]

    assert changed(lambda r: svhn(r)["weat_adv"]["optim"].update(lr=0.02)) == [("train", "svhn", "weat_adv")]
    assert changed(lambda r: svhn(r).update({"*": {"data": {"augment": "none"}}})) == [
        ("train", "svhn", "trades"), ("train", "svhn", "weat_adv")]
    assert changed(lambda r: r["dataset_methods"].update(svhn={"trades": {"model": "preact_resnet18"}})) == [
        (s, "svhn", "trades") for s in ("evaluate", "generate", "metrics", "train")]  # the architecture is read by all


def test_each_dvc_stage_reads_its_own_settings_digest_and_settings_reads_params(params):
    """DVC's parameter of a job is its key of results/P/settings.json, whose value is the Snakemake digest."""
    doc = yaml.safe_load(dvc_yaml(params))["stages"]
    assert doc["settings"]["do"]["params"] == [{"params.yaml": None}]
    assert doc["settings"]["do"]["outs"] == [{"results/${item}/settings.json": {"cache": False}}]
    assert doc["train"]["do"]["params"] == [{"results/${item.profile}/settings.json": [
        "train.${item.profile}-${item.dataset}-${item.method}-s${item.seed}"]}]
    assert doc["figures"]["do"]["params"] == [{"results/${item}/settings.json": ["figures.${item}"]}]
    plan = Plan(params, "smoke")
    settings = plan.settings_file()
    assert sum(map(len, settings.values())) == len(plan.jobs)
    for job in plan.jobs:
        assert settings[job.stage][job.name] == plan.settings(job.stage, **job.wildcards)


def test_evaluate_reruns_when_its_attack_code_changes(params):
    job = Plan(params, "smoke").job("evaluate", profile="smoke", dataset="digits", method="trades", seed=0)
    for module in ("evaluate", "attacks", "autoattack", "histogram_attacks"):
        assert f"src/robust_ebm/{module}.py" in job.inputs


def test_snakemake_sees_every_code_file_of_a_stage_folder(params):
    """A folder input only reruns Snakemake jobs when the folder itself changes, so folders are listed file by file."""
    job = Plan(params, "smoke").job("metrics", profile="smoke", dataset="digits", method="trades", seed=0)
    assert "src/robust_ebm/metrics/stage.py" in job.inputs and "src/robust_ebm/metrics" not in job.inputs
    train = Plan(params, "smoke").job("train", profile="smoke", dataset="digits", method="trades", seed=0)
    assert "src/robust_ebm/methods/trades.py" in train.inputs
    assert all((ROOT / p).is_file() for p in job.inputs + train.inputs if p.startswith("src/"))


def test_moving_the_data_root_reruns_nothing(params, monkeypatch):
    """A new location of the same data (ROBUST_EBM_DATA_ROOT, paths.data_root) must not rerun a profile."""
    before = Plan(params, "paper").settings("data", dataset="cifar10")
    monkeypatch.setenv("ROBUST_EBM_DATA_ROOT", "/somewhere/else")
    assert Plan(params, "paper").settings("data", dataset="cifar10") == before
    changed = params.model_copy(deep=True)
    changed.datasets["cifar10"] = changed.datasets["cifar10"].model_copy(update={"n_train": 123})
    assert Plan(changed, "paper").settings("data", dataset="cifar10") != before  # a real setting still counts


def test_job_runtime_is_the_profiles_setting_and_reruns_nothing():
    """Snakemake's runtime comes from profiles.<P>.runtime, not from the profile's name; it is no job setting."""
    from robust_ebm.config import params_from_dict

    original = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profiles"]["smoke"]["runtime"] = {"train": 7, "other": 3}
    raw["profiles"]["renamed"] = raw["profiles"].pop("mini")
    params = params_from_dict(raw)
    smoke = Plan(params, "smoke")
    assert (smoke.resources("train")["runtime"], smoke.resources("tables")["runtime"]) == (7, 3)
    assert Plan(params, "renamed").resources("train")["runtime"] == original.profiles["mini"].runtime.train
    assert smoke.settings_file() == Plan(original, "smoke").settings_file()


def test_job_threads_are_the_profiles_setting_for_the_model_stages():
    """profiles.<P>.runtime.threads is the Snakemake `threads` of train/evaluate/generate/metrics jobs (1 elsewhere);
    like the runtime it is no job setting."""
    from robust_ebm.config import params_from_dict

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profiles"]["smoke"]["runtime"] = {"train": 30, "other": 30, "threads": 3}
    smoke = Plan(params_from_dict(raw), "smoke")
    assert {s: smoke.resources(s)["threads"] for s in ("data", "train", "evaluate", "generate", "metrics", "tables")} \
        == {"data": 1, "train": 3, "evaluate": 3, "generate": 3, "metrics": 3, "tables": 1}
    assert smoke.settings_file() == Plan(load_params(ROOT / "params.yaml"), "smoke").settings_file()
    assert Plan(load_params(ROOT / "params.yaml"), "smoke").resources("evaluate")["threads"] == 1  # default


def test_path_helpers_fill_the_plans_patterns(params):
    from robust_ebm.plan import beside, file_path, profile_path

    plan = Plan(params, "smoke")
    w = {"profile": "smoke", "dataset": "digits", "method": "jem", "seed": 0}
    v = plan.values("evaluate", w)
    root = f"{plan.results}/smoke"
    for key in ("data", "model", "dynamics", "eval", "eval_energies", "samples", "metrics_energies"):
        assert str(profile_path(key, root, **{k: w[k] for k in ("dataset", "method", "seed")})) == v[key], key
    assert str(profile_path("claims_json", root)) == v["claims_json"]
    assert str(beside(v["eval"], "eval", "eval_energies")) == v["eval_energies"]
    assert str(beside(v["metrics"], "metrics", "metrics_energies")) == v["metrics_energies"]
    assert str(beside(v["model_dir"], "model_dir", "model")) == v["model"]
    assert str(beside("/elsewhere/mine.json", "eval", "eval_energies")) == "/elsewhere/mine.energies.npz"
    assert str(file_path("eval", results=plan.results + "/", **w)) == v["eval"]
    with pytest.raises(ValueError, match="no 'eval' file beside"):
        beside(v["model"], "model", "eval")
    with pytest.raises(KeyError, match="needs more fields"):
        profile_path("eval", root, dataset="digits")


def test_figures_and_tables_declare_the_data_folders_they_read(params):
    plan = Plan(params, "smoke")
    for stage in ("figures", "tables"):
        inputs = plan.job(stage, profile="smoke").inputs
        for d in plan.datasets:
            assert plan.values("data", {"profile": "smoke", "dataset": d})["data"] in inputs, (stage, d)


def test_generate_declares_the_replay_buffer_its_train_job_writes(params):
    """generate's buffer generators read replay_buffer.pt: a declared output of every train job (methods without
    samples write an empty one) and a declared input of every generate job."""
    plan = Plan(params, "smoke")
    for d, m, s in plan.runs:
        w = {"profile": "smoke", "dataset": d, "method": m, "seed": s}
        buffer = plan.values("train", w)["replay_buffer"]
        assert buffer in plan.job("train", **w).outputs and buffer in plan.job("generate", **w).inputs, (m, buffer)
