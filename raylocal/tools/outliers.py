"""What a run's test BPD is made of, image by image.

    python -m raylocal.tools.outliers RUN_DIR [--held-out 2000] [--worst 5]

The test BPD is a mean over images, and a flow can give one image a BPD
thousands of times the others', which alone moves the mean by whole bits. This
reads ``RUN_DIR/config.json`` and ``RUN_DIR/checkpoint.pt`` and prints, for the
run's test images (and with ``--held-out N`` for the last N training images,
which a run with ``--validation N`` evaluates on instead), the mean BPD, the
median image's, the worst images with their indices, and the mean without them.

    python -m raylocal.tools.outliers RUN_DIR --explain 1707 --explain held-out:12

says where one image's BPD comes from: its terms (the dequantisation constant,
each block's log-dets by kind, each split prior and the top prior, in bits/dim
of the image, summing to its BPD), and the one latent element that costs it
most: which term, the image patch that element sits over (the couplings' 3x3
convolutions also see the patch's neighbours), its value against the prior's
mean and std, and how many training images have any ink in that patch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from raylocal.core.config import RaylocalConfig, data_source
from raylocal.errors import ConfigError, RaylocalError
from raylocal.model.flows import Coupling, Split, gaussian_log_density
from raylocal.model.glow import Glow
from raylocal.model.objectives import LN2
from raylocal.run.launch import finished_run
from raylocal.training.trainer import eval_batches, image_bpds, mean_bpd


def summary(bpds: torch.Tensor, mean: float, worst: int) -> dict[str, object]:
    """The mean (as the run evaluates it), the median, the ``worst`` images and the mean without them."""
    top = bpds.topk(min(worst, len(bpds)))
    rest = len(bpds) - len(top.values)
    return {
        "images": len(bpds),
        "mean": mean,
        "median": float(bpds.median()),
        "worst": [(int(i), float(v)) for i, v in zip(top.indices, top.values)],
        "mean_without_worst": float(bpds.sum() - top.values.sum()) / rest if rest else float("nan"),
    }


def image_sets(run_dir: Path, held_out: int | None) -> tuple[RaylocalConfig, Glow, Tensor, dict[str, Tensor]]:
    """A finished run's config, model, training images, and the images it is
    scored on: its test images, and its last ``held_out`` training images."""
    config, data, glow = finished_run(run_dir)
    sets = {"test": data.test}
    if held_out:
        sets["held-out"] = data_source(config.replace(validation=held_out)).load().test
    return config, glow, data.train, sets


def outliers(run_dir: Path, held_out: int | None, worst: int, cap: float | None = None) -> dict[str, dict[str, object]]:
    """``summary`` of the run's test images, and of its last ``held_out`` training
    images; ``capped_mean`` with each image capped at ``cap`` (default: the run's ``--eval-cap``)."""
    config, glow, _, sets = image_sets(run_dir, held_out)
    batch, cap = config.schedule.eval_batch_size, cap if cap is not None else config.schedule.eval_cap
    out = {}
    for name, images in sets.items():
        bpds = image_bpds(glow, images, batch, torch.device("cpu"))
        out[name] = summary(bpds, mean_bpd(bpds, batch), worst)
        if cap is not None:  # as the run's own evaluation scores with --eval-cap
            out[name]["capped_mean"] = mean_bpd(bpds, batch, cap)
    return out


@dataclass(frozen=True)
class CostliestElement:
    """The latent element that costs an image most: in ``term``, channel
    ``channel`` at ``(row, col)`` of that term's grid, over image rows
    ``rows`` and columns ``cols`` (half-open); ``bits``: its share of the
    image's BPD. A prior's element also has its value and the prior's mean
    and std; a coupling's, only its log-scale (``value``)."""

    term: str
    channel: int
    row: int
    col: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    bits: float
    value: float
    mean: float | None = None
    std: float | None = None


def _costliest(
    term: str, log_density: Tensor, squeezes: int, to_bits: float, detail: dict[str, Tensor]
) -> CostliestElement:
    """The element of ``log_density`` ([C, H, W], one image) that costs most, and where it sits."""
    flat = int(log_density.argmin())
    c, rest = divmod(flat, log_density.shape[1] * log_density.shape[2])
    i, j = divmod(rest, log_density.shape[2])
    side = 2**squeezes  # each squeeze halves the grid: a latent cell covers side x side pixels
    pick = {k: float(v[0, c, i, j]) for k, v in detail.items()}
    return CostliestElement(
        term, c, i, j, (i * side, (i + 1) * side), (j * side, (j + 1) * side), float(log_density[c, i, j]) * to_bits,
        pick["value"], pick.get("mean"), pick.get("std"),
    )  # fmt: skip


@torch.no_grad()
def explain(glow: Glow, x: Tensor) -> tuple[dict[str, float], CostliestElement]:
    """One preprocessed image ``x`` ([1, C, H, W]): its BPD's terms, in layer
    order (they sum to its BPD), and its costliest latent element."""
    to_bits = -1.0 / (glow.data_dims * LN2)
    terms: dict[str, float] = {"dequantisation": float(glow.n_bits)}  # -log(1/2^n_bits) per dim, in bits
    costly: list[CostliestElement] = []
    for info, layer in zip(glow.info, glow.layers):
        name = f"block {info.block + 1} {'split prior' if info.kind == 'split' else info.kind}"
        if isinstance(layer, Split):
            z1, z2 = x.chunk(2, dim=1)
            mean, logs = layer.mean_logs(z1)
            detail = {"value": z2, "mean": mean, "std": logs.exp()}
            costly.append(_costliest(name, gaussian_log_density(z2, mean, logs)[0], info.block + 1, to_bits, detail))
        elif isinstance(layer, Coupling) and layer.affine:
            log_scale = layer.shift_log_scale(x.chunk(2, dim=1)[0])[1]
            costly.append(_costliest(name, log_scale[0], info.block + 1, to_bits, {"value": log_scale}))
        x, log_det = layer(x)
        terms[name] = terms.get(name, 0.0) + float(log_det[0]) * to_bits
    prior = glow.prior
    top = gaussian_log_density(x, prior.mean, prior.logs)
    terms["top prior"] = float(top.sum()) * to_bits
    detail = {"value": x, "mean": prior.mean.expand_as(x), "std": prior.logs.exp().expand_as(x)}
    costly.append(_costliest("top prior", top[0], glow.n_levels, to_bits, detail))
    return terms, max(costly, key=lambda e: e.bits)


def evaluated_image(images: Tensor, index: int, batch_size: int, n_bits: int) -> Tensor:
    """Image ``index`` as the evaluation scores it: with its batch's dequantisation noise."""
    if not 0 <= index < len(images):
        raise ConfigError(f"--explain: image {index} does not exist (there are {len(images)})")
    for b, x in enumerate(eval_batches(images, batch_size, n_bits, torch.device("cpu"))):  # drawn lazily
        if b == index // batch_size:
            return x[index % batch_size :][:1]
    raise AssertionError("unreachable")


def ink_share(train: Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> float:
    """The share of training images with any non-zero pixel in the patch."""
    patch = train[:, :, rows[0] : rows[1], cols[0] : cols[1]]
    return float((patch.flatten(1) > 0).any(1).float().mean())


def parse_image(text: str) -> tuple[str, int]:
    """``1707`` (a test image) or ``held-out:12``."""
    name, _, index = text.rpartition(":")
    if name not in ("", "test", "held-out") or not index.isdigit():
        raise ConfigError(f"--explain {text!r}: expected an image index, or test:INDEX or held-out:INDEX")
    return name or "test", int(index)


def explained(run_dir: Path, requests: list[tuple[str, int]], held_out: int | None) -> list[str]:
    """What ``--explain`` prints for each requested image: two lines each."""
    config, glow, train, sets = image_sets(run_dir, held_out)
    batch_size, lines = config.schedule.eval_batch_size, []
    for name, index in requests:
        if name not in sets:
            raise ConfigError(f"--explain {name}:{index}: give --held-out N to name the held-out images")
        images = sets[name]
        terms, e = explain(glow, evaluated_image(images, index, batch_size, glow.n_bits))
        shown = ", ".join(f"{k} {v:.2f}" for k, v in terms.items())
        lines.append(f"{name} #{index}: {sum(terms.values()):.2f} bits/dim = {shown}")
        prior = f" against the prior's mean {e.mean:.3g}, std {e.std:.3g}" if e.mean is not None else " (log-scale)"
        ink = int((images[index, :, e.rows[0] : e.rows[1], e.cols[0] : e.cols[1]] > 0).sum())
        lines.append(
            f"  costliest element: {e.term}, channel {e.channel} at ({e.row}, {e.col}), over image rows "
            f"{e.rows[0]}-{e.rows[1] - 1}, columns {e.cols[0]}-{e.cols[1] - 1}: {e.bits:.2f} bits/dim; value "
            f"{e.value:.3g}{prior}; the image has {ink} inked pixel(s) there, "
            f"{ink_share(train, e.rows, e.cols):.2%} of the training images any"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--held-out", type=int, default=None, help="also the last N training images")
    p.add_argument("--worst", type=int, default=5, help="how many of the worst images to list")
    p.add_argument("--cap", type=float, default=None, help="also the mean with each image capped at CAP bits/dim")
    p.add_argument(
        "--explain", action="append", default=[], metavar="IMAGE",
        help="where one image's BPD comes from: INDEX (a test image) or held-out:INDEX; may repeat",
    )  # fmt: skip
    args = p.parse_args(argv)
    try:
        if args.cap is not None and args.cap <= 0:
            raise ConfigError(f"--cap {args.cap:g}: a cap is a BPD above 0")
        if args.explain and args.cap is not None:
            raise ConfigError(f"--cap {args.cap:g}: --explain shows an image's own terms, uncapped; drop one of them")
        if args.explain:
            lines = explained(args.run_dir, [parse_image(t) for t in args.explain], args.held_out)
        else:
            lines = summary_lines(outliers(args.run_dir, args.held_out, args.worst, args.cap))
    except RaylocalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def summary_lines(found: dict[str, dict[str, object]]) -> list[str]:
    lines = []
    for name, s in found.items():
        worst = ", ".join(f"#{i} {v:.2f}" for i, v in s["worst"])
        lines.append(
            f"{name} ({s['images']} images): BPD {s['mean']:.4f}; median image {s['median']:.4f}; "
            f"worst {worst}; mean without them {s['mean_without_worst']:.4f}"
            + (f"; each image capped {s['capped_mean']:.4f}" if "capped_mean" in s else "")
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
