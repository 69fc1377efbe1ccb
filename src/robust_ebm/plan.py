"""The job plan of a profile: every stage job, its files and its command.

One source for both front ends. The Snakefile's rules take their path
patterns and shell commands from `PATTERNS` and `shell_command`, and
`robust-ebm dvc-yaml` writes dvc.yaml from `dvc_yaml` (same templates with
DVC's `${item.x}` syntax). A command therefore reads the same, byte for
byte, whichever tool runs it (tests/test_dag_sync.py checks it).

Jobs of profile P (everything under results/P/):

    data      per data set                      results/P/data/D/
    train     per (data set, method, seed)      results/P/models/D/M/sS/{model.pt,train.json,dynamics.json,
                                                                         replay_buffer.pt}
    evaluate  per run                           results/P/eval/D/M/sS.json
    generate  per run                           results/P/samples/D/M/sS/
    metrics   per run (needs the reference)     results/P/metrics/D/M/sS.json
    figures   one                               results/P/figures/
    claims    one                               results/P/claims.{json,csv,md}, results/P/summary.json
    tables    one                               results/P/tables/

The metrics stage scores samples with a reference classifier: the `standard`
method (params `metrics.refclf.method`) on the same data set and seed. When a
profile's runs lack it, the plan adds its train job only (a "reference"
run: trained, not evaluated, not in the tables).

Paths. Every stage finds the files it reads and writes through PATTERNS: `profile_path` (a file in the
results/P folder the profile stages are given), `beside` (a file of the same job, e.g. the energies npz
beside --out s0.json), `file_path` (any pattern, every field given).

Code inputs. A job also depends on every package file its `robust-ebm <stage>`
command can import (`stage_modules`: the static import closure from cli.py's
`cmd_<stage>`, lazy imports included), listed file by file in both the
Snakefile and dvc.yaml. Editing sampling.py therefore reruns every train job
and what follows; editing figures.py reruns figures and tables only.
`code_digest("train")` of the same files keys the train checkpoint's resume.

Settings inputs. A job also depends on the resolved settings it reads (`Plan.resolved_settings`):
Snakemake through the rule's `params: settings` (their digest), DVC through the job's key of
results/P/settings.json, the digests of every job, written by the DVC-only stage `settings@P`
(`robust-ebm settings`), which reads params.yaml. One figure setting reruns figures and tables only.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

PARAMS_FILE = "params.yaml"
RUN_STAGES = ("train", "evaluate", "generate", "metrics")
STAGES = ("data", *RUN_STAGES, "figures", "claims", "tables")
PROFILE_STAGES = ("figures", "claims", "tables")  # one job per profile, fan-in of every run
SETTINGS_STAGE = "settings"  # DVC only: writes results/P/settings.json, the per-job settings digests
GPU_STAGES = RUN_STAGES  # resources: gpu=1 on a non-CPU profile

# File patterns relative to the repository root. {results} is params
# `paths.results`; the other fields are the wildcards of a job.
PATTERNS = {
    "data": "{results}/{profile}/data/{dataset}",
    "model_dir": "{results}/{profile}/models/{dataset}/{method}/s{seed}",
    "model": "{results}/{profile}/models/{dataset}/{method}/s{seed}/model.pt",
    "train_json": "{results}/{profile}/models/{dataset}/{method}/s{seed}/train.json",
    "dynamics": "{results}/{profile}/models/{dataset}/{method}/s{seed}/dynamics.json",
    # the SGLD replay buffer at the end of training, read by generate's `buffer` generators; every run has one (a
    # method without samples writes one of zero images that says so)
    "replay_buffer": "{results}/{profile}/models/{dataset}/{method}/s{seed}/replay_buffer.pt",
    "eval": "{results}/{profile}/eval/{dataset}/{method}/s{seed}.json",
    "eval_energies": "{results}/{profile}/eval/{dataset}/{method}/s{seed}.energies.npz",
    "samples": "{results}/{profile}/samples/{dataset}/{method}/s{seed}",
    "metrics": "{results}/{profile}/metrics/{dataset}/{method}/s{seed}.json",
    "metrics_energies": "{results}/{profile}/metrics/{dataset}/{method}/s{seed}.energies.npz",
    "refclf": "{results}/{profile}/models/{dataset}/{refclf}/s{seed}/model.pt",
    "figures": "{results}/{profile}/figures",
    "claims_json": "{results}/{profile}/claims.json",
    "claims_csv": "{results}/{profile}/claims.csv",
    "claims_md": "{results}/{profile}/claims.md",
    "tables": "{results}/{profile}/tables",
    "summary": "{results}/{profile}/summary.json",
    "settings": "{results}/{profile}/settings.json",
    # not files of the DAG: train's resumable state and metrics' cache of Inception reference statistics
    "checkpoint": "{results}/{profile}/models/{dataset}/{method}/s{seed}/checkpoint.pt",
    "inception_cache": "{results}/{profile}/cache/inception",
}
PROFILE_DIR = "{results}/{profile}"  # every pattern lies under it: the --results folder of figures, claims, tables
LOGS = {
    "data": "logs/{profile}/data/{dataset}.log",
    **{s: f"logs/{{profile}}/{s}/{{dataset}}-{{method}}-s{{seed}}.log" for s in RUN_STAGES},
    "figures": "logs/{profile}/figures.log",
    "claims": "logs/{profile}/claims.log",
    "tables": "logs/{profile}/tables.log",
    SETTINGS_STAGE: "logs/{profile}/settings.log",
}
# What each stage reads and writes (keys of PATTERNS).
INPUTS = {
    "data": (),
    "train": ("data",),
    "evaluate": ("data", "model"),
    "generate": ("data", "model", "replay_buffer"),
    "metrics": ("data", "model", "samples", "refclf", "eval", "eval_energies"),
}
OUTPUTS = {
    "data": ("data",),
    "train": ("model", "train_json", "dynamics", "replay_buffer"),
    "evaluate": ("eval", "eval_energies"),
    "generate": ("samples",),
    "metrics": ("metrics", "metrics_energies"),
    "figures": ("figures",),
    "claims": ("claims_json", "claims_csv", "claims_md", "summary"),
    "tables": ("tables",),
}
# The package code a stage runs; a change reruns the stage in both tools. Derived from the
# code (see `stage_modules`), never listed by hand.
PACKAGE = "robust_ebm"
PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = "src/robust_ebm"  # where PACKAGE_DIR sits in the repository (paths in the Snakefile and dvc.yaml)
CLI_MODULE = f"{PACKAGE}.cli"  # every stage command runs `robust-ebm <stage>`, i.e. cli.cmd_<stage>


def _module_file(module: str) -> Path | None:
    """robust_ebm.a.b -> PACKAGE_DIR/a/b.py or PACKAGE_DIR/a/b/__init__.py; None outside the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py") if len(parts) > 1 else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imported(module: str, tree: ast.Module, skip_functions: frozenset[str] = frozenset()) -> set[str]:
    """Package modules `tree` imports: top level and inside functions (lazy imports), relative or
    absolute, and `importlib.import_module("robust_ebm...")`; not `if TYPE_CHECKING:` blocks, not the
    bodies of the top-level functions and classes named in `skip_functions`."""
    is_package = _module_file(module) is not None and _module_file(module).name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # kept when it is a module
        elif isinstance(node, ast.Call) and _literal_import_module(node):
            found.add(node.args[0].value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in skip_functions:
            continue
        visit(node)
    return {m for m in found if _module_file(m) is not None}


def _literal_import_module(call: ast.Call) -> bool:
    """`importlib.import_module("a.b")` or `import_module("a.b")` with a constant name."""
    name = getattr(call.func, "attr", getattr(call.func, "id", None))
    return name == "import_module" and bool(call.args) and isinstance(call.args[0], ast.Constant) \
        and isinstance(call.args[0].value, str)


def _with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _data_files(tree: ast.Module) -> set[Path]:
    """Package data files a module names by a string literal, e.g. 'resources/paper_tables.yaml'."""
    files = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "/" in node.value \
                and not node.value.endswith(".py") and len(node.value) < 200:
            candidate = PACKAGE_DIR / node.value
            if not node.value.startswith("/") and ".." not in node.value and candidate.is_file():
                files.add(candidate)
    return files


@lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@lru_cache(maxsize=None)
def stage_modules(stage: str) -> tuple[Path, ...]:
    """Every package file the `robust-ebm <stage>` command can run, sorted (a static import closure).

    Roots: cli.py's module-level imports and the imports inside the functions and classes of
    cli.py that `main` or `cmd_<stage>` reach by name (helpers such as `_run_stage`), never
    entering another `cmd_*` subcommand. From there every import of a package module is followed,
    including imports inside functions; importing a.b also counts a/__init__.py. Package data
    files a module names by path (e.g. tables.py's resources/paper_tables.yaml) count as code too.
    """
    cli_tree = _parse(_module_file(CLI_MODULE))
    defined = {n.name: n for n in cli_tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    commands = {name for name in defined if name.startswith("cmd_")}
    entry = f"cmd_{stage.replace('-', '_')}"
    if entry not in commands:
        raise ValueError(f"cli.py has no `{entry}` for stage '{stage}'; stages: {', '.join(sorted(commands))}")
    reached, stack = set(), ["main", entry]
    while stack:  # cli.py's own call graph, by the names each reached definition mentions
        name = stack.pop()
        if name in reached or name not in defined or (name in commands and name != entry):
            continue
        reached.add(name)
        stack += [n.id for n in ast.walk(defined[name]) if isinstance(n, ast.Name)]
    todo = [*_with_parents(CLI_MODULE)]
    todo += [p for m in _imported(CLI_MODULE, cli_tree, frozenset(set(defined) - reached)) for p in _with_parents(m)]
    seen: set[str] = set()
    files: set[Path] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        files.add(path)
        if module == CLI_MODULE:
            continue  # its imports were filtered above
        tree = _parse(path)
        files |= _data_files(tree)
        todo += [p for m in _imported(module, tree) for p in _with_parents(m) if p not in seen]
    return tuple(sorted(files))


def code_files(stage: str) -> tuple[str, ...]:
    """`stage_modules` as repository paths (src/robust_ebm/...): Snakemake inputs and DVC deps."""
    return tuple(f"{SOURCE_DIR}/{p.relative_to(PACKAGE_DIR).as_posix()}" for p in stage_modules(stage))


def code_digest(stage: str) -> str:
    """sha256 of the stage's code files (path and bytes): what a resumed job must still be running."""
    digest = hashlib.sha256()
    for path in stage_modules(stage):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# The robust-ebm command line of each stage (architecture.md "Stage command line").
_HEAD = "robust-ebm {stage} --params {params_file} --profile {profile}"
_RUN = " --dataset {dataset} --method {method} --seed {seed} --data {data}"
COMMANDS = {
    "data": _HEAD + " --dataset {dataset} --out {data} --log {log}",
    "train": _HEAD + _RUN + " --out {model_dir} --log {log}",
    "evaluate": _HEAD + _RUN + " --model {model} --out {eval} --log {log}",
    "generate": _HEAD + _RUN + " --model {model} --out {samples} --log {log}",
    "metrics": _HEAD + _RUN + " --model {model} --samples {samples} --refclf {refclf}"
    " --eval {eval} --out {metrics} --log {log}",
    "figures": _HEAD + " --results {results}/{profile} --out {figures} --log {log}",
    "claims": _HEAD + " --results {results}/{profile} --out {results}/{profile} --log {log}",
    "tables": _HEAD + " --results {results}/{profile} --out {tables} --log {log}",
    SETTINGS_STAGE: _HEAD + " --out {settings}",
}
WILDCARDS = {
    "data": ("profile", "dataset"),
    **{s: ("profile", "dataset", "method", "seed") for s in RUN_STAGES},
    "figures": ("profile",),
    "claims": ("profile",),
    "tables": ("profile",),
    SETTINGS_STAGE: ("profile",),
}


def _fill(template: str, values: dict[str, Any]) -> str:
    """str.format that leaves unknown fields untouched (so patterns can be filled in steps)."""

    class Keep(dict):
        def __missing__(self, key):
            return "{" + key + "}"

    return template.format_map(Keep(values))


def _filled(key: str, values: dict[str, Any], pattern: str | None = None) -> str:
    text = _fill(PATTERNS[key] if pattern is None else pattern, values)
    if "{" in text:
        raise KeyError(f"path pattern '{key}' ({PATTERNS[key]}) needs more fields than {sorted(values)}")
    return text


def file_path(key: str, **values: Any) -> Path:
    """PATTERNS[key] filled with `values` (results, profile and the job's wildcards), e.g.
    file_path("inception_cache", results="results", profile="smoke")."""
    if "results" in values:
        values["results"] = str(values["results"]).rstrip("/")
    return Path(_filled(key, values))


def profile_path(key: str, profile_dir: str | Path, **wildcards: Any) -> Path:
    """PATTERNS[key] inside one profile's results folder `profile_dir` (results/P, what figures, claims and
    tables are given as --results), e.g. profile_path("eval", d, dataset="digits", method="jem", seed=0)."""
    prefix = PROFILE_DIR + "/"
    if not PATTERNS[key].startswith(prefix):
        raise ValueError(f"path pattern '{key}' ({PATTERNS[key]}) is not under {PROFILE_DIR}")
    return Path(profile_dir) / _filled(key, wildcards, PATTERNS[key][len(prefix):])


def beside(path: str | Path, key: str, other: str) -> Path:
    """The file of pattern `other` that belongs with `path`, a file of pattern `key` of the same job: the two
    patterns share everything up to their last wildcard, e.g. beside(".../s0.json", "eval", "eval_energies")
    -> ".../s0.energies.npz", beside(out_dir, "model_dir", "model") -> out_dir/model.pt."""
    a, b = PATTERNS[key], PATTERNS[other]
    cut = a.rfind("}") + 1
    tail = a[cut:]
    text = str(Path(path))
    if not b.startswith(a[:cut]) or "{" in b[cut:] or not text.endswith(tail):
        raise ValueError(f"{path} as a '{key}' file ({a}) has no '{other}' file beside it ({b})")
    return Path(text[: len(text) - len(tail)] + b[cut:])


def job_name(stage: str, wildcards: dict[str, Any]) -> str:
    """DVC foreach key and log name: 'smoke-digits-jem-s0', 'smoke-digits', 'smoke'."""
    w = wildcards
    if stage == "data":
        return f"{w['profile']}-{w['dataset']}"
    if stage in RUN_STAGES:
        return f"{w['profile']}-{w['dataset']}-{w['method']}-s{w['seed']}"
    return str(w["profile"])


# The RunConfig fields each run stage reads (its Snakemake rerun digest; every stage that runs a model reads
# "training" for its memory layout, models.place). Upstream changes reach
# a stage through its input files (e.g. a retrained model.pt), so they need not be listed here.
# "method" is the method's settings on the job's data set (config `dataset_methods` merged), so a
# data-set-only setting changes the digests of that data set's jobs alone.
RUN_STAGE_SETTINGS = {
    "train": ("dataset", "method_name", "method", "model", "seed", "device", "training"),
    "evaluate": ("dataset", "method_name", "model", "seed", "device", "training", "evaluation"),
    "generate": ("dataset", "method_name", "model", "seed", "device", "training", "generation"),
    "metrics": ("dataset", "method_name", "model", "seed", "device", "training", "metrics", "inception_weights"),
}


def run_settings(run, stage: str) -> dict[str, Any]:
    """The RunConfig fields `stage` reads (RUN_STAGE_SETTINGS), as JSON-ready values."""
    values = run.to_dict()
    values["dataset"].pop("root")  # where data is read from is not a setting of the result
    values["inception_weights"] = values["paths"]["inception_weights"]
    return {key: values[key] for key in RUN_STAGE_SETTINGS[stage]}


def settings_digest(payload: Any) -> str:
    """sha256 (16 hex digits) of resolved settings: the rerun trigger in both tools."""
    text = json.dumps(payload, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_settings_digest(run, stage: str) -> str:
    """Digest of the RunConfig fields `stage` reads (RUN_STAGE_SETTINGS): the rerun trigger of a run job
    (Snakemake `params:`, DVC's settings.json), and the settings part of a resumable job's resume key (resume.py for
    train, generate.py)."""
    return settings_digest(run_settings(run, stage))


@dataclass(frozen=True)
class Job:
    """One stage job: concrete wildcards, files, command, params keys it reads."""

    stage: str
    wildcards: dict[str, Any] = field(hash=False)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    log: str
    command: str
    reference: bool = False  # a train job that exists only to serve as metrics' refclf

    @property
    def name(self) -> str:
        return job_name(self.stage, self.wildcards)


class Plan:
    """Every job of one profile, built from validated Params (see config.load_params)."""

    def __init__(self, params, profile: str | None = None, params_file: str = PARAMS_FILE):
        self.params = params
        self.profile = profile or params.profile
        if self.profile not in params.profiles:
            raise ValueError(
                f"unknown profile '{self.profile}'; params.yaml defines: {', '.join(params.profiles)}"
            )
        self.params_file = params_file
        self.config = params.profile_config(self.profile)
        self.results = str(self.config.paths.results).rstrip("/")
        self.refclf_method = self.config.metrics.refclf.method if self.config.metrics.refclf.enabled else None

    # -- the axes -------------------------------------------------------
    @cached_property
    def runs(self) -> list[tuple[str, str, int]]:
        """(dataset, method, seed) of every evaluated run, in params order."""
        return [(d, m, s) for d, m in self.config.runs for s in self.config.seeds]

    @cached_property
    def reference_runs(self) -> list[tuple[str, str, int]]:
        """Train-only runs added for the reference classifier (empty when all are in `runs`)."""
        if self.refclf_method is None:
            return []
        wanted = dict.fromkeys((d, self.refclf_method, s) for d, _, s in self.runs)
        return [r for r in wanted if r not in set(self.runs)]

    @cached_property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(d for d, _, _ in self.runs))

    @cached_property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(m for _, m, _ in self.runs + self.reference_runs))

    # -- files and commands ---------------------------------------------
    def values(self, stage: str, wildcards: dict[str, Any]) -> dict[str, Any]:
        """Every pattern of PATTERNS filled for these wildcards (plus log and stage)."""
        base = {"results": self.results, "params_file": self.params_file, "refclf": self.refclf_method,
                "stage": stage, **wildcards}
        filled = {key: _fill(pattern, base) for key, pattern in PATTERNS.items()}
        return {**base, **filled, "log": _fill(LOGS[stage], base)}

    def _job(self, stage: str, wildcards: dict[str, Any], *, reference: bool = False) -> Job:
        v = self.values(stage, wildcards)
        if stage in PROFILE_STAGES:
            inputs = self.fan_in(stage)
        else:
            keys = [k for k in INPUTS[stage] if not (k == "refclf" and self.refclf_method is None)]
            inputs = tuple(v[k] for k in keys)
        return Job(
            stage=stage,
            wildcards=wildcards,
            inputs=inputs + code_files(stage),
            outputs=tuple(v[k] for k in OUTPUTS[stage]),
            log=v["log"],
            command=shell_command(stage, v, refclf=self.refclf_method is not None),
            reference=reference,
        )

    def fan_in(self, stage: str) -> tuple[str, ...]:
        """Inputs of the profile-wide stages: explicit file lists, never a glob."""
        files: list[str] = [self.values(stage, {"profile": self.profile, "dataset": d})["data"]
                            for d in self.datasets] if stage in ("figures", "tables") else []  # test images, data.json
        if stage == "claims":  # the numbers: evaluate and metrics outputs of every run (DVC: their folders)
            for d, m, s in self.runs:
                v = self.values(stage, {"profile": self.profile, "dataset": d, "method": m, "seed": s})
                files += [v["eval"], v["eval_energies"], v["metrics"], v["metrics_energies"]]
            return tuple(files)
        for d, m, s in self.runs + self.reference_runs:
            v = self.values(stage, {"profile": self.profile, "dataset": d, "method": m, "seed": s})
            files += [v[k] for k in OUTPUTS["train"]]
        for d, m, s in self.runs:
            v = self.values(stage, {"profile": self.profile, "dataset": d, "method": m, "seed": s})
            files += [v["eval"], v["eval_energies"], v["metrics"], v["metrics_energies"]]
            files += [v["samples"]] if stage == "figures" else []
        if stage == "tables":
            v = self.values(stage, {"profile": self.profile})
            files += [v["figures"], v["claims_json"]]
        return tuple(files)

    @cached_property
    def jobs(self) -> list[Job]:
        P = self.profile
        jobs = [self._job("data", {"profile": P, "dataset": d}) for d in self.datasets]
        for d, m, s in self.runs + self.reference_runs:
            jobs.append(self._job("train", {"profile": P, "dataset": d, "method": m, "seed": s},
                                  reference=(d, m, s) in self.reference_runs))
        for stage in ("evaluate", "generate", "metrics"):
            jobs += [self._job(stage, {"profile": P, "dataset": d, "method": m, "seed": s})
                     for d, m, s in self.runs]
        jobs += [self._job(stage, {"profile": P}) for stage in PROFILE_STAGES]
        return jobs

    def job(self, stage: str, **wildcards) -> Job:
        """The planned job for these wildcards; a clear error when the profile has no such job."""
        wildcards = {k: (int(v) if k == "seed" else str(v)) for k, v in wildcards.items()}
        for job in self.jobs:
            if job.stage == stage and job.wildcards == wildcards:
                return job
        raise KeyError(f"profile '{self.profile}' plans no {stage} job for {wildcards}; "
                       f"see `robust-ebm check --profile {self.profile}` for the planned jobs")

    def resolved_settings(self, stage: str, **wildcards) -> Any:
        """The resolved settings a job reads: profile overrides merged onto the base sections and
        `dataset_methods` onto the method, for this job's data set and method."""
        c = self.config
        if stage == "data":  # where the files are read from is not a setting of the result (data.json records it)
            return c.dataset(wildcards["dataset"]).model_dump(mode="json", exclude={"root"})
        if stage in RUN_STAGES:
            return run_settings(c.run(wildcards["dataset"], wildcards["method"], int(wildcards["seed"])), stage)
        if stage == "claims":  # the claims read no figure setting
            return {"runs": self.runs, "seeds": c.seeds, "metrics": c.metrics, "table_datasets": c.table_datasets}
        return {"runs": self.runs, "figures": c.figures, "metrics": c.metrics, "table_datasets": c.table_datasets}

    def settings(self, stage: str, **wildcards) -> str:
        """A digest of the resolved settings a job reads (Snakemake `params:`, DVC `settings.json`)."""
        return settings_digest(self.resolved_settings(stage, **wildcards))

    def settings_file(self) -> dict[str, dict[str, str]]:
        """results/P/settings.json: {stage: {job name: settings digest}} of every job of the profile.
        Each DVC stage lists its own key as a parameter (`settings_key`), so a change in params.yaml marks
        exactly the jobs whose resolved settings changed, as Snakemake's `params: settings` does."""
        out: dict[str, dict[str, str]] = {}
        for job in self.jobs:
            out.setdefault(job.stage, {})[job.name] = self.settings(job.stage, **job.wildcards)
        return out

    def resources(self, stage: str) -> dict[str, int]:
        """gpu/mem/runtime/threads for Snakemake: GPU stages ask for one GPU unless the profile is CPU-only;
        runtime (minutes) and the threads of the run stages are the profile's `runtime`."""
        gpu = int(stage in GPU_STAGES and self.config.device != "cpu")
        limits = self.params.profiles[self.profile].runtime
        runtime = limits.train if stage == "train" else limits.other
        threads = limits.threads if stage in RUN_STAGES else 1
        return {"gpu": gpu, "mem_mb": 32000 if gpu else 8000, "runtime": runtime, "threads": threads}

    def template(self, stage: str, style: str) -> dict[str, str]:
        """`values` with placeholders instead of wildcard values: 'pattern' -> {x} (Snakemake
        input/output patterns), 'snakemake' -> {wildcards.x} (shell), 'dvc' -> ${item.x}."""
        if style == "pattern":
            marks = {n: "{" + n + "}" for n in WILDCARDS[stage]}
        else:
            marks = placeholders(stage, style)
        v = self.values(stage, marks)
        v["command"] = shell_command(stage, v, refclf=self.refclf_method is not None)
        return v

    def describe(self) -> str:
        """A human-readable job list (printed by `robust-ebm check`)."""
        lines = [f"profile {self.profile}: {len(self.jobs)} jobs; {len(self.runs)} runs over "
                 f"{len(self.datasets)} data set(s) and seeds {self.config.seeds}"]
        if self.reference_runs:
            lines.append("reference classifiers (train only, for metrics): "
                         + ", ".join(f"{d}/{m}/s{s}" for d, m, s in self.reference_runs))
        for stage in STAGES:
            names = [j.name for j in self.jobs if j.stage == stage]
            lines.append(f"  {stage:9s} {len(names):4d}  e.g. {names[0] if names else '-'}")
        return "\n".join(lines)


def shell_command(stage: str, values: dict[str, Any], *, refclf: bool = True) -> str:
    """The command of `stage` with `values` filled in (concrete or placeholder strings)."""
    template = COMMANDS[stage]
    if not refclf:
        template = template.replace(" --refclf {refclf}", "")
    return _fill(template, values)


def settings_key(stage: str, wildcards: dict[str, Any]) -> str:
    """The key of a job in results/P/settings.json (a DVC params key): '<stage>.<job name>'."""
    return f"{stage}.{job_name(stage, wildcards)}"


def placeholders(stage: str, style: str) -> dict[str, str]:
    """Wildcard placeholders: style 'snakemake' -> {wildcards.x}; 'dvc' -> ${item.x}."""
    names = WILDCARDS[stage]
    if style == "snakemake":
        return {n: "{wildcards." + n + "}" for n in names}
    if style == "dvc":
        return {n: ("${item}" if names == ("profile",) else "${item." + n + "}") for n in names}
    raise ValueError(f"unknown placeholder style '{style}' (use 'snakemake' or 'dvc')")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return str(value)


# --------------------------------------------------------------------------- dvc.yaml

_DVC_HEADER = """\
# Generated by `robust-ebm dvc-yaml` from params.yaml and src/robust_ebm/plan.py: do not edit.
# The same jobs and byte-identical commands as the Snakefile (tests/test_dag_sync.py).
# Stage names: <stage>@<profile>[-<dataset>[-<method>-s<seed>]], e.g. train@smoke-digits-jem-s0.
#   dvc repro tables@smoke       the smoke profile (CPU, minutes)
#   dvc repro tables@paper       every paper table (GPU days)
# Fan-in stages (figures, claims, tables) depend on results directories, whose producers DVC finds.
"""


def _dvc_stage(stage: str, items, template: dict[str, str], plan: "Plan") -> dict:
    """One foreach stage: `items` are the explicit job wildcards, `do` the templated job."""
    if stage in PROFILE_STAGES:
        root = "{results}/${{item}}".format(results=plan.results)
        if stage == "claims":
            deps = [f"{root}/{d}" for d in ("eval", "metrics")]
        else:
            deps = [f"{root}/{d}" for d in ("data", "models", "eval", "metrics")]
            deps += [f"{root}/samples"] if stage == "figures" else [f"{root}/figures", f"{root}/claims.json"]
    else:
        keys = [k for k in INPUTS[stage] if not (k == "refclf" and plan.refclf_method is None)]
        deps = [template[k] for k in keys]
    settings = {template["settings"]: [settings_key(stage, placeholders(stage, "dvc"))]}
    do: dict[str, Any] = {"cmd": template["command"], "deps": deps + list(code_files(stage)), "params": [settings]}
    outs = [template[k] for k in OUTPUTS[stage]]
    # dynamics.json: one record per epoch (robust_ebm.dynamics); every method has WEAT's ΔE(x) by default
    plots = [{o: {"x": "epoch", "y": "weat/dE_x", "title": "energy divergence ΔE(x) per epoch (dynamics.json)"}}
             for o in outs if o.endswith("/dynamics.json")]
    metrics = [o for o in outs if o.endswith("/summary.json")]  # headline numbers of a profile, small and flat
    do["outs"] = [o for o in outs if o not in metrics and o not in {next(iter(p)) for p in plots}]
    if metrics:
        do["metrics"] = metrics
    if plots:
        do["plots"] = plots
    return {"foreach": items, "do": do}


def dvc_stage_name(job: Job) -> str:
    """The DVC stage of a job: '<stage>@<job name>', e.g. train@smoke-digits-jem-s0."""
    return f"{job.stage}@{job.name}"


def _dvc_settings_stage(profiles: list[str], template: dict[str, str]) -> dict:
    """settings@P writes results/P/settings.json (`robust-ebm settings`) whenever params.yaml or the code
    that resolves settings changes; every other stage lists its own key of that file as a parameter."""
    return {"foreach": profiles, "do": {"cmd": template["command"], "deps": list(code_files(SETTINGS_STAGE)),
                                        "params": [{PARAMS_FILE: None}],
                                        "outs": [{template["settings"]: {"cache": False}}]}}


def dvc_yaml(params, profiles: list[str] | None = None, params_file: str = PARAMS_FILE) -> str:
    """dvc.yaml text: one foreach stage per pipeline stage over the jobs of every profile."""
    import yaml

    plans = [Plan(params, p, params_file=params_file) for p in (profiles or list(params.profiles))]
    if len({(p.results, p.refclf_method) for p in plans}) > 1:
        raise ValueError("dvc.yaml needs one `paths.results` and one `metrics.refclf.method` for all "
                         "profiles (the stage templates are shared); remove those profile overrides")
    stages: dict[str, Any] = {SETTINGS_STAGE: _dvc_settings_stage([p.profile for p in plans],
                                                                  plans[0].template(SETTINGS_STAGE, "dvc"))}
    for stage in STAGES:
        items: dict[str, Any] = {}
        for plan in plans:
            for job in (j for j in plan.jobs if j.stage == stage):
                items[job.name] = dict(job.wildcards)
        if stage in PROFILE_STAGES:
            items = list(items)  # foreach over profile names: ${item}
        stages[stage] = _dvc_stage(stage, items, plans[0].template(stage, "dvc"), plans[0])
    body = yaml.safe_dump({"stages": stages}, sort_keys=False, width=1000, default_flow_style=None)
    return _DVC_HEADER + body
