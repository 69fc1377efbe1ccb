"""The conda environment of the rules parses and pins what pyproject.toml pins."""

import re
import tomllib

import yaml

from repo_copy import ROOT

PINNED = ("torch", "torchvision", "mlflow")


def pins(requirements):
    out = {}
    for req in requirements:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", req)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_conda_env_pins_match_pyproject():
    env = yaml.safe_load((ROOT / "envs" / "robust-ebm.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env_pins, project_pins = pins(pip), pins(project)
    for name in PINNED:
        assert name in project_pins, f"pyproject.toml no longer pins {name}"
        assert env_pins.get(name) == project_pins[name], f"envs/robust-ebm.yaml pins {name} differently"
    assert any(str(d).startswith("python") for d in env["dependencies"])
    assert any(p.strip().startswith("-e") for p in pip), "the env must install this package"


def test_every_rule_uses_the_env_file():
    rules = (ROOT / "workflow" / "rules").glob("*.smk")
    text = "\n".join(p.read_text() for p in rules)
    n_rules = len(re.findall(r"^rule (?!link_tables)\w+:", text, flags=re.M))
    assert text.count("conda: ENV") == n_rules
    assert 'ENV = "../../envs/robust-ebm.yaml"' in text
