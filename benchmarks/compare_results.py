"""File-by-file comparison of two results/<profile> folders (outside CI): every JSON (numbers at 1e-12 relative,
wall-clock fields left out), every .npz array exactly, .csv/.md as text.

    python benchmarks/compare_results.py BEFORE/results/smoke AFTER/results/smoke
"""
import json, sys
from pathlib import Path
import numpy as np

VOLATILE = {"seconds", "started", "finished", "date", "time", "wall_seconds", "mlflow_run_id", "run_id", "img_per_s", "images_per_s", "commit", "host", "timestamp", "elapsed"}

def diff(a, b, path=""):
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in VOLATILE or "second" in k:
                continue
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'after' if k in b else 'before'}")
            else:
                out += diff(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} vs {len(b)}")
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                out += diff(x, y, f"{path}[{i}]")
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if not (a == b or (a != a and b != b) or abs(a - b) <= 1e-12 * max(1, abs(a))):
            out.append(f"{path}: {a} vs {b}")
    elif a != b:
        out.append(f"{path}: {str(a)[:60]!r} vs {str(b)[:60]!r}")
    return out

before, after = Path(sys.argv[1]), Path(sys.argv[2])
rows = {"identical": [], "differ": [], "only before": [], "only after": []}
files = sorted({p.relative_to(before) for p in before.rglob("*") if p.is_file() and p.suffix in (".json", ".npz", ".csv", ".md")} |
               {p.relative_to(after) for p in after.rglob("*") if p.is_file() and p.suffix in (".json", ".npz", ".csv", ".md")})
details = {}
for f in files:
    a, b = before / f, after / f
    if not a.exists() or not b.exists():
        rows["only after" if b.exists() else "only before"].append(str(f)); continue
    if f.suffix == ".json":
        d = diff(json.loads(a.read_text()), json.loads(b.read_text()))
    elif f.suffix == ".npz":
        A, B = np.load(a), np.load(b)
        d = [f"keys {sorted(set(A.files) ^ set(B.files))}"] if set(A.files) != set(B.files) else []
        d += [f"{k}: max |diff| {np.max(np.abs(A[k].astype(float) - B[k].astype(float))) if A[k].shape == B[k].shape else 'shape'}" for k in A.files if k in B.files and not np.array_equal(A[k], B[k])]
    else:
        d = [] if a.read_text() == b.read_text() else ["text differs"]
    (rows["differ"] if d else rows["identical"]).append(str(f))
    if d: details[str(f)] = d
print(json.dumps({k: len(v) for k, v in rows.items()}))
for k in ("only before", "only after"):
    for f in rows[k]: print(k, f)
for f, d in details.items():
    print("DIFFER", f, "|", "; ".join(d[:6]), "..." if len(d) > 6 else "")
