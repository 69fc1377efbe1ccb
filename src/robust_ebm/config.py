"""Top-level schema of params.yaml, its validation, and profile resolution.

params.yaml is the single source of truth. `load_params` validates all of it
before any work: the top-level sections, every profile's merged view, every
name a profile, method or generator refers to, and everything each method
requires (methods.method_problems; per run, methods.dataset_problems), so
`robust-ebm check` rejects what training would reject. Any problem raises one
`ConfigError` that lists each bad key by its dotted path and the allowed
values.

A section's schema lives beside its algorithm (OptimConfig in optim.py, SamplerConfig in
sampling.py, AttackConfig in attacks.py, DatasetConfig in data.py, a method's `params` in its
methods/ file, ...); this module imports them and none of them imports it. The schemas of the
training loop, evaluation, generation, metrics, landscape and figures stay here: their modules
import config or are code no training job may depend on (every stage imports this module, and
plan.code_files makes each module it imports a code dependency of every job).

    params = load_params("params.yaml")
    prof = params.profile_config("smoke")          # ProfileConfig (overrides merged)
    for dataset, method in prof.runs:
        for seed in prof.seeds:
            run = prof.run(dataset, method, seed)   # RunConfig: everything one job needs

Profile merge order (`ProfileSpec.overrides`, applied to the top-level sections):
  1. the top-level sections as written;
  2. in `datasets`, `models` and `methods`: the override under the key "*"
     is deep-merged onto every entry, but never turns a null/absent optional
     value into a set one (so `"*": {sampler: {steps: 2}}` shortens every
     sampler without giving standard training one);
  3. the override under an entry's own name is deep-merged on top;
  4. every other section, `dataset_methods` included, is deep-merged as is.
Deep merge: mappings merge key by key; lists, scalars and null replace.

Per-dataset method settings (`dataset_methods: {<dataset>: {<method> | "*": {...}}}`,
top level and in a profile's overrides). The settings of method M on data set D
are, lowest priority first:
  a. methods.M                         (top level)
  b. overrides.methods."*"             (profile; steps 2-3 above)
  c. overrides.methods.M               (profile)
  d. dataset_methods.D."*"             (top level, then the profile's on top; as in
                                        step 2 it never sets a null/absent optional value)
  e. dataset_methods.D.M               (top level, then the profile's on top)
The more specific key wins: a data set's own setting beats any setting of "every
data set" (a profile's shortening included), and the pair (D, M) beats D alone,
so `svhn: {"*": {data: {augment: none}}}` holds for every method unless that method's
own svhn entry says otherwise.
A profile that must change a data-set setting (e.g. shorten a schedule that
dataset_methods sets) does so in its own `dataset_methods`.
`ProfileConfig.method(D, M)` and `ProfileConfig.run(D, M, seed)` return the result.
"""

from __future__ import annotations

import copy
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

# Each section's schema lives beside its algorithm; none of these modules imports config.
from .attacks import AttackConfig
from .autoattack import AutoAttackConfig
from .data import DataConfig, DatasetConfig
from .dynamics import DynamicsConfig
from .histogram_attacks import WEAT_FIG2 as HISTOGRAM_WEAT_FIG2, HistogramAttacksConfig
from .methods import dataset_problems, method_problems
from .models import ModelConfig
from .optim import OptimConfig, ScheduleConfig
from .sampling import NOISY_DATA_STD, SamplerConfig
from .schema_types import Fraction, Strict

DATA_ROOT_ENV = "ROBUST_EBM_DATA_ROOT"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class ConfigError(ValueError):
    """params.yaml (or a profile of it) is invalid; the message lists every bad key."""


# --------------------------------------------------------------------------- paths, tracking


class PathsConfig(Strict):
    results: str = "results"
    data_root: str = Field(".cache/data", description=f"parent of every data set root; env {DATA_ROOT_ENV} overrides")
    inception_weights: str | None = Field(None, description="local pt_inception weights file (offline FID/IS)")
    torch_home: str | None = None


class TrackingConfig(Strict):
    experiment_prefix: str = "robust-ebm"
    uri: str | None = Field(None, description=f"null: env {TRACKING_URI_ENV}, else {DEFAULT_TRACKING_URI}")


# --------------------------------------------------------------------------- one training method


class SelectConfig(Strict):
    """Which epoch's weights become model.pt (never chosen on the test set)."""

    rule: Literal["last", "best_val_clean", "best_val_pgd"] = "last"
    from_epoch: int = Field(0, ge=0, description="ignore epochs before this one (WEAT: 90)")


