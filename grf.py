"""Gaussian random fields (GRF): the random initial states of the heat and Navier-Stokes data.

DINo (Yin, Kirchmeyer et al., ICLR 2023), Sec. 5 and the appendix on data: the initial vorticity
of Navier-Stokes (and here the initial temperature of the heat extension too) is a sample
of a periodic Gaussian random field with mean zero and covariance

    C = sigma^2 (-Laplacian + tau^2)^(-alpha)        (alpha = 2.5, tau = 7 in the paper)

on the unit torus [0, 1)^d. The Fourier modes e_k(x) = exp(2 pi i k.x) are the eigenfunctions of
the Laplacian there, with -Laplacian e_k = 4 pi^2 |k|^2 e_k, so the field is drawn mode by mode:

    u(x) = sum_k  sigma (4 pi^2 |k|^2 + tau^2)^(-alpha/2)  xi_k  e_k(x),    xi_k ~ N(0, 1) i.i.d.

Three details that the usual sampler (FNO's `GaussianRF`, the source of DINo's Navier-Stokes
data) leaves unexplained, spelled out here:
- Mean mode. The k = 0 coefficient is set to zero, so every sample has exactly zero mean. For
  Navier-Stokes this is required (a periodic vorticity integrates to zero); for heat it only
  removes a constant that diffusion would never change.
- Default sigma = tau^(alpha - d/2). The marginal variance is sigma^2 sum_k (4 pi^2 |k|^2 +
  tau^2)^(-alpha) ~ sigma^2 tau^(d - 2 alpha) * (a constant): substitute k = tau q in the sum seen
  as an integral. The default cancels the tau dependence, so the pointwise amplitude does not depend
  on the correlation length 1/tau (for alpha 2.5 in 2D the pointwise std is about 0.19).
- FFT scaling. We fill a full (not Hermitian) n x n array with complex normal xi_k (real and
  imaginary parts each of variance 1/2), multiply by n^2 sqrt(2) sigma (4 pi^2 |k|^2 + tau^2)^
  (-alpha/2), inverse-FFT and keep the real part. torch's ifft divides by n^2, which the n^2
  undoes; taking the real part halves the variance, which the sqrt(2) undoes. The result has
  exactly the covariance above on the grid's modes (|k_i| <= n/2).

Domains: the field lives on the unit-period torus. As the official code does, the heat data on
[-1, 1]^2 and the Navier-Stokes data on [0, 1)^2 simply take the n x n grid values of one sample.

Use:
    from grf import sample_grf
    u0 = sample_grf(64, seeds=range(8))            # (8, 64, 64) float32, one field per seed
    u0 = sample_grf(64, seeds=[3], dtype=torch.float64, device="cuda")
The same seed gives the same field on any device and in either dtype (up to rounding), because
the noise is always drawn on the CPU, in float64, from a torch.Generator seeded with that seed.
Run `python grf.py` to print the statistics of a few samples.
"""
import math

import torch


def grf_wavenumbers(size, *, dtype=torch.float64, device="cpu"):
    """Integer wavenumbers of an n x n FFT grid in torch's order: k_x (n, 1), k_y (1, n)."""
    k = torch.fft.fftfreq(size, d=1.0 / size, dtype=dtype, device=device)  # 0, 1, .., -1
    return k[:, None], k[None, :]


def grf_eigenvalues(size, *, alpha=2.5, tau=7.0, sigma=None, dtype=torch.float64, device="cpu"):
    """Variance of each Fourier coefficient: sigma^2 (4 pi^2 |k|^2 + tau^2)^(-alpha), mean mode 0.

    Returns (size, size) in FFT order. This is the target power spectrum that the tests check.
    """
    if sigma is None:
        sigma = tau ** (alpha - 1.0)  # tau^(alpha - d/2) with d = 2: see the module docstring
    k_x, k_y = grf_wavenumbers(size, dtype=dtype, device=device)
    eig = sigma**2 * (4 * math.pi**2 * (k_x**2 + k_y**2) + tau**2) ** (-alpha)  # (n, n)
    eig[0, 0] = 0.0  # zero mean mode: every sample has exactly zero mean
    return eig


def sample_grf(size, seeds, *, alpha=2.5, tau=7.0, sigma=None, dtype=torch.float32, device="cpu"):
    """One periodic GRF sample per seed on an n x n grid of [0, 1)^2 -> (len(seeds), size, size).

    seeds: iterable of ints; field b depends only on seeds[b] (so a prefix of the seeds gives a
    prefix of the fields, and the same seed gives the same field on any device).
    """
    seeds = [int(s) for s in seeds]
    if size < 2:
        raise ValueError(f"size must be >= 2, got {size}")
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    # Noise on the CPU in float64 from one generator per seed: reproducible everywhere.
    # (A loop over samples, but only to draw noise: the transform below is batched.)
    noise = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(size, size, dtype=torch.complex128, generator=gen))  # E|xi|^2 = 1
    noise = torch.stack(noise).to(device)  # (B, n, n) complex
    eig = grf_eigenvalues(size, alpha=alpha, tau=tau, sigma=sigma, device=device)  # (n, n)
    # n^2 undoes ifft's 1/n^2; sqrt(2) undoes the variance halved by keeping the real part.
    coeff = size**2 * math.sqrt(2.0) * eig.sqrt() * noise
    field = torch.fft.ifft2(coeff).real  # (B, n, n)
    return field.to(dtype)


if __name__ == "__main__":
    fields = sample_grf(64, seeds=range(256))
    print(f"256 samples of 64x64, alpha 2.5, tau 7: mean {fields.mean():+.2e}, "
          f"std {fields.std():.3f}, max |u| {fields.abs().max():.3f}")
    target = grf_eigenvalues(64).sum().sqrt()
    print(f"target pointwise std sqrt(sum of eigenvalues) = {target:.3f}")
