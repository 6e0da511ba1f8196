"""Glow as a flat, indexable sequence of flow layers, and Parts: contiguous slices of it.

For L blocks of K steps the sequence is, per block b:
    Squeeze, then K x (ActNorm, InvConv1x1, Coupling), then Split (all but the last block)
followed by a learned top prior on the final latent. A ``Part`` is the slice
``layers[start:stop]`` (with the top prior when it is the last slice); its state
dict uses the same keys as the whole model, so parts' weights assemble back
into a Glow by merging dictionaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from raylocal.core.tensors import tensor_bytes
from raylocal.model.flows import (
    ActNorm,
    Coupling,
    FlowLayer,
    InvConv1x1,
    Split,
    Squeeze,
    TopPrior,
)


@dataclass(frozen=True)
class LayerInfo:
    """Where a layer sits: its kind, block, step within the block and tensor shapes."""

    index: int
    kind: str  # squeeze | actnorm | invconv | coupling | split
    block: int  # 0-based
    step: int | None  # 0-based flow step within the block; None for squeeze/split
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    hidden: int  # coupling network width, for the cost estimate

    @property
    def cost(self) -> float:
        """Relative compute estimate (multiply-adds per sample), for balancing parts."""
        c, h, w = self.in_shape
        if self.kind == "coupling":
            hid = self.hidden
            return float(h * w * (c // 2 * 9 * hid + hid * hid + hid * 9 * c))
        if self.kind == "invconv":
            return float(h * w * c * c)
        if self.kind == "split":
            return float(h * w * (c // 2) * 9 * c)
        return float(h * w * c)


def run_layers(layers: list[FlowLayer], x: Tensor) -> tuple[Tensor, Tensor]:
    """Apply layers in order, summing their per-sample log-likelihood contributions."""
    logdet = x.new_zeros(x.shape[0])
    for layer in layers:
        x, ld = layer(x)
        logdet = logdet + ld
    return x, logdet


@dataclass(frozen=True)
class GlowLayout:
    """The layer sequence of a Glow without its weights: what a part spec is
    checked against before any tensor exists (the driver's start checks)."""

    info: tuple[LayerInfo, ...]
    n_levels: int
    depth: int
    latent_shape: tuple[int, int, int]

    @classmethod
    def of(cls, image_shape: tuple[int, int, int], n_levels: int, depth: int, hidden: int) -> GlowLayout:
        info: list[LayerInfo] = []

        def add(kind: str, block: int, step: int | None, out: tuple[int, int, int]) -> tuple[int, int, int]:
            info.append(LayerInfo(len(info), kind, block, step, shape, out, hidden))
            return out

        shape = tuple(image_shape)
        for b in range(n_levels):
            shape = add("squeeze", b, None, (shape[0] * 4, shape[1] // 2, shape[2] // 2))
            for k in range(depth):
                for kind in ("actnorm", "invconv", "coupling"):
                    add(kind, b, k, shape)
            if b < n_levels - 1:
                shape = add("split", b, None, (shape[0] // 2, shape[1], shape[2]))
        return cls(tuple(info), n_levels, depth, shape)

    def __len__(self) -> int:
        return len(self.info)


class Glow(nn.Module):
    """The whole multi-scale Glow (x -> z is ``forward``)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        n_levels: int,
        depth: int,
        hidden: int,
        affine: bool = True,
        lu: bool = True,
        n_bits: int = 8,
        bf16: bool = False,
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        if h % 2**n_levels or w % 2**n_levels:
            raise ValueError(f"image size {h}x{w} is not divisible by 2^n_levels = {2**n_levels} (n_levels={n_levels})")
        self.image_shape = tuple(image_shape)
        self.n_bits = n_bits
        self.n_bins = 2**n_bits
        self.data_dims = c * h * w
        self.layout = GlowLayout.of(image_shape, n_levels, depth, hidden)
        make = {
            "squeeze": lambda i: Squeeze(),
            "actnorm": lambda i: ActNorm(i.in_shape[0]),
            "invconv": lambda i: InvConv1x1(i.in_shape[0], lu=lu),
            "coupling": lambda i: Coupling(i.in_shape[0], hidden, affine=affine, bf16=bf16),
            "split": lambda i: Split(i.in_shape[0]),
        }
        self.layers = nn.ModuleList([make[i.kind](i) for i in self.layout.info])
        self.info = self.layout.info
        self.n_levels = n_levels
        self.depth = depth
        self.latent_shape = self.layout.latent_shape
        self.prior = TopPrior(self.latent_shape[0])

    def __len__(self) -> int:
        return len(self.layers)

    def param_bytes(self) -> int:
        """Bytes of all parameters (what a data-parallel step all-reduces)."""
        return tensor_bytes(list(self.parameters()))

    def part(self, start: int, stop: int) -> Part:
        """The slice layers[start:stop] as a Part sharing this model's modules."""
        if not 0 <= start < stop <= len(self):
            raise ValueError(f"part [{start}, {stop}) is not a non-empty slice of {len(self)} layers")
        return Part(self, start, stop)

    def whole(self) -> Part:
        return self.part(0, len(self))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> top latent z, with the per-sample sum of log-dets and split log-priors."""
        return run_layers(list(self.layers), x)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact per-sample log-density of continuous x (already preprocessed)."""
        z, logdet = self(x)
        return logdet + self.prior.log_prob(z)

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x -> (top latent, factored-out latents of every split, in order)."""
        latents = []
        for layer in self.layers:
            if isinstance(layer, Split):
                x, z2, _ = layer.factor(x)
                latents.append(z2)
            else:
                x, _ = layer(x)
        return x, latents

    def decode(self, z: Tensor, latents: list[Tensor] | None = None, temperature: float = 1.0) -> Tensor:
        """Top latent (and optionally stored split latents) -> x. Missing latents are
        sampled from the split priors at ``temperature``."""
        stored = list(latents) if latents is not None else None
        for layer in reversed(self.layers):
            if isinstance(layer, Split):
                z2 = stored.pop() if stored is not None else None
                z, _ = layer.inverse(z, z2=z2, temperature=temperature)
            else:
                z, _ = layer.inverse(z)
        return z

    def reconstruct(self, x: Tensor) -> Tensor:
        z, latents = self.encode(x)
        return self.decode(z, latents)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.7) -> Tensor:
        """n samples in the model's continuous space ([-0.5, 0.5] per pixel)."""
        z = self.prior.sample((n, *self.latent_shape), temperature)
        return self.decode(z, temperature=temperature)


class Part(nn.Module):
    """A contiguous slice of a Glow's layers, trained on its own local objective.

    Holds (does not copy) the Glow's modules; ``prior`` is the top prior for the
    last part and None otherwise. Keys of ``state_dict`` equal the Glow's keys.
    """

    def __init__(self, glow: Glow, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        self.layers = nn.ModuleDict({str(i): glow.layers[i] for i in range(start, stop)})
        self.prior = glow.prior if stop == len(glow) else None
        self.is_first = start == 0
        self.data_dims = glow.data_dims
        self.n_bins = glow.n_bins
        self.in_shape = glow.info[start].in_shape
        self.out_shape = glow.info[stop - 1].out_shape

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return run_layers(list(self.layers.values()), x)

    def extra_repr(self) -> str:
        return f"layers [{self.start}, {self.stop}), top prior: {self.prior is not None}"
