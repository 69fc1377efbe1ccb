from types import SimpleNamespace

import pytest

from robust_ebm.bench import format_bench, run_bench
from robust_ebm.cli import cmd_bench
from robust_ebm.config import MethodConfig
from robust_ebm.models import ModelConfig

TINY = ModelConfig(arch="tiny_cnn", width=4)


def method(loss, **kw):
    base = dict(loss=loss, model="tiny", data={"batch_size": 8}, optim={"name": "sgd", "lr": 0.1},
                schedule={"name": "constant", "epochs": 1})
    return MethodConfig(**(base | kw))


def test_run_bench_reports_speed_and_memory_per_method():
    methods = {"standard": method("standard"),
               "pgd_at": method("pgd_at", attack={"steps": 2}),
               "sam": method("standard", optim={"name": "sam", "lr": 0.1, "sam_rho": 0.5})}
    rows = run_bench(methods, TINY, batch=8, device="cpu", steps=2, warmup=1, image_shape=(3, 16, 16))
    assert [r["method"] for r in rows] == list(methods) and {r["arch"] for r in rows} == {"tiny CNN"}
    for r in rows:
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0
        assert r["images_per_s"] == pytest.approx(8 * 1000 / r["ms_per_step"])
        assert r["mem_kind"] == "cpu_rss_delta" and r["device"] == "cpu"
    text = format_bench(rows)
    assert all(name in text for name in methods)


def test_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps >= 1"):
        run_bench({"standard": method("standard")}, TINY, batch=8, device="cpu", steps=0)


def test_cli_rejects_unknown_method():
    from pathlib import Path
    args = SimpleNamespace(params=str(Path(__file__).resolve().parents[1] / "params.yaml"), profile="smoke",
                           methods=["nope"], model=None, batch=4, device="cpu", steps=1, warmup=0)
    with pytest.raises(ValueError, match="unknown method"):
        cmd_bench(args)


# ---------------------------------------------------------------- FLOPs, MFU, the SGLD precision check (CPU)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from robust_ebm.bench import PEAK_TFLOPS, bench_groups, count_flops, peak_for_name, sgld_precision_check  # noqa: E402
from robust_ebm.config import load_params  # noqa: E402
from robust_ebm.models import build_model  # noqa: E402
from robust_ebm.sampling import SamplerConfig  # noqa: E402

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_count_flops_is_twice_the_multiply_adds_also_under_autograd_grad():
    n, d_in, d_out = 6, 5, 3
    layer = torch.nn.Linear(d_in, d_out, bias=False)
    x = torch.rand(n, d_in)
    assert count_flops(lambda: layer(x)) == 2 * n * d_in * d_out
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * (2 * n * d_in * d_out)  # + weight gradient
    x.requires_grad_(True)  # what attacks and SGLD do: the gradient of a leaf input, no weight gradient
    assert count_flops(lambda: torch.autograd.grad(layer(x).sum(), x)) == 2 * (2 * n * d_in * d_out)


