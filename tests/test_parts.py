"""Part specs, gradient isolation, exact bookkeeping of the local objectives."""

from __future__ import annotations

import math

import pytest
import torch

from raylocal.errors import SpecError
from raylocal.model.flows import ActNorm, standard_normal_log_prob
from raylocal.model.glow import Glow
from raylocal.model.objectives import local_nll
from raylocal.model.parts import (
    PartSpec,
    automatic_spec,
    estimated_costs,
    measured_costs,
    parse_part_spec,
    resolve_part_spec,
)
from raylocal.training.trainer import initialize


def glow3(depth: int = 4, dtype=torch.float32) -> Glow:
    """L=3 blocks of `depth` steps on 2x8x8: 3*(1+3*depth) + 2 layers."""
    torch.manual_seed(0)
    return Glow((2, 8, 8), n_levels=3, depth=depth, hidden=8).to(dtype)


def test_layer_count_and_block_notation_round_trip():
    g = glow3()
    assert len(g) == 3 * (1 + 12) + 2 == 41
    spec = parse_part_spec("1|2,3", g)
    # block 1 = squeeze(0) + 12 step layers (1-12) + split(13)
    assert spec.bounds == ((0, 14), (14, 41))
    assert spec.canonical(g) == "1|2,3  (layers 0-13|14-40)"
    spec = parse_part_spec("1[:2]|1[2:],2,3", g)
    assert spec.bounds == ((0, 7), (7, 41))
    assert spec.canonical(g) == "1[:2]|1[2:],2,3  (layers 0-6|7-40)"
    # every notation of the same cut prints the same canonical form
    assert parse_part_spec("layers:0-6|7-40", g).canonical(g) == spec.canonical(g)
    assert parse_part_spec(" 1[0:2] | 1[2:4], 2, 3 ", g) == spec


def test_explicit_layers_inside_a_step_have_layer_form_only():
    g = glow3()
    spec = parse_part_spec("layers:0-4|5-40", g)
    assert spec.canonical(g) == "layers:0-4|5-40"


