"""`robust-ebm`: the command line every workflow rule calls, one subcommand per stage.

    robust-ebm check    --profile smoke                 validate params.yaml, print the job plan and
                                                        where the data, Inception weights and device are
    robust-ebm data     --profile P --dataset D --out results/P/data/D
    robust-ebm train    ... --dataset D --method M --seed S --data DIR --out results/P/models/D/M/sS
    robust-ebm evaluate ... --model model.pt --out results/P/eval/D/M/sS.json
    robust-ebm generate ... --model model.pt --out results/P/samples/D/M/sS
    robust-ebm metrics  ... --model --samples --refclf --eval --out results/P/metrics/D/M/sS.json
    robust-ebm figures  --profile P --results results/P --out results/P/figures
    robust-ebm claims   --profile P --results results/P --out results/P   (claims.{json,csv,md}, summary.json)
    robust-ebm tables   --profile P --results results/P --out results/P/tables
    robust-ebm digest   --profile P --results results/P --out DIR   small JSON/Markdown of every run, to keep
    robust-ebm bench    [--model wrn28_10] [--batch 64 128] [--precision fp32 bf16] [--flops] [--sgld-check]
                        [--methods ...] [--device auto] [--json FILE]
    robust-ebm settings --profile P --out results/P/settings.json   (DVC's settings step)
    robust-ebm adopt-dvc --profile P                    a finished Snakemake run -> dvc.lock
    robust-ebm dvc-yaml [--out dvc.yaml] [--check]
    robust-ebm serve    --socket PATH                   a warm job server (robust_ebm.jobserver); with
                                                        ROBUST_EBM_JOBSERVER=PATH every command runs in it

Heavy libraries (torch, mlflow) are imported inside the subcommands, so
`--help` is instant. Known user errors (bad params, missing data or Inception
weights, an unreadable or mismatched input file, a diverged run) print one
paragraph and exit with status 2. SIGTERM is handled like Ctrl-C: the stage
unwinds (temporary files removed, its MLflow run marked KILLED) and the command
exits with 143 (130 for SIGINT).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

USER_ERRORS = {"ConfigError", "DataUnavailableError", "InceptionWeightsUnavailable", "InceptionWeightsNotFound",
               "BadFileError", "FileNotFoundError", "InputsMissing", "TrainingDiverged", "ModelSourceError"}
log = logging.getLogger("robust_ebm")


# --------------------------------------------------------------------------- logging to a file too


class _Tee:
    """Write to the console stream and to a log file (stage logs under logs/)."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.file.write(text)
        self.file.flush()
        return self.stream.write(text)

    def flush(self):
        self.file.flush()
        self.stream.flush()

    def isatty(self):
        return self.stream.isatty()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _setup_logging(log_path: str | None) -> None:
    if log_path:
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        file = path.open("w")
        sys.stdout, sys.stderr = _Tee(sys.stdout, file), _Tee(sys.stderr, file)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------- shared helpers


def _profile_config(args):
    from .config import load_params

    params = load_params(args.params)
    return params, params.profile_config(args.profile)


def _run_config(args):
    _, profile = _profile_config(args)
    return profile.run(args.dataset, args.method, args.seed)


def _project_dir(args) -> Path:
    return Path(args.params).resolve().parent


def _finish(tracker, stage: str, result, outputs: list) -> None:
    """Log a stage's returned numbers and its output files; print a one-line summary."""
    if isinstance(result, dict):
        tracker.log_summary(stage, result)
    for path in outputs:
        tracker.log_artifact(path, artifact_path=stage)
    print(f"robust-ebm {stage}: done -> {', '.join(str(p) for p in outputs)}")


def _run_stage(args, stage: str, call, outputs) -> None:
    """Resolve the run, open its MLflow child run (settings logged as params there), call the stage,
    log what it returns."""
    from .tracking import open_stage_run

    run = _run_config(args)
    with open_stage_run(run, stage, project_dir=_project_dir(args)) as tracker:
        result = call(run, tracker)
        _finish(tracker, stage, result, outputs)


# --------------------------------------------------------------------------- subcommands


class InputsMissing(RuntimeError):
    """`robust-ebm check`: an input the profile's runs need is missing (listed above the error)."""


