"""What a run's test BPD is made of, image by image.

    python -m raylocal.tools.outliers RUN_DIR [--held-out 2000] [--worst 5]

The test BPD is a mean over images, and a flow can give one image a BPD
thousands of times the others', which alone moves the mean by whole bits. This
reads ``RUN_DIR/config.json`` and ``RUN_DIR/checkpoint.pt`` and prints, for the
run's test images (and with ``--held-out N`` for the last N training images,
which a run with ``--validation N`` evaluates on instead), the mean BPD, the
median image's, the worst images with their indices, and the mean without them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from raylocal.core.config import data_source
from raylocal.errors import RaylocalError
from raylocal.run.launch import finished_run
from raylocal.training.trainer import image_bpds, mean_bpd


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


def outliers(run_dir: Path, held_out: int | None, worst: int) -> dict[str, dict[str, object]]:
    """``summary`` of the run's test images, and of its last ``held_out`` training images."""
    config, data, glow = finished_run(run_dir)
    sets = {"test": data.test}
    if held_out:
        sets["held-out"] = data_source(config.model_copy(update={"validation": held_out})).load().test
    out = {}
    for name, images in sets.items():
        bpds = image_bpds(glow, images, config.eval_batch_size, torch.device("cpu"))
        out[name] = summary(bpds, mean_bpd(bpds, config.eval_batch_size), worst)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--held-out", type=int, default=None, help="also the last N training images")
    p.add_argument("--worst", type=int, default=5, help="how many of the worst images to list")
    args = p.parse_args(argv)
    try:
        found = outliers(args.run_dir, args.held_out, args.worst)
    except RaylocalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, s in found.items():
        worst = ", ".join(f"#{i} {v:.2f}" for i, v in s["worst"])
        print(
            f"{name} ({s['images']} images): BPD {s['mean']:.4f}; median image {s['median']:.4f}; "
            f"worst {worst}; mean without them {s['mean_without_worst']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
