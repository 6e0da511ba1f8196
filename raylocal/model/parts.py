"""PartSpec: how the flat Glow is cut into contiguous parts.

Three ways to say it, all printed back in one canonical form:

- automatic: ``--parts N --split by-block`` (boundaries between blocks) or
  ``--split across-blocks`` (boundaries between flow steps anywhere, so a
  block's split layer falls inside a part); both choose the boundaries that
  minimise the most expensive part's estimated (or measured) compute;
- block notation of the reference work, blocks 1-based, steps as Python
  slices: ``1|2,3`` (block 1, then blocks 2 and 3), ``1[:16]|1[16:],2,3``
  (the first 16 steps of block 1, then the rest). A block's squeeze belongs to
  its first step and its split to its last;
- explicit layer indices, inclusive ranges: ``layers:0-12|13-38``.

A split layer holds its own prior, so no boundary can separate the two.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass

import torch

from raylocal.errors import SpecError
from raylocal.model.glow import Glow, GlowLayout
from raylocal.model.objectives import wait_for

# what a spec is read against: a model, or its layout alone (no tensors)
Layout = Glow | GlowLayout


@dataclass(frozen=True)
class PartSpec:
    """Half-open layer ranges [start, stop), contiguous, covering the whole model."""

    bounds: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.bounds)

    def canonical(self, glow: Layout) -> str:
        """``<block notation>  (layers a-b|c-d)``; the block notation is omitted when a
        boundary falls inside a flow step (only possible with explicit layers)."""
        layers = "|".join(f"{a}-{b - 1}" for a, b in self.bounds)
        blocks = _block_notation(self, glow)
        return f"{blocks}  (layers {layers})" if blocks else f"layers:{layers}"


def _step_ranges(glow: Layout) -> list[tuple[int, int, int, int]]:
    """(block, step, first layer, last layer + 1) for every flow step; the squeeze
    joins the block's first step and the split its last."""
    out = []
    for info in glow.info:
        if info.kind == "actnorm":
            start = info.index - 1 if info.step == 0 else info.index
            stop = info.index + 3
            if info.step == glow.depth - 1 and stop < len(glow) and glow.info[stop].kind == "split":
                stop += 1
            out.append((info.block, info.step, start, stop))
    return out


def _block_notation(spec: PartSpec, glow: Layout) -> str | None:
    steps = _step_ranges(glow)
    starts = {s[2] for s in steps}
    if any(a not in starts for a, _ in spec.bounds):
        return None
    parts = []
    for a, b in spec.bounds:
        inside = [s for s in steps if a <= s[2] and s[3] <= b]
        items = []
        for block in sorted({s[0] for s in inside}):
            ks = [s[1] for s in inside if s[0] == block]
            lo, hi = min(ks), max(ks) + 1
            if lo == 0 and hi == glow.depth:
                items.append(str(block + 1))
            else:
                items.append(f"{block + 1}[{lo if lo else ''}:{hi if hi < glow.depth else ''}]")
        parts.append(",".join(items))
    return "|".join(parts)


def _check_cover(ranges: list[list[tuple[int, int]]], glow: Layout, what: str) -> PartSpec:
    """Each part is a list of layer ranges; together they must tile 0..n-1 in order."""
    n = len(glow)
    for k, rs in enumerate(ranges):
        if not rs:
            raise SpecError(f"part {k + 1} of {what!r} is empty")
    pos = 0
    bounds = []
    for k, rs in enumerate(ranges):
        start = rs[0][0]
        for a, b in rs:
            if b <= a:
                raise SpecError(f"part {k + 1} of {what!r} has an empty range of layers {a}-{b - 1}")
            if a > pos:
                raise SpecError(f"{what!r} leaves a gap: layers {pos}-{a - 1} are in no part")
            if a < pos:
                raise SpecError(f"{what!r} overlaps: layers {a}-{min(b, pos) - 1} are in two places")
            pos = b
        bounds.append((start, pos))
    if pos != n:
        raise SpecError(f"{what!r} leaves a gap: layers {pos}-{n - 1} are in no part")
    return PartSpec(tuple(bounds))


def _parse_layers(text: str, glow: Layout) -> PartSpec:
    n = len(glow)
    body = text[len("layers:") :]
    ranges = []
    for k, chunk in enumerate(body.split("|")):
        rs = []
        for item in filter(None, (s.strip() for s in chunk.split(","))):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
            if not m:
                raise SpecError(f"part {k + 1} of {text!r}: {item!r} is not a layer index or range a-b")
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) else a
            if b >= n:
                raise SpecError(f"{text!r}: layer {b} is out of range (the model has layers 0-{n - 1})")
            rs.append((a, b + 1))
        ranges.append(rs)
    return _check_cover(ranges, glow, text)


def _parse_blocks(text: str, glow: Layout) -> PartSpec:
    steps = _step_ranges(glow)
    ranges = []
    for k, chunk in enumerate(text.split("|")):
        rs = []
        for item in filter(None, (s.strip() for s in chunk.split(","))):
            m = re.fullmatch(r"(\d+)(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\])?", item)
            if not m:
                raise SpecError(
                    f"part {k + 1} of {text!r}: {item!r} is not a block (e.g. 2) or block slice (e.g. 1[:16])"
                )
            block = int(m.group(1))
            if not 1 <= block <= glow.n_levels:
                raise SpecError(f"{text!r}: block {block} is out of range (the model has blocks 1-{glow.n_levels})")
            lo, hi = 0, glow.depth
            if m.group(2) is not None:
                lo = int(m.group(2)) if m.group(2) else 0
                hi = int(m.group(3)) if m.group(3) else glow.depth
                if not (0 <= lo < hi <= glow.depth):
                    raise SpecError(
                        f"{text!r}: {item} selects no valid steps (block {block} has steps 0-{glow.depth - 1})"
                    )
            sel = [s for s in steps if s[0] == block - 1 and lo <= s[1] < hi]
            rs.append((sel[0][2], sel[-1][3]))
        ranges.append(rs)
    return _check_cover(ranges, glow, text)


