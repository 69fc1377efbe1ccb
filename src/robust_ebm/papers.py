"""The published numbers of the three papers (resources/paper_tables.yaml) and how the papers'
names map to ours (resources/paper_mapping.yaml): read by the tables (paper vs ours), the claims
(a method's own generated set) and the clean-vs-AutoAttack scatter (published points beside ours).

The mapping is data; `mapping_problems(params)` checks every key of ours it names against
params.yaml. `robust-ebm check` and the stages that read the mapping (figures, claims, tables) run
that check before any work; the other stages neither read nor import it, so editing the mapping
never invalidates a trained model.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from .schema_types import Strict

MAPPING_FILE = "resources/paper_mapping.yaml"


class _Ours(Strict):
    ours: str | None
    note: str = ""


class _Metric(Strict):
    """Where our number for a paper metric lives, or why there is none."""

    file: Literal["eval", "metrics"] | None = None
    path: str | None = None
    scale: float = Field(1.0, gt=0.0)
    reason: str | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.file is None) != (self.path is None) or (self.file is None) == (self.reason is None):
            raise ValueError("give either file and path (and scale) or a reason")
        return self


class _StandIn(Strict):
    column: str
    path: str


class _Mapping(Strict):
    datasets: dict[str, str]
    architectures: list[str]
    methods: dict[str, str | _Ours | None]
    generators: dict[str, str] = Field(description="method -> its own generator; `default`: every other method")
    metrics: dict[str, _Metric]
    stand_ins: dict[str, _StandIn]


def _load_mapping() -> _Mapping:
    text = resources.files("robust_ebm").joinpath(MAPPING_FILE).read_text()
    try:
        return _Mapping.model_validate(yaml.safe_load(text))
    except ValidationError as err:
        raise ValueError(f"{MAPPING_FILE} is invalid: {err}") from None


_MAPPING = _load_mapping()
DEFAULT_GENERATOR_KEY = "default"
# Paper method name -> (our method key | None, note). None: an external baseline we do not train.
METHODS: dict[str, tuple[str | None, str]] = {
    name: (m.ours, m.note) if isinstance(m, _Ours) else (m, "") for name, m in _MAPPING.methods.items()}
# Paper metric -> (our file 'eval'|'metrics', dotted JSON path, scale) or (None, reason, None).
METRICS: dict[str, tuple[str | None, str, float | None]] = {
    name: (m.file, m.path, m.scale) if m.file else (None, m.reason, None) for name, m in _MAPPING.metrics.items()}
# Paper metric -> (stand-in column, dotted path) of ours only, beside Inception IS/FID (reference classifier).
STAND_INS: dict[str, tuple[str, str]] = {name: (s.column, s.path) for name, s in _MAPPING.stand_ins.items()}
# Paper data-set name -> our data set key for the same data.
PAPER_DATASETS: dict[str, str] = dict(_MAPPING.datasets)
KNOWN_ARCHITECTURES: frozenset[str] = frozenset(_MAPPING.architectures)
# A paper's metric names for the two axes of the clean-vs-AutoAttack scatter (EB-JDAT Fig.1).
CLEAN_METRICS = ("clean_accuracy", "accuracy_no_attack")
AUTOATTACK_METRIC = "robust_accuracy_AA"


def own_generator(method: str) -> str:
    """The generated set that is `method`'s own (its IS/FID, its clean-vs-generated energy gap)."""
    gens = _MAPPING.generators
    if method not in gens and DEFAULT_GENERATOR_KEY not in gens:
        raise ValueError(f"{MAPPING_FILE}: no generator for method '{method}' and no '{DEFAULT_GENERATOR_KEY}'; add one")
    return gens.get(method, gens.get(DEFAULT_GENERATOR_KEY))


