"""The package's import structure: no import cycle, and no stage module importing another stage module.

Stages share code through the layers below them (data, models, inference, energies_file, plan, ...), never
by importing each other: a stage's code dependencies (plan.stage_modules) then hold no other stage's code.
Imports are read with plan's walker (top level and inside functions, relative or absolute), as for the DAG.
"""

from __future__ import annotations

import ast

import pytest

from robust_ebm import plan


def _module_name(path) -> str:
    parts = [plan.PACKAGE, *path.relative_to(plan.PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in plan.PACKAGE_DIR.rglob("*.py"))


def imports(module: str) -> set[str]:
    """The package modules `module` imports itself (lazy imports included)."""
    return plan._imported(module, plan._parse(plan._module_file(module))) - {module}


def closure(module: str) -> set[str]:
    """Every package module importing `module` can run (parent packages' __init__ included), but itself."""
    seen, todo = set(), [p for m in imports(module) for p in plan._with_parents(m)]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [p for i in imports(m) for p in plan._with_parents(i)]
    return seen - {module}


def _defining_module(module: str, name: str) -> str:
    """The module that defines function `name`, following `from .x import name` re-exports (metrics/__init__)."""
    tree = plan._parse(plan._module_file(module))
    if any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body):
        return module
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(a.name == name for a in node.names):
            target = next(m for m in plan._imported(module, ast.Module(body=[node], type_ignores=[]))
                          if not m.endswith("." + name))
            return _defining_module(target, name)
    raise LookupError(f"{module} neither defines nor imports {name}")


def stage_entry_modules() -> dict[str, str]:
    """{stage: the module defining the `*_stage` function that cli.py's cmd_<stage> calls}."""
    cli = plan._parse(plan._module_file(plan.CLI_MODULE))
    commands = {n.name: n for n in cli.body if isinstance(n, ast.FunctionDef)}
    entries = {}
    for stage in plan.STAGES:
        found = [(node, alias.name) for node in ast.walk(commands[f"cmd_{stage}"]) if isinstance(node, ast.ImportFrom)
                 for alias in node.names if alias.name.endswith("_stage")]
        assert len(found) == 1, f"cmd_{stage} imports {len(found)} *_stage functions"
        node, name = found[0]
        module = next(m for m in plan._imported(plan.CLI_MODULE, ast.Module(body=[node], type_ignores=[]))
                      if not m.endswith("." + name))
        entries[stage] = _defining_module(module, name)
    return entries


def test_the_stage_entry_modules_are_found():
    entries = stage_entry_modules()
    assert entries["metrics"] == "robust_ebm.metrics.stage" and entries["data"] == "robust_ebm.prepare"
    assert len(set(entries.values())) == len(plan.STAGES)


@pytest.mark.parametrize("stage", plan.STAGES)
def test_no_stage_module_imports_another(stage):
    entries = stage_entry_modules()
    others = {m for s, m in entries.items() if s != stage}
    reached = closure(entries[stage]) & others
    assert not reached, f"stage module {entries[stage]} imports the stage module(s) {sorted(reached)}"


def test_the_walk_sees_an_import_of_a_stage_module(tmp_path, monkeypatch):
    """The check can fail: a module that imports evaluate (even lazily) reaches it."""
    fake = plan.PACKAGE_DIR / "structure_probe_tmp.py"
    assert not fake.exists()
    tree = ast.parse("def f():\n    from .evaluate import evaluate_stage\n")
    monkeypatch.setattr(plan, "_parse", lambda path, real=plan._parse: tree if path == fake else real(path))
    monkeypatch.setattr(plan, "_module_file", lambda m, real=plan._module_file:
                        fake if m == "robust_ebm.structure_probe_tmp" else real(m))
    assert "robust_ebm.evaluate" in closure("robust_ebm.structure_probe_tmp")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_package():
    assert len(MODULES) > 20 and "robust_ebm.inference" in MODULES
    graph = {m: imports(m) for m in MODULES}
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself


def test_the_samples_folder_is_named_by_samples_file_alone():
    """generate writes, and metrics, figures and digest read, the samples folder through samples_file.py (its one
    writer and reader, as energies_file.py is for energies): no other module spells its index's name."""
    owner = "robust_ebm.samples_file"
    index = __import__(owner, fromlist=["INDEX"]).INDEX
    spelled = []
    for module in MODULES:
        tree = plan._parse(plan._module_file(module))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        if any(isinstance(n, ast.Constant) and isinstance(n.value, str) and index in n.value
               and id(n) not in docstrings for n in ast.walk(tree)):
            spelled.append(module)
    assert spelled == [owner]
