"""The baseline to beat: one learning rate shared by every part, on a grid."""

from ray import tune

GRID = True
VALUES = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]


def space(parts: int) -> dict:
    return {"lr": tune.grid_search(VALUES)}


def lrs(params: dict, parts: int) -> list[float]:
    return [float(params["lr"])] * parts
