"""Start-up cost (issue 13 item 3): what the command line and the stage modules import before any work.
Each check imports in a fresh interpreter and reads its sys.modules; no timings are asserted."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest


def _imported(code: str, packages: tuple[str, ...]) -> list[str]:
    """The top-level packages of `packages` that `code` leaves in sys.modules of a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    return sorted(loaded & set(packages))


def test_cli_imports_no_heavy_library():
    """`robust-ebm --help` and argument errors answer before torch, MLflow, matplotlib... are imported."""
    assert _imported("import robust_ebm.cli; robust_ebm.cli.build_parser()",
                     ("torch", "mlflow", "matplotlib", "pyautoattack", "torchvision", "scipy", "sklearn")) == []


@pytest.mark.parametrize("module", ["robust_ebm.train", "robust_ebm.evaluate", "robust_ebm.generate",
                                    "robust_ebm.metrics", "robust_ebm.tracking"])
def test_stage_modules_import_only_what_every_job_uses(module):
    """A run stage imports torch, not torchvision / torch-fidelity (seconds each; only some jobs need them),
    nor matplotlib; MLflow is imported when a run is opened (tracking.open_run), not by the modules."""
    assert _imported(f"import {module}", ("torchvision", "torch_fidelity", "matplotlib", "mlflow", "sklearn")) == []


def test_inception_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from robust_ebm.metrics import inception

    assert inception.WEIGHTS_URL == URL_INCEPTION_V3


@pytest.mark.parametrize("channels", [1, 3])
def test_sample_grid_has_make_grids_layout(tmp_path, channels):
    """generate.save_grid draws what torchvision's make_grid(padding=2) draws: one row per class, its first
    images, black where a class has fewer."""
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    from robust_ebm.generate import save_grid

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(23, channels, 5, 4), dtype=np.uint8)
    labels = rng.permutation(np.array([0] * 15 + [1] * 6 + [2] * 2))  # class 2 has fewer than 6, class 3 none
    save_grid(tmp_path / "g.png", images, labels, num_classes=4, columns=6)
    tiles = torch.zeros((4 * 6, channels, 5, 4), dtype=torch.uint8)
    for c in range(4):
        picked = torch.from_numpy(images[labels == c][:6])
        tiles[c * 6 : c * 6 + len(picked)] = picked
    expected = make_grid(tiles.float() / 255, nrow=6, padding=2).mul(255).round().byte().permute(1, 2, 0).numpy()
    with Image.open(io.BytesIO((tmp_path / "g.png").read_bytes())) as png:
        assert np.array_equal(np.asarray(png), expected)
