"""The claims stage: each claim of the three papers (resources/claims.yaml) checked against a profile's results.

A claim is data (paper, figure/table, data set, one-line statement) plus the name of a small check
function of `CHECKS` and its arguments. A check reads the evaluate and metrics stages' JSON of the
runs it names (results/<P>/{eval,metrics}/<D>/<M>/s<S>.json, nothing else) and returns the quantity
it measured, the runs, the measured values and a verdict. Output: results/<P>/claims.{json,csv,md}.

Verdicts (one vocabulary for every claim):

    holds                the data decide for the claim
    fails                the data decide against the claim
    inconclusive (why)   measured, but the difference is within noise (or a part is not measured)
    not measured (why)   an input is missing: a run not in the profile, a column not computed, ...

Noise. Every compared number is an estimate with a standard error (SE):
  - an accuracy k/n: the binomial SE sqrt(p(1-p)/n) with p = (k+1)/(n+2) (never 0 at k = 0 or n);
  - a mean over images (paired energy difference E(x) - E(x*), landscape statistics over test images,
    Fisher scores): std / sqrt(n); an unpaired gap of two means: sqrt(s1^2/n1 + s2^2/n2);
  - an Inception (or stand-in) score: its std over splits / sqrt(splits);
  - FID has no noise estimate: it can only turn a decided IS comparison into `inconclusive`.
Seeds are pooled (accuracy counts summed; means averaged, SEs combined as sqrt(sum se^2) / S); the
spread between seeds is not part of the SE. A comparison a vs b is decided when |a - b| >= z * SE,
SE = sqrt(se_a^2 + se_b^2) (z from claims.yaml, 2 by default); a claim over several comparisons holds
when all hold and fails when one fails.

Sample quality uses Inception IS/FID where the metrics stage had the weights for every compared run,
else the reference-classifier stand-in (is_refclf / fid_refclf), and the row says which.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from . import plan
from .papers import own_generator
from .runtime import atomic_write_json, atomic_write_text

HOLDS, FAILS = "holds", "fails"


class NotMeasured(Exception):
    """An input of a check is missing; the message says which and why."""


# --------------------------------------------------------------------------- estimates and comparisons


@dataclass(frozen=True)
class Estimate:
    """A measured number and its standard error (None: no noise estimate)."""

    value: float
    se: float | None
    n: int | None = None

    def text(self, digits: int = 3) -> str:
        se = "" if self.se is None else f" ± {self.se:.{digits}f}"
        n = "" if self.n is None else f" (n {self.n})"
        return f"{self.value:.{digits}f}{se}{n}"


def binomial(accuracy: float, n: int) -> Estimate:
    """An accuracy on n points with its binomial SE (p smoothed to (k+1)/(n+2))."""
    k = round(accuracy * n)
    p = (k + 1) / (n + 2)
    return Estimate(accuracy, math.sqrt(p * (1 - p) / n), n)


def mean_estimate(mean: float, std: float, n: int) -> Estimate:
    """A mean over n items with SE std / sqrt(n); no SE from a single item."""
    return Estimate(mean, std / math.sqrt(n) if n > 1 else None, n)


def pool(estimates: list[Estimate]) -> Estimate:
    """The mean over seeds; SE sqrt(sum se^2) / S (None if any seed lacks one)."""
    s = len(estimates)
    value = sum(e.value for e in estimates) / s
    se = None if any(e.se is None for e in estimates) else math.sqrt(sum(e.se ** 2 for e in estimates)) / s
    n = sum(e.n for e in estimates) if all(e.n is not None for e in estimates) else None
    return Estimate(value, se, n)


@dataclass(frozen=True)
class Comparison:
    """One decided-or-not comparison: `label` says what was compared."""

    verdict: str
    label: str

    @property
    def decided(self) -> bool:
        return self.verdict in (HOLDS, FAILS)


def compare(a: Estimate, b: Estimate, relation: str, label: str, z: float, margin: float = 0.0) -> Comparison:
    """Is `a relation b`, SE = sqrt(se_a^2 + se_b^2), d = a - b?
      '>' ('<'): holds when d >= z SE (d <= -z SE), fails on the other side, else inconclusive;
      '>=': a at least as good as b up to `margin`: holds when d - z SE >= -margin, fails when d + z SE < -margin;
      '~' : |d| <= margin: holds when |d| + z SE <= margin, fails when |d| - z SE > margin."""
    diff = a.value - b.value
    se = None if a.se is None or b.se is None else math.hypot(a.se, b.se)
    text = f"{label}: {diff:+.4g}" + ("" if se is None else f" ± {se:.2g}")
    if se is None:
        return Comparison("inconclusive (no noise estimate)", text)
    if relation == "<":
        diff, relation = -diff, ">"
    if relation == ">":
        verdict = HOLDS if diff >= z * se else FAILS if diff <= -z * se else f"inconclusive (|difference| < {z:g} SE)"
    elif relation == ">=":  # a at least as good as b, up to `margin`
        verdict = (HOLDS if diff - z * se >= -margin else FAILS if diff + z * se < -margin
                   else f"inconclusive (within {z:g} SE of -{margin:g})")
    elif relation == "~":  # |a - b| <= margin
        verdict = (HOLDS if abs(diff) + z * se <= margin else FAILS if abs(diff) - z * se > margin
                   else f"inconclusive (within {z:g} SE of the margin {margin:g})")
    else:
        raise ValueError(f"unknown relation '{relation}' (use '>', '<', '>=', '~')")
    return Comparison(verdict, text)


def combine(parts: list[Comparison]) -> str:
    """All hold -> holds; one fails -> fails; else inconclusive with the reasons."""
    if not parts:
        raise NotMeasured("nothing to compare")
    if any(p.verdict == FAILS for p in parts):
        return FAILS
    if all(p.verdict == HOLDS for p in parts):
        return HOLDS
    reasons = sorted({p.verdict.removeprefix("inconclusive (").removesuffix(")") for p in parts if p.verdict != HOLDS})
    return f"inconclusive ({'; '.join(reasons)})"


# --------------------------------------------------------------------------- reading the stage outputs


class Results:
    """The evaluate and metrics JSON of a profile's runs, read once each; records the runs it used."""

    def __init__(self, results_dir: Path, profile_cfg):
        self.root, self.profile = Path(results_dir), profile_cfg
        self._cache: dict[Path, Any] = {}
        self.used: list[str] = []

    def seeds(self, dataset: str, method: str) -> list[int]:
        if method not in self.profile.methods_for(dataset):
            raise NotMeasured(f"{method} is not run on {dataset} in profile {self.profile.name}")
        return list(self.profile.seeds)

    def read(self, kind: str, dataset: str, method: str) -> list[dict]:
        """One JSON per seed of the run (kind 'eval' or 'metrics')."""
        out = []
        for seed in self.seeds(dataset, method):
            path = plan.profile_path(kind, self.root, dataset=dataset, method=method, seed=seed)
            if path not in self._cache:
                self._cache[path] = json.loads(path.read_text()) if path.is_file() else None
            if self._cache[path] is None:
                raise NotMeasured(f"no {kind} output {path} (stage not run or failed)")
            run = f"{dataset}/{method}/s{seed}"
            if run not in self.used:
                self.used.append(run)
            out.append(self._cache[path])
        return out

    def accuracy(self, dataset: str, method: str, column: str) -> Estimate:
        parts = []
        for data in self.read("eval", dataset, method):
            col = data.get("columns", {}).get(column)
            if not isinstance(col, dict) or not isinstance(col.get("accuracy"), (int, float)):
                why = col.get("status") if isinstance(col, dict) else "no such column"
                raise NotMeasured(f"{method}: eval column '{column}' has no accuracy ({why})")
            parts.append(binomial(float(col["accuracy"]), int(col["n"])))
        total = sum(p.n for p in parts)
        return binomial(sum(p.value * p.n for p in parts) / total, total)

    def metrics(self, dataset: str, method: str, path: str, what: str) -> list[Any]:
        """The value at `path` ('a|b|c') of each seed's metrics JSON (NotMeasured if absent)."""
        values = []
        for data in self.read("metrics", dataset, method):
            obj: Any = data
            for key in path.split("|"):  # '|' separates keys: energy keys hold '/' and '.
                obj = obj.get(key) if isinstance(obj, dict) else None
            if obj is None:
                raise NotMeasured(f"{method}: no {what} in the metrics output ({path})")
            values.append(obj)
        return values