def inputs_report(profile) -> tuple[list[str], list[str]]:
    """Lines on the inputs a long run needs (data sets, Inception weights, device) and the missing ones."""
    from .data import locate
    from .metrics.inception import locate_weights
    from .runtime import describe_device

    lines, missing = [f"inputs of profile {profile.name}:"], []

    def add(what: str, ok: bool, text: str) -> None:
        lines.append(f"  {what}: {text}")
        if not ok:
            missing.append(what)

    for key in profile.run_datasets:
        add(f"data set {key}", *locate(profile.dataset(key)))
    _, weights_text = locate_weights(profile.paths.inception_weights)  # a set but missing path raises
    lines.append(f"  Inception weights: {weights_text}")  # missing ones have a recorded fallback
    add(f"device ({profile.device})", *describe_device(profile.device))
    return lines, missing


def cmd_check(args) -> None:
    from .plan import Plan

    params, profile = _profile_config(args)
    _check_paper_mapping(params, args.params)
    plan = Plan(params, profile.name, params_file=args.params)
    print(f"{args.params}: valid ({len(params.profiles)} profiles: {', '.join(params.profiles)})")
    print(plan.describe())
    if args.jobs:
        for job in plan.jobs:
            print(job.command)
    if args.skip_inputs:
        return
    lines, missing = inputs_report(profile)
    print("\n".join(lines))
    if missing:
        raise InputsMissing(f"profile '{profile.name}' cannot run: {', '.join(missing)} missing (see above); "
                            "supply them, or pass --skip-inputs to check params.yaml alone")


def cmd_data(args) -> None:
    from .prepare import prepare_stage
    from .tracking import open_run

    params, profile = _profile_config(args)
    with open_run(profile=profile.name, stage="data", dataset=args.dataset, uri=profile.tracking.uri,
                  prefix=profile.tracking.experiment_prefix, project_dir=_project_dir(args)) as tracker:
        result = prepare_stage(params, profile.name, args.dataset, Path(args.out))
        _finish(tracker, "data", result, [Path(args.out) / "data.json"])


def cmd_train(args) -> None:
    from .plan import beside
    from .train import train_stage

    out = Path(args.out)
    _run_stage(args, "train", lambda run, t: train_stage(run, Path(args.data), out, tracker=t),
               [beside(out, "model_dir", "train_json")])


def _model_source(args):
    """--arch, --mean/--std, --unsafe-pickle and --robustbench-* as a model_sources.ModelSource."""
    from .config import ConfigError
    from .model_sources import ModelSource, torchvision_name

    arch = args.arch
    if arch is not None and torchvision_name(arch) is None:
        _, profile = _profile_config(args)
        if arch not in profile.models:
            raise ConfigError(f"--arch '{arch}' is neither a `models` key of {args.params} "
                              f"({', '.join(sorted(profile.models))}) nor torchvision:NAME; pass one of those")
        arch = profile.models[arch]
    return ModelSource(arch=arch, mean=tuple(args.mean) if args.mean else None,
                       std=tuple(args.std) if args.std else None, unsafe_pickle=args.unsafe_pickle,
                       robustbench_dir=Path(args.robustbench_dir) if args.robustbench_dir else None,
                       robustbench_dataset=args.robustbench_dataset, threat_model=args.threat_model)


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate_stage

    out, source = Path(args.out), _model_source(args)
    _run_stage(args, "evaluate",
               lambda run, t: evaluate_stage(run, Path(args.data), Path(args.model), out, tracker=t, source=source),
               [out])


def cmd_generate(args) -> None:
    from .generate import generate_stage
    from .samples_file import index_path

    out, source = Path(args.out), _model_source(args)
    _run_stage(args, "generate",
               lambda run, t: generate_stage(run, Path(args.data), Path(args.model), out, tracker=t, source=source),
               [index_path(out)])


def cmd_metrics(args) -> None:
    from .metrics import metrics_stage

    out, source = Path(args.out), _model_source(args)
    refclf = Path(args.refclf) if args.refclf else None
    evaluation = Path(args.eval) if args.eval else None
    _run_stage(args, "metrics",
               lambda run, t: metrics_stage(run, Path(args.data), Path(args.model), Path(args.samples),
                                            refclf, evaluation, out, tracker=t, source=source), [out])


