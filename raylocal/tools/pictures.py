#!/usr/bin/env python
"""Pictures of a trained run, for the README: a sample grid and a reconstruction grid.

    python scripts/pictures.py RUN_DIR --out docs/pictures/mnist --temperature 0.7

Reads ``RUN_DIR/config.json`` and ``RUN_DIR/checkpoint.pt``; writes
``<out>-samples.png`` (an n x n grid sampled at --temperature, seeded) and
``<out>-reconstructions.png`` (test images on odd rows, the model's
reconstructions below them: a flow inverts exactly, so they match to float
precision, and the picture shows that it does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from raylocal.errors import RaylocalError
from raylocal.model.objectives import postprocess, preprocess
from raylocal.run.launch import finished_run


def pictures(run_dir: Path, out: Path, n: int, temperature: float, seed: int = 0) -> tuple[Path, Path]:
    """Write the two grids of the run in ``run_dir``; returns their paths."""
    _, data, glow = finished_run(run_dir)
    torch.manual_seed(seed)
    samples = postprocess(glow.sample(n * n, temperature), glow.n_bits).float()
    x = data.test[: n * max(n // 2, 1)]
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        back = postprocess(glow.reconstruct(preprocess(x, glow.n_bits, noise)), glow.n_bits)
    originals = postprocess(preprocess(x, glow.n_bits, torch.Generator().manual_seed(seed)), glow.n_bits)
    # a row of test images, then a row of their reconstructions, and so on
    rows = [r for i in range(0, len(x), n) for r in (originals[i : i + n], back[i : i + n])]
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = (out.with_name(out.name + "-samples.png"), out.with_name(out.name + "-reconstructions.png"))
    save_image(make_grid(torch.nan_to_num(samples), nrow=n, padding=1), paths[0])
    save_image(make_grid(torch.cat(rows), nrow=n, padding=1), paths[1])
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output prefix")
    p.add_argument("--n", type=int, default=8, help="grid side")
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args(argv)
    try:
        for path in pictures(args.run_dir, args.out, args.n, args.temperature):
            print(path)
    except (RaylocalError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
