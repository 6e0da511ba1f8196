"""A small grid for reproducible comparisons: a few LR profiles (flat,
decreasing, increasing along the parts), each defined for a part count."""

from ray import tune

from raylocal.errors import ConfigError

GRID = True  # every point once: --trials does not apply
PROFILES = {
    2: [[1e-3, 1e-3], [1e-3, 5e-4], [5e-4, 1e-3], [2e-3, 5e-4]],
    3: [[1e-3, 1e-3, 1e-3], [1e-3, 5e-4, 2.5e-4], [2.5e-4, 5e-4, 1e-3], [2e-3, 1e-3, 5e-4]],
}


def space(parts: int) -> dict:
    if parts not in PROFILES:
        raise ConfigError(f"tune space 'grid' defines {sorted(PROFILES)} parts, not {parts}")
    return {"lrs": tune.grid_search(PROFILES[parts])}


def lrs(params: dict, parts: int) -> list[float]:
    return [float(v) for v in params["lrs"]]