def _check_paper_mapping(params, source: str) -> None:
    """resources/paper_mapping.yaml against params.yaml (papers.mapping_problems): in `check` and in the
    stages that read the mapping (figures, claims, tables), never in the others (their code deps)."""
    from .config import ConfigError
    from .papers import MAPPING_FILE, mapping_problems

    problems = mapping_problems(params)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"src/robust_ebm/{MAPPING_FILE} does not fit {source} ({len(problems)} problem"
                          f"{'s' * (len(problems) != 1)}; fix the mapping or params.yaml):\n{lines}")


def _profile_stage(args, stage: str, call, after=None) -> None:
    """A stage over a whole profile: its own run in experiment <prefix>/<profile>; `after(tracker, profile,
    files)` may log more (the figures of one run into that run's parent)."""
    from .tracking import open_run

    params, profile = _profile_config(args)
    _check_paper_mapping(params, args.params)
    with open_run(profile=profile.name, stage=stage, uri=profile.tracking.uri,
                  prefix=profile.tracking.experiment_prefix, project_dir=_project_dir(args)) as tracker:
        files = call(profile, Path(args.results), Path(args.out))
        if isinstance(files, tuple):  # (files, numbers to log)
            files, numbers = files
            tracker.log_metrics(numbers)
        for path in files:
            tracker.log_artifact(path, artifact_path=stage)
        if after is not None:
            after(tracker, profile, files)
        print(f"robust-ebm {stage}: {len(files)} files -> {args.out}")


def cmd_figures(args) -> None:
    from .figures import figures_stage
    from .tracking import log_run_figures, run_settings

    def to_parents(tracker, profile, files):
        index = next(p for p in files if Path(p).name == "figures.json")
        log_run_figures(tracker, index, lambda d, m, s: run_settings(profile.run(d, m, s).to_dict()),
                        profile=profile.name, prefix=profile.tracking.experiment_prefix or "robust-ebm")

    _profile_stage(args, "figures", figures_stage, after=to_parents)