# --------------------------------------------------------------------------- the check functions

CHECKS: dict[str, Callable[..., "Outcome"]] = {}


@dataclass
class Outcome:
    quantity: str
    values: list[str] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    verdict: str | None = None  # None: combine(comparisons)


def check(fn: Callable[..., Outcome]) -> Callable[..., Outcome]:
    """Register a check function under its own name."""
    CHECKS[fn.__name__] = fn
    return fn


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _measure(results, dataset, methods, get) -> tuple[dict[str, Estimate], list[str]]:
    """{method: get(method)} for the measurable methods, and a note per unmeasurable one."""
    got, missing = {}, []
    for m in methods:
        try:
            got[m] = get(m)
        except NotMeasured as err:
            missing.append(str(err))
    return got, missing


def _pairwise(got, better: list[str], than: str, relation: str, z: float, label: str,
              margin: float = 0.0) -> list[Comparison]:
    """compare(got[m], got[than]) for each measured m of `better` (none when `than` is not measured)."""
    if than not in got:
        return []
    return [compare(got[m], got[than], relation, f"{m} − {than} ({label})", z, margin) for m in better if m in got]


def _finish(outcome: Outcome, missing: list[str]) -> Outcome:
    if not outcome.comparisons:
        raise NotMeasured("; ".join(missing) or "nothing to compare")
    if missing:
        outcome.comparisons.append(Comparison(f"inconclusive (not measured: {'; '.join(missing)})", "missing"))
    return outcome


