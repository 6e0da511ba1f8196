"""Every layer and the whole Glow against independent computations, in float64."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import Normal

from raylocal.model.flows import (
    ActNorm,
    Coupling,
    InvConv1x1,
    Split,
    Squeeze,
    gaussian_log_prob,
)
from raylocal.model.glow import Glow
from raylocal.model.objectives import nll_bits, preprocess


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def randomize(module: torch.nn.Module, x: torch.Tensor | None = None, scale: float = 0.2) -> None:
    """Initialise ActNorms on x (if given), then perturb every parameter so that no
    zero-initialised conv makes a check trivial."""
    if x is not None:
        with torch.no_grad():
            module(x)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for m in module.modules():
        if isinstance(m, ActNorm):
            m.initialized.fill_(True)
            m._ready = True


def jacobian_logdet(f, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of a map of one sample, by autograd (independent of the layer's formula)."""
    jac = jacobian(lambda v: f(v.view_as(x)).reshape(-1), x.reshape(-1))
    return torch.linalg.slogdet(jac)[1]


LAYERS = [
    ("squeeze", lambda: Squeeze(), (2, 4, 4)),
    ("actnorm", lambda: ActNorm(4), (4, 3, 3)),
    ("invconv-lu", lambda: InvConv1x1(4, lu=True), (4, 3, 3)),
    ("invconv-plain", lambda: InvConv1x1(4, lu=False), (4, 3, 3)),
    ("coupling-affine", lambda: Coupling(4, 8, affine=True), (4, 3, 3)),
    ("coupling-additive", lambda: Coupling(4, 8, affine=False), (4, 3, 3)),
]


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_layer_inverse_and_logdet(name, make, shape):
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(3, *shape)
    randomize(layer, x)
    y, logdet = layer(x)
    x_back, inv_logdet = layer.inverse(y)
    assert torch.allclose(x_back, x, atol=1e-10), name
    assert torch.allclose(inv_logdet, -logdet, atol=1e-10)
    for b in range(3):  # per-sample log-dets against the autograd Jacobian
        expected = jacobian_logdet(lambda v: layer(v)[0], x[b : b + 1])
        assert torch.allclose(logdet[b], expected, atol=1e-8), (name, logdet[b], expected)


def test_coupling_is_not_trivial_after_randomize():
    # Guard for the test above: the log-det really depends on the input.
    torch.manual_seed(0)
    layer = Coupling(4, 8).double()
    x = torch.randn(2, 4, 3, 3)
    randomize(layer, x)
    _, logdet = layer(x)
    assert abs(float((logdet[0] - logdet[1]).detach())) > 1e-3


def test_split_logp_matches_normal_density():
    torch.manual_seed(0)
    split = Split(4).double()
    x = torch.randn(2, 4, 3, 3)
    randomize(split)
    z1, logp = split(x)
    z2 = x[:, 2:]
    conv = split.prior
    h = torch.nn.functional.conv2d(z1, conv.weight, conv.bias, padding=1)
    h = h * torch.exp(3 * conv.logs).view(1, -1, 1, 1)
    mean, logs = h[:, 0::2], h[:, 1::2]
    expected = Normal(mean, torch.exp(logs)).log_prob(z2).flatten(1).sum(1)
    assert torch.allclose(logp, expected, atol=1e-10)
    assert torch.equal(z1, x[:, :2])
    x_back, neg = split.inverse(z1, z2=z2)
    assert torch.equal(x_back, x) and torch.allclose(neg, -logp)


def test_actnorm_data_init_statistics():
    torch.manual_seed(0)
    x = 3.0 + 2.5 * torch.randn(256, 5, 4, 4)
    layer = ActNorm(5).double()
    y, _ = layer(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-10)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(5), atol=1e-5)
    assert bool(layer.initialized)
    # a second batch does not re-initialise
    y2, _ = layer(x + 10)
    assert torch.allclose(y2.mean(dim=(0, 2, 3)), 10 * torch.exp(layer.logs).view(-1), atol=1e-8)


def test_coupling_logdet_at_init():
    torch.manual_seed(0)
    c, h, w = 6, 5, 4
    layer = Coupling(c, 16).double()
    _, logdet = layer(torch.randn(3, c, h, w))
    expected = (c / 2) * h * w * math.log(1 / (1 + math.exp(-2.0)))
    assert torch.allclose(logdet, torch.full((3,), expected), atol=1e-10)