def cmd_claims(args) -> None:
    from .claims import claims_stage, verdict_counts

    def call(profile, results, out):
        files = claims_stage(profile, results, out)
        counts = verdict_counts(json.loads(files[0].read_text())["claims"])
        print("claims: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return files, {"claims": counts}

    _profile_stage(args, "claims", call)


def cmd_tables(args) -> None:
    from .tables import tables_stage

    _profile_stage(args, "tables", tables_stage)


def cmd_digest(args) -> None:
    from .digest import digest

    out = digest(args.results, _profile_config(args)[1], args.out)
    print(f"robust-ebm digest: {out}/README.md (one JSON per run, claims, digest.json)")


def cmd_settings(args) -> None:
    """DVC's settings step: results/P/settings.json, every job's settings digest (plan.Plan.settings_file)."""
    from .plan import Plan
    from .runtime import atomic_write_json

    params, profile = _profile_config(args)
    atomic_write_json(args.out, Plan(params, profile.name, params_file=args.params).settings_file())
    print(f"robust-ebm settings: wrote {args.out}")


def cmd_adopt_dvc(args) -> None:
    """Hand a finished Snakemake run of one profile to DVC (robust_ebm.adopt): nothing is rerun."""
    from .adopt import adopt
    from .plan import Plan

    params, profile = _profile_config(args)
    committed, missing = adopt(Plan(params, profile.name, params_file=args.params), _project_dir(args))
    for name in missing:
        print(f"robust-ebm adopt-dvc: skipped {name} (an output is missing: run it first)")
    print(f"robust-ebm adopt-dvc: {len(committed)} stages of profile {profile.name} recorded in dvc.lock")


def cmd_bench(args) -> None:
    from .bench import bench_profile

    _, profile = _profile_config(args)
    names = args.methods or list(profile.methods)
    unknown = sorted(set(names) - set(profile.methods))
    if unknown or (args.model and args.model not in profile.models):
        from .config import ConfigError

        raise ConfigError(f"unknown method(s) {unknown} or model '{args.model}'; methods: "
                          f"{sorted(profile.methods)}; models: {sorted(profile.models)}")
    bench_profile(profile, names, args)


def cmd_dvc_yaml(args) -> None:
    from .config import load_params
    from .plan import dvc_yaml

    text = dvc_yaml(load_params(args.params), params_file=args.params)
    out = Path(args.out)
    if args.check:
        if not out.exists() or out.read_text() != text:
            raise SystemExit(f"{out} is out of date with {args.params}; run `robust-ebm dvc-yaml` and commit it")
        print(f"{out} is up to date")
        return
    from .runtime import atomic_write_text

    atomic_write_text(out, text)
    print(f"wrote {out}")


# --------------------------------------------------------------------------- parser


def _add_model_options(p) -> None:
    """--model and the options saying how to read it (robust_ebm.model_sources)."""
    g = p.add_argument_group("classifier", "what --model holds (README: Your own classifier or data)")
    g.add_argument("--model", required=True,
                   help="classifier file: this project's model.pt, or a state dict (bare, or under 'state_dict', "
                        "'model_state_dict' or 'model'; DataParallel 'module.' prefixes are stripped) of --arch; "
                        "or robustbench:NAME (with --robustbench-dir)")
    g.add_argument("--arch", default=None,
                   help="architecture of a bare state dict: a `models` key of params.yaml (default: the method's; "
                        "JEM, JEM++, SADA-JEM, TRADES WRN and kuangliu ResNet-18 key layouts are renamed), or "
                        "torchvision:NAME (e.g. torchvision:resnet18; inputs normalised with ImageNet's mean "
                        "0.485 0.456 0.406 and std 0.229 0.224 0.225 unless --mean/--std)")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                   help="the network normalises [0,1] pixels as (x - mean) / std: per-channel mean (or one value); "
                        "replaces its own normalisation; attack budgets stay in pixel units")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="S", help="per-channel std, with --mean")
    g.add_argument("--unsafe-pickle", action="store_true",
                   help="also read a whole pickled model (torch.save(model)) with torch.load(weights_only=False). "
                        "UNSAFE: unpickling runs any code the file holds; use only for files you trust. "
                        "The module defining its class must be importable")
    g.add_argument("--robustbench-dir", default=None, metavar="DIR",
                   help="robustbench's model directory for --model robustbench:NAME (it reads "
                        "DIR/<dataset>/<threat model>/NAME.pt; nothing is downloaded; needs `pip install robustbench`)")
    g.add_argument("--robustbench-dataset", default=None,
                   help="robustbench data set (default: --dataset, e.g. cifar10, cifar100)")
    g.add_argument("--threat-model", default="Linf", help="robustbench threat model (default: Linf)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robust-ebm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help, *, run=False, model=False):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--profile", default=None, help="profile name (default: `profile:` in params)")
        p.add_argument("--log", default=None, help="also write all output to this file")
        if run:
            p.add_argument("--dataset", required=True, help="data set key of params `datasets`")
            p.add_argument("--method", required=True, help="method key of params `methods`")
            p.add_argument("--seed", required=True, type=int)
            p.add_argument("--data", required=True, help="prepared data directory (the data stage's --out)")
        if model:
            _add_model_options(p)
        return p

    p = add("check", cmd_check, "validate params.yaml and print the job plan of a profile")
    p.add_argument("--jobs", action="store_true", help="also print every job's command")
    p.add_argument("--skip-inputs", action="store_true",
                   help="do not look for the data sets, Inception weights and device the profile needs")
    p = add("data", cmd_data, "prepare a data set: splits and class statistics")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p = add("train", cmd_train, "train one (data set, method, seed) run", run=True)
    p.add_argument("--out", required=True, help="run directory: model.pt, checkpoint.pt, train.json")
    p = add("evaluate", cmd_evaluate, "clean, PGD, energy attacks and AutoAttack accuracy", run=True, model=True)
    p.add_argument("--out", required=True, help="JSON file")
    p = add("generate", cmd_generate, "sample images from the classifier's energy", run=True, model=True)
    p.add_argument("--out", required=True, help="samples directory")
    p = add("metrics", cmd_metrics, "IS/FID (Inception and reference classifier), Fisher scores, energies",
            run=True, model=True)
    p.add_argument("--samples", required=True, help="the generate stage's directory")
    p.add_argument("--refclf", default=None, help="reference classifier (standard training, same data set)")
    p.add_argument("--eval", default=None, help="the evaluate stage's JSON (energies of clean/adversarial)")
    p.add_argument("--out", required=True, help="JSON file")
    for name, func, text in (("figures", cmd_figures, "draw every figure from a profile's results"),
                             ("claims", cmd_claims, "check the papers' claims on a profile's results"),
                             ("tables", cmd_tables, "paper-vs-ours tables (Markdown, CSV, LaTeX)")):
        p = add(name, func, text)
        p.add_argument("--results", required=True, help="results/<profile>")
        p.add_argument("--out", required=True)
    p = sub.add_parser("bench", help="images/s and peak memory per method",
                       description="images/s and peak memory per method (training step incl. attack/sampling)")
    p.set_defaults(func=cmd_bench)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--profile", default=None)
    p.add_argument("--log", default=None)
    p.add_argument("--model", default=None, help="models key for every method (default: each method's own model); "
                   "a method whose own model is a variant M_* of it (e.g. wrn28_10_jem) keeps its variant")
    p.add_argument("--batch", type=int, nargs="+", default=[64], help="one or more batch sizes")
    p.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "fp32", "tf32", "bf16"],
                   help="one or more (auto: the train stage's choice; fp32: TF32 off)")
    p.add_argument("--methods", nargs="+", default=None, help="method keys (default: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--flops", action="store_true", help="count model FLOPs per step (one extra step) and report MFU")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (default: bench.PEAK_TFLOPS)")
    p.add_argument("--json", default=None, help="also write every row (and the SGLD check) to this JSON file")
    p.add_argument("--sgld-check", action="store_true",
                   help="bf16/TF32 vs fp32 SGLD: same start and noise, compare the sample energies (per sampler method)")
    p.add_argument("--sgld-chains", type=int, default=128)
    p.add_argument("--sgld-steps", type=int, default=None, help="default: each method's own sampler steps")
    p.add_argument("--sgld-tol", type=float, default=0.1, help="allowed |d mean|, |d std| in units of the fp32 std")
    p.add_argument("--sgld-seed", type=int, default=0)
    p.add_argument("--sgld-weights", default=None,
                   help="a trained model.pt to run the SGLD check on (default: fresh weights of each method's model)")
    p = add("digest", cmd_digest, "the numbers of a profile's runs as small JSON + Markdown, to keep (docs/)")
    p.add_argument("--results", required=True, help="results/<profile>")
    p.add_argument("--out", required=True, help="folder to write (e.g. docs/runs/<profile>-<date>)")
    p = add("settings", cmd_settings, "write results/P/settings.json, each job's settings digest (a DVC stage)")
    p.add_argument("--out", required=True, help="results/<profile>/settings.json")
    add("adopt-dvc", cmd_adopt_dvc, "record a finished Snakemake run of a profile in dvc.lock (dvc commit)")
    p = add("dvc-yaml", cmd_dvc_yaml, "write dvc.yaml from the job plans of every profile")
    p.add_argument("--out", default="dvc.yaml")
    p.add_argument("--check", action="store_true", help="only check that --out is up to date")
    p = sub.add_parser("serve", help="a warm process that runs every robust-ebm command of this environment "
                       "(ROBUST_EBM_JOBSERVER=PATH) in a forked child; the Snakefile starts one per workflow run")
    p.set_defaults(func=cmd_serve)
    p.add_argument("--socket", required=True, help="Unix socket path to listen on")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log", default=None)
    return parser