@check
def accuracy_at_least(results: Results, dataset: str, z: float, *, method: str, column: str, threshold: float) -> Outcome:
    """Accuracy of `method` in eval column `column` is at least `threshold`."""
    acc = results.accuracy(dataset, method, column)
    floor = Estimate(threshold, 0.0)
    return Outcome(f"{column} accuracy", [f"{method}: {acc.text()}"],
                   [compare(acc, floor, ">=", f"{method} − {threshold:g}", z)])


@check
def more_robust(results: Results, dataset: str, z: float, *, better: list[str], than: str, column: str) -> Outcome:
    """Each of `better` has a higher accuracy in `column` than `than`."""
    got, missing = _measure(results, dataset, [*better, than], lambda m: results.accuracy(dataset, m, column))
    out = Outcome(f"{column} accuracy", [f"{m}: {e.text()}" for m, e in got.items()],
                  _pairwise(got, better, than, ">", z, column))
    return _finish(out, missing)


@check
def at_least_as_robust(results: Results, dataset: str, z: float, *, better: list[str], than: str, column: str,
                       margin: float = 0.0) -> Outcome:
    """Each of `better` is not less accurate in `column` than `than` (by more than `margin`)."""
    got, missing = _measure(results, dataset, [*better, than], lambda m: results.accuracy(dataset, m, column))
    out = Outcome(f"{column} accuracy", [f"{m}: {e.text()}" for m, e in got.items()],
                  _pairwise(got, better, than, ">=", z, column, margin))
    return _finish(out, missing)


@check
def attack_as_strong(results: Results, dataset: str, z: float, *, method: str, attack: str, reference: str,
                     margin: float) -> Outcome:
    """Accuracy of `method` under `attack` is within `margin` of that under `reference`, and below clean."""
    acc = {c: results.accuracy(dataset, method, c) for c in ("clean", attack, reference)}
    return Outcome(f"accuracy of {method} under {attack} vs {reference}", [f"{c}: {e.text()}" for c, e in acc.items()],
                   [compare(acc[attack], acc[reference], "~", f"{attack} − {reference}", z, margin),
                    compare(acc["clean"], acc[attack], ">", f"clean − {attack}", z)])


def _landscape(results, dataset, method, kind, stat) -> Estimate:
    per_seed = results.metrics(dataset, method, f"landscape|{kind}|{stat}", "landscape statistics (metrics.landscape)")
    return pool([mean_estimate(s["mean"], s["std"], s["n"]) for s in per_seed])


