"""Objectives in bits per dimension of the original image, for whole models and parts.

Images are uint8. They are reduced to ``n_bits``, scaled to [-0.5, 0.5) and
dequantised with uniform noise of one bin's width; the discrete log-likelihood
is then log p(x) - D log(n_bins) (D = C*H*W of the original image), and BPD is
its negation over D log 2. The -D log(n_bins) constant belongs to the part that
sees the data (the first part), so the parts' local terms add up to the model's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from raylocal.model.flows import standard_normal_log_prob
from raylocal.model.glow import Glow, Part

LN2 = math.log(2.0)


def preprocess(x: Tensor, n_bits: int, generator: torch.Generator | None = None) -> Tensor:
    """uint8 images -> float in [-0.5, 0.5), dequantised with uniform noise.

    With ``generator=None`` the noise comes from the global RNG; pass a generator
    to make it reproducible. The noise is drawn on the CPU so that runs on
    different devices see the same numbers.
    """
    n_bins = 2**n_bits
    x = torch.floor(x.float() / 2 ** (8 - n_bits))
    noise = to_device(torch.rand(x.shape, generator=generator), x.device)
    return x / n_bins - 0.5 + noise / n_bins


def wait_for(device: torch.device) -> None:
    """Wait until ``device`` has finished its queued work (a GPU runs ahead of the
    host: a timer must not stop at a kernel's launch); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def queued_work(x: Tensor) -> torch.cuda.Event | None:
    """An event recorded now on the stream of ``x``'s GPU: its ``synchronize()``
    waits for the work queued so far (say, the kernels computing ``x``), without
    blocking the host now. None on a CPU, where that work is done already."""
    if not x.is_cuda:
        return None
    event = torch.cuda.Event(blocking=True)  # a thread that waits for it sleeps, not spins
    event.record(torch.cuda.current_stream(x.device))
    return event


def to_device(x: Tensor, device: torch.device | str) -> Tensor:
    """``x`` on ``device``; from the CPU to a GPU through pinned memory without
    blocking, so that the CPU goes on preparing the step while it copies."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def postprocess(x: Tensor, n_bits: int) -> Tensor:
    """Model space -> images in [0, 1] (for sample grids)."""
    n_bins = 2**n_bits
    return (torch.floor((x + 0.5) * n_bins).clamp(0, n_bins - 1) / (n_bins - 1)).clamp(0, 1)


def sample_images(glow: Glow, n: int, temperature: float) -> Tensor:
    """n samples at ``temperature`` as images in [0, 1], on the CPU (the model's
    mode is left as it was)."""
    was_training = glow.training
    glow.eval()
    images = postprocess(glow.sample(n, temperature), glow.n_bits).float().cpu()
    glow.train(was_training)
    return torch.nan_to_num(images)


def local_nll(part: Part, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample local negative log-likelihood of a part, in bits/dim of the image.

    -[log N(y; 0, I) (the learned top prior for the last part) + the part's
    log-dets + its split priors (+ the dequantisation constant for the first
    part)] / (D ln 2). The input is detached: no gradient crosses a part
    boundary. Returns (nll[B], y) where y is the part's output (not detached).
    """
    y, logdet = part(x.detach())
    logp = part.prior.log_prob(y) if part.prior is not None else standard_normal_log_prob(y)
    if part.is_first:
        logdet = logdet - part.data_dims * math.log(part.n_bins)
    return -(logdet + logp) / (part.data_dims * LN2), y


def nll_bits(glow: Glow, x: Tensor) -> Tensor:
    """Per-sample negative log-likelihood of the whole model in bits/dim (x preprocessed)."""
    return local_nll(glow.whole(), x)[0]