def test_coupling_logdet_stays_finite_where_the_float32_scale_underflows():
    # a coupling net output of -150 gives sigmoid(-148) = 0 in float32; the
    # log-det is still the exact log-sigmoid (here -148 per such element)
    class FixedNet(torch.nn.Module):
        def forward(self, x1):
            h = torch.zeros(x1.shape[0], 2, 3, 3, dtype=torch.float32)
            h[:, 1, 0, 0] = -150.0  # the scale of element (0, 0), interleaved after the shift
            return h

    layer = Coupling(2, 8).float()
    layer.net = FixedNet()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    y, logdet = layer(x)
    expected = -(148.0 + math.log1p(math.exp(-148.0))) + 8 * math.log(1 / (1 + math.exp(-2.0)))
    assert torch.isfinite(logdet).all() and torch.isfinite(y).all()
    assert torch.allclose(logdet.double(), torch.full((4,), expected), rtol=1e-6)
    assert torch.sigmoid(torch.tensor(-148.0, dtype=torch.float32)) == 0  # what log(sigmoid(.)) took the log of
    assert torch.isfinite(layer.inverse(y)[1]).all()


def small_glow(**kw) -> Glow:
    torch.manual_seed(0)
    args = dict(image_shape=(2, 4, 4), n_levels=2, depth=2, hidden=8)
    args.update(kw)
    return Glow(**args).double()


def test_glow_layer_sequence():
    glow = small_glow()
    kinds = [i.kind for i in glow.info]
    step = ["actnorm", "invconv", "coupling"]
    assert kinds == ["squeeze"] + step * 2 + ["split", "squeeze"] + step * 2
    assert glow.latent_shape == (16, 1, 1)
    assert glow.info[7].in_shape == (8, 2, 2) and glow.info[7].out_shape == (4, 2, 2)


@pytest.mark.parametrize("affine,lu", [(True, True), (False, False)])
def test_glow_log_prob_equals_jacobian_and_priors(affine, lu):
    glow = small_glow(affine=affine, lu=lu)
    x = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(0)) - 0.5
    # 0.05, not 0.2: perturbations of 0.2 through two levels gave coupling log-dets
    # of -1e5, scales that underflow even in float64, and -inf == -inf "passed"
    randomize(glow, x, scale=0.05)
    logp = glow.log_prob(x)
    assert torch.isfinite(logp).all()
    for b in range(2):
        xb = x[b : b + 1]

        def latents(v):
            z, zs = glow.encode(v)
            return torch.cat([t.reshape(-1) for t in [z, *zs]])

        logdet = jacobian_logdet(latents, xb)
        # the priors, by hand: walk the layers and score each factored-out half
        h, prior_terms = xb, []
        for layer in glow.layers:
            if isinstance(layer, Split):
                z1, z2 = h.chunk(2, 1)
                hp = layer.prior(z1)
                prior_terms.append(Normal(hp[:, 0::2], torch.exp(hp[:, 1::2])).log_prob(z2).sum())
                h = z1
            else:
                h, _ = layer(h)
        top = Normal(glow.prior.mean, torch.exp(glow.prior.logs)).log_prob(h).sum()
        expected = logdet + sum(prior_terms) + top
        assert torch.allclose(logp[b], expected, atol=1e-8), (logp[b], expected)


def test_glow_reconstruct_and_sample_shapes():
    glow = small_glow()
    x = torch.rand(5, 2, 4, 4) - 0.5
    randomize(glow)  # no data init: 1x1 top latents make a degenerate init batch
    assert torch.allclose(glow.reconstruct(x), x, atol=1e-10)
    assert glow.sample(3, temperature=0.7).shape == (3, 2, 4, 4)


def test_bpd_counts_original_dimensions_and_bins():
    # An untrained Glow with identity-like layers: BPD by hand from log_prob.
    glow = small_glow(n_bits=5)
    x8 = torch.randint(0, 256, (3, 2, 4, 4), dtype=torch.uint8)
    x = preprocess(x8, 5, torch.Generator().manual_seed(0)).double()
    assert x.min() >= -0.5 and x.max() < 0.5
    bits = nll_bits(glow, x)
    d = 2 * 4 * 4
    expected = -(glow.log_prob(x) - d * math.log(32)) / (d * math.log(2))
    assert torch.allclose(bits, expected)


def test_save_load_round_trip_keeps_log_prob():
    glow = small_glow()
    x = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(0)) - 0.5
    randomize(glow, x, scale=0.05)
    before = glow.log_prob(x)
    assert torch.isfinite(before).all()
    buf = io.BytesIO()
    torch.save(glow.state_dict(), buf)
    buf.seek(0)
    fresh = small_glow()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    # the loaded ActNorms must not re-initialise on this (different) batch
    assert torch.equal(fresh.log_prob(x), before)
    assert torch.equal(fresh.log_prob(x * 3), glow.log_prob(x * 3))