@check
def landscape_flatter_and_lower(results: Results, dataset: str, z: float, *, flatter: list[str], than: str,
                                kind: str = "E_xy") -> Outcome:
    """Around test images, each of `flatter` has a lower mean |E(p) - E(x0)| and a lower mean E(p) than `than`."""
    out = Outcome(f"{kind} on a plane around test images: mean |ΔE| (flatness), mean E (level), centre rank")
    missing: list[str] = []
    for stat, word in (("mean_abs_delta", "flatness"), ("mean_energy", "level")):
        got, miss = _measure(results, dataset, [*flatter, than], lambda m: _landscape(results, dataset, m, kind, stat))
        missing += [m for m in miss if m not in missing]
        out.values += [f"{m} {stat}: {e.text()}" for m, e in got.items()]
        out.comparisons += _pairwise(got, flatter, than, "<", z, word)
    ranks, _ = _measure(results, dataset, [*flatter, than], lambda m: _landscape(results, dataset, m, kind, "centre_rank"))
    out.values += [f"{m} centre_rank: {e.text(2)}" for m, e in ranks.items()]
    return _finish(out, missing)


@check
def fisher_order(results: Results, dataset: str, z: float, *, descending: list[str], scores: list[str]) -> Outcome:
    """Each score (jfs, mfs) strictly decreases along `descending`."""
    out = Outcome(" and ".join(s.upper() for s in scores) + " (Hyvärinen score; lower is better)")
    missing: list[str] = []
    for score in scores:
        def get(m, score=score):
            return pool([mean_estimate(f[score], f[f"{score}_std"], f["n"]) if f"{score}_std" in f
                         else Estimate(f[score], None, f.get("n"))
                         for f in results.metrics(dataset, m, "fisher", "Fisher scores")])
        got, miss = _measure(results, dataset, descending, get)
        missing += [m for m in miss if m not in missing]
        out.values += [f"{m} {score}: {e.text(4)}" for m, e in got.items()]
        present = [m for m in descending if m in got]
        out.comparisons += [compare(got[a], got[b], ">", f"{a} − {b} ({score})", z) for a, b in zip(present, present[1:])]
    return _finish(out, missing)


def _quality(results: Results, dataset: str, method: str, generator: str, source: str) -> tuple[Estimate, float]:
    """(IS with SE, FID) of `generator`'s samples of `method`, from Inception or the refclf stand-in."""
    is_, fid = [], []
    for data in results.read("metrics", dataset, method):
        gen = data.get("generators", {}).get(generator)
        if gen is None:
            raise NotMeasured(f"{method}: no '{generator}' samples in the metrics output")
        if source == "inception":
            n = max((int(k.rsplit("_n", 1)[1]) for k in gen if k.startswith("is_inception_n")), default=None)
            if n is None:
                raise NotMeasured(f"{method}/{generator}: no Inception scores")
            splits = min(data["inception"]["splits"], n)
            is_.append(mean_estimate(gen[f"is_inception_n{n}"], gen[f"is_std_inception_n{n}"], splits))
            fid.append(gen[f"fid_inception_n{n}"])
        else:
            ref = gen.get("refclf", {})
            if "is_refclf" not in ref:
                raise NotMeasured(f"{method}/{generator}: no stand-in scores ({ref.get('status', 'refclf disabled')})")
            splits = min(results.profile.metrics.inception.splits, int(ref["n"]))
            is_.append(mean_estimate(ref["is_refclf"], ref["is_std_refclf"], splits))
            fid.append(ref["fid_refclf"])
    return pool(is_), sum(fid) / len(fid)


def _quality_source(results: Results, dataset: str, methods: list[str]) -> str:
    """'inception' when every measurable run had the Inception weights, else 'refclf'."""
    statuses = []
    for m in methods:
        try:
            statuses += [d.get("inception", {}).get("status") for d in results.read("metrics", dataset, m)]
        except NotMeasured:
            continue
    return "inception" if statuses and all(s == "ok" for s in statuses) else "refclf"


def _quality_compare(better, worse, qa, qb, z) -> Comparison:
    """IS decides (a higher); a FID that points the other way makes it inconclusive."""
    (is_a, fid_a), (is_b, fid_b) = qa, qb
    c = compare(is_a, is_b, ">", f"{better} − {worse} (IS)", z)
    label = f"{c.label}; FID {fid_a:.4g} vs {fid_b:.4g}"
    if c.verdict == HOLDS and fid_a > fid_b or c.verdict == FAILS and fid_a < fid_b:
        return Comparison("inconclusive (IS and FID disagree)", label)
    return Comparison(c.verdict, label)


