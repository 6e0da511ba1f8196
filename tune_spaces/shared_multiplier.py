"""One shared learning rate, scaled per part by a multiplier: searches the
overall scale and how much later parts should slow down, with fewer free
dimensions than independent LRs. Part 1's multiplier is fixed at 1."""

from ray import tune


def space(parts: int) -> dict:
    params = {"lr": tune.loguniform(1e-3, 1e-2)}
    params.update({f"mult_{k + 1}": tune.uniform(0.25, 2.0) for k in range(1, parts)})
    return params


def lrs(params: dict, parts: int) -> list[float]:
    base = float(params["lr"])
    return [base] + [base * float(params[f"mult_{k + 1}"]) for k in range(1, parts)]
