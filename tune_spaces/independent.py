"""An independent log-uniform learning rate per part (the widest search)."""

from ray import tune

LOW, HIGH = 3e-4, 2e-2


def space(parts: int) -> dict:
    return {f"lr_{k + 1}": tune.loguniform(LOW, HIGH) for k in range(parts)}


def lrs(params: dict, parts: int) -> list[float]:
    return [float(params[f"lr_{k + 1}"]) for k in range(parts)]