def _source_text(source: str) -> str:
    return ("Inception IS/FID" if source == "inception"
            else "IS/FID of the reference-classifier stand-in (is_refclf/fid_refclf; Inception unavailable)")


@check
def sample_quality_order(results: Results, dataset: str, z: float, *, ascending: list, generator: str) -> Outcome:
    """Sample quality of `generator` rises along `ascending` (an entry may be a list of equals)."""
    groups = [_as_list(g) for g in ascending]
    methods = [m for g in groups for m in g]
    source = _quality_source(results, dataset, methods)
    got, missing = _measure(results, dataset, methods, lambda m: _quality(results, dataset, m, generator, source))
    out = Outcome(f"sample quality of '{generator}': {_source_text(source)}",
                  [f"{m}: IS {q[0].text()}, FID {q[1]:.4g}" for m, q in got.items()])
    for low, high in zip(groups, groups[1:]):
        out.comparisons += [_quality_compare(h, lo, got[h], got[lo], z) for h in high for lo in low if h in got and lo in got]
    return _finish(out, missing)


@check
def generator_better(results: Results, dataset: str, z: float, *, methods: list[str], better: str, worse: str) -> Outcome:
    """On each method, `better`'s samples score higher than `worse`'s."""
    source = _quality_source(results, dataset, methods)
    out = Outcome(f"sample quality of '{better}' vs '{worse}': {_source_text(source)}")
    missing = []
    for m in methods:
        try:
            qa, qb = _quality(results, dataset, m, better, source), _quality(results, dataset, m, worse, source)
        except NotMeasured as err:
            missing.append(str(err))
            continue
        out.values.append(f"{m}: {better} IS {qa[0].text()} FID {qa[1]:.4g}; {worse} IS {qb[0].text()} FID {qb[1]:.4g}")
        out.comparisons.append(_quality_compare(f"{m}/{better}", f"{m}/{worse}", qa, qb, z))
    return _finish(out, missing)


def _delta(results, dataset, method, kind, column) -> Estimate:
    """Paired E(x) - E(x*) (x* = `column`'s adversarial image) from the metrics stage's energy report."""
    per_seed = results.metrics(dataset, method, f"energy|delta|{kind}/clean-{column}",
                               f"paired energy difference clean vs {column}")
    return pool([mean_estimate(d["mean"], d["std"], d["n"]) for d in per_seed])


@check
def attack_energy_shift(results: Results, dataset: str, z: float, *, method: str, attacks: list[str],
                        direction: str, kind: str = "E_x") -> Outcome:
    """Each attack moves `kind` of `method`'s test images `direction` ('lower'|'higher') than the clean energy."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got '{direction}'")
    got, missing = {}, []
    for a in attacks:
        try:
            got[a] = _delta(results, dataset, method, kind, a)
        except NotMeasured as err:
            missing.append(f"{a} ({err})")
    zero = Estimate(0.0, 0.0)
    # delta = E(clean) - E(adversarial) > 0 <=> the attack lowered the energy
    rel = ">" if direction == "lower" else "<"
    out = Outcome(f"paired {kind}(x) - {kind}(x*) of {method} per attack (> 0: the attack lowers the energy)",
                  [f"{a}: {e.text()}" for a, e in got.items()],
                  [compare(e, zero, rel, a, z) for a, e in got.items()])
    return _finish(out, missing)


def _gap(results, dataset, method, kind, which) -> Estimate:
    """|mean E(B) - mean E(clean)|: B = PGD images (paired) or the method's generated set (unpaired)."""
    if which == "adversarial":
        d = _delta(results, dataset, method, kind, "pgd")
        return Estimate(abs(d.value), d.se, d.n)
    if which != "generated":
        raise ValueError(f"energy gap set must be 'adversarial' or 'generated', got '{which}'")
    gen = f"generated/{own_generator(method)}"   # the method's own set (resources/paper_mapping.yaml)
    parts = []
    for s in results.metrics(dataset, method, "energy|summary", "energy summaries"):
        if gen not in s or "clean" not in s:
            raise NotMeasured(f"{method}: no energies of '{gen}' in the metrics output")
        c, g = s["clean"][kind], s[gen][kind]
        parts.append(Estimate(abs(g["mean"] - c["mean"]), math.sqrt(c["std"] ** 2 / c["n"] + g["std"] ** 2 / g["n"]),
                              g["n"]))
    return pool(parts)