def test_gaussian_log_prob_matches_torch():
    x, mean, logs = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    expected = Normal(mean, torch.exp(logs)).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(gaussian_log_prob(x, mean, logs), expected)


def test_dequantisation_noise_fills_each_bin_uniformly():
    """Uniform dequantisation: pixel value v lands uniformly in [v, v + 1) / 2^bits
    (shifted by -0.5), for every bit depth: its mean half a bin above v, its spread
    the whole bin (a uniform's variance: bin² / 12)."""
    for bits in (8, 5):
        values = torch.randint(0, 256, (200_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        x = preprocess(values, bits, torch.Generator().manual_seed(1)).double()
        level = torch.floor(values.double() / 2 ** (8 - bits))
        offset = (x + 0.5) * 2**bits - level  # where in its bin, in bins
        assert offset.min() >= 0 and offset.max() < 1
        assert float(offset.mean()) == pytest.approx(0.5, abs=0.005)
        assert float(offset.var()) == pytest.approx(1 / 12, rel=0.02)


def test_samples_follow_their_temperature():
    """At temperature T every latent, the top one and each split's, is drawn with T
    times its prior's standard deviation: encoding samples gives them back."""
    torch.manual_seed(0)
    glow = Glow((1, 8, 8), n_levels=3, depth=1, hidden=8).double()  # zero-initialised priors: N(0, 1)
    glow(torch.rand(64, 1, 8, 8) - 0.5)  # the ActNorms' data init, before anything is encoded
    for temperature in (0.3, 1.0):
        torch.manual_seed(1)
        z, latents = glow.encode(glow.sample(4000, temperature))
        for latent in [z, *latents]:
            assert float(latent.std()) == pytest.approx(temperature, rel=0.03), temperature


def test_samples_follow_learned_priors_and_the_images_their_temperature(monkeypatch):
    """With priors that are not N(0, 1) (a learned top mean and log-std, split priors
    conditioned on the kept half), each latent of a sample at T, standardised by
    its own prior, has mean 0 and std T; and the images a run saves are drawn at
    the run's temperature (``sample_images``)."""
    from raylocal.model.flows import Split
    from raylocal.model.objectives import sample_images

    torch.manual_seed(0)
    glow = Glow((1, 8, 8), n_levels=3, depth=1, hidden=8).double()
    glow(torch.rand(64, 1, 8, 8, dtype=torch.float64) - 0.5)  # the ActNorms' data init
    with torch.no_grad():
        glow.prior.mean.normal_(0.0, 1.0)
        glow.prior.logs.uniform_(-1.0, 0.5)
        for layer in glow.layers:
            if isinstance(layer, Split):
                for p in layer.prior.parameters():
                    p.normal_(0.0, 0.1)
    temperature = 0.5
    torch.manual_seed(1)
    x = glow.sample(4000, temperature)
    standardised = []
    for layer in glow.layers:
        if isinstance(layer, Split):
            x, z2, _ = layer.factor(x)
            mean, logs = layer.mean_logs(x)
            standardised.append((z2 - mean) / torch.exp(logs))
        else:
            x, _ = layer(x)
    standardised.append((x - glow.prior.mean) / torch.exp(glow.prior.logs))
    for eps in standardised:
        assert abs(float(eps.mean())) < 0.02 and float(eps.std()) == pytest.approx(temperature, rel=0.03)
    asked = []
    real = glow.sample
    monkeypatch.setattr(glow, "sample", lambda n, t: asked.append((n, t)) or real(n, t))
    images = sample_images(glow, 4, 0.3)
    assert asked == [(4, 0.3)] and images.shape == (4, 1, 8, 8) and images.dtype == torch.float32


def test_an_actnorm_loaded_from_a_state_dict_initialises_on_data_only_if_that_one_had_not():
    torch.manual_seed(0)
    source, x = ActNorm(3), torch.randn(8, 3, 4, 4) * 3 + 1
    fresh_state = {k: v.clone() for k, v in source.state_dict().items()}  # before any data
    y, _ = source(x)  # data-dependent init: per-channel zero mean, unit variance
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    trained = ActNorm(3)
    trained.load_state_dict(source.state_dict())
    other = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(trained(other)[0], source(other)[0])  # the loaded init, not the new data's
    untrained = ActNorm(3)
    untrained.data_init(other)  # initialised here, then given a state dict that never was
    untrained.load_state_dict(fresh_state)
    y, _ = untrained(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