def cmd_serve(args) -> None:
    from .jobserver import serve

    serve(args.socket, run, ready_fd=args.ready_fd)


class Terminated(KeyboardInterrupt):
    """SIGTERM raised as an interrupt, so that a stage unwinds as it does on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated(f"received {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    """`robust-ebm ARGS`: in this process, or in a child of the job server ROBUST_EBM_JOBSERVER names."""
    from .jobserver import JobServerError, requested, submit

    argv = sys.argv[1:] if argv is None else list(argv)
    socket_path = requested()
    if socket_path is None or argv[:1] == ["serve"]:
        return run(argv)
    try:
        code = submit(argv, socket_path)
    except JobServerError as err:
        print(f"robust-ebm: {err}", file=sys.stderr)
        return 2
    return run(argv) if code is None else code


def run(argv: list[str]) -> int:
    """Parse `argv` and run the command here; known user errors become one paragraph and status 2."""
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log", None))
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        args.func(args)
    except KeyboardInterrupt as err:
        print(f"robust-ebm {args.command}: interrupted ({err or 'SIGINT'}); finished outputs are kept, "
              "a rerun resumes or redoes the rest", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except Exception as err:  # noqa: BLE001 - known user errors become one paragraph, others re-raise
        names = {cls.__name__ for cls in type(err).__mro__}
        if not names & USER_ERRORS:
            raise
        print(f"robust-ebm {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