@check
def energy_gap_narrower(results: Results, dataset: str, z: float, *, narrower: list[str], than: str,
                        sets: list[str], kind: str = "E_xy") -> Outcome:
    """For each set (adversarial: PGD; generated), each of `narrower` has a smaller |clean-vs-set gap| than `than`."""
    out = Outcome(f"|mean {kind}(set) − mean {kind}(clean)| for set in {sets}")
    missing: list[str] = []
    for which in sets:
        got, miss = _measure(results, dataset, [*narrower, than], lambda m: _gap(results, dataset, m, kind, which))
        missing += [m for m in miss if m not in missing]
        out.values += [f"{m} {which}: {e.text()}" for m, e in got.items()]
        out.comparisons += _pairwise(got, narrower, than, "<", z, f"{which} gap")
    return _finish(out, missing)


@check
def more_robust_at_similar_clean(results: Results, dataset: str, z: float, *, pairs: list[list[str]], column: str,
                                 clean_margin: float) -> Outcome:
    """For each (a, b): a more accurate than b in `column`, and a's clean accuracy not below b's by more than the margin."""
    out = Outcome(f"{column} and clean accuracy")
    missing = []
    for a, b in pairs:
        try:
            rob = {m: results.accuracy(dataset, m, column) for m in (a, b)}
            clean = {m: results.accuracy(dataset, m, "clean") for m in (a, b)}
        except NotMeasured as err:
            missing.append(str(err))
            continue
        out.values += [f"{m}: {column} {rob[m].text()}, clean {clean[m].text()}" for m in (a, b)]
        out.comparisons += [compare(rob[a], rob[b], ">", f"{a} − {b} ({column})", z),
                            compare(clean[a], clean[b], ">=", f"{a} − {b} (clean, margin {clean_margin:g})", z, clean_margin)]
    return _finish(out, missing)


# --------------------------------------------------------------------------- the stage

COLUMNS = ("id", "paper", "where", "dataset", "statement", "quantity", "runs", "values", "comparisons", "verdict")


def _claims_data(path: Path | None = None) -> dict:
    text = Path(path).read_text() if path else resources.files("robust_ebm").joinpath("resources/claims.yaml").read_text()
    return yaml.safe_load(text)


