"""Glow's invertible layers and the Glow model as a flat sequence of them.

Direction convention: ``forward`` maps data x to latent z, ``inverse`` maps back.
Every layer has the same small interface (as in nflows/normflows):

    forward(x) -> (y, logdet)   logdet[b] = log|det dy/dx| for sample b
    inverse(y) -> (x, logdet)   logdet[b] = log|det dx/dy| = -forward logdet

A ``Split`` is also a layer of this sequence: it factors out half of the channels
and its "logdet" is the log-likelihood of that half under its learned conditional
prior, i.e. its contribution to ``log p(x)``. With that convention the
log-likelihood of any contiguous slice of layers is simply the sum of the
returned terms, which is what makes training in parts exact bookkeeping.

The math follows openai/glow (and y0ast/Glow-PyTorch): ActNorm with
data-dependent init, LU-decomposed 1x1 convolutions, affine coupling with
``sigmoid(h + 2)`` scales read interleaved from a zero-initialised last conv,
split priors and a learned top prior. Nothing here knows about parts or Ray.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density(x: Tensor, mean: Tensor, logs: Tensor) -> Tensor:
    """Each element's log-density under a diagonal Gaussian N(mean, exp(logs)^2)."""
    return -0.5 * (LOG_2PI + 2.0 * logs + (x - mean) ** 2 * torch.exp(-2.0 * logs))


def gaussian_log_prob(x: Tensor, mean: Tensor, logs: Tensor) -> Tensor:
    """Per-sample log-density of x under a diagonal Gaussian N(mean, exp(logs)^2)."""
    return gaussian_log_density(x, mean, logs).flatten(1).sum(1)


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """Per-sample log-density of x under N(0, I)."""
    return (-0.5 * (LOG_2PI + x * x)).flatten(1).sum(1)


def _per_sample(value: Tensor, x: Tensor) -> Tensor:
    """A log-det that is the same for every sample, as a [B] tensor."""
    return value.expand(x.shape[0])


class FlowLayer(nn.Module):
    """One invertible layer: forward(x) -> (y, logdet[B]), inverse(y) -> (x, logdet[B])."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class Squeeze(FlowLayer):
    """Space-to-depth: [B, C, H, W] -> [B, 4C, H/2, W/2]; volume preserving."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(b, c * 4, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = y.shape
        x = y.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // 4, h * 2, w * 2), y.new_zeros(b)