def parse_part_spec(text: str, glow: Layout) -> PartSpec:
    text = text.strip()
    if not text:
        raise SpecError("part spec is empty")
    spec = _parse_layers(text, glow) if text.startswith("layers:") else _parse_blocks(text, glow)
    return spec


def estimated_costs(glow: Layout) -> list[float]:
    return [info.cost for info in glow.info]


def measured_costs(glow: Glow, x: torch.Tensor, rounds: int = 5) -> list[float]:
    """Seconds of forward + backward per layer on batch x (the layer's own input).

    Every round times each layer once, and a layer's cost is its median over the
    rounds: a burst of load on a shared machine then lands on every layer
    alike instead of inflating a few neighbouring ones (which would move a
    part boundary).
    """
    with torch.no_grad():
        inputs = []
        for layer in glow.layers:
            inputs.append(x)
            x, _ = layer(x)
    inputs = [inp.clone().requires_grad_(True) for inp in inputs]
    times: list[list[float]] = [[] for _ in inputs]
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for layer, inp, seen in zip(glow.layers, inputs, times):
            wait_for(x.device)  # a GPU runs ahead of the clock: time the layer's kernels, not their launch
            t = time.perf_counter()
            y, ld = layer(inp)
            (y.sum() + ld.sum()).backward()
            wait_for(x.device)
            seen.append(time.perf_counter() - t)
    glow.zero_grad(set_to_none=True)
    return [statistics.median(seen[1:]) for seen in times]


def _balanced(candidates: list[int], costs: list[float], n_parts: int, n_layers: int) -> list[int]:
    """Choose n_parts-1 boundaries among candidate layer indices minimising the
    most expensive part (dynamic programming over candidate units)."""
    units = candidates + [n_layers]
    unit_cost = [sum(costs[units[i] : units[i + 1]]) for i in range(len(units) - 1)]
    m = len(unit_cost)
    prefix = [0.0]
    for c in unit_cost:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: minimal max-cost of splitting units[:j] into k parts
    best = [[inf] * (m + 1) for _ in range(n_parts + 1)]
    choice = [[0] * (m + 1) for _ in range(n_parts + 1)]
    best[0][0] = 0.0
    for k in range(1, n_parts + 1):
        for j in range(k, m + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j]:
                    best[k][j], choice[k][j] = v, i
    cuts, j = [], m
    for k in range(n_parts, 0, -1):
        j = choice[k][j]
        cuts.append(j)
    return sorted(units[i] for i in cuts if i > 0)


def automatic_spec(glow: Layout, n_parts: int, split: str, costs: list[float] | None = None) -> PartSpec:
    """Balanced boundaries between blocks (by-block) or between flow steps (across-blocks)."""
    costs = costs or estimated_costs(glow)
    if split == "by-block":
        candidates = [i.index for i in glow.info if i.kind == "squeeze"]
        unit = "blocks"
    else:
        candidates = sorted({s[2] for s in _step_ranges(glow)})
        unit = "flow steps"
    if n_parts > len(candidates):
        raise SpecError(
            f"{n_parts} parts split {split} need at least {n_parts} {unit}, the model has "
            f"{len(candidates)} (n_levels={glow.n_levels}, depth={glow.depth})"
        )
    cuts = [0] + _balanced(candidates, costs, n_parts, len(glow)) + [len(glow)]
    return PartSpec(tuple(zip(cuts[:-1], cuts[1:])))


def resolve_part_spec(
    glow: Layout, n_parts: int, split: str, text: str | None, costs: list[float] | None = None
) -> PartSpec:
    """The spec a run uses: the explicit one when given (it must agree with
    ``n_parts`` unless that was left at 1), else the automatic one (balanced on
    ``costs``, default: estimated)."""
    if n_parts > len(glow):
        raise SpecError(f"{n_parts} parts but the model has only {len(glow)} layers")
    if text:
        spec = parse_part_spec(text, glow)
        if n_parts not in (1, len(spec)):
            raise SpecError(f"--parts {n_parts} but part spec {text!r} has {len(spec)} parts")
        return spec
    return automatic_spec(glow, n_parts, split, costs)


def boundary_steps(glow: Layout, bounds: tuple[tuple[int, int], ...]) -> list[int]:
    """Layer indices of the flow steps next to each part boundary: the last step
    before it and the first after it (a boundary at a squeeze or split takes the
    nearest step on each side). What ``--finetune-scope boundary`` trains."""
    steps: set[tuple[int, int]] = set()
    for start, _ in bounds[1:]:
        before = next((i for i in glow.info[:start][::-1] if i.step is not None), None)
        after = next((i for i in glow.info[start:] if i.step is not None), None)
        steps.update((i.block, i.step) for i in (before, after) if i is not None)
    return [i.index for i in glow.info if i.step is not None and (i.block, i.step) in steps]