def load_claims(path: Path | None = None) -> tuple[list[dict], float]:
    """The claims and z of claims.yaml, validated: unknown checks or missing fields fail here."""
    data = _claims_data(path)
    claims, z = data["claims"], float(data.get("z", 2.0))
    ids = [c.get("id") for c in claims]
    for c in claims:
        missing = [k for k in ("id", "paper", "where", "dataset", "statement", "check") if k not in c]
        if missing:
            raise ValueError(f"claims.yaml: claim {c.get('id', '?')} lacks {missing}")
        if c["check"] not in CHECKS:
            raise ValueError(f"claims.yaml: claim {c['id']} names unknown check '{c['check']}'; known: {sorted(CHECKS)}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"claims.yaml: duplicate claim ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return claims, z


def _datasets(claim: dict, profile_cfg) -> list[str] | str:
    """Our data sets for the claim's paper data set, or why there is none."""
    if claim["dataset"] == "any":
        return list(profile_cfg.run_datasets)
    ours = profile_cfg.table_datasets.get(claim["dataset"])
    if ours is None:
        return f"profile {profile_cfg.name} maps no data set to {claim['dataset']} (table_datasets)"
    return [ours]


def evaluate_claim(claim: dict, results: Results, dataset: str, z: float) -> dict:
    """One output row: the claim's fields, what was measured and the verdict."""
    row = {k: claim[k] for k in ("id", "paper", "where", "statement")} | {"dataset": dataset}
    results.used = []
    try:
        outcome = CHECKS[claim["check"]](results, dataset, z, **claim.get("args", {}))
        verdict = outcome.verdict or combine(outcome.comparisons)
        row |= {"quantity": outcome.quantity, "values": outcome.values,
                "comparisons": [f"{c.label} → {c.verdict}" for c in outcome.comparisons if c.label != "missing"],
                "verdict": verdict}
    except NotMeasured as err:
        row |= {"quantity": "", "values": [], "comparisons": [], "verdict": f"not measured ({err})"}
    row["runs"] = list(results.used)
    return row


def claims_stage(profile_cfg, results_dir, out_dir, *, claims_path: Path | None = None) -> list[Path]:
    """Check every claim on `results_dir` (one profile); write claims.{json,csv,md} into `out_dir`."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"no results folder {results_dir}; run the pipeline's earlier stages first")
    claims, z = load_claims(claims_path)
    results = Results(results_dir, profile_cfg)
    rows = []
    for claim in claims:
        datasets = _datasets(claim, profile_cfg)
        if isinstance(datasets, str):
            rows.append({k: claim[k] for k in ("id", "paper", "where", "statement")}
                        | {"dataset": claim["dataset"], "quantity": "", "runs": [], "values": [], "comparisons": [],
                           "verdict": f"not measured ({datasets})"})
            continue
        rows += [evaluate_claim(claim, results, d, z) for d in datasets]
    summary = verdict_counts(rows)
    out = {key: plan.profile_path(key, out_dir) for key in ("claims_json", "claims_csv", "claims_md", "summary")}
    paths = [atomic_write_json(out["claims_json"], {"profile": profile_cfg.name, "z": z, "summary": summary,
                                                    "verdicts": VERDICTS, "claims": rows}),
             atomic_write_text(out["claims_csv"], _csv(rows)),
             atomic_write_text(out["claims_md"], _markdown(rows, profile_cfg, z, summary)),
             atomic_write_json(out["summary"], headline(results, profile_cfg, summary))]
    return paths


SUMMARY_COLUMNS = ("clean", "pgd")  # the eval columns of summary.json (accuracy, pooled over seeds)


def headline(results: Results, profile_cfg, counts: dict[str, int]) -> dict:
    """summary.json, the profile's DVC metrics (`dvc metrics show`, `dvc exp show`): the claims' verdict counts
    and each run's clean and PGD accuracy pooled over seeds, {"verdicts": {...}, "accuracy": {dataset: {method:
    {column: value}}}}; a number that was not measured is left out, so the file stays small."""
    accuracy: dict[str, dict] = {}
    for dataset, method in profile_cfg.runs:
        row = {}
        for column in SUMMARY_COLUMNS:
            try:
                row[column] = round(results.accuracy(dataset, method, column).value, 6)
            except NotMeasured:
                continue
        if row:
            accuracy.setdefault(dataset, {})[method] = row
    return {"verdicts": counts, "accuracy": accuracy}


VERDICTS = {"holds": "the data decide for the claim (difference at least z SE on the claimed side)",
            "fails": "the data decide against the claim (difference at least z SE on the other side)",
            "inconclusive (why)": "measured, but within noise, or part of it not measured",
            "not measured (why)": "an input is missing (run not in the profile, column or score not computed)"}


def verdict_counts(rows: list[dict]) -> dict[str, int]:
    """{'holds': n, 'fails': n, 'inconclusive': n, 'not measured': n}."""
    counts = dict.fromkeys(("holds", "fails", "inconclusive", "not measured"), 0)
    for r in rows:
        counts[next(k for k in counts if r["verdict"].startswith(k))] += 1
    return counts


def _cell(value) -> str:
    return "; ".join(value) if isinstance(value, list) else str(value)


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(r[k]) for k in COLUMNS})
    return buffer.getvalue()


def _markdown(rows: list[dict], profile_cfg, z: float, summary: dict) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# Claims of the papers, checked on profile `{profile_cfg.name}`", "",
             f"Seeds {profile_cfg.seeds}; a comparison is decided at {z:g} standard errors (robust_ebm/claims.py). "
             + ", ".join(f"{k}: {v}" for k, v in summary.items()) + ".", "",
             "| claim | paper | where | data | statement | quantity | values | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(esc(_cell(r[k])) for k in
                                         ("id", "paper", "where", "dataset", "statement", "quantity", "values", "verdict")) + " |")
    lines += ["", "## Comparisons", ""]
    for r in rows:
        lines.append(f"- **{r['id']}** ({r['dataset']}; runs {', '.join(r['runs']) or '-'}): "
                     + (esc("; ".join(r["comparisons"])) or esc(r["verdict"])))
    lines += ["", "## Verdicts", ""] + [f"- `{k}`: {v}" for k, v in VERDICTS.items()]
    return "\n".join(lines) + "\n"