def test_bench_rows_report_flops_and_mfu_against_a_given_peak():
    rows = run_bench({"standard": method("standard"), "pgd_at": method("pgd_at", attack={"steps": 2})}, TINY,
                     batch=4, device="cpu", steps=1, warmup=0, image_shape=(3, 16, 16), flops=True, peak_tflops=2.0)
    std, pgd = rows
    assert std["flops_per_step"] > 0 and pgd["flops_per_step"] > 2 * std["flops_per_step"]  # 2 attack steps on top
    for r in rows:
        assert r["tflops_per_s"] == pytest.approx(r["flops_per_step"] / (r["ms_per_step"] / 1000) / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops_per_s"] / 2.0) and r["peak_source"] == "given"
    cpu = run_bench({"standard": method("standard")}, TINY, batch=4, device="cpu", steps=1, warmup=0,
                    image_shape=(3, 16, 16), flops=True)[0]
    assert cpu["peak_tflops"] is None and cpu["mfu"] is None  # no peak known for the CPU: no MFU


def test_peak_table_matches_device_names():
    assert peak_for_name("NVIDIA H100 80GB HBM3", "bf16")[0] == PEAK_TFLOPS["H100"]["bf16"]
    assert peak_for_name("NVIDIA H100 PCIe", "fp32")[0] == PEAK_TFLOPS["H100 PCIe"]["fp32"]
    assert peak_for_name("NVIDIA H200", "tf32")[0] == PEAK_TFLOPS["H200"]["tf32"]
    assert peak_for_name("NVIDIA A100-SXM4-80GB", "bf16") == (None, None)


def test_bench_model_option_keeps_the_jem_family_variants():
    profile = load_params(PARAMS).profile_config("paper")
    groups = bench_groups(profile, ["pgd_at", "standard", "jem", "jempp"], "wrn28_10")
    assert {k: sorted(v) for k, v in groups.items()} == {
        "wrn28_10": ["pgd_at", "standard"], "wrn28_10_jem": ["jem"], "wrn28_10_jempp": ["jempp"]}
    own = bench_groups(profile, ["pgd_at", "jem"], None)
    assert {k: sorted(v) for k, v in own.items()} == {profile.methods["pgd_at"].model: ["pgd_at"],
                                                        "wrn28_10_jem": ["jem"]}


def _sgld_check(sampler, tol):
    torch.manual_seed(0)
    model = build_model(TINY, num_classes=10, in_channels=3, image_size=16)
    return sgld_precision_check(model, sampler, n=8, image_shape=(3, 16, 16), num_classes=10, device="cpu",
                                seed=0, tol=tol)


@pytest.mark.parametrize("sampler", [SamplerConfig(steps=3, step_size=1.0, noise_std=0.01),
                                     SamplerConfig(kind="pyld", steps=2, inner_steps=2, noise_std=0.01)])
def test_sgld_precision_check_compares_the_same_chains(sampler):
    res = _sgld_check(sampler, tol=0.1)
    assert res["steps"] == sampler.steps and len(res["fp32"]["trace_mean"]) == sampler.steps
    tf32, bf16 = res["precisions"]["tf32"], res["precisions"]["bf16"]
    # TF32 does not exist on the CPU: the same start and noise give the very same chains
    assert tf32["mean_abs_pixel_diff"] == 0 and tf32["delta_mean_in_std"] == 0 and tf32["verdict"] == "tf32 ok"
    assert bf16["mean_abs_pixel_diff"] > 0  # bf16 autocast does change the chains on the CPU
    assert bf16["verdict"] == ("bf16 ok" if max(abs(bf16["delta_mean_in_std"]), abs(bf16["delta_std_in_std"])) <= 0.1
                               else "keep fp32")
    strict = _sgld_check(sampler, tol=0.0)["precisions"]["bf16"]  # any difference at all fails a zero tolerance
    assert strict["verdict"] == "keep fp32" and strict["delta_mean_in_std"] == bf16["delta_mean_in_std"]


def test_cli_bench_writes_every_batch_and_precision_and_the_sgld_check(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = SimpleNamespace(params=str(PARAMS), profile="smoke", methods=["standard", "jem"], model=None, batch=[4, 8],
                           precision=["fp32", "bf16"], device="cpu", steps=1, warmup=0, flops=True, peak_tflops=None,
                           json=str(out), sgld_check=True, sgld_chains=4, sgld_steps=2, sgld_tol=0.1, sgld_seed=0,
                           sgld_weights=None)
    cmd_bench(args)
    report = json.loads(out.read_text())
    assert report["complete"] is True
    got = sorted((r["method"], r["batch"], r["precision"]) for r in report["rows"])
    assert got == sorted((m, b, p) for m in ("standard", "jem") for b in (4, 8) for p in ("fp32", "bf16"))
    assert all(r["flops_per_step"] > 0 for r in report["rows"])
    assert [c["method"] for c in report["sgld_check"]] == ["jem"] and report["sgld_check"][0]["steps"] == 2
    assert "sgld check jem" in capsys.readouterr().out


def test_sgld_checks_run_one_chain_set_per_sampler_and_architecture():
    from robust_ebm.bench import sgld_checks

    profile = SimpleNamespace(models={"tiny": TINY})
    jem = method("jem", sampler={"steps": 2})
    other = method("jem", sampler={"steps": 2, "step_size": 0.5})
    args = SimpleNamespace(device="cpu", sgld_seed=0, sgld_chains=4, sgld_steps=None, sgld_tol=0.1, sgld_weights=None)
    a, b, c = sgld_checks(profile, {"tiny": {"a": jem, "b": jem, "c": other, "d": method("standard")}}, args)
    assert (a["method"], b["method"], b["same_as"], c["method"]) == ("a", "b", "a", "c") and "same_as" not in c
    assert b["precisions"] == a["precisions"] and c["fp32"]["mean"] != a["fp32"]["mean"]


def test_sgld_checks_on_trained_weights_run_every_sampler_on_that_model(tmp_path):
    from robust_ebm.bench import sgld_checks
    from robust_ebm.models import save_classifier

    torch.manual_seed(1)
    trained = build_model(TINY, num_classes=10, in_channels=3, image_size=16)
    save_classifier(tmp_path / "model.pt", trained, TINY, {})
    jem = method("jem", sampler={"steps": 2})
    args = SimpleNamespace(device="cpu", sgld_seed=0, sgld_chains=4, sgld_steps=None, sgld_tol=0.1,
                           sgld_weights=str(tmp_path / "model.pt"))
    [res] = sgld_checks(SimpleNamespace(models={"tiny": TINY}), {"tiny": {"jem": jem}}, args)
    direct = sgld_precision_check(trained.eval(), jem.sampler, n=4, image_shape=(3, 16, 16), num_classes=10,
                                  device="cpu", seed=0)
    assert res["weights"] == f"trained: {tmp_path / 'model.pt'}"
    assert res["fp32"]["mean"] == direct["fp32"]["mean"]  # the chains ran on the saved weights, 16x16 images
    fresh = sgld_checks(SimpleNamespace(models={"tiny": TINY}), {"tiny": {"jem": jem}},
                        SimpleNamespace(**{**vars(args), "sgld_weights": None}))[0]
    assert fresh["fp32"]["mean"] != res["fp32"]["mean"]
