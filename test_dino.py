"""Checks for dino, against exact solutions and invariants. Run: python -m pytest -q"""
import math
import os
import time

import pytest
import scipy.fft
import torch

import grf
import solvers

# ---- grf


def test_grf_zero_mean_and_periodic():
    u = grf.sample_grf(32, seeds=range(16), dtype=torch.float64)  # (16, 32, 32)
    assert u.shape == (16, 32, 32) and u.dtype == torch.float64
    assert u.mean(dim=(1, 2)).abs().max() < 1e-14  # mean mode is exactly zero
    # Periodic: the wrap-around step (last row/column -> first) is as small as an interior step.
    inner = (u[:, 1:] - u[:, :-1]).abs().mean()
    wrap = (u[:, 0] - u[:, -1]).abs().mean()
    assert 0.7 < wrap / inner < 1.3
    inner_y = (u[:, :, 1:] - u[:, :, :-1]).abs().mean()
    assert 0.7 < (u[:, :, 0] - u[:, :, -1]).abs().mean() / inner_y < 1.3


def test_grf_power_spectrum_follows_target():
    # E|FFT(u)_k|^2 / n^4 equals the target eigenvalue of every mode (the real part keeps it).
    n, alpha, tau = 32, 2.5, 7.0
    u = grf.sample_grf(n, seeds=range(400), alpha=alpha, tau=tau, dtype=torch.float64)
    power = (torch.fft.fft2(u).abs() ** 2).mean(0) / n**4  # (n, n)
    target = grf.grf_eigenvalues(n, alpha=alpha, tau=tau)
    k_x, k_y = grf.grf_wavenumbers(n)
    shell = torch.sqrt(k_x**2 + k_y**2).round().long()  # radial shells
    for r in range(1, n // 2):  # radially averaged spectrum within 15% (400 samples: ~3% noise)
        sel = shell == r
        assert abs(power[sel].mean() / target[sel].mean() - 1) < 0.15, r
    assert power[0, 0] < 1e-25
    # Default sigma = tau^(alpha - 1): pointwise variance = sum of the eigenvalues.
    assert abs(u.var() / target.sum() - 1) < 0.1


def test_grf_deterministic_and_seed_wise():
    a = grf.sample_grf(16, seeds=[3, 4, 5])
    assert torch.equal(a, grf.sample_grf(16, seeds=[3, 4, 5]))
    assert torch.equal(a[1:2], grf.sample_grf(16, seeds=[4]))  # field depends on its seed only
    b = grf.sample_grf(16, seeds=[3], dtype=torch.float64)
    assert torch.allclose(a[0].double(), b[0], atol=1e-6)
    assert not torch.allclose(a[0], a[1])
    with pytest.raises(ValueError, match="dtype"):
        grf.sample_grf(16, seeds=[1], dtype=torch.int64)
    with pytest.raises(ValueError, match="seeds"):
        grf.sample_grf(16, seeds=[])


# ---- solvers


def test_heat_matches_eigenfunctions_and_conserves_mean():
    n, k = 24, 0.1
    s = (solvers.planar_coords(n, low=-1.0, high=1.0, cell_centred=True) + 1) / 2  # (H, W, 2) in [0,1]
    t = torch.tensor([0.0, 0.5, 3.0, 10.0], dtype=torch.float64)
    modes = [(3, 5, 1.0), (1, 0, 0.5), (0, 0, 0.3), (7, 2, -0.2)]  # (m, n, amplitude)
    u0 = sum(a * torch.cos(math.pi * m * s[..., 0]) * torch.cos(math.pi * q * s[..., 1]) for m, q, a in modes)
    exact = sum(a * torch.cos(math.pi * m * s[..., 0]) * torch.cos(math.pi * q * s[..., 1])
                * torch.exp(-k * (math.pi / 2) ** 2 * (m**2 + q**2) * t)[:, None, None] for m, q, a in modes)
    u = solvers.solve_heat(u0[None], t, diffusivity=k)  # (1, T, H, W, 1)
    assert u.shape == (1, 4, n, n, 1)
    assert ((u[0, ..., 0] - exact).norm() / exact.norm()) < 1e-6
    g = grf.sample_grf(n, seeds=[0, 1], dtype=torch.float64) + 0.7
    means = solvers.solve_heat(g, t).mean(dim=(2, 3, 4))  # (B, T)
    assert (means - 0.7).abs().max() < 1e-12


def test_heat_agrees_with_scipy_dct():
    u0 = grf.sample_grf(16, seeds=[2], dtype=torch.float64)[0]
    lam = (math.pi * torch.arange(16, dtype=torch.float64) / 2) ** 2
    coeff = scipy.fft.dctn(u0.numpy(), type=2) * torch.exp(-0.1 * 1.5 * (lam[:, None] + lam)).numpy()
    ref = torch.from_numpy(scipy.fft.idctn(coeff, type=2))
    assert torch.allclose(solvers.solve_heat(u0[None], [1.5])[0, 0, ..., 0], ref, atol=1e-12)


def test_wave_single_mode_and_energy():
    n, c = 32, 1.0 / 16
    xy = solvers.planar_coords(n, low=-1.0, high=1.0, cell_centred=False).double()
    k = torch.tensor([3 * math.pi, 2 * math.pi], dtype=torch.float64)  # modes (3, 2) of period 2
    u0 = torch.cos(k[0] * xy[..., 0] + k[1] * xy[..., 1])
    t = torch.tensor([0.0, 1.0, 10.0, 40.0], dtype=torch.float64)
    out = solvers.solve_wave(u0[None], torch.zeros_like(u0)[None], t, speed=c)  # (1, T, H, W, 2)
    omega = c * k.norm()
    exact_u = torch.cos(omega * t)[:, None, None] * u0
    exact_v = -omega * torch.sin(omega * t)[:, None, None] * u0
    assert ((out[0, ..., 0] - exact_u).norm() / exact_u.norm()) < 1e-6
    assert ((out[0, 1:, ..., 1] - exact_v[1:]).norm() / exact_v[1:].norm()) < 1e-6
    # Energy 1/2 sum(v^2 + c^2 |grad u|^2) of a bump, gradients by FFT: conserved.
    bump = solvers.wave_bump(n, [7])
    frames = solvers.solve_wave(bump, torch.zeros_like(bump), torch.linspace(0, 40, 9), speed=c)[0]
    kk = math.pi * torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    u_h = torch.fft.fft2(frames[..., 0])
    grad2 = (torch.fft.ifft2(1j * kk[:, None] * u_h).real ** 2 + torch.fft.ifft2(1j * kk * u_h).real ** 2)
    energy = 0.5 * (frames[..., 1] ** 2 + c**2 * grad2).sum(dim=(1, 2))  # (T,)
    assert (energy / energy[0] - 1).abs().max() < 1e-10


def test_navier_stokes_taylor_green_exact_decay():
    n, nu, k = 32, 1e-2, 2 * math.pi * 2
    xy = solvers.planar_coords(n, low=0.0, high=1.0, cell_centred=False).double()
    w0 = torch.sin(k * xy[..., 0]) * torch.sin(k * xy[..., 1])  # steady Euler flow: u.grad w = 0
    out = solvers.solve_navier_stokes(w0[None], [0.5, 1.0], viscosity=nu)
    exact = w0 * math.exp(-nu * 2 * k**2 * 1.0)
    assert ((out[0, -1, ..., 0] - exact).norm() / exact.norm()) < 1e-6


def test_navier_stokes_fourth_order_in_dt_on_forced_grf():
    n = 16
    w0 = 5 * grf.sample_grf(n, seeds=[0, 1], dtype=torch.float64)  # strong enough to be nonlinear
    f = solvers.ns_forcing(n)
    run = lambda dt: solvers.solve_navier_stokes(w0, [0.5], forcing=f, dt=dt)[:, -1]
    fine = run(1 / 160)
    errors = [((run(dt) - fine).norm() / fine.norm()).item() for dt in (1 / 10, 1 / 20, 1 / 40)]
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(3.5 < p < 4.5 for p in orders), (errors, orders)


def test_navier_stokes_refuses_unstable_step_and_adapts():
    w0 = 20 * grf.sample_grf(16, seeds=[3], dtype=torch.float64)
    with pytest.raises(ValueError, match="dt=0.5"):
        solvers.solve_navier_stokes(w0, [0.5], dt=0.5)
    out = solvers.solve_navier_stokes(w0, [0.25, 0.5])  # Courant-bounded steps: finite
    assert torch.isfinite(out).all() and out[0, -1].abs().max() < 2 * w0.abs().max()
    # A trajectory's result does not depend on the batch it is solved in (own step count).
    both = solvers.solve_navier_stokes(torch.cat([w0, 0.1 * w0]), [0.25, 0.5])
    assert torch.allclose(both[:1], out, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="non-decreasing"):
        solvers.solve_navier_stokes(w0, [1.0, 0.5])


def test_resample_is_exact_spectral_interpolation():
    # Periodic: a trigonometric polynomial is reproduced on finer and nested coarser grids.
    f = lambda xy: torch.sin(2 * math.pi * 3 * xy[..., 0]) * torch.cos(2 * math.pi * 5 * xy[..., 1] + 0.3)
    grid = lambda n: solvers.planar_coords(n, low=0.0, high=1.0, cell_centred=False).double()
    frames = f(grid(32))[None, ..., None]  # (1, H, W, 1)
    for m in (16, 48, 64):
        assert torch.allclose(solvers.resample(frames, m, periodic=True)[0, ..., 0], f(grid(m)), atol=1e-12)
    # Cell-centred cosine series on [-1, 1]: reproduced on any other cell-centred grid.
    g = lambda xy: torch.cos(math.pi * 4 * (xy[..., 0] + 1) / 2) * torch.cos(math.pi * 7 * (xy[..., 1] + 1) / 2)
    cells = lambda n: solvers.planar_coords(n, low=-1.0, high=1.0, cell_centred=True).double()
    frames = g(cells(24))[None, ..., None]
    for m in (16, 40):
        assert torch.allclose(solvers.resample(frames, m, periodic=False)[0, ..., 0], g(cells(m)), atol=1e-12)


def test_load_dataset_layout_cache_prefix_and_resolutions(tmp_path, capsys):
    d = str(tmp_path)
    data = solvers.load_dataset("heat", "test", data_dir=d, n_trajectories=2)
    assert data.frames.shape == (4, 20, 64, 64, 1) and data.frames.dtype == torch.float32
    assert data.coords.shape == (64, 64, 2) and data.mask is None and data.n_in_t == 10
    assert torch.equal(data.trajectory, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(data.t, 0.25 * torch.arange(20.0))
    assert "generating heat test" in capsys.readouterr().out
    # Window 1 continues window 0 (frame 20 of the trajectory = frame 0 of window 1, t = 5).
    full = solvers.solve_heat(grf.sample_grf(64, seeds=[2**31 - 1]), [5.0])[0, 0]
    assert torch.allclose(data.frames[1, 0], full, atol=1e-5)
    start = time.perf_counter()
    again = solvers.load_dataset("heat", "test", data_dir=d, n_trajectories=2)
    assert time.perf_counter() - start < 1.0 and torch.equal(again.frames, data.frames)
    assert "generating" not in capsys.readouterr().out
    first = solvers.load_dataset("heat", "test", data_dir=d, n_trajectories=1, verbose=False)
    assert torch.equal(first.frames, data.frames[:2])  # smaller sets are prefixes
    # A truncated cache file is detected and rebuilt.
    path = [os.path.join(d, f) for f in os.listdir(d) if f.startswith("heat-test-64px-2traj")][0]
    with open(path, "r+b") as fh:
        fh.truncate(1000)
    rebuilt = solvers.load_dataset("heat", "test", data_dir=d, n_trajectories=2)
    assert "unusable" in capsys.readouterr().out and torch.equal(rebuilt.frames, data.frames)
    # Other resolutions hold the same fields: 128 -> 64 by the cosine series gives the 64 set back.
    fine = solvers.load_dataset("heat", "test", data_dir=d, n_trajectories=1, size=128, verbose=False)
    assert fine.frames.shape[2:4] == (128, 128)
    assert torch.allclose(solvers.resample(fine.frames, 64, periodic=False), first.frames, atol=1e-4)
    assert not any(f.endswith(".tmp") or ".tmp" in f for f in os.listdir(d))


def test_load_dataset_wave_nested_grid_and_errors(tmp_path):
    d = str(tmp_path)
    w64 = solvers.load_dataset("wave", "test", data_dir=d, n_trajectories=1, verbose=False)
    w32 = solvers.load_dataset("wave", "test", data_dir=d, n_trajectories=1, size=32, verbose=False)
    assert w64.frames.shape == (8, 20, 64, 64, 2)
    assert torch.allclose(w32.frames, w64.frames[:, :, ::2, ::2], atol=1e-4)  # same points, same values
    assert torch.allclose(w32.coords, w64.coords[::2, ::2])
    # Train and test differ (disjoint seeds).
    train = solvers.load_dataset("wave", "train", data_dir=d, n_trajectories=1, size=32, verbose=False)
    assert not torch.allclose(train.frames[0, 0], w32.frames[0, 0])
    with pytest.raises(ValueError, match="shallow-water"):
        solvers.load_dataset("shallow-water", "train", data_dir=d)
    with pytest.raises(ValueError, match="unknown pde 'burgers'"):
        solvers.load_dataset("burgers", "train", data_dir=d)
    with pytest.raises(ValueError, match="n_trajectories"):
        solvers.load_dataset("wave", "test", data_dir=d, n_trajectories=5)
    with pytest.raises(ValueError, match="split"):
        solvers.load_dataset("wave", "valid", data_dir=d)


@pytest.mark.slow
def test_bench_navier_stokes_beats_official_scheme():
    r = solvers.bench_navier_stokes(batch=8, span=2.0)
    print(r)
    assert r["speedup"] >= 5 and r["ours_err"] < r["official_err"]
