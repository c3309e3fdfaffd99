"""KL-VAE: shapes, the KL against its closed form, learning on blobs, the latent scale."""

from __future__ import annotations

import math

import pytest
import torch

from models.vae import VAE, DiagonalGaussian, VAEConfig, measure_latent_scale, vae_loss


def _blobs(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Soft discs at random places and radii, grayscale in [-1, 1], (n, 1, size, size)."""
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")  # (size, size)
    centre = torch.rand(n, 2, generator=generator) * 1.2 - 0.6  # (n, 2)
    radius = torch.rand(n, generator=generator) * 0.3 + 0.2  # (n,)
    dist = ((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2).sqrt()
    return (torch.sigmoid((radius[:, None, None] - dist) * 20) * 2 - 1)[:, None]  # (n, 1, size, size)


@pytest.mark.parametrize("downsample", [4, 8])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_shapes_round_trip(downsample, in_channels):
    cfg = VAEConfig(in_channels=in_channels, downsample=downsample, base_channels=8, latent_channels=4)
    vae = VAE(cfg)
    x = torch.rand(2, in_channels, 16, 24) * 2 - 1
    q = vae.encode(x)
    latent_shape = (2, 4, 16 // downsample, 24 // downsample)
    assert q.mean.shape == latent_shape and q.logvar.shape == latent_shape
    assert q.sample().shape == latent_shape
    assert vae.decode(q.mean).shape == x.shape
    out = vae(x)
    assert out.x_hat.shape == x.shape
    assert out.posterior.mean.shape == latent_shape


def test_config_rejects_other_downsample_factors():
    with pytest.raises(ValueError, match="downsample=2"):
        VAEConfig(downsample=2)
    with pytest.raises(ValueError, match="downsample=16"):
        VAEConfig(downsample=16)


def test_vae_rejects_wrong_images():
    vae = VAE(VAEConfig(in_channels=1, base_channels=8))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\).*\(2, 3, 16, 16\)"):
        vae.encode(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(18, 16\).*downsample=4"):
        vae.encode(torch.zeros(2, 1, 18, 16))


def test_kl_matches_closed_form():
    mean = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.0, 3.0]], dtype=torch.float64)
    sigma = torch.tensor([[1.0, 0.5, 2.0], [0.1, 1.0, 3.0]], dtype=torch.float64)
    q = DiagonalGaussian(mean, torch.log(sigma**2))
    # KL(N(mu, s^2) || N(0, 1)) = log(1 / s) + (s^2 + mu^2) / 2 - 1/2, per dimension
    expected = [
        sum(math.log(1 / s) + (s * s + m * m) / 2 - 0.5 for m, s in zip(mrow, srow))
        for mrow, srow in zip(mean.tolist(), sigma.tolist())
    ]
    assert torch.allclose(q.kl(), torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    # The standard normal has zero KL.
    zero = DiagonalGaussian(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3))
    assert torch.equal(zero.kl(), torch.zeros(2))


def test_sample_moments_and_generator():
    q = DiagonalGaussian(torch.full((200_000,), 2.0), torch.full((200_000,), math.log(0.25)))
    z = q.sample(torch.Generator().manual_seed(0))
    assert z.mean().item() == pytest.approx(2.0, abs=0.01)
    assert z.std().item() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(z, q.sample(torch.Generator().manual_seed(0)))


def test_loss_is_recon_plus_beta_kl():
    vae = VAE(VAEConfig(base_channels=8, beta=0.01))
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    out = vae_loss(vae, x, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out.loss, out.recon + 0.01 * out.kl)
    assert out.loss.ndim == out.recon.ndim == out.kl.ndim == 0
    # the same generator gives the same sample, hence the same reconstruction loss
    again = vae_loss(vae, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.recon, again.recon)


def test_tiny_vae_learns_blobs():
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(0)
    vae = VAE(VAEConfig(in_channels=1, base_channels=8, downsample=4))
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(50):
        out = vae_loss(vae, _blobs(8, 16, data))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_measure_latent_scale():
    means = 3.0 * torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0)) + 1.0
    expected = 1.0 / means.double().std(unbiased=False).item()
    assert measure_latent_scale(means) == pytest.approx(expected, rel=1e-12)
    assert measure_latent_scale(means) == pytest.approx(1 / 3, rel=0.05)
    with pytest.raises(ValueError, match="constant or not finite"):
        measure_latent_scale(torch.ones(10, 4))
