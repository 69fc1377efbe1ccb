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