class ActNorm(FlowLayer):
    """Per-channel affine map y = (x + bias) * exp(logs), initialised from data.

    On the first batch it sees, bias and logs are set so that the output has zero
    mean and unit variance per channel (openai/glow's data-dependent init; the
    trainer feeds a large first batch for that). Whether that happened is the
    ``initialized`` buffer, so it is saved in the state dict and a loaded
    checkpoint is never re-initialised.
    """

    def __init__(self, channels: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        # A Python mirror of the buffer so that the hot path never syncs a device.
        self._ready = False

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        self.bias.copy_(-mean)
        self.logs.copy_(torch.log(self.scale / (var.sqrt() + 1e-6)))
        self.initialized.fill_(True)
        self._ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # the loaded flag, read off the (CPU) state dict: reading the module's own on a GPU waits for it
        self._ready = bool(state_dict.get(prefix + "initialized", self.initialized))

    def normalize(self, x: Tensor) -> Tensor:
        if not self._ready:
            self.data_init(x)
        return (x + self.bias) * torch.exp(self.logs)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.normalize(x)
        return y, _per_sample(x.shape[2] * x.shape[3] * self.logs.sum(), x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = y * torch.exp(-self.logs) - self.bias
        return x, _per_sample(-y.shape[2] * y.shape[3] * self.logs.sum(), y)


class InvConv1x1(FlowLayer):
    """Invertible 1x1 convolution, LU-decomposed (default) or a plain matrix.

    LU form (openai/glow): W = P (L + I) (U + diag(sign(s) exp(log|s|))), with P and
    sign(s) fixed, so log|det W| = sum(log|s|) exactly and cheaply. The plain
    form computes slogdet and the inverse in float64, where rounding matters.
    """

    def __init__(self, channels: int, lu: bool = True) -> None:
        super().__init__()
        self.lu = lu
        w = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        if lu:
            p, lower, upper = torch.linalg.lu(w)
            s = torch.diagonal(upper)
            self.register_buffer("perm", p.float())
            self.register_buffer("sign_s", torch.sign(s).float())
            self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
            self.register_buffer("eye", torch.eye(channels))
            self.lower = nn.Parameter(lower.float())
            self.upper = nn.Parameter(torch.triu(upper, 1).float())
            self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())
        else:
            self.weight = nn.Parameter(w.float())

    def weight_and_logabsdet(self) -> tuple[Tensor, Tensor]:
        if self.lu:
            lower = self.lower * self.lower_mask + self.eye
            upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
            return self.perm @ lower @ upper, self.log_s.sum()
        logabsdet = torch.linalg.slogdet(self.weight.double())[1].to(self.weight.dtype)
        return self.weight, logabsdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w, logabsdet = self.weight_and_logabsdet()
        y = F.conv2d(x, w.view(*w.shape, 1, 1))
        return y, _per_sample(x.shape[2] * x.shape[3] * logabsdet, x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        w, logabsdet = self.weight_and_logabsdet()
        w_inv = torch.linalg.inv(w.double()).to(w.dtype)
        x = F.conv2d(y, w_inv.view(*w.shape, 1, 1))
        return x, _per_sample(-y.shape[2] * y.shape[3] * logabsdet, y)


class ZeroConv2d(nn.Module):
    """3x3 conv initialised to zero whose output is scaled by exp(3 * logs) (openai's conv2d_zeros)."""

    def __init__(self, in_channels: int, out_channels: int, logscale_factor: float = 3.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.logs = nn.Parameter(torch.zeros(out_channels))
        self.logscale_factor = logscale_factor

    def forward(self, x: Tensor) -> Tensor:
        # conv(x) * e == conv with weights and bias scaled by e: one pass over the output.
        e = torch.exp(self.logs * self.logscale_factor)
        return F.conv2d(x, self.weight * e.view(-1, 1, 1, 1), self.bias * e, padding=1)


class ConvActNorm(nn.Module):
    """A bias-free conv followed by ActNorm (openai's conv2d with do_actnorm).

    (conv(x) + b) * exp(logs) is computed as one conv with weights scaled by
    exp(logs) and bias b * exp(logs): identical math, one less pass over the
    largest activations in the model. The ActNorm still initialises from the
    first batch of conv outputs it sees.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        # openai/glow initialises these convs with N(0, 0.05).
        nn.init.normal_(self.weight, std=0.05)
        self.norm = ActNorm(out_channels)
        self.padding = kernel_size // 2

    def forward(self, x: Tensor) -> Tensor:
        if not self.norm._ready:
            self.norm.data_init(F.conv2d(x, self.weight, padding=self.padding))
        e = torch.exp(self.norm.logs).view(-1)
        weight = self.weight * e.view(-1, 1, 1, 1)
        return F.conv2d(x, weight, self.norm.bias.view(-1) * e, padding=self.padding)


class CouplingNet(nn.Module):
    """openai's f(): conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> zero conv3x3.

    The ActNorms normalise hidden activations; they are not part of the flow and
    contribute no log-det.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = ConvActNorm(in_channels, hidden, 3)
        self.conv2 = ConvActNorm(hidden, hidden, 1)
        self.out = ZeroConv2d(hidden, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        # channels-last convs are ~1.7x faster here on CPU (oneDNN); the flow
        # itself stays NCHW, so only the small input and output are converted.
        h = x.contiguous(memory_format=torch.channels_last)
        h = F.relu(self.conv1(h), inplace=True)
        h = F.relu(self.conv2(h), inplace=True)
        return self.out(h).contiguous()


class Coupling(FlowLayer):
    """Affine (default) or additive coupling: the second half of the channels is
    transformed conditioned on the first half.

    Affine: h = NN(x1); shift = h[:, 0::2]; scale = sigmoid(h[:, 1::2] + 2);
    y2 = (x2 + shift) * scale. At init NN outputs zeros, so the log-det is exactly
    (C/2) * H * W * log(sigmoid(2)).
    """

    def __init__(self, channels: int, hidden: int, affine: bool = True, bf16: bool = False) -> None:
        super().__init__()
        self.affine = affine
        self.bf16 = bf16
        half = channels // 2
        self.net = CouplingNet(half, (channels - half) * (2 if affine else 1), hidden)

    def shift_log_scale(self, x1: Tensor) -> tuple[Tensor, Tensor | None]:
        """The shift and log-scale the network gives x2 (no log-scale when additive)."""
        if self.bf16:  # the network's convs in bfloat16; its output, the log-dets and all after them in float32
            with torch.autocast(device_type=x1.device.type, dtype=torch.bfloat16):
                h = self.net(x1)
            h = h.float()
        else:
            h = self.net(x1)
        if not self.affine:
            return h, None
        # logsigmoid, not log(sigmoid): sigmoid underflows to 0 in float32 below
        # about -88, and one -inf log-det stops a run (docs/benchmarks.md)
        return h[:, 0::2], F.logsigmoid(h[:, 1::2] + 2.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x.chunk(2, dim=1)
        shift, log_scale = self.shift_log_scale(x1)
        if log_scale is None:
            return torch.cat([x1, x2 + shift], dim=1), x.new_zeros(x.shape[0])
        y2 = (x2 + shift) * torch.exp(log_scale)
        return torch.cat([x1, y2], dim=1), log_scale.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y1, y2 = y.chunk(2, dim=1)
        shift, log_scale = self.shift_log_scale(y1)
        if log_scale is None:
            return torch.cat([y1, y2 - shift], dim=1), y.new_zeros(y.shape[0])
        x2 = y2 * torch.exp(-log_scale) - shift
        return torch.cat([y1, x2], dim=1), -log_scale.flatten(1).sum(1)


class Split(FlowLayer):
    """Factor out half the channels, scored by a learned Gaussian conditioned on the rest.

    forward(x) -> (z1, log p(z2 | z1)); the factored-out z2 is not carried on.
    ``factor`` also returns z2, for exact reconstruction; ``inverse`` reuses a
    stored z2 when given one and otherwise samples it at a temperature.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.prior = ZeroConv2d(channels // 2, channels)

    def mean_logs(self, z1: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and log-std of the factored-out half, given the kept half."""
        h = self.prior(z1)
        return h[:, 0::2], h[:, 1::2]

    def factor(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z1, z2 = x.chunk(2, dim=1)
        mean, logs = self.mean_logs(z1)
        return z1, z2, gaussian_log_prob(z2, mean, logs)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z1, _, logp = self.factor(x)
        return z1, logp

    def inverse(self, y: Tensor, z2: Tensor | None = None, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        mean, logs = self.mean_logs(y)
        if z2 is None:
            z2 = mean + torch.exp(logs) * torch.randn_like(mean) * temperature
        return torch.cat([y, z2], dim=1), -gaussian_log_prob(z2, mean, logs)


class TopPrior(nn.Module):
    """Learned diagonal Gaussian on the final latent: one mean and log-std per channel
    (openai's learntop: a zero conv applied to zeros is a per-channel bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def log_prob(self, z: Tensor) -> Tensor:
        return gaussian_log_prob(z, self.mean, self.logs)

    def sample(self, shape: tuple[int, ...], temperature: float = 1.0) -> Tensor:
        eps = torch.randn(shape, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(self.logs) * eps * temperature
