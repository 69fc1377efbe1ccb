"""The energy landscape around a test image (JEAT Fig.2, papers.md §3.7) and its statistics.

E(x0 + a d1 + b d2, y0) and E(x0 + a d1 + b d2) on a grid of the plane spanned by two random unit
directions d1, d2 through a test image x0 (a, b in [-radius, radius]). The figures stage draws the
contours; the metrics stage writes `landscape_statistics` for the claims stage:

    mean_abs_delta   mean over the plane of |E(p) - E(x0)|            flatness (lower = flatter)
    mean_energy      mean over the plane of E(p)                       level (lower = lower)
    centre_energy    E(x0)
    centre_rank      fraction of plane points with E(p) < E(x0)        0: x0 is the plane's minimum

The plane of test image i is `plane_directions(shape, i)`, the same for every model, stage and run.
"""

from __future__ import annotations

import numpy as np
import torch

from .energy import joint_energy, marginal_energy
from .inference import batched_outputs

KINDS = ("E_xy", "E_x")
STATISTICS = ("mean_abs_delta", "mean_energy", "centre_energy", "centre_rank")


def random_directions(shape, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian directions of `shape`, each scaled to unit L2 norm."""
    d1, d2 = torch.randn(2, *shape, generator=generator)
    return d1 / d1.norm(), d2 / d2.norm()


def grid_coordinates(radius: float, grid: int) -> torch.Tensor:
    """`grid` points on [-radius, radius]; for odd `grid` the middle one is exactly 0 (the image itself)."""
    half = (grid - 1) / 2
    return radius * (torch.arange(grid, dtype=torch.float64) - half) / half


@torch.no_grad()
def energy_landscape(model, x0, y0: int, d1, d2, radius: float, grid: int, *, batch_size: int = 256) -> dict:
    """E(x0 + a d1 + b d2, y0) and E(x0 + a d1 + b d2) on a grid x grid plane (a rows -> b columns).

    Points are not clipped to [0,1]: the plot shows the energy function itself around x0.
    Returns {"coords": (grid,), "E_xy": (grid, grid), "E_x": (grid, grid)} as numpy arrays.
    """
    device = next(model.parameters()).device
    coords = grid_coordinates(radius, grid)
    a, b = torch.meshgrid(coords, coords, indexing="ij")
    offsets = a.reshape(-1, 1) * d1.reshape(1, -1).double() + b.reshape(-1, 1) * d2.reshape(1, -1).double()
    points = (x0.reshape(1, -1).double() + offsets).float().view(-1, *x0.shape)

    def step(chunk):
        logits = model(chunk.to(device))
        return joint_energy(logits, torch.full((len(chunk),), int(y0), device=device)), marginal_energy(logits)

    e_xy, e_x = batched_outputs(model, step, points, batch_size=batch_size, desc=None)
    return {"coords": coords.numpy(), "E_xy": e_xy.view(grid, grid).numpy(), "E_x": e_x.view(grid, grid).numpy()}



def plane_directions(shape, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plane of test image `index`: `random_directions` seeded by the index."""
    return random_directions(shape, torch.Generator().manual_seed(int(index)))


def plane_statistics(values: np.ndarray) -> dict[str, float]:
    """STATISTICS of one grid x grid energy array whose centre (odd grid) is the test image."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if values.ndim != 2 or values.shape[1] != n or n % 2 == 0:
        raise ValueError(f"landscape statistics need an odd square grid with the image at the centre, got shape {values.shape}")
    centre = values[n // 2, n // 2]
    return {"mean_abs_delta": float(np.abs(values - centre).mean()), "mean_energy": float(values.mean()),
            "centre_energy": float(centre), "centre_rank": float((values < centre).mean())}


def landscape_statistics(model, images01: torch.Tensor, labels: torch.Tensor, *, radius: float, grid: int,
                         batch_size: int = 256) -> dict:
    """Per-image STATISTICS of E(x,y) and E(x) around each image (image i on plane i), with mean, std and n.

    Returns {"E_xy": {stat: {"mean", "std", "n", "values"}}, "E_x": {...}, "radius", "grid", "n_images"}.
    """
    if grid % 2 == 0:
        raise ValueError(f"metrics.landscape.grid must be odd (the centre is the test image), got {grid}")
    per_image = {kind: {stat: [] for stat in STATISTICS} for kind in KINDS}
    for i, (x0, y0) in enumerate(zip(images01, labels)):
        d1, d2 = plane_directions(x0.shape, i)
        land = energy_landscape(model, x0, int(y0), d1, d2, radius, grid, batch_size=batch_size)
        for kind in KINDS:
            for stat, value in plane_statistics(land[kind]).items():
                per_image[kind][stat].append(value)
    out: dict = {"radius": float(radius), "grid": int(grid), "n_images": len(images01)}
    for kind in KINDS:
        out[kind] = {}
        for stat, values in per_image[kind].items():
            v = np.asarray(values)
            out[kind][stat] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                               "n": len(v), "values": [float(x) for x in v]}
    return out