class GuardConfig(Strict):
    """Divergence guard: on |loss| > max_abs_loss (or energy gap too large) resume from the last good checkpoint."""

    max_abs_loss: float = Field(1e8, gt=0.0)
    max_energy_gap: float | None = Field(None, gt=0.0)
    max_retries: int = Field(3, ge=0)
    remedy: Literal["lr_decay", "more_sgld_steps", "reseed"] = "lr_decay"
    lr_factor: float = Field(0.5, gt=0.0, lt=1.0)


class MethodConfig(Strict):
    """One training method: `loss` names the file in methods/; `params` holds its own weights and switches."""

    loss: str = Field(min_length=1)
    model: str = Field(min_length=1, description="key of `models`")
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    attack: AttackConfig | None = None
    sampler: SamplerConfig | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    select: SelectConfig = Field(default_factory=SelectConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    dynamics: DynamicsConfig = Field(default_factory=DynamicsConfig)

    @model_validator(mode="after")
    def _check_selection_window(self):
        if not self.data.holdout and self.select.rule != "last":
            raise ValueError(f"data.holdout is false (the validation images are trained on), so select.rule "
                             f"'{self.select.rule}' would select on training images; set select.rule: last or data.holdout: true")
        if self.select.from_epoch >= self.schedule.epochs:
            raise ValueError(f"select.from_epoch={self.select.from_epoch} is not below schedule.epochs={self.schedule.epochs}: "
                             "no epoch could be selected; lower select.from_epoch")
        return self


# --------------------------------------------------------------------------- training loop, evaluation, generation


class TrainingConfig(Strict):
    """Settings of the one training loop shared by every method."""

    precision: Literal["auto", "fp32", "bf16", "tf32"] = "auto"
    channels_last: bool = Field(False, description="NHWC weights in every stage that runs a model, "
                                "evaluation and generation included (models.place)")
    compile: bool = False
    deterministic: bool = False
    checkpoint_every_steps: int | None = Field(None, ge=1, description="extra mid-epoch checkpoints; null: per epoch only")
    val_n_examples: int = Field(1000, ge=1)
    val_pgd: AttackConfig = Field(default_factory=lambda: AttackConfig(steps=20))
    val_batch_size: int = Field(256, ge=1, description="images per forward pass in validation and dynamics")
    log_every_steps: int = Field(100, ge=1)
    grid_every_epochs: int = Field(10, ge=0, description="sample grid to MLflow every N epochs; 0: off")


class EOTConfig(Strict):
    samples: int = Field(20, ge=1, description="EOT gradient samples for models with test-time noise")


class EbjdatScaleConfig(AttackConfig):
    """EB-JDAT's released PGD (papers.md §3.2) with its test-time input noise.

    test_noise 'model': the test images get + sigma N(0, I) before the attack, sigma the checkpoint's
    test-time noise (meta noise_std: the JEM family's labelled-batch training noise), as
    EB-JDAT-JEM/eval_jem.py:421-425 and EB-JDAT-JEM++/eval_jempp.py:409-413 do with --sigma 0.03
    ([-1,1] units, their training sigma) and EB-JDAT-SADAJEM/eval_sadajem.py with --sigma 0 (:501);
    'none': clean test images.
    """

    test_noise: Literal["model", "none"] = "model"


class EvaluationConfig(Strict):
    batch_size: int = Field(256, ge=1)
    n_examples: int | None = Field(None, ge=1, description="null: full test set")
    pgd: AttackConfig
    energy_attack: AttackConfig
    ebjdat_scale: EbjdatScaleConfig
    autoattack: AutoAttackConfig = Field(default_factory=AutoAttackConfig)
    eot: EOTConfig = Field(default_factory=EOTConfig)
    histogram_attacks: HistogramAttacksConfig | None = Field(
        None, description="per-attack energies for WEAT Fig.2 (diagnostic, not a headline number); null: off")


class GeneratorSpec(Strict):
    """One way to draw samples from a classifier (papers.md §3.5)."""

    kind: Literal["sgld", "targeted_pgd", "buffer"]
    sampler: SamplerConfig | None = None
    attack: AttackConfig | None = None
    init: Literal["uniform", "gaussian", "pca", "buffer", "data", "noisy_data"] = "gaussian"
    pca_fraction: float = Field(0.95, gt=0.0, le=1.0, description="init 'pca': WEAT's retained_variance as sample_x0_pca "
                                "gets it (keeps the leading components whose cumulative share stays below it; "
                                "eval.py's own default 0.95/100 = 0.0095 keeps none: x0 = the class mean)")
    pca_sigma: float = Field(0.005, ge=0.0, description="init 'pca': WEAT sigma_pca, the scale of the coefficients "
                             "lambda_i * z_i (lambda_i sklearn's singular values); no pixel noise is added")
    noise_std: Fraction = Field(NOISY_DATA_STD, ge=0.0, description="init 'noisy_data': std of the pixel noise added "
                                "to a test image of the class, then clamped to [0,1] (WEAT: 50 * 8/255)")
    methods: Literal["all"] | list[str] = "all"

    @model_validator(mode="after")
    def _check_kind(self):
        if self.kind == "sgld" and self.sampler is None:
            raise ValueError("kind 'sgld' needs a sampler section")
        if self.kind == "targeted_pgd" and (self.attack is None or not self.attack.targeted):
            raise ValueError("kind 'targeted_pgd' needs an attack section with targeted: true")
        if (self.kind == "buffer") != (self.init == "buffer"):
            raise ValueError("init 'buffer' goes with kind 'buffer' and only with it")
        if self.init != "noisy_data" and self.noise_std != NOISY_DATA_STD:
            raise ValueError(f"noise_std={self.noise_std} is only read by init 'noisy_data' (this generator's init is "
                             f"'{self.init}'); remove it, or set the Langevin noise in sampler.noise_std")
        return self

    def applies_to(self, method: str) -> bool:
        return self.methods == "all" or method in self.methods


class GenerationConfig(Strict):
    n_per_class: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    generators: dict[str, GeneratorSpec]

    def for_method(self, method: str) -> dict[str, GeneratorSpec]:
        """The generators that apply to `method`, in params order."""
        return {name: spec for name, spec in self.generators.items() if spec.applies_to(method)}


class InceptionConfig(Strict):
    n_uniform: int = Field(50000, ge=1, description="samples for the headline IS/FID")
    n_small: int = Field(10000, ge=1, description="samples for the 10k protocol (WEAT)")
    splits: int = Field(10, ge=1)
    reference: Literal["train", "test", "train+test"] = "train"


class TopConfidentConfig(Strict):
    """The JEM-family papers' own IS/FID on a replay buffer (metrics/buffer_protocol.py): per predicted class,
    the most confident `ratio` of the images (ratio >= 1: a count per class). Defaults: SADA-JEM's
    eval_sadajem.py (IS on 0.1, FID on 0.9, real set CIFAR-10 train+test); EB-JDAT's code prints an IS of the
    0.9 set (add 0.9 to is_ratios); JEM++'s README scores everything (ratio 10000)."""

    enabled: bool = True
    is_ratios: list[float] = Field(default_factory=lambda: [0.1], min_length=1)
    fid_ratios: list[float] = Field(default_factory=lambda: [0.9], min_length=1)
    reference: Literal["train", "test", "train+test"] = "train+test"
    splits: int = Field(10, ge=1, description="IS splits (torchmetrics' default, as EB-JDAT; SADA-JEM's TF code: N // 5000)")

    @staticmethod
    def label(ratio: float) -> str:
        """Key suffix of a ratio: 'top10pct' for 0.1, 'top7' for a count of 7 per class."""
        return f"top{round(ratio * 100):d}pct" if ratio < 1 else f"top{int(ratio)}"

    @field_validator("is_ratios", "fid_ratios")
    @classmethod
    def _positive(cls, ratios):
        if any(r <= 0 for r in ratios):
            raise ValueError(f"ratios must be > 0 (a fraction below 1 or a count per class), got {ratios}")
        return ratios


class RefClfConfig(Strict):
    enabled: bool = True
    method: str = Field("standard", description="method whose model is the stand-in feature network")


class FisherConfig(Strict):
    probes: int = Field(4, ge=1, description="Hutchinson Rademacher probes")
    n_examples: int = Field(1000, ge=1)


class EnergyStatsConfig(Strict):
    n_examples: int = Field(10000, ge=1)


class LandscapeConfig(Strict):
    """The plane around each test image (landscape.py; metrics.landscape: statistics, figures.landscape: contours).
    Kept here, not in landscape.py: every stage imports config, and training must not depend on the landscape code."""

    grid: int = Field(51, ge=3)
    radius: Fraction = Field(1.74, gt=0.0, description="L2 radius of the plane; 8/255*sqrt(3072) ~ 1.74")
    n_images: int = Field(4, ge=1)


class MetricsConfig(Strict):
    inception: InceptionConfig = Field(default_factory=InceptionConfig)
    top_confident: TopConfidentConfig = Field(default_factory=TopConfidentConfig)
    refclf: RefClfConfig = Field(default_factory=RefClfConfig)
    fisher: FisherConfig = Field(default_factory=FisherConfig)
    energy: EnergyStatsConfig = Field(default_factory=EnergyStatsConfig)
    landscape: LandscapeConfig | None = Field(
        None, description="landscape statistics around the first n_images test images (JEAT Fig.2 claims); null: off")
    batch_size: int = Field(100, ge=1, description="images per forward pass (Inception, refclf, Fisher, energies)")


# WEAT Fig.2's panels in its order: PGD (evaluate's pgd column), then evaluation.histogram_attacks
WEAT_FIG2_ATTACKS = ("pgd", *HISTOGRAM_WEAT_FIG2)


class HistogramsConfig(Strict):
    """Energy histograms: `attacks` are columns of the evaluate stage's energies (evaluate's columns or
    evaluation.histogram_attacks names); each one present gets a column of panels, the first one also
    goes into the clean-vs-adversarial-vs-generated figure."""

    bins: int = Field(200, ge=1)
    range: tuple[float, float] = (-40.0, 20.0)
    attacks: list[str] = Field(default_factory=lambda: list(WEAT_FIG2_ATTACKS), min_length=1)

    @field_validator("range")
    @classmethod
    def _check_range(cls, value):
        if value[0] >= value[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {list(value)}")
        return value


class SamplesFigureConfig(Strict):
    n_per_class: int = Field(10, ge=1)


class NearestConfig(Strict):
    n_images: int = Field(4, ge=1, description="generated images shown with their nearest training images (JEAT Fig.7)")
    k: int = Field(10, ge=1, description="nearest training images by SSIM per generated image")
    generators: list[str] | Literal["all"] = Field("all", description="generators whose samples get a nearest-image figure")


class FiguresConfig(Strict):
    landscape: LandscapeConfig = Field(default_factory=LandscapeConfig)
    histograms: HistogramsConfig = Field(default_factory=HistogramsConfig)
    samples: SamplesFigureConfig = Field(default_factory=SamplesFigureConfig)
    nearest: NearestConfig = Field(default_factory=NearestConfig)
    formats: list[Literal["png", "pdf"]] = Field(["png", "pdf"], min_length=1, description="file formats of every figure")


# --------------------------------------------------------------------------- profiles and the whole file


class RuntimeConfig(Strict):
    """What each job of a profile gets: a wall-clock limit in minutes (Snakemake's `runtime` resource, a SLURM
    time limit) and CPU threads (Snakemake's `threads`, at most --cores; the job's torch threads)."""

    train: int = Field(48 * 60, ge=1, description="each train job")
    other: int = Field(12 * 60, ge=1, description="each job of every other stage")
    threads: int = Field(1, ge=1, description="CPU threads of each train/evaluate/generate/metrics job; 1 runs as "
                         "many jobs side by side as there are cores")


class ProfileSpec(Strict):
    """A profile as written: which runs, which seeds, and overrides of the top-level sections."""

    description: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seeds: list[int] = Field(min_length=1)
    runs: dict[str, list[str] | Literal["all"]] = Field(min_length=1, description="dataset -> methods or 'all'")
    overrides: dict[str, Any] = Field(default_factory=dict)
    table_datasets: dict[str, str] = Field(default_factory=dict, description="paper data-set name -> dataset key")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class Sections(Strict):
    """Every top-level section a profile may override."""

    paths: PathsConfig = Field(default_factory=PathsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    datasets: dict[str, DatasetConfig]
    models: dict[str, ModelConfig]
    methods: dict[str, MethodConfig]
    dataset_methods: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict, description='dataset -> method or "*" -> settings merged onto methods.<method> on that '
        "data set only (order: module docstring); validated per pair as dataset_methods.<dataset>.<method>")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig
    generation: GenerationConfig
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    figures: FiguresConfig = Field(default_factory=FiguresConfig)


SECTION_NAMES = tuple(Sections.model_fields)
STAR_SECTIONS = ("datasets", "models", "methods")


class RunConfig(Strict):
    """Everything one (profile, dataset, method, seed) job needs, fully resolved."""

    profile: str
    dataset_name: str
    dataset: DatasetConfig
    method_name: str
    method: MethodConfig
    model: ModelConfig
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    training: TrainingConfig
    evaluation: EvaluationConfig
    generation: GenerationConfig
    metrics: MetricsConfig
    figures: FiguresConfig
    paths: PathsConfig
    tracking: TrackingConfig

    @property
    def run_name(self) -> str:
        return f"{self.profile}/{self.dataset_name}/{self.method_name}/s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for MLflow params and stage JSON)."""
        return self.model_dump(mode="json")


class ProfileConfig(Sections):
    """A profile resolved: overrides merged, runs expanded to (dataset, method) pairs, env applied to
    paths.data_root and tracking.uri, generators' `methods: all` expanded to the list of methods."""

    name: str
    device: Literal["auto", "cpu", "cuda"]
    seeds: list[int]
    runs: list[tuple[str, str]]
    table_datasets: dict[str, str]
    methods_by_dataset: dict[str, dict[str, MethodConfig]] = Field(
        default_factory=dict, description="dataset -> method -> its settings on that data set, for every pair that "
        "`dataset_methods` changes; every other pair uses `methods`")

    @property
    def run_datasets(self) -> list[str]:
        """Data sets that appear in `runs`, in order."""
        return list(dict.fromkeys(d for d, _ in self.runs))

    def methods_for(self, dataset: str) -> list[str]:
        return [m for d, m in self.runs if d == dataset]

    @property
    def results_dir(self) -> Path:
        return Path(self.paths.results) / self.name

    def _require(self, kind: str, key: str, allowed) -> None:
        if key not in allowed:
            raise ConfigError(f"unknown {kind} '{key}' in profile '{self.name}'; allowed: {sorted(allowed)}")

    def dataset(self, key: str) -> DatasetConfig:
        """DatasetConfig of `key` with `root` resolved (default <paths.data_root>/<key>)."""
        self._require("dataset", key, self.datasets)
        cfg = self.datasets[key]
        root = cfg.root if cfg.root is not None else str(Path(self.paths.data_root) / key)
        return cfg.model_copy(update={"root": root})

    def method(self, dataset: str, method: str) -> MethodConfig:
        """Settings of `method` on `dataset`: `methods[method]` with `dataset_methods` merged (module docstring)."""
        self._require("dataset", dataset, self.datasets)
        self._require("method", method, self.methods)
        return self.methods_by_dataset.get(dataset, {}).get(method, self.methods[method])

    def run(self, dataset: str, method: str, seed: int) -> RunConfig:
        """Everything the (dataset, method, seed) job needs; the method's settings are those on `dataset`."""
        method_cfg = self.method(dataset, method)
        return RunConfig(
            profile=self.name, dataset_name=dataset, dataset=self.dataset(dataset),
            method_name=method, method=method_cfg, model=self.models[method_cfg.model],
            seed=seed, device=self.device, training=self.training, evaluation=self.evaluation,
            generation=self.generation, metrics=self.metrics, figures=self.figures,
            paths=self.paths, tracking=self.tracking,
        )


class Params(Sections):
    """The whole params.yaml (validated by `load_params`)."""

    profile: str = "paper"
    profiles: dict[str, ProfileSpec] = Field(min_length=1)
    _source: str = PrivateAttr("params")   # the file it was read from, named in every error

    @property
    def source(self) -> str:
        return self._source

    def sections_as_written(self) -> dict[str, Any]:
        """The top-level sections as plain dicts, without the defaults that params.yaml leaves out."""
        return self.model_dump(mode="python", include=set(SECTION_NAMES), exclude_unset=True)

    def profile_config(self, name: str | None = None) -> ProfileConfig:
        """Resolve profile `name` (default: the active `profile`); see the module docstring for merge order."""
        name = self.profile if name is None else name
        if name not in self.profiles:
            raise ConfigError(f"{self._source}: unknown profile '{name}'; allowed: {sorted(self.profiles)} "
                              "(fix --profile, --config profile=..., or `profile:` in the file)")
        spec = self.profiles[name]
        merged = _apply_overrides(self.sections_as_written(), spec.overrides)
        where = f"{self._source}, profile '{name}' (params after its overrides)"
        sections = _validate(Sections, merged, where=where)
        by_dataset = _resolve_dataset_methods(sections, merged, where=where)
        paths = sections.paths.model_copy(update={"data_root": os.environ.get(DATA_ROOT_ENV) or sections.paths.data_root})
        tracking = sections.tracking.model_copy(
            update={"uri": sections.tracking.uri or os.environ.get(TRACKING_URI_ENV) or DEFAULT_TRACKING_URI})
        runs = [(d, m) for d, ms in spec.runs.items() for m in (list(sections.methods) if ms == "all" else ms)]
        generation = sections.generation.model_copy(update={"generators": {
            key: gen.model_copy(update={"methods": [m for m in sections.methods if gen.applies_to(m)]})
            for key, gen in sections.generation.generators.items()}})
        fields = {k: getattr(sections, k) for k in SECTION_NAMES}
        fields |= {"paths": paths, "tracking": tracking, "generation": generation}
        return ProfileConfig(name=name, device=spec.device, seeds=spec.seeds, runs=runs,
                             table_datasets=spec.table_datasets, methods_by_dataset=by_dataset,
                             **fields)


# --------------------------------------------------------------------------- loading and validation


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate params.yaml: every section, every profile, every cross-reference."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path.resolve()}; run from the repository root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML:\n{err}") from err
    return params_from_dict(raw, source=str(path))


def params_from_dict(raw: Any, *, source: str = "params") -> Params:
    """Validate an already-parsed params mapping (see `load_params`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    params = _validate(Params, raw, where=source)
    params._source = source
    top_level = _resolve_dataset_methods(params, params.sections_as_written(), where=source)
    problems = _reference_problems(params, params, prefix="", by_dataset=top_level)
    if problems:
        raise ConfigError(_report(source, problems))
    if params.profile not in params.profiles:
        raise ConfigError(f"{source}:\n  - profile: '{params.profile}' is not a profile; allowed: {sorted(params.profiles)}")
    for name, spec in params.profiles.items():
        unknown = sorted(set(spec.overrides) - set(SECTION_NAMES))
        if unknown:
            raise ConfigError(f"{source}:\n  - profiles.{name}.overrides: unknown section(s) {unknown}; "
                              f"allowed: {list(SECTION_NAMES)}")
        resolved = params.profile_config(name)
        problems = _reference_problems(resolved, spec, prefix=f"profiles.{name}.", by_dataset=resolved.methods_by_dataset)
        problems += _run_problems(resolved, resolved.runs, resolved.methods_by_dataset, f"profiles.{name}.")
        if problems:
            raise ConfigError(_report(f"{source}, profile '{name}'", problems))
    return params


def validate_run(run: RunConfig) -> None:
    """Check one resolved run as `load_params` checks params (a RunConfig edited or built in code skips
    that); `train` calls it before any work. Raises ConfigError naming each bad key."""
    where = f"methods.{run.method_name}"
    try:
        MethodConfig.model_validate(run.method.model_dump())
        problems = []
    except ValidationError as err:
        problems = [f"{where}.{_describe(e, MethodConfig)}" for e in err.errors()]
    problems += _method_problems([(where, run.method)])
    problems += [f"{where}.{key}: {text}" for key, text in dataset_problems(run.method, run.dataset.num_classes)]
    if _selects_without_validation(run.method, run.dataset):
        problems.append(f"{where}.select.rule: '{run.method.select.rule}' needs a validation split, but data set "
                        f"'{run.dataset_name}' has n_valid 0; set n_valid > 0 or select.rule: last")
    if problems:
        raise ConfigError(_report(f"run {run.run_name}", problems))


def _reference_problems(sections: Sections, runs_from: Params | ProfileSpec, prefix: str,
                        by_dataset: dict[str, dict[str, MethodConfig]]) -> list[str]:
    """Names that must exist: models of methods (also on each data set of `by_dataset`), methods of
    generators, the refclf method, profile runs."""
    problems = []
    datasets, models, methods = sorted(sections.datasets), sorted(sections.models), sorted(sections.methods)
    method_configs = _method_configs(sections.methods, by_dataset)
    for where, method in method_configs:
        if method.model not in sections.models:
            problems.append(f"{where}.model: unknown model '{method.model}'; allowed: {models}")
    for name, spec in sections.generation.generators.items():
        for m in [] if spec.methods == "all" else spec.methods:
            if m not in sections.methods:
                problems.append(f"generation.generators.{name}.methods: unknown method '{m}'; allowed: {methods}")
        if spec.kind == "buffer":  # training saves a replay buffer only where the method samples
            for m in sorted(sections.methods) if spec.methods == "all" else spec.methods:
                method = sections.methods.get(m)
                if method is not None and method.sampler is None and not any(
                        key == "sampler" for key, _ in method_problems(method)):  # a missing block is reported once
                    problems.append(f"generation.generators.{name}: kind buffer reads the replay buffer, and method "
                                    f"'{m}' has none (no sampler); leave '{m}' out of its `methods` and give it a "
                                    "generator of kind sgld")
    if sections.metrics.refclf.enabled and sections.metrics.refclf.method not in sections.methods:
        problems.append(f"metrics.refclf.method: unknown method '{sections.metrics.refclf.method}'; allowed: {methods}")
    specs = runs_from.profiles.items() if isinstance(runs_from, Params) else [(None, runs_from)]
    for pname, spec in specs:
        where = f"profiles.{pname}." if pname is not None else prefix
        for d, ms in spec.runs.items():
            if d not in sections.datasets:
                problems.append(f"{where}runs.{d}: unknown dataset '{d}'; allowed: {datasets}")
            for m in [] if ms == "all" else ms:
                if m not in sections.methods:
                    problems.append(f"{where}runs.{d}: unknown method '{m}'; allowed: {methods} or 'all'")
        for paper_name, d in spec.table_datasets.items():
            if d not in sections.datasets:
                problems.append(f"{where}table_datasets.{paper_name}: unknown dataset '{d}'; allowed: {datasets}")
    problems += _method_problems(method_configs)
    return problems


def _method_problems(method_configs: list[tuple[str, MethodConfig]]) -> list[str]:
    """What each method cannot run with (methods.method_problems: params, attack, sampler, p(x) stream).

    A per-data-set copy (dataset_methods.<d>.<m>) reports only problems its methods.<m> does not
    already have, so one bad setting is reported once.
    """
    problems, seen = [], set()
    for where, method in method_configs:
        name = where.split(".")[-1]
        for key, text in method_problems(method):
            if where.startswith("dataset_methods.") and (name, key, text) in seen:
                continue
            seen.add((name, key, text))
            problems.append(f"{where}.{key}: {text}")
    return problems


def _selects_without_validation(method: MethodConfig, dataset: DatasetConfig) -> bool:
    """A select.rule on validation images, on a data set without a validation split."""
    return method.select.rule != "last" and dataset.n_valid == 0


def _run_problems(sections: Sections, runs: list[tuple[str, str]], by_dataset, prefix: str) -> list[str]:
    """What each run of a profile cannot do on its data set: select on a validation split the data set lacks
    (one line per data set), settings its method rejects there (methods.dataset_problems)."""
    selecting: dict[str, list[str]] = {}
    problems = []
    for d, m in runs:
        if d not in sections.datasets or m not in sections.methods:
            continue  # reported as unknown names
        method, dataset = by_dataset.get(d, {}).get(m, sections.methods[m]), sections.datasets[d]
        if _selects_without_validation(method, dataset):
            selecting.setdefault(d, []).append(m)
        where = f"dataset_methods.{d}.{m}" if m in by_dataset.get(d, {}) else f"methods.{m}"
        problems += [f"{where}.{key}: {text} (run on data set '{d}')"
                     for key, text in dataset_problems(method, dataset.num_classes)]
    return [f"{prefix}runs.{d}: datasets.{d}.n_valid is 0, but method(s) {ms} select their epoch on validation "
            "images; set n_valid > 0 or their select.rule: last" for d, ms in selecting.items()] + problems


def _method_configs(methods: dict[str, MethodConfig],
                    by_dataset: dict[str, dict[str, MethodConfig]]) -> list[tuple[str, MethodConfig]]:
    """Every MethodConfig by its params path: methods.<m>, then dataset_methods.<d>.<m> (m on data set d)."""
    pairs = [(f"methods.{m}", cfg) for m, cfg in methods.items()]
    return pairs + [(f"dataset_methods.{d}.{m}", cfg) for d, cfgs in by_dataset.items() for m, cfg in cfgs.items()]


def _dataset_methods_problems(sections: Sections) -> list[str]:
    """`dataset_methods` keys that name no data set, or neither a method nor "*"."""
    problems = []
    for dataset, entries in sections.dataset_methods.items():
        if dataset not in sections.datasets:
            problems.append(f"dataset_methods.{dataset}: unknown dataset '{dataset}'; allowed: {sorted(sections.datasets)}")
        for method in entries:
            if method != "*" and method not in sections.methods:
                problems.append(f"dataset_methods.{dataset}.{method}: unknown method '{method}'; "
                                f"allowed: {sorted(sections.methods)} or '*'")
    return problems


def _validate(model: type[BaseModel], data: dict, *, where: str):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_report(where, [_describe(e, model) for e in err.errors()])) from None


def _report(where: str, problems: list[str]) -> str:
    problems = _group_per_entry(problems)
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{where} is invalid ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}"


_PER_ENTRY = re.compile(r"^((?:dataset_methods\.[^.\s:]+\.)|(?:(?:methods|datasets|models)\.))([^.\s:]+)((?:\.[^\s:]*)?: .*)$")


def _group_per_entry(problems: list[str]) -> list[str]:
    """One line for a problem that several methods (data sets, models) share, e.g. a typo under a
    profile's methods."*": 'methods.*.x: ... (in 18 methods: a, b, ...)' instead of one line each."""
    groups: dict[tuple[str, str], list[str]] = {}
    order: list[tuple[str, str] | str] = []
    for p in dict.fromkeys(problems):
        match = _PER_ENTRY.match(p)
        if match is None:
            order.append(p)
            continue
        key = (match.group(1), match.group(3))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(match.group(2))
    out = []
    for item in order:
        if isinstance(item, str):
            out.append(item)
            continue
        (prefix, rest), names = item, groups[item]
        if len(names) == 1:
            out.append(f"{prefix}{names[0]}{rest}")
        else:
            kind = "methods" if prefix.startswith(("methods", "dataset_methods")) else prefix.rstrip(".")
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            out.append(f"{prefix}*{rest} (in {len(names)} {kind}: {shown})")
    return out


def _describe(error: dict, root: type[BaseModel]) -> str:
    """One pydantic error as 'dotted.key.path: message (allowed values)'."""
    loc = [str(part) for part in error["loc"] if not _is_union_tag(part)]
    key = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        return f"{key}: unknown key; allowed keys here: {allowed}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    msg = error["msg"].removeprefix("Value error, ")
    named = re.match(r"(\w+)=", msg)   # a model-level check that names its field ("eps=2.0 exceeds 1 ...")
    if named and named.group(1) in _allowed_keys(root, loc):
        key = f"{key}.{named.group(1)}"
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{key}: {msg}{shown}"


def _is_union_tag(part) -> bool:
    """pydantic puts the union member tried into loc (e.g. "list[str]", "literal['all']"); drop it."""
    return isinstance(part, str) and ("[" in part or part in {"function-after", "function-before"})


def _allowed_keys(root: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the model found by walking `loc` from `root` (dict keys and list indices are skipped)."""
    annotation: Any = root
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return []
            annotation = field.annotation
        else:  # dict[str, X] or list[X]: this part is a key or an index
            args = typing.get_args(annotation)
            annotation = args[-1] if args else Any
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _unwrap(annotation):
    """X | None -> X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


# --------------------------------------------------------------------------- profile overrides


def _apply_overrides(base: dict, overrides: dict) -> dict:
    """Merge a profile's overrides onto the top-level sections (order: module docstring)."""
    merged = copy.deepcopy(base)
    for section, override in overrides.items():
        if section in STAR_SECTIONS and isinstance(override, dict):
            entries = dict(merged.get(section) or {})
            star = override.get("*")
            entry_model = typing.get_args(Sections.model_fields[section].annotation)[1]
            for key in entries:
                if isinstance(star, dict) and isinstance(entries[key], dict):
                    entries[key] = _merge_star(entries[key], star, entry_model)
            for key, value in override.items():
                if key != "*":
                    entries[key] = _deep_merge(entries.get(key), value)
            merged[section] = entries
        else:
            merged[section] = _deep_merge(merged.get(section), override)
    return merged


def _resolve_dataset_methods(sections: Sections, raw: dict, *, where: str) -> dict[str, dict[str, MethodConfig]]:
    """Validated settings of every (dataset, method) pair that `dataset_methods` touches.

    `sections` is `raw` validated; its `dataset_methods` keys must name data sets and methods (or "*").
    """
    problems = _dataset_methods_problems(sections)
    if problems:
        raise ConfigError(_report(where, problems))
    resolved = _validate(_DatasetMethodConfigs, {"dataset_methods": _dataset_method_dicts(raw)}, where=where)
    return resolved.dataset_methods


class _DatasetMethodConfigs(Strict):
    """Validates the merged (dataset, method) settings so that errors read dataset_methods.<d>.<m>.<key>."""

    dataset_methods: dict[str, dict[str, MethodConfig]]


def _dataset_method_dicts(sections: dict) -> dict[str, dict[str, dict]]:
    """Unvalidated settings of every (dataset, method) pair that `dataset_methods` touches (a "*" entry
    touches every method), merged as in steps d-e of the module docstring onto the profile's methods."""
    methods = sections["methods"]
    merged: dict[str, dict[str, dict]] = {}
    for dataset, entries in (sections.get("dataset_methods") or {}).items():
        star = entries.get("*")
        names = list(methods) if star is not None else [m for m in entries if m != "*"]
        merged[dataset] = {m: _on_dataset(methods[m], star, entries.get(m)) for m in names}
    return merged


def _on_dataset(method: dict, star: dict | None, own: dict | None) -> dict:
    """One method's settings on one data set: `star` as a "*" override (never creating a null
    section), then the method's own entry deep-merged on top."""
    out = _merge_star(method, star, MethodConfig) if star else dict(method)
    return _deep_merge(out, own) if own else out


def _deep_merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _deep_merge(base.get(key), value)
        return out
    return copy.deepcopy(override)


def _merge_star(base: dict, override: dict, model: type[BaseModel] | None) -> dict:
    """Deep merge that skips keys whose current value (as written, else the field default) is None."""
    out = dict(base)
    for key, value in override.items():
        field = model.model_fields.get(key) if model is not None else None
        if key in base:
            current = base[key]
        elif field is not None and field.default_factory is not None:
            default = field.default_factory()
            current = default.model_dump() if isinstance(default, BaseModel) else default
        else:
            current = field.default if field is not None and not field.is_required() else value
        if current is None:
            continue
        if isinstance(value, dict) and isinstance(current, dict):
            sub = _unwrap(field.annotation) if field is not None else None
            sub = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
            out[key] = _merge_star(current, value, sub)
        else:
            out[key] = copy.deepcopy(value)
    return out
