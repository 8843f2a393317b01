"""pytest checks of dino against exact solutions and invariants (fast: tiny grids)."""

# ---- shallow water on the sphere
import math

import numpy as np
import pytest
import torch
from scipy.special import factorial, lpmv

from solvers import (SPHERE_GRAVITY, SPHERE_HYPERDIFFUSION, SPHERE_RADIUS, SphereShallowWater, SphereTransform,
                     latitude_mask, shallow_water_trajectories, sphere_coords, sphere_galewsky_state,
                     sphere_legendre, sphere_williamson2_state)


@pytest.fixture(autouse=False)
def sphere_one_thread():
    # The sphere tests run many tiny batched matmuls; on a busy 2-core machine two OpenMP threads make
    # them ~100x slower (threads wait on each other), so these tests run on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_band_limited(lmax, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.complex(torch.randn(n, lmax + 1, lmax + 1, generator=g, dtype=torch.float64),
                      torch.randn(n, lmax + 1, lmax + 1, generator=g, dtype=torch.float64))
    c[:, 0] = c[:, 0].real                                         # m = 0 coefficients of a real field
    return c * (torch.arange(lmax + 1)[None, :] >= torch.arange(lmax + 1)[:, None])


@pytest.mark.usefixtures("sphere_one_thread")
def test_sphere_legendre_matches_scipy():
    mu = np.linspace(-0.99, 0.99, 11)
    P, H = sphere_legendre(20, mu)
    for l, m in [(0, 0), (5, 0), (7, 3), (20, 20), (20, 11)]:
        norm = math.sqrt((2 * l + 1) / 2 * factorial(l - m) / factorial(l + m)) * (-1) ** m
        np.testing.assert_allclose(P[m, l], norm * lpmv(m, l, mu), rtol=1e-11, atol=1e-13)
        h = 1e-6                                                   # H = (1 - mu^2) dP/dmu, by differences
        fd = (sphere_legendre(20, mu + h)[0][m, l] - sphere_legendre(20, mu - h)[0][m, l]) / (2 * h)
        np.testing.assert_allclose(H[m, l], (1 - mu**2) * fd, atol=1e-7)


@pytest.mark.usefixtures("sphere_one_thread")
def test_sphere_transform_round_trips_band_limited_fields():
    T = SphereTransform(23, 24)
    c = _random_band_limited(23, 3)
    assert (T.to_spec(T.to_grid(c)) - c).abs().max() < 1e-12 * c.abs().max()
    vort, div = _random_band_limited(23, 2, seed=1), _random_band_limited(23, 2, seed=2)
    vort[:, 0, 0] = div[:, 0, 0] = 0                               # a velocity has no l = 0 curl or divergence
    u, v = T.velocity(vort, div)
    curl2, div2 = T.curl_div(u, v)
    assert (curl2 - vort).abs().max() < 1e-12 * vort.abs().max()
    assert (div2 - div).abs().max() < 1e-12 * div.abs().max()


@pytest.mark.parametrize("l, m, field", [
    (4, 0, lambda lat, lon: 35 * torch.sin(lat)**4 - 30 * torch.sin(lat)**2 + 3 + 0 * lon),
    (2, 1, lambda lat, lon: torch.sin(lat) * torch.cos(lat) * torch.cos(lon)),
    (3, 2, lambda lat, lon: torch.cos(lat)**2 * torch.sin(lat) * torch.sin(2 * lon)),
])
@pytest.mark.usefixtures("sphere_one_thread")
def test_sphere_laplacian_of_harmonic(l, m, field):
    # Lap Y = div grad Y with grad Y by automatic differentiation on the grid: checks the vector
    # transforms (both directions) against the eigenvalue -l(l+1)/R^2 the solver uses.
    T, R = SphereTransform(15, 16), SPHERE_RADIUS
    lat = torch.asin(T.mu)[:, None].expand(-1, T.nlon).clone().requires_grad_()
    lon = T.lon[None, :].expand(T.nlat, -1).clone().requires_grad_()
    y = field(lat, lon)                                            # (nlat, nlon) Y_l^m up to a constant
    dlat, dlon = torch.autograd.grad(y.sum(), [lat, lon])
    y, u, v = y.detach(), dlon / (R * torch.cos(lat.detach())), dlat / R     # grad Y, eastward / northward
    c = T.to_spec(y)
    assert (c.abs() > 1e-12 * c.abs().max()).sum() == 1 and c[m, l].abs() > 0
    curl, div = T.curl_div(u, v, R)
    torch.testing.assert_close(div, -l * (l + 1) / R**2 * c, rtol=0, atol=1e-12 * c.abs().max() / R**2)
    assert curl.abs().max() < 1e-12 * c.abs().max() / R**2
    u2, v2 = T.velocity(torch.zeros_like(c), div, R)
    torch.testing.assert_close(u2, u, rtol=0, atol=1e-12 * u.abs().max())
    torch.testing.assert_close(v2, v, rtol=0, atol=1e-12 * v.abs().max())