def mapping_problems(params) -> list[str]:
    """Every key of ours that paper_mapping.yaml names but `params` (config.Params) lacks, each with its fix,
    as '<key in the mapping>: <problem>'."""
    methods, datasets = sorted(params.methods), sorted(params.datasets)
    generators = params.generation.generators
    problems = []
    for name, (ours, _) in METHODS.items():
        if ours is not None and ours not in params.methods:
            problems.append(f"methods.{name}: '{ours}' is not a method of params.yaml (allowed: {methods}); "
                            "fix the name, set it to null (an external baseline), or add the method")
    for name, key in PAPER_DATASETS.items():
        if key not in params.datasets:
            problems.append(f"datasets.{name}: '{key}' is not a data set of params.yaml (allowed: {datasets})")
    if DEFAULT_GENERATOR_KEY not in _MAPPING.generators:
        problems.append(f"generators: no '{DEFAULT_GENERATOR_KEY}' entry; add one (the generator of every "
                        "method not listed) or list every method")
    for method, gen in _MAPPING.generators.items():
        if method != DEFAULT_GENERATOR_KEY and method not in params.methods:
            problems.append(f"generators.{method}: not a method of params.yaml (allowed: {methods} "
                            f"or '{DEFAULT_GENERATOR_KEY}')")
        elif gen not in generators:
            problems.append(f"generators.{method}: '{gen}' is not a generator of params.yaml "
                            f"(generation.generators: {sorted(generators)})")
    for method in params.methods if DEFAULT_GENERATOR_KEY in _MAPPING.generators else []:
        gen = own_generator(method)
        if gen in generators and not generators[gen].applies_to(method):
            problems.append(f"generators.{method}: its own generator '{gen}' does not run for it "
                            f"(generation.generators.{gen}.methods); add '{method}' there or map it to another")
    for profile in params.profiles if DEFAULT_GENERATOR_KEY in _MAPPING.generators else []:
        generation = params.profile_config(profile).generation  # a profile may narrow `methods` per generator
        for _, method in params.profile_config(profile).runs:
            gen = own_generator(method)
            if gen in generation.generators and not generation.generators[gen].applies_to(method) \
                    and generators[gen].applies_to(method):
                problems.append(f"generators.{method}: its own generator '{gen}' does not run for it in profile "
                                f"'{profile}' (profiles.{profile}.overrides.generation.generators.{gen}.methods); "
                                f"add '{method}' there")
    sections = {"eval": {"columns": {"clean", *type(params.evaluation).model_fields}},
                "metrics": {"generators", "inception", *type(params.metrics).model_fields}}
    paths = [(f"metrics.{n}", m.file, m.path) for n, m in _MAPPING.metrics.items() if m.file]
    paths += [(f"stand_ins.{n}", "metrics", s.path) for n, s in _MAPPING.stand_ins.items()]
    for key, file, path in paths:
        head, _, rest = path.partition(".")
        fields = {f for _, f, _, _ in string.Formatter().parse(path) if f is not None}
        if file == "eval":
            ok = head == "columns" and rest.partition(".")[0] in sections["eval"]["columns"]
            allowed = f"columns.<one of {sorted(sections['eval']['columns'])}>..."
        else:
            ok = head in sections["metrics"]
            allowed = f"<one of {sorted(sections['metrics'])}>..."
        if not ok:
            problems.append(f"{key}.path: '{path}' is not a field of the {file} stage's output; allowed: {allowed}")
        if fields - {"generator"}:
            problems.append(f"{key}.path: unknown placeholder(s) {sorted(fields - {'generator'})} in '{path}'; "
                            "only {generator} (the method's own generator) is filled in")
    return problems


def load_paper_records() -> list[dict]:
    text = resources.files("robust_ebm").joinpath("resources/paper_tables.yaml").read_text()
    return yaml.safe_load(text)["records"]


@dataclass(frozen=True)
class PublishedPoint:
    """A published (clean, AutoAttack) accuracy pair in %, and the tables that report it."""

    method: str             # the paper's method name
    ours: str | None        # our method key (METHODS), None for a baseline we do not train
    clean: float
    autoattack: float
    sources: tuple[str, ...]  # '<paper> <table_id>'


def published_accuracy_points(dataset: str, records: list[dict] | None = None) -> list[PublishedPoint]:
    """Every row of the papers on `dataset` (the paper's name, e.g. 'CIFAR-10') that reports both clean and
    AutoAttack accuracy; a method reported with the same pair in several tables is one point. Rows that
    METHODS maps to no method of ours *with a note* (weight ablations, analysis settings) are left out:
    only methods and external baselines are points."""
    rows: dict[tuple, dict] = {}
    for r in records if records is not None else load_paper_records():
        ours, note = METHODS.get(r["method"], (None, "not mapped"))
        if r["dataset"] == dataset and r["metric"] in (*CLEAN_METRICS, AUTOATTACK_METRIC) and (ours or not note):
            key = (r["paper"], r["table_id"], r["method"], str(r.get("architecture")))
            rows.setdefault(key, {})[r["metric"]] = r.get("value")
    points: dict[tuple, list[str]] = {}
    for (paper, table_id, method, _), values in rows.items():
        clean = next((values[m] for m in CLEAN_METRICS if isinstance(values.get(m), (int, float))), None)
        aa = values.get(AUTOATTACK_METRIC)
        if isinstance(clean, (int, float)) and isinstance(aa, (int, float)):
            points.setdefault((method, float(clean), float(aa)), []).append(f"{paper} {table_id}")
    return [PublishedPoint(m, METHODS.get(m, (None, ""))[0], c, a, tuple(src)) for (m, c, a), src in points.items()]
