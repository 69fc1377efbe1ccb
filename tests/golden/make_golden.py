"""Regenerate the golden fixtures from fetched checkouts of the official repositories.

    python tests/golden/make_golden.py --refs /path/to/refs [--only jem trades ...]

Each `tests/golden/gen_<family>.py` defines `generate(refs) -> list[Path]`, where `refs` maps
"owner/name" to a `common.Reference`; a family whose repositories are absent is reported, not skipped
silently. Reference code is imported at run time from the checkouts and never copied here.
The `generate` family also needs torchattacks 3.5.1 (WEAT's pin, no project dependency) importable,
e.g. `pip download torchattacks==3.5.1 --no-deps` unpacked onto PYTHONPATH. On 2026-11-30 every fixture
regenerated bit-identically from the commits listed in docs/provenance.md (2 CPU cores, ~5 min).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Import the fixtures' helpers as `golden.*`, as pytest does (tests/ first on sys.path). The package
# name `tests` cannot be used: torch-fidelity installs a top-level `tests` package into site-packages.
sys.path.insert(0, str(HERE.parent))

from golden.common import refs_from_root  # noqa: E402


def families() -> list[str]:
    return sorted(p.stem[len("gen_"):] for p in HERE.glob("gen_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--refs", type=Path, default=os.environ.get("ROBUST_EBM_REFS"),
                        help="folder holding the checkouts as owner+name/ (env ROBUST_EBM_REFS)")
    parser.add_argument("--only", nargs="*", default=None, help=f"families to regenerate, of {families()}")
    args = parser.parse_args(argv)
    if args.refs is None:
        parser.error("--refs DIR is required (a folder of fetched checkouts named owner+name)")
    refs = refs_from_root(args.refs)
    wanted = args.only or families()
    unknown = sorted(set(wanted) - set(families()))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {families()}")
    failed = []
    for family in wanted:
        module = importlib.import_module(f"golden.gen_{family}")
        missing = [r for r in getattr(module, "REPOSITORIES", ()) if r not in refs]
        if missing:
            print(f"{family}: missing checkouts {missing} under {args.refs}", file=sys.stderr)
            failed.append(family)
            continue
        for path in module.generate(refs):
            print(f"{family}: wrote {path.relative_to(HERE.parents[1])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