@pytest.mark.parametrize("alpha", [0.0, 0.7])
@pytest.mark.usefixtures("sphere_one_thread")
def test_sphere_williamson2_stays_steady(alpha):
    # alpha != 0 tilts the rotation axis: f is then a full 2-D field and v != 0
    kw = dict(dt=1800.0, mean_depth=2.94e4 / SPHERE_GRAVITY, coriolis_tilt=alpha)
    for nu, tol in [(0.0, 1e-12), (SPHERE_HYPERDIFFUSION, 1e-5)]:
        s = SphereShallowWater(16, hyperdiffusion=nu, **kw)
        x0 = sphere_williamson2_state(s, alpha=alpha)
        x = s.advance(x0, 48)                                      # one day
        h0, h1 = s.height(x0) + s.mean_depth, s.height(x) + s.mean_depth
        assert ((h1 - h0).norm() / h0.norm()) < tol
        assert ((s.vorticity(x) - s.vorticity(x0)).norm() / s.vorticity(x0).norm()) < tol * 10
    wrong = SphereShallowWater(16, hyperdiffusion=0.0, dt=1800.0, mean_depth=2.94e4 / SPHERE_GRAVITY)
    x0 = sphere_williamson2_state(wrong, alpha=0.7)                # axis mismatch must NOT be steady
    assert ((wrong.height(wrong.advance(x0, 12)) - wrong.height(x0)).norm() / wrong.height(x0).norm()) > 1e-3


@pytest.mark.usefixtures("sphere_one_thread")
def test_sphere_galewsky_balance_mass_and_energy():
    s = SphereShallowWater(32, dt=1800.0, hyperdiffusion=0.0)
    jet = sphere_galewsky_state(s, u_max=[60.0, 80.0], bump=None, mirror=True)
    assert (s.tendency(jet) + s.linear(jet))[:, 1].abs().max() < 1e-12 * s.lap.max() * 9.8 * jet[:, 2].abs().max()
    assert jet[:, 2, 0, 0].abs().max() == 0                       # mean height deviation zero
    x = sphere_galewsky_state(s, u_max=[60.0, 80.0], bump="galewsky", mirror=True)
    m0, e0 = s.mass(x), s.energy(x)
    quad = (s.grid.to_grid(x[:, 2]).mean(-1) * s.grid.weights).sum(-1) * 2 * math.pi * SPHERE_RADIUS**2
    torch.testing.assert_close(m0 - 4 * math.pi * SPHERE_RADIUS**2 * s.mean_depth, quad, rtol=1e-10, atol=0)
    x = s.advance(x, 24)                                           # 12 hours, no dissipation
    assert ((s.mass(x) - m0).abs() / m0).max() <= 1e-12
    drift_inviscid = ((s.energy(x) - e0).abs() / e0).max()    # spectral truncation only: ~1e-5
    assert drift_inviscid < 3e-5
    damped = SphereShallowWater(32, dt=1800.0)                     # Dedalus's hyperdiffusion: energy only falls
    x, energies = sphere_galewsky_state(damped, u_max=[60.0, 80.0], bump="galewsky", mirror=True), []
    for _ in range(7):
        energies.append(damped.energy(x))
        x = damped.advance(x, 4)
    drops = torch.stack(energies).diff(dim=0)                      # (6, B) per 2 hours
    assert (drops < 0).all() and (-drops.sum(0) / e0).min() > 100 * drift_inviscid
    assert ((damped.mass(x) - m0).abs() / m0).max() <= 1e-12


