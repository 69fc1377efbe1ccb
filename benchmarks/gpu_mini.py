"""The whole mini profile on one GPU in one command, under a wall-clock guard (issue 10.4). Outside CI.

Runs the profile's jobs from `robust_ebm.plan` (the same commands, byte for byte, as the Snakefile
and dvc.yaml) without Snakemake, which the GPU machine does not have: data, then per method
train -> evaluate, generate -> metrics, with `--jobs` run jobs sharing the GPU at once, then
claims and tables (figures with `--figures`: their SSIM search runs on the CPU), then `robust-ebm
digest` where the package has it (into `digest/`), and the bf16-vs-fp32 SGLD check on every trained
sampler model (`robust-ebm bench --sgld-check --sgld-weights`, into `sgld/`). A ready job is
started in method order (`--methods`, default `PRIORITY`), the reference classifier's training
first since every metrics job needs it; so the methods that matter most finish first.

Guard: no job starts after `--budget - --reserve` seconds; the running ones then get SIGTERM
(the stages unwind cleanly; train keeps its per-epoch checkpoint), SIGKILL 15 s later; claims and
tables run on whatever finished (the claims say `not measured` for the rest). Everything is
reported, nothing is cut silently: run.json lists every job with its status (ok, failed, killed
at the guard, not started, skipped after a failed input, existing) and seconds.

Collected (JSON, Markdown, CSV, LaTeX and logs; no models, samples or .npz) into
`results/gpu_run/<folder>/`, then packed as `<out>/<folder>.tar.gz` (the device tool returns at most
8 files); run.json, claims.md, summary.json and driver.log are also copied beside the archive. A job whose outputs already exist is not rerun
(`existing`: its outputs are there and the driver saw it exit 0), so a second call on the same warm
machine continues where the first stopped.

    PYTHONPATH=src python benchmarks/gpu_mini.py --profile mini --out "$OUT"            # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu_mini.py --profile smoke --methods standard pgd_at --jobs 2 \
        --out /tmp/gpu_smoke                                                          # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from robust_ebm.config import load_params  # noqa: E402
from robust_ebm.plan import RUN_STAGES, Job, Plan  # noqa: E402
from robust_ebm.tracking import git_commit, git_dirty  # noqa: E402

# Most important first (issue 10.4): the three papers' methods and their key baselines, then the JEM family
# and EB-JDAT, then the cheap baselines.
PRIORITY = ("jeat", "prejeat", "weat_adv", "trades", "standard", "pgd_at", "jem", "jempp", "sadajem",
            "ebjdat_jem", "ebjdat_jempp", "ebjdat_sadajem", "weat_nat", "mart", "mail_tr",
            "noise_8", "noise_16", "noise_24")
TEXT_SUFFIXES = (".json", ".md", ".csv", ".tex", ".txt", ".log", ".html")
GRACE_S = 15


@dataclass
class Task:
    job: Job
    rank: tuple
    deps: list["Task"] = field(default_factory=list)
    status: str = "pending"  # pending, running, ok, failed, killed, not started, skipped, existing
    start: float | None = None
    seconds: float | None = None
    rc: int | None = None
    proc: subprocess.Popen | None = None
    out_file: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.job.stage}@{self.job.name}"


def argv(command: str) -> list[str]:
    """A plan command ('robust-ebm stage ...') run by this interpreter: no installed console script needed."""
    words = shlex.split(command)
    assert words[0] == "robust-ebm", command
    return [sys.executable, "-m", "robust_ebm", *words[1:]]


def build_tasks(plan: Plan, methods: list[str]) -> list[Task]:
    """The run jobs of `methods` (plus the data jobs and the reference classifier's training), ranked
    and linked to the jobs that write their inputs."""
    order = {m: i for i, m in enumerate(methods)}
    refclf = plan.refclf_method
    keep = [j for j in plan.jobs if j.stage == "data" or (j.stage in RUN_STAGES and (
        j.wildcards["method"] in order or (j.stage == "train" and j.wildcards["method"] == refclf)))]
    tasks = []
    for j in keep:
        if j.stage == "data":
            rank = (-2,)
        elif j.stage == "train" and j.wildcards["method"] == refclf:
            rank = (-1,)
        else:
            rank = (order.get(j.wildcards["method"], len(order)), RUN_STAGES.index(j.stage), j.name)
        tasks.append(Task(j, rank))
    writer = {out: t for t in tasks for out in t.job.outputs}
    for t in tasks:
        t.deps = []
        for d in (writer[i] for i in t.job.inputs if i in writer):
            if not any(d is e for e in t.deps):
                t.deps.append(d)
    return sorted(tasks, key=lambda t: t.rank)


def child_env(threads: int, tracking: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if not tracking:
        env["ROBUST_EBM_TRACKING"] = "off"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Runner:
    def __init__(self, tasks: list[Task], *, jobs: int, env: dict, logs: Path, t0: float, say):
        self.tasks, self.jobs, self.env, self.logs, self.t0, self.say = tasks, jobs, env, logs, t0, say

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self, t: Task) -> None:
        t.out_file = self.logs / f"{t.job.name}.{t.job.stage}.out"
        t.out_file.parent.mkdir(parents=True, exist_ok=True)
        with open(t.out_file, "w") as f:
            # the driver's own process group: whatever ends the driver's command (the device tool's limit) ends them too
            t.proc = subprocess.Popen(argv(t.job.command), cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        t.status, t.start = "running", self.now()
        self.say(f"start  {t.name}")

    def reap(self) -> None:
        for t in self.running():
            rc = t.proc.poll()
            if rc is None:
                continue
            t.rc, t.seconds = rc, self.now() - t.start
            t.status = t.status if t.status == "killed" else ("ok" if rc == 0 else "failed")
            if t.status == "ok":
                self.marker(t).touch()
            self.say(f"{t.status:<6} {t.name} ({t.seconds:.0f} s, rc {rc})")
            if t.status == "failed":
                self.say("       " + tail(t.out_file, 6).replace("\n", "\n       "))

    def marker(self, t: Task) -> Path:
        """Written when a job exits 0: a folder output (samples) can hold a partial stage JSON after a kill."""
        return self.logs / f"{t.job.name}.{t.job.stage}.ok"

    def running(self) -> list[Task]:
        return [t for t in self.tasks if t.status == "running"]

    def ready(self) -> list[Task]:
        out = []
        for t in self.tasks:
            if t.status != "pending":
                continue
            if any(d.status in ("failed", "killed", "skipped", "not started") for d in t.deps):
                t.status = "skipped"
                self.say(f"skip   {t.name} (an input job did not finish)")
            elif all(d.status in ("ok", "existing") for d in t.deps):
                out.append(t)
        return out

    def run(self, stop_at: float) -> None:
        for t in self.tasks:  # finished in an earlier call on the same machine
            if self.marker(t).exists() and all((ROOT / o).exists() for o in t.job.outputs):
                t.status = "existing"
        while self.now() < stop_at:
            self.reap()
            ready = self.ready()
            if not ready and not self.running():
                break
            for t in ready[:max(self.jobs - len(self.running()), 0)]:
                self.start(t)
            time.sleep(0.5)
        self.stop()

    def stop(self) -> None:
        """The guard: SIGTERM to every running job, SIGKILL after GRACE_S; pending jobs are `not started`."""
        late = self.running()
        for t in late:
            t.status = "killed"
            self.say(f"guard: SIGTERM {t.name}")
            t.proc.terminate()
        deadline = time.monotonic() + GRACE_S
        while any(t.proc.poll() is None for t in late) and time.monotonic() < deadline:
            time.sleep(0.5)
        for t in late:
            if t.proc.poll() is None:
                self.say(f"guard: SIGKILL {t.name}")
                t.proc.kill()
            t.rc, t.seconds = t.proc.wait(), self.now() - t.start
            self.say(f"killed {t.name} ({t.seconds:.0f} s, rc {t.rc})")
        for t in self.tasks:
            if t.status == "pending":
                t.status = "not started"


def tail(path: Path | None, n: int) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def run_profile_stage(plan: Plan, stage: str, env: dict, logs: Path, say, timeout: float, command: str | None = None,
                      ) -> dict:
    """One profile-wide stage (figures, claims, tables: the plan's command; or `command`), within `timeout`."""
    job = next((j for j in plan.jobs if j.stage == stage), None)
    name = job.name if job else plan.profile
    out = logs / f"{name}.{stage}.out"
    t = time.monotonic()
    say(f"start  {stage}")
    try:
        with open(out, "w") as f:
            rc = subprocess.run(argv(command or job.command), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=max(timeout, 1)).returncode
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        rc, status = None, "killed"
    seconds = time.monotonic() - t
    say(f"{status:<6} {stage} ({seconds:.0f} s)" + ("" if status == "ok" else "\n" + tail(out, 6)))
    return {"stage": stage, "job": name, "status": status, "rc": rc, "seconds": round(seconds, 2)}


def trained_samplers(plan: Plan, tasks) -> list:
    """The train jobs that finished for a method with a sampler (the JEM family, JEAT): their models get the
    bf16 SGLD check (`robust-ebm bench --sgld-check --sgld-weights`, docs/gpu.md)."""
    return [t.job for t in tasks if t.job.stage == "train" and t.status in ("ok", "existing") and not t.job.reference
            and plan.config.method(t.job.wildcards["dataset"], t.job.wildcards["method"]).sampler is not None]


def gpu_info() -> dict:
    """nvidia-smi's view of the GPU and torch's (None fields where there is no GPU)."""
    info: dict = {}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,memory.total,driver_version,clocks.max.sm,power.limit,pci.bus_id"
        r = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi_query"] = {"fields": query, "rows": r.stdout.strip().splitlines(), "rc": r.returncode}
        info["nvidia_smi"] = subprocess.run([smi], capture_output=True, text=True).stdout
    import torch

    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


class GpuSampler:
    """`nvidia-smi` sampled every `every` seconds into a CSV during the run (utilisation and memory), summarised
    in run.json: how busy the jobs kept the GPU, the number to tune --jobs by. Nothing where there is no nvidia-smi."""

    FIELDS = "timestamp,utilization.gpu,memory.used"

    def __init__(self, path: Path, every: int = 2):
        self.path, self.proc = path, None
        smi = shutil.which("nvidia-smi")
        if smi:
            self.file = open(path, "w")
            self.proc = subprocess.Popen([smi, f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits",
                                          "-l", str(every)], stdout=self.file, stderr=subprocess.DEVNULL)

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait()
        self.file.close()
        util, mem = [], []
        for line in self.path.read_text().splitlines():
            parts = [x.strip() for x in line.split(",")]
            try:
                util.append(float(parts[1]))
                mem.append(float(parts[2]))
            except (IndexError, ValueError):
                continue
        if not util:
            return {"samples": 0}
        return {"samples": len(util), "utilization_gpu_mean_pct": sum(util) / len(util),
                "utilization_gpu_max_pct": max(util), "memory_used_max_mib": max(mem), "csv": self.path.name}


def commit_info() -> dict:
    """The commit: from git where .git travelled, else from .gpu/commit.txt (written by gpu_prepare.sh)."""
    commit = git_commit(ROOT)
    if commit:
        return {"commit": commit, "dirty": bool(git_dirty(ROOT)), "source": "git"}
    stamp = ROOT / ".gpu" / "commit.txt"
    if stamp.exists():
        return {**json.loads(stamp.read_text()), "source": ".gpu/commit.txt (gpu_prepare.sh)"}
    return {"commit": None, "source": "unknown (no .git, no .gpu/commit.txt)"}


def collect(plan: Plan, tasks: list[Task], profile_stages: list[dict], record: dict, folder: Path, logs: Path) -> None:
    """Copy the stage JSONs (and the text outputs of claims and tables) of every finished job into `folder`."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    results = ROOT / plan.results / plan.profile

    def copy(src: Path, dst: Path) -> None:
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)

    for t in tasks:
        if t.status not in ("ok", "existing"):
            continue
        for out in t.job.outputs:
            src = ROOT / out
            rel = src.relative_to(results)
            if src.is_dir():  # data/<D>/, samples/<D>/<M>/sS/: their JSON files only
                for f in src.rglob("*.json"):
                    copy(f, folder / rel / f.relative_to(src))
            elif src.suffix == ".json":
                copy(src, folder / rel)
    for extra in ("digest", "sgld"):  # robust-ebm digest's folder; the SGLD checks on the trained samplers
        made = folder.with_name(f"{folder.name}.{extra}")
        if made.is_dir():
            shutil.copytree(made, folder / extra)
    for name in ("claims.json", "claims.md", "claims.csv", "summary.json"):
        copy(results / name, folder / name)
    for d in ("tables", "figures"):
        if (results / d).is_dir():
            for f in (results / d).rglob("*"):
                if f.suffix in TEXT_SUFFIXES:
                    copy(f, folder / d / f.relative_to(results / d))
    job_logs = ROOT / "logs" / plan.profile
    if job_logs.is_dir():
        for f in job_logs.rglob("*.log"):
            if logs not in f.parents:  # the driver's own folder is copied below
                copy(f, folder / "logs" / f.relative_to(job_logs))
    for f in logs.glob("*"):
        copy(f, folder / "logs" / "driver" / f.name)
    (folder / "run.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default="mini")
    ap.add_argument("--methods", nargs="+", help="methods to run, most important first (default: PRIORITY, "
                    "then any other method of the profile)")
    ap.add_argument("--jobs", type=int, default=8, help="run jobs at once on the one GPU")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per job (default: cores / jobs)")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole command, collection included")
    ap.add_argument("--reserve", type=float, default=90, help="seconds kept for claims, tables and collection")
    ap.add_argument("--figures", action="store_true", help="also run the figures stage (slow SSIM search on the CPU)")
    ap.add_argument("--tracking", action="store_true", help="keep MLflow logging on (off by default: no mlflow there)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "results/gpu_run")
    ap.add_argument("--folder", default=None, help="name of the collected folder (default gpu_<profile>)")
    a = ap.parse_args()
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = Path(a.out).resolve()
    folder = ROOT / "results" / "gpu_run" / (a.folder or f"gpu_{a.profile}")  # packed into `out` at the end
    out.mkdir(parents=True, exist_ok=True)
    logs = ROOT / "logs" / a.profile / "gpu_driver"
    logs.mkdir(parents=True, exist_ok=True)
    console = open(logs / "driver.log", "w")

    def say(msg: str) -> None:
        line = f"[{time.monotonic() - t0:6.1f} s] {msg}"
        print(line, flush=True)
        console.write(line + "\n")
        console.flush()

    plan = Plan(load_params(ROOT / a.params), a.profile, params_file=a.params)
    known = plan.methods
    methods = a.methods or [m for m in PRIORITY if m in known] + [m for m in known if m not in PRIORITY]
    unknown = [m for m in methods if m not in known]
    if unknown:
        ap.error(f"methods {unknown} are not run in profile {a.profile}; its methods: {known}")
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    env = child_env(threads, a.tracking)
    tasks = build_tasks(plan, methods)
    say(f"profile {a.profile}: {len(tasks)} jobs, {a.jobs} at once, {threads} CPU threads each, budget {a.budget:.0f} s "
        f"(guard at {a.budget - a.reserve:.0f} s); methods in order: {' '.join(methods)}")
    gpu = gpu_info()
    say(f"device: {gpu['device'] or 'no CUDA GPU (CPU run)'}; torch {gpu['torch']}")

    sampler = GpuSampler(logs / "gpu_util.csv")
    runner = Runner(tasks, jobs=a.jobs, env=env, logs=logs, t0=t0, say=say)
    signal.signal(signal.SIGTERM, _interrupt)
    interrupted = False
    try:
        runner.run(stop_at=a.budget - a.reserve)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the jobs as the guard does, collect at once
        interrupted = True
        say("interrupted: stopping the running jobs; no claims or tables")
        runner.stop()
    gpu["utilization"] = sampler.stop()
    say(f"GPU use during the run jobs: {gpu['utilization']}")
    profile_stages = []
    for stage in (["figures"] if a.figures else []) + ["claims", "tables"]:
        left = a.budget - 10 - runner.now()
        if interrupted or (stage == "figures" and left < a.reserve):
            profile_stages.append({"stage": stage, "status": "not started",
                                   "reason": "interrupted" if interrupted else "budget"})
            continue
        profile_stages.append(run_profile_stage(plan, stage, env, logs, say, timeout=left))
    sgld_dir = folder.with_name(f"{folder.name}.sgld")
    shutil.rmtree(sgld_dir, ignore_errors=True)
    for job in [] if interrupted else trained_samplers(plan, tasks):  # bf16 vs fp32 SGLD on the trained EBMs
        method, model = job.wildcards["method"], next(o for o in job.outputs if o.endswith("model.pt"))
        left = a.budget - 30 - runner.now()  # the digest comes after
        if left < 20:
            profile_stages.append({"stage": f"sgld_check_{method}", "status": "not started", "reason": "budget"})
            continue
        sgld_dir.mkdir(parents=True, exist_ok=True)
        check = (f"robust-ebm bench --params {a.params} --profile {a.profile} --methods {method} --sgld-check "
                 f"--sgld-weights {model} --steps 1 --warmup 0 --batch 8 --precision fp32 "
                 f"--json {sgld_dir.relative_to(ROOT)}/{method}.json")
        profile_stages.append(run_profile_stage(plan, f"sgld_check_{method}", env, logs, say, command=check,
                                                timeout=min(60, left)))
    if not interrupted and (ROOT / "src" / "robust_ebm" / "digest.py").exists():  # the runs' numbers, to keep
        shutil.rmtree(folder.with_name(folder.name + ".digest"), ignore_errors=True)
        digest = (f"robust-ebm digest --params {a.params} --profile {a.profile} --results {plan.results}/{a.profile} "
                  f"--out {folder.relative_to(ROOT)}.digest")
        profile_stages.append(run_profile_stage(plan, "digest", env, logs, say, command=digest,
                                                timeout=a.budget - 5 - runner.now()))

    statuses = {}
    for t in tasks:
        statuses[t.status] = statuses.get(t.status, 0) + 1
    finished_methods = [m for m in methods if all(
        t.status in ("ok", "existing") for t in tasks if t.job.wildcards.get("method") == m)]
    stage_seconds: dict[str, dict[str, float]] = {}
    for t in tasks:
        if t.seconds is not None and t.job.stage != "data":
            stage_seconds.setdefault(t.job.wildcards["method"], {})[t.job.stage] = round(t.seconds, 2)
    record = {
        "what": "benchmarks/gpu_mini.py: one profile on one GPU (issue 10.4)",
        "started_utc": started, "wall_s": None, "profile": a.profile, "params": a.params,
        "args": vars(a), "threads_per_job": threads, "commit": commit_info(),
        "python": platform.python_version(), "host_cpus": os.cpu_count(), "gpu": gpu,
        "methods_in_order": methods, "methods_finished": finished_methods, "job_status_counts": statuses,
        "jobs": [{"job": t.name, "stage": t.job.stage, "method": t.job.wildcards.get("method"), "status": t.status,
                  "rc": t.rc, "start_s": None if t.start is None else round(t.start, 2),
                  "seconds": None if t.seconds is None else round(t.seconds, 2), "command": t.job.command}
                 for t in tasks],
        "stage_seconds": stage_seconds, "profile_stages": profile_stages,
    }
    record["wall_s"] = round(runner.now(), 1)
    collect(plan, tasks, profile_stages, record, folder, logs)
    archive = out / f"{folder.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    for name in ("run.json", "claims.md", "summary.json"):
        if (folder / name).exists():
            shutil.copy2(folder / name, out / name)
    say(f"done in {runner.now():.0f} s: {statuses}; finished: {' '.join(finished_methods) or 'none'}; "
        f"-> {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")
    console.close()
    shutil.copy2(logs / "driver.log", out / "driver.log")
    return 0 if all(s["status"] == "ok" for s in profile_stages) else 1


if __name__ == "__main__":
    sys.exit(main())