BAD = [
    ("1||2,3", "part 2 of '1||2,3' is empty"),
    ("1,2|2,3", "overlaps: layers 14-27 are in two places"),
    ("1|3", "leaves a gap: layers 14-27 are in no part"),
    ("1|2", "leaves a gap: layers 28-40 are in no part"),
    ("1|2,4", "block 4 is out of range (the model has blocks 1-3)"),
    ("1[:9]|1[9:],2,3", "1[:9] selects no valid steps (block 1 has steps 0-3)"),
    ("1[3:1]|2,3", "selects no valid steps"),
    ("layers:0-10|12-40", "leaves a gap: layers 11-11 are in no part"),
    ("layers:0-10|5-40", "overlaps: layers 5-10 are in two places"),
    ("layers:0-10|11-99", "layer 99 is out of range (the model has layers 0-40)"),
    ("layers:0-x", "'0-x' is not a layer index or range a-b"),
    ("one|two", "'one' is not a block"),
    ("", "part spec is empty"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[b[0] or "empty" for b in BAD])
def test_bad_specs_are_one_line_errors(text, message):
    with pytest.raises(SpecError) as err:
        parse_part_spec(text, glow3())
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_more_parts_than_layers_or_units():
    g = glow3(depth=1)
    with pytest.raises(SpecError, match="100 parts but the model has only 14 layers"):
        resolve_part_spec(g, 100, "across-blocks", None)
    with pytest.raises(SpecError, match="4 parts split by-block need at least 4 blocks, the model has 3"):
        resolve_part_spec(g, 4, "by-block", None)
    with pytest.raises(SpecError, match="--parts 3 but part spec '1|2,3' has 2 parts"):
        resolve_part_spec(g, 3, "across-blocks", "1|2,3")


def test_automatic_specs_balance_estimated_cost():
    g = glow3(depth=4)
    costs = estimated_costs(g)
    by_block = automatic_spec(g, 2, "by-block")
    assert all(g.info[a].kind == "squeeze" for a, _ in by_block.bounds)
    across = automatic_spec(g, 3, "across-blocks")
    assert len(across) == 3
    # brute force over every cut between flow steps: the DP found the best one
    starts = sorted({a for a, _ in parse_part_spec("1[:1]|1[1:],2,3", g).bounds} | _step_starts(g))
    best = min(
        max(sum(costs[a:b]) for a, b in zip([0, i, j], [i, j, len(g)])) for i in starts for j in starts if 0 < i < j
    )
    got = max(sum(costs[a:b]) for a, b in across.bounds)
    assert got == pytest.approx(best)
    # the split of block 1 falls inside a part, never on a cut
    for a, _ in across.bounds[1:]:
        assert g.info[a - 1].kind != "split" or g.info[a].kind == "squeeze"


def _step_starts(g: Glow) -> set[int]:
    return {(i.index - 1 if i.step == 0 else i.index) for i in g.info if i.kind == "actnorm"}


def test_measured_costs_are_positive_per_layer():
    g = glow3(depth=1)
    costs = measured_costs(g, torch.rand(8, 2, 8, 8) - 0.5, rounds=2)
    assert len(costs) == len(g) and all(c > 0 for c in costs)
    # the three convs of a coupling network cost more than a reshape
    by_kind = {kind: max(c for c, i in zip(costs, g.info) if i.kind == kind) for kind in ("coupling", "squeeze")}
    assert by_kind["coupling"] > by_kind["squeeze"]
    assert all(p.grad is None for p in g.parameters())


def _parts(g: Glow, spec: PartSpec):
    return [g.part(a, b) for a, b in spec.bounds]


def test_local_objectives_sum_to_end_to_end_log_prob_float64():
    g = glow3(depth=2, dtype=torch.float64)
    x = torch.rand(6, 2, 8, 8, dtype=torch.float64) - 0.5
    parts = _parts(g, parse_part_spec("1[:1]|1[1:],2|3", g))
    initialize(parts, x)
    with torch.no_grad():  # move away from the trivial init
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = g.data_dims
    total = torch.zeros(6, dtype=torch.float64)
    h = x
    for part in parts:
        nll, y = local_nll(part, h)
        # remove the surrogate N(0, I) term of every non-last part: what is left
        # is the part's own log-dets and split priors
        gauss = standard_normal_log_prob(y) if part.prior is None else 0.0
        total += -nll * d * math.log(2) - gauss
        h = y
    expected = g.log_prob(x) - d * math.log(g.n_bins)
    assert torch.isfinite(expected).all()
    assert torch.allclose(total, expected, atol=1e-9), (total - expected).abs().max()


def test_no_gradient_crosses_a_part_boundary():
    g = glow3(depth=2)
    parts = _parts(g, parse_part_spec("1|2|3", g))
    x = torch.rand(4, 2, 8, 8) - 0.5
    initialize(parts, x)
    h = x
    outputs = []
    for part in parts:
        h, _ = part(h)  # NOT detached here: local_nll must cut the graph itself
        outputs.append(h)
    nll, _ = local_nll(parts[1], outputs[0])
    nll.mean().backward()
    for k, part in enumerate(parts):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        if k == 1:
            assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
        else:
            assert all(gr is None for gr in grads), f"part {k + 1} got a gradient"


def test_next_part_actnorm_initialises_on_previous_part_output():
    g = glow3(depth=1)
    parts = _parts(g, parse_part_spec("1|2,3", g))
    x = 3 * torch.rand(64, 2, 8, 8) - 1.0
    initialize(parts, x)
    with torch.no_grad():
        y1, _ = parts[0](x)
        first = g.layers[parts[1].start]  # squeeze of block 2
        h, _ = first(y1)
        actnorm = g.layers[parts[1].start + 1]
        assert isinstance(actnorm, ActNorm)
        mean = h.mean(dim=(0, 2, 3))
        std = h.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(actnorm.bias.view(-1), -mean, atol=1e-5)
    assert torch.allclose(actnorm.logs.view(-1), torch.log(1 / (std + 1e-6)), atol=1e-4)