@pytest.mark.usefixtures("sphere_one_thread")
def test_sphere_imex_time_stepping_is_second_order():
    def run(dt):
        s = SphereShallowWater(16, dt=dt)
        return s.vorticity(s.advance(sphere_galewsky_state(s, bump="galewsky"), int(21600 / dt)))
    ref, coarse, fine = run(225.0), run(1800.0), run(900.0)
    ratio = (coarse - ref).norm() / (fine - ref).norm()
    assert 3.0 < ratio < 5.5


@pytest.mark.usefixtures("sphere_one_thread")
def test_shallow_water_dataset_seeds_grids_and_mask():
    kw = dict(sim_nlat=16, hours=(2, 4), verbose=False)
    pair = shallow_water_trajectories("train", [3, 5], size=16, **kw)
    assert pair.shape == (2, 2, 16, 32, 2) and pair.dtype == torch.float32 and torch.isfinite(pair).all()
    alone = shallow_water_trajectories("train", [5], size=16, **{**kw, "verbose": True})
    torch.testing.assert_close(alone[0], pair[1], rtol=0, atol=1e-5)          # depends on (split, index) only
    test = shallow_water_trajectories("test", [3], size=16, **kw)
    assert (test[0] - pair[0]).abs().max() > 1e-3                            # disjoint seeds
    coarse = shallow_water_trajectories("train", [3], size=8, **kw)
    torch.testing.assert_close(coarse[0], pair[0, :, ::2, ::2], rtol=0, atol=1e-5)   # every other point
    xyz = sphere_coords(16, 32)
    assert xyz.shape == (16, 32, 3) and torch.allclose(xyz.norm(dim=-1), torch.ones(16, 32))
    torch.testing.assert_close(sphere_coords(8, 16), xyz[::2, ::2])
    mask = latitude_mask(64, 128)
    kept = mask.sum(1).float()                                   # (nlat,) about nlon cos(lat) per latitude
    cos_lat = torch.sqrt(1 - sphere_coords(64, 128)[:, 0, 2].double() ** 2)
    assert mask.shape == (64, 128) and ((kept - 128 * cos_lat).abs() <= 1.5).all()
    with pytest.raises(ValueError, match="split"):
        shallow_water_trajectories("valid", [0], **kw)
    with pytest.raises(ValueError, match="nlat dividing"):
        sphere_coords(48, 96)


@pytest.mark.slow
@pytest.mark.usefixtures("sphere_one_thread")
def test_sphere_galewsky_t127_rolls_up():
    # Full size (256x128, dt 600 s, Dedalus's settings, ~2 min): the jet stays zonal for about 3 days,
    # then barotropic instability rolls it up at 30-60 N by day 6; mass exact, energy only falls.
    s = SphereShallowWater(128, dt=600.0)
    x = sphere_galewsky_state(s, bump="dedalus")
    m0, e0 = s.mass(x), s.energy(x)
    nonzonal = []
    for day in range(6):
        x = s.advance(x, 144)
        north = s.vorticity(x)[0, :64]
        nonzonal.append(((north - north.mean(-1, keepdim=True)).norm() / north.norm()).item())
        print(f"day {day + 1}: non-zonal fraction of northern vorticity {nonzonal[-1]:.3f}")
    mass_drift, energy_change = ((s.mass(x) - m0) / m0).item(), ((s.energy(x) - e0) / e0).item()
    print(f"6 days: relative mass change {mass_drift:.1e}, relative energy change {energy_change:.2e}")
    assert nonzonal[2] < 0.2 and nonzonal[5] > 0.5
    assert abs(mass_drift) <= 1e-12
    assert (s.energy(x) < e0).all()
