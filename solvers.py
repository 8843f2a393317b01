"""Our own PDE solvers and the datasets DINo trains on (heat, wave, Navier-Stokes).

DINo (Yin, Kirchmeyer et al., ICLR 2023), Sec. 5 "Experiments" and the appendix on datasets. The
official code makes its data with py-pde (wave; the tutorial's heat) and FNO's Crank-Nicolson +
Euler script (Navier-Stokes). We replace both with solvers that are exact in time where the PDE is
linear and fourth order where it is not, all in torch, batched, on any device and dtype.

Layout. Every solver takes a batch of initial states (B, H, W) and output times t (T,) (the initial
state sits at time 0) and returns frames CHANNELS LAST, (B, T, H, W, S). This is a deliberate
contract choice: solvers, datasets (windows, T, H, W, S) and the model (B, T, N, S) all share one
layout, so a frame flattens to points with a reshape and never needs a permute. Grid axis 0 (H) is
x, axis 1 (W) is y.

1. Heat, du/dt = k Lap u on [-1, 1]^2 with zero-flux walls, cell-centred grid. The cosine series
   of the grid values (DCT-II) diagonalises the Neumann Laplacian, so u(t) = IDCT(exp(-k lam t)
   DCT(u0)) with the continuous eigenvalues lam: exact in time and spectral in space.
2. Wave, d2u/dt2 = c^2 Lap u on the periodic [-1, 1)^2, state (u, du/dt): exact in time, mode by
   mode in Fourier space (a rotation of (u_k, du_k/dt) at frequency c|k|).
3. Navier-Stokes, vorticity form on the periodic [0, 1)^2:
       dw/dt + u . grad w = nu Lap w + f,   u = (d psi/dy, -d psi/dx),   -Lap psi = w,
   pseudo-spectral with 2/3 de-aliasing; integrating-factor RK4 (Lawson): viscosity exact, the
   advection and forcing fourth order, a per-trajectory step from a Courant bound. An unstable
   step is never taken silently: it is retried with half the step, or refused with an error.

Datasets (load_dataset) follow the paper's table; a trajectory depends only on (split, index),
train and test seeds are disjoint, and the sets are cached on disk. Other grid sizes: a trajectory
is always simulated at the paper's size (64) and then evaluated on the requested grid through its
own spectral interpolant (cosine series for heat, Fourier series for wave and Navier-Stokes), so
a 32x32 or 128x128 test set holds the same fields as the 64x64 one, point for point.

Use:
    from solvers import load_dataset
    data = load_dataset("navier-stokes", "train")     # PDEData, frames (512, 20, 64, 64, 1)
    python solvers.py heat --split test --size 128      # build (or load) one set, print a summary
    python solvers.py --bench                           # speed and accuracy against the references
"""
import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from grf import sample_grf

PDES = ("heat", "wave", "navier-stokes", "shallow-water")


# ---------------------------------------------------------------------------- grids
def planar_coords(size, *, low, high, cell_centred):
    """(size, size, 2) physical positions (x along H, y along W) of a square grid on [low, high)."""
    h = (high - low) / size
    x = low + h * (torch.arange(size, dtype=torch.float64) + (0.5 if cell_centred else 0.0))
    return torch.stack(torch.meshgrid(x, x, indexing="ij"), dim=-1)  # (H, W, 2)


def cosine_resample_matrix(n_in, n_out, *, dtype=torch.float64, device="cpu"):
    """(n_out, n_in) matrix evaluating the cosine series (DCT-II) of n_in cell-centred values at
    n_out cell centres of the same interval. Identity when n_out == n_in."""
    m = torch.arange(n_in, dtype=torch.float64)
    s_in = (torch.arange(n_in, dtype=torch.float64) + 0.5) / n_in  # cell centres in [0, 1]
    s_out = (torch.arange(n_out, dtype=torch.float64) + 0.5) / n_out
    dct = torch.cos(math.pi * m[:, None] * s_in[None, :])  # (m, i) DCT-II analysis
    weight = torch.full((n_in,), 2.0 / n_in, dtype=torch.float64)
    weight[0] = 1.0 / n_in  # synthesis weights of the inverse DCT-II
    synth = torch.cos(math.pi * s_out[:, None] * m[None, :]) * weight  # (j, m)
    return (synth @ dct).to(dtype=dtype, device=device)


def fourier_resample_matrix(n_in, n_out, *, dtype=torch.float64, device="cpu"):
    """(n_out, n_in) matrix evaluating the trigonometric interpolant of n_in periodic samples at
    n_out equispaced points of the same period (n_in even; the Nyquist mode is split evenly so the
    interpolant is real). Zero-padding the FFT when finer, exact subsampling when nested."""
    if n_in % 2:
        raise ValueError(f"periodic resampling needs an even source size, got {n_in}")
    s = (torch.arange(n_out, dtype=torch.float64)[:, None] / n_out
         - torch.arange(n_in, dtype=torch.float64)[None, :] / n_in)  # (j, i) offsets / period
    k = torch.arange(1, n_in // 2, dtype=torch.float64)
    kernel = 1 + 2 * torch.cos(2 * math.pi * k * s[..., None]).sum(-1) + torch.cos(math.pi * n_in * s)
    return (kernel / n_in).to(dtype=dtype, device=device)


def resample(frames, size, *, periodic):
    """Evaluate (..., H, W, S) grid frames on a size x size grid of the same domain via their
    spectral interpolant (Fourier if periodic, else cosine for cell-centred Neumann grids)."""
    make = fourier_resample_matrix if periodic else cosine_resample_matrix
    h, w = frames.shape[-3], frames.shape[-2]
    if (h, w) == (size, size):
        return frames
    r_h = make(h, size, dtype=frames.dtype, device=frames.device)  # (size, H)
    r_w = make(w, size, dtype=frames.dtype, device=frames.device)  # (size, W)
    return torch.einsum("ih,...hws,jw->...ijs", r_h, frames, r_w)


# ---------------------------------------------------------------------------- heat
def solve_heat(u0, t, *, diffusivity=0.1, length=2.0):
    """du/dt = k Lap u on a square of side `length`, zero-flux walls, cell-centred grid.

    u0 (B, H, W), t (T,) -> (B, T, H, W, 1). Exact in time; spectral in space: the grid values
    define a cosine series sum a_mn cos(pi m s_x) cos(pi n s_y) (s in [0, 1] across the box), each
    term an eigenfunction of the Neumann Laplacian with eigenvalue -(pi/length)^2 (m^2 + n^2).
    The DCT-II is a dense cosine matrix here: exact, any device and dtype with torch alone (torch
    has no DCT), and for grids of a few hundred points a matmul is as fast as an FFT.
    """
    b, h, w = u0.shape
    opts = dict(dtype=u0.dtype, device=u0.device)
    t = torch.as_tensor(t, **opts)

    def dct_matrix(n):  # (m, i) = cos(pi m (i + 1/2) / n)
        m = torch.arange(n, **opts)
        return torch.cos(math.pi * m[:, None] * (m[None, :] + 0.5) / n)

    d_h, d_w = dct_matrix(h), dct_matrix(w)
    coeff = d_h @ u0 @ d_w.T  # (B, H, W) cosine coefficients a_mn (unnormalised DCT-II)
    lam_h = (math.pi * torch.arange(h, **opts) / length) ** 2  # (H,)
    lam_w = (math.pi * torch.arange(w, **opts) / length) ** 2  # (W,)
    decay = torch.exp(-diffusivity * t[:, None, None] * (lam_h[:, None] + lam_w[None, :]))  # (T, H, W)
    # Inverse DCT-II = transposed matrix with weights 1/n (mode 0) and 2/n (others).
    w_h = torch.full((h,), 2.0 / h, **opts); w_h[0] = 1.0 / h
    w_w = torch.full((w,), 2.0 / w, **opts); w_w[0] = 1.0 / w
    coeff = coeff * w_h[:, None] * w_w[None, :]
    u = d_h.T @ (coeff[:, None] * decay) @ d_w  # (B, T, H, W)
    return u.unsqueeze(-1)  # (B, T, H, W, 1)


# ---------------------------------------------------------------------------- wave
def solve_wave(u0, v0, t, *, speed=1.0 / 16, length=2.0):
    """d2u/dt2 = c^2 Lap u on the periodic square [0, length)^2, state (u, v = du/dt).

    u0, v0 (B, H, W), t (T,) -> (B, T, H, W, 2) with channels (u, du/dt). Exact in time: each
    Fourier mode with wavenumber |k| turns (u_k, v_k) at the frequency omega = c|k|:
        u_k(t) = u_k cos(omega t) + v_k sin(omega t) / omega,  v_k(t) = -omega u_k sin(omega t) + v_k cos(omega t)
    (omega = 0: u_k + v_k t). Spectral in space, so the energy 1/2 int v^2 + c^2 |grad u|^2 is
    conserved to rounding.
    """
    b, h, w = u0.shape
    opts = dict(dtype=u0.dtype, device=u0.device)
    t = torch.as_tensor(t, **opts)[:, None, None]  # (T, 1, 1)
    k_x = 2 * math.pi / length * torch.fft.fftfreq(h, d=1.0 / h, **opts)[:, None]
    k_y = 2 * math.pi / length * torch.fft.rfftfreq(w, d=1.0 / w, **opts)[None, :]
    omega = speed * torch.sqrt(k_x**2 + k_y**2)  # (H, W//2+1)
    cos, sin = torch.cos(omega * t), torch.sin(omega * t)  # (T, H, W//2+1)
    # sin(omega t) / omega, with its limit t at omega = 0 (the mean mode drifts with mean velocity)
    sinc = torch.where(omega > 0, sin / omega.clamp_min(1e-300), t.expand_as(sin))
    u_h, v_h = torch.fft.rfft2(u0)[:, None], torch.fft.rfft2(v0)[:, None]  # (B, 1, H, W//2+1)
    u_t = torch.fft.irfft2(u_h * cos + v_h * sinc, s=(h, w))  # (B, T, H, W)
    v_t = torch.fft.irfft2(-omega * sin * u_h + v_h * cos, s=(h, w))
    return torch.stack([u_t, v_t], dim=-1)  # (B, T, H, W, 2)


# ---------------------------------------------------------------------------- Navier-Stokes
@dataclass
class SpectralOps:
    """Fourier multipliers of an rfft2 grid on the unit torus, shared by the NS time steppers."""
    lap: torch.Tensor      # (H, W//2+1) |k|^2 (angular k = 2 pi * integer), 1 at k = 0
    to_fields: torch.Tensor  # (4, H, W//2+1) w_h -> (u, v, dw/dx, dw/dy) in Fourier space
    dealias: torch.Tensor  # (H, W//2+1) bool: 2/3 rule, keeps |k_i| <= (2/3)(n/2)
    k_max: float           # largest de-aliased |k|, turns max(|u| + |v|) into a Courant rate
    shape: tuple


def spectral_ops(h, w, *, dtype, device):
    kx_int = torch.fft.fftfreq(h, d=1.0 / h, dtype=dtype, device=device)[:, None]  # (H, 1)
    ky_int = torch.fft.rfftfreq(w, d=1.0 / w, dtype=dtype, device=device)[None, :]  # (1, W//2+1)
    k_x, k_y = 2 * math.pi * kx_int, 2 * math.pi * ky_int
    lap = k_x**2 + k_y**2
    lap[0, 0] = 1.0  # psi's mean is arbitrary; w has no mean mode in the Poisson solve, so psi_0 = 0
    # -Lap psi = w  =>  psi_h = w_h / |k|^2;  u = d psi/dy, v = -d psi/dx, plus grad w.
    to_fields = torch.stack(torch.broadcast_tensors(1j * k_y / lap, -1j * k_x / lap, 1j * k_x, 1j * k_y))
    # 2/3 rule: products of two fields with |k_i| <= n/3 alias only onto modes above n/3, removed.
    dealias = (kx_int.abs() <= (2.0 / 3.0) * (h // 2)) & (ky_int.abs() <= (2.0 / 3.0) * (w // 2))
    k_max = 2 * math.pi * (2.0 / 3.0) * max(h // 2, w // 2)
    return SpectralOps(lap=lap, to_fields=to_fields, dealias=dealias, k_max=k_max, shape=(h, w))


def ns_forcing(size, *, amplitude=0.1, dtype=torch.float64, device="cpu"):
    """The paper's forcing 0.1 (sin 2pi(x+y) + cos 2pi(x+y)) on the n x n grid of [0, 1)^2."""
    xy = planar_coords(size, low=0.0, high=1.0, cell_centred=False).to(dtype=dtype, device=device)
    phase = 2 * math.pi * (xy[..., 0] + xy[..., 1])
    return amplitude * (torch.sin(phase) + torch.cos(phase))  # (H, W)


def ns_advection(w_h, ops, *, with_rate=False):
    """-u . grad w in Fourier space, de-aliased: w_h (B, H, W//2+1) -> (B, H, W//2+1).

    with_rate=True also returns the Courant rate max(|u| + |v|) * k_max per trajectory (B,)."""
    u, v, w_x, w_y = torch.fft.irfft2(w_h[:, None] * ops.to_fields, s=ops.shape).unbind(1)  # (B, H, W) each
    adv_h = -torch.fft.rfft2(u * w_x + v * w_y) * ops.dealias
    if not with_rate:
        return adv_h
    return adv_h, (u.abs() + v.abs()).amax(dim=(-2, -1)) * ops.k_max


def _ifrk4_step(w_h, dt, ops, *, viscosity, f_h):
    """One Lawson integrating-factor RK4 step of w_h' = -nu |k|^2 w_h + N(w_h); dt (B, 1, 1).

    With E = exp(-nu |k|^2 dt / 2) the substitution v = exp(nu |k|^2 t) w_h removes the stiff term
    and classical RK4 is applied to v: fourth order, viscosity exact (any |k| is stable)."""
    e = torch.exp(-viscosity * ops.lap * dt / 2)  # (B, H, W//2+1), half-step factor
    e[..., 0, 0] = 1.0  # lap holds 1 at k = 0 only for the Poisson solve; the mean does not decay
    n1, rate = ns_advection(w_h, ops, with_rate=True)
    n1 = n1 + f_h
    n2 = ns_advection(e * (w_h + dt / 2 * n1), ops) + f_h
    n3 = ns_advection(e * w_h + dt / 2 * n2, ops) + f_h
    n4 = ns_advection(e * e * w_h + dt * e * n3, ops) + f_h
    w_new = e * e * w_h + dt / 6 * (e * e * n1 + 2 * e * (n2 + n3) + n4)
    return w_new, rate * dt[:, 0, 0]  # new state, Courant number at the start of the step (B,)


def solve_navier_stokes(w0, t, *, viscosity=1e-3, forcing=None, dt=None, cfl=2.0, max_cfl=2.6,
                        max_halvings=4):
    """2D incompressible Navier-Stokes (vorticity) on the periodic [0, 1)^2, pseudo-spectral.

    w0 (B, H, W) vorticity, t (T,) non-decreasing output times >= 0 -> (B, T, H, W, 1).
    forcing: (H, W) tensor or None (= no forcing; use ns_forcing(n) for the paper's).
    Time step: dt=None picks, per trajectory and per output interval, the largest step with
    Courant number dt * max(|u| + |v|) * k_max <= cfl (k_max the largest de-aliased wavenumber;
    RK4 is stable up to 2.83 on the imaginary axis). If a step then exceeds max_cfl or produces a
    non-finite value, that trajectory's interval is redone with half the step (up to max_halvings
    times) before a RuntimeError. A fixed dt (for convergence studies) is refused with a
    ValueError when it exceeds max_cfl. Each trajectory's steps depend on it alone, so a
    trajectory does not change with the batch it is computed in.
    Order: 4 in time (Lawson IF-RK4), spectral in space.
    """
    b, h, w = w0.shape
    opts = dict(dtype=w0.dtype, device=w0.device)
    if not torch.isfinite(w0).all():
        raise ValueError("w0 holds non-finite values")
    t = torch.as_tensor(t, dtype=torch.float64).tolist()
    if any(b_ < a_ for a_, b_ in zip([0.0] + t, t)):
        raise ValueError(f"output times must be >= 0 and non-decreasing, got {t}")
    if dt is not None and dt <= 0:
        raise ValueError(f"dt must be positive or None, got {dt}")
    ops = spectral_ops(h, w, **opts)
    f_h = torch.zeros(h, w // 2 + 1, dtype=torch.fft.rfft2(w0[:1]).dtype, device=w0.device)
    if forcing is not None:
        f_h = torch.fft.rfft2(torch.as_tensor(forcing, **opts))
    w_h, now, frames = torch.fft.rfft2(w0), 0.0, []
    for target in t:
        span = target - now
        if span > 0:
            w_h = _ns_interval(w_h, span, ops, viscosity=viscosity, f_h=f_h, dt=dt, cfl=cfl,
                               max_cfl=max_cfl, max_halvings=max_halvings)
        now = target
        frames.append(torch.fft.irfft2(w_h, s=(h, w)))
    return torch.stack(frames, dim=1).unsqueeze(-1)  # (B, T, H, W, 1)


def _ns_interval(w_h, span, ops, *, viscosity, f_h, dt, cfl, max_cfl, max_halvings):
    """Advance every trajectory by `span`, each with its own number of equal steps."""
    b = w_h.shape[0]
    if dt is None:  # per-trajectory Courant bound from the state at the start of the interval
        rate = ns_advection(w_h, ops, with_rate=True)[1]  # (B,)
        steps = torch.ceil(span * rate / cfl).clamp_min(1)
    else:
        steps = torch.full((b,), math.ceil(span / dt - 1e-9), dtype=torch.float64)
    steps = steps.to(torch.float64).cpu()
    for attempt in range(max_halvings + 1):
        steps_dev = steps.to(w_h.device)
        dt_b = (span / steps_dev).to(ops.lap.dtype)[:, None, None]  # (B, 1, 1) own step each
        state, worst = w_h, torch.zeros(b, dtype=ops.lap.dtype, device=w_h.device)
        for i in range(int(steps.max())):
            active = i < steps_dev  # (B,) trajectories still stepping
            new, courant = _ifrk4_step(state, dt_b, ops, viscosity=viscosity, f_h=f_h)
            state = torch.where(active[:, None, None], new, state)
            worst = torch.maximum(worst, torch.where(active, courant, 0.0))  # NaN propagates
        bad = ~(worst <= max_cfl) | ~torch.isfinite(state).all(dim=(-2, -1))  # (B,) on device
        bad = bad.cpu()
        if not bad.any():
            return state
        if dt is not None:
            raise ValueError(f"dt={dt} is unstable here: Courant number {worst.max():.2f} > "
                             f"max_cfl={max_cfl} (or non-finite values); use a smaller dt or dt=None")
        steps = torch.where(bad, 2 * steps, steps)  # only the failing trajectories change
    raise RuntimeError(f"Navier-Stokes step still unstable after {max_halvings} halvings for "
                       f"trajectories {bad.nonzero().flatten().tolist()}: the state is blowing up")


def _ns_cn_euler_reference(w0, t, *, viscosity=1e-3, forcing=None, dt=1e-3):
    """The official data's scheme, for benchmarks only: Crank-Nicolson viscosity + explicit Euler
    advection and forcing, fixed dt (first order). Same spatial discretisation as ours."""
    b, h, w = w0.shape
    ops = spectral_ops(h, w, dtype=w0.dtype, device=w0.device)
    f_h = 0.0 if forcing is None else torch.fft.rfft2(forcing)
    visc = viscosity * ops.lap
    w_h, now, frames = torch.fft.rfft2(w0), 0.0, []
    for target in torch.as_tensor(t, dtype=torch.float64).tolist():
        n_steps = round((target - now) / dt)
        for _ in range(n_steps):
            adv_h = ns_advection(w_h, ops)
            w_h = ((1 - 0.5 * dt * visc) * w_h + dt * (adv_h + f_h)) / (1 + 0.5 * dt * visc)
        now = target
        frames.append(torch.fft.irfft2(w_h, s=(h, w)))
    return torch.stack(frames, dim=1).unsqueeze(-1)


# ---------------------------------------------------------------------------- datasets
def trajectory_seed(split, index):
    """Train trajectory i uses seed i, test ones 2^31 - 1 - i (disjoint, as the official code)."""
    return int(index) if split == "train" else 2**31 - 1 - int(index)


def in_batches(make_batch, indices, *, batch, label="", verbose=False):
    """Concatenate make_batch(indices[i:i + batch]) over consecutive batches (dim 0).

    Each trajectory depends on its index only, so batching changes speed, never results. Small
    batches keep the working set in cache, and on a CPU we run single-threaded: these 64x64
    transforms are too small to share between threads, and on a busy machine threads waiting for
    each other made generation up to 10x slower (measured)."""
    indices, out, start = list(indices), [], time.time()
    threads, last_print = torch.get_num_threads(), start
    torch.set_num_threads(1)
    try:
        for lo in range(0, len(indices), batch):
            out.append(make_batch(indices[lo:lo + batch]))
            done, now = min(lo + batch, len(indices)), time.time()
            if verbose and (now - last_print > 10 or done == len(indices)):  # every 10 s and at the end
                last_print, spent = now, now - start
                print(f"  {label}: {done}/{len(indices)} trajectories, {spent:.0f} s, "
                      f"eta {spent / done * (len(indices) - done):.0f} s", flush=True)
    finally:
        torch.set_num_threads(threads)
    return torch.cat(out)


def make_heat(split, indices, size, *, diffusivity=0.1, n_frames=40, spacing=0.25, verbose=False):
    """(n, n_frames, size, size, 1): GRF(alpha 2.5, tau 7) on the 64x64 cell centres of [-1,1]^2.
    Solved in float32 (exact in time; ~1e-6 relative round-off), evaluated on size x size."""
    times = spacing * torch.arange(n_frames)

    def make_batch(idx):
        u0 = sample_grf(64, [trajectory_seed(split, i) for i in idx])  # (b, 64, 64) float32
        return resample(solve_heat(u0, times, diffusivity=diffusivity), size, periodic=False)
    return in_batches(make_batch, indices, batch=16, label=f"heat {split}", verbose=verbose)


def wave_bump(size, seeds, *, dtype=torch.float64):
    """Gaussian bumps height * exp(-d^2 / (2 r^2)) on the periodic [-1, 1)^2 grid, r ~ U(0.25,
    0.30), height ~ U(2, 4), centre uniform (a random periodic shift): (n, size, size)."""
    draws = torch.stack([torch.rand(4, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                         for s in seeds])  # (n, 4) noise on the CPU per seed
    radius, height = 0.25 + 0.05 * draws[:, 0], 2.0 + 2.0 * draws[:, 1]
    centre = -1.0 + 2.0 * draws[:, 2:]  # (n, 2)
    xy = planar_coords(size, low=-1.0, high=1.0, cell_centred=False)  # (H, W, 2)
    d = xy[None] - centre[:, None, None, :]  # (n, H, W, 2)
    # Sum the periodic images within two periods: the bump is smooth and periodic to ~1e-20.
    shifts = 2.0 * torch.arange(-2, 3, dtype=torch.float64)
    dx2 = ((d[..., 0, None] + shifts) ** 2)  # (n, H, W, 5)
    dy2 = ((d[..., 1, None] + shifts) ** 2)
    r2 = 2 * radius[:, None, None, None] ** 2
    bump = torch.exp(-dx2 / r2).sum(-1) * torch.exp(-dy2 / r2).sum(-1)  # separable Gaussian
    return (height[:, None, None] * bump).to(dtype)


def make_wave(split, indices, size, *, speed=1.0 / 16, n_frames=160, spacing=0.25, verbose=False):
    """(n, n_frames, size, size, 2): bump at rest on the periodic 64x64 grid, channels (u, du/dt).
    Solved in float32 (exact in time), evaluated on size x size."""
    times = spacing * torch.arange(n_frames)

    def make_batch(idx):
        u0 = wave_bump(64, [trajectory_seed(split, i) for i in idx], dtype=torch.float32)
        frames = solve_wave(u0, torch.zeros_like(u0), times, speed=speed)
        return resample(frames, size, periodic=True)
    return in_batches(make_batch, indices, batch=4, label=f"wave {split}", verbose=verbose)


def make_navier_stokes(split, indices, size, *, viscosity=1e-3, spin_up=30.0, n_frames=40,
                       spacing=1.0, dtype=torch.float32, verbose=False):
    """(n, n_frames, size, size, 1): GRF(alpha 2.5, tau 7) vorticity on 64x64, spun up for
    `spin_up` time units under the paper's forcing, then one frame every `spacing`.

    float32 by default: twice as fast as float64 on a CPU; the round-off it adds, grown by the flow,
    is ~1e-5..1e-4 relative at t = 69 against float64 (measured), below the first-order official
    scheme's own error over 2 time units (1e-4)."""
    times = spin_up + spacing * torch.arange(n_frames, dtype=torch.float64)

    def make_batch(idx):
        w0 = sample_grf(64, [trajectory_seed(split, i) for i in idx], dtype=dtype)
        frames = solve_navier_stokes(w0, times, viscosity=viscosity, forcing=ns_forcing(64, dtype=dtype))
        return resample(frames, size, periodic=True)
    return in_batches(make_batch, indices, batch=8, label=f"navier-stokes {split}", verbose=verbose)


@dataclass(frozen=True)
class PDESpec:
    """Everything load_dataset needs to know about one PDE's dataset (the paper's table)."""
    channels: int            # S
    spacing: float           # time between frames
    windows: int             # windows of `window` frames per trajectory
    trajectories: dict       # split -> paper count
    sizes: dict              # split -> paper grid size (H)
    make: Callable           # make(split, indices, size, verbose=) -> (n, windows * window, H, W, S)
    coords: Callable         # coords(size) -> (H, W, X) physical positions
    mask: Callable = lambda size: None  # size -> (H, W) bool default observation mask, or None
    settings: dict = field(default_factory=dict)  # physical settings, part of the cache key
    window: int = 20
    n_in_t: int = 10


SPECS = {
    "heat": PDESpec(
        channels=1, spacing=0.25, windows=2, trajectories={"train": 256, "test": 16},
        sizes={"train": 64, "test": 64}, make=make_heat,
        coords=lambda size: planar_coords(size, low=-1.0, high=1.0, cell_centred=True),
        settings=dict(diffusivity=0.1, grf=(2.5, 7.0), domain="[-1,1]^2 cell-centred, Neumann", dtype="float32")),
    "wave": PDESpec(
        channels=2, spacing=0.25, windows=8, trajectories={"train": 64, "test": 4},
        sizes={"train": 64, "test": 64}, make=make_wave,
        coords=lambda size: planar_coords(size, low=-1.0, high=1.0, cell_centred=False),
        settings=dict(speed=1.0 / 16, radius=(0.25, 0.30), height=(2.0, 4.0), domain="[-1,1)^2 periodic", dtype="float32")),
    "navier-stokes": PDESpec(
        channels=1, spacing=1.0, windows=2, trajectories={"train": 256, "test": 16},
        sizes={"train": 64, "test": 64}, make=make_navier_stokes,
        coords=lambda size: planar_coords(size, low=0.0, high=1.0, cell_centred=False),
        settings=dict(viscosity=1e-3, spin_up=30.0, forcing="0.1(sin 2pi(x+y) + cos 2pi(x+y))",
                      grf=(2.5, 7.0), scheme="IF-RK4 cfl 2.0 float32", domain="[0,1)^2 periodic")),
    # 'shallow-water' joins this table with its own spec (issue 3).
}
CACHE_VERSION = 1  # bump when a generator changes in a way the settings do not show


@dataclass
class PDEData:
    pde: str                   # 'heat' | 'wave' | 'navier-stokes' | 'shallow-water'
    split: str                 # 'train' | 'test' (sphere also 'test-hr')
    frames: torch.Tensor       # (windows, T, H, W, S) float32
    coords: torch.Tensor       # (H, W, X) physical positions, float32
    t: torch.Tensor            # (T,) times of the frames within a window, t[0] = 0
    trajectory: torch.Tensor   # (windows,) long: the trajectory each window came from
    mask: torch.Tensor | None  # (H, W) bool default observation mask, else None
    n_in_t: int                # frames inside the training horizon (10 of 20)


def _resolve(pde, split, size, n_trajectories):
    if pde not in PDES:
        raise ValueError(f"unknown pde {pde!r}; allowed: {', '.join(PDES)}")
    if pde not in SPECS:
        raise ValueError(f"pde {pde!r} is not available yet: its solver is not in this solvers.py "
                         f"(available: {', '.join(SPECS)})")
    spec = SPECS[pde]
    if split not in spec.trajectories:
        raise ValueError(f"unknown split {split!r} for {pde}; allowed: {', '.join(spec.trajectories)}")
    size = spec.sizes[split] if size is None else int(size)
    if size < 4:
        raise ValueError(f"size must be >= 4 grid points, got {size}")
    n = spec.trajectories[split] if n_trajectories is None else int(n_trajectories)
    if not 1 <= n <= spec.trajectories[split]:
        raise ValueError(f"n_trajectories must be in 1..{spec.trajectories[split]} for {pde} "
                         f"{split}, got {n_trajectories}")
    return spec, size, n


def _cache_path(data_dir, pde, split, size, n, settings):
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(data_dir, f"{pde}-{split}-{size}px-{n}traj-{digest}.pt")


def _build(pde, split, size, n, spec, verbose):
    full = spec.make(split, range(n), size, verbose=verbose)  # (n, windows * window, H, W, S)
    frames = full[:, : spec.windows * spec.window].reshape(
        n * spec.windows, spec.window, *full.shape[2:])  # (windows, T, H, W, S), trajectory-major
    if not torch.isfinite(frames).all():
        raise RuntimeError(f"{pde} {split}: the generator produced non-finite values")
    mask = spec.mask(size)
    return dict(frames=frames.float().contiguous(), coords=spec.coords(size).float(),
                t=spec.spacing * torch.arange(spec.window, dtype=torch.float32),
                trajectory=torch.arange(n).repeat_interleave(spec.windows),
                mask=None if mask is None else mask.bool())


def load_dataset(pde, split, *, size=None, data_dir="data", n_trajectories=None, device="cpu",
                 verbose=True):
    """The paper's dataset for `pde` and `split` as a PDEData (see the dataclass for shapes).

    size: grid points along H (None = the paper's 64); n_trajectories: None = the paper's count,
    smaller = the first n trajectories of the full set. Generated on the first call and cached in
    data_dir under a name holding a hash of every setting; a cached file whose stored settings or
    shapes disagree, or that cannot be read, is regenerated. Writes go to a temporary name first.
    """
    spec, size, n = _resolve(pde, split, size, n_trajectories)
    settings = dict(pde=pde, split=split, size=size, n_trajectories=n, version=CACHE_VERSION,
                    spacing=spec.spacing, window=spec.window, windows=spec.windows,
                    channels=spec.channels, **spec.settings)
    settings = json.loads(json.dumps(settings))  # canonical form (tuples -> lists) for comparison
    path = _cache_path(data_dir, pde, split, size, n, settings)
    payload = None
    if os.path.exists(path):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            shape = payload["frames"].shape
            if payload.get("settings") != settings or tuple(shape) != (
                    n * spec.windows, spec.window, *shape[2:4], spec.channels):
                raise ValueError("stored settings or shapes differ")
        except Exception as err:  # unreadable, truncated or stale: regenerate
            if verbose:
                print(f"cache {path} unusable ({type(err).__name__}: {err}); regenerating")
            payload = None
    if payload is None:
        start = time.time()
        if verbose:
            print(f"generating {pde} {split}: {n} trajectories at {size}x{size} -> {path}", flush=True)
        payload = _build(pde, split, size, n, spec, verbose)
        payload["settings"] = settings
        os.makedirs(data_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: a crash leaves no half-written cache under the real name
        if verbose:
            print(f"generated {pde} {split} in {time.time() - start:.1f} s "
                  f"({os.path.getsize(path) / 2**20:.1f} MiB)")
    mask = payload["mask"]
    return PDEData(pde=pde, split=split, frames=payload["frames"].to(device),
                   coords=payload["coords"].to(device), t=payload["t"].to(device),
                   trajectory=payload["trajectory"].to(device),
                   mask=None if mask is None else mask.to(device), n_in_t=spec.n_in_t)


# ---------------------------------------------------------------------------- benchmark
def bench_navier_stokes(*, batch=8, span=2.0, dtype=torch.float64):
    """Ours (IF-RK4, Courant-bounded step) vs the official scheme (CN + Euler, dt 1e-3) on the same
    batch of spun-up flows over the same span; errors against IF-RK4 at dt 2.5e-3 (Courant ~0.1).
    Returns a dict of seconds and relative L2 errors (worst trajectory). Runs single-threaded,
    both schemes alike (see in_batches: threads only slow these small transforms down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench_navier_stokes(batch=batch, span=span, dtype=dtype)
    finally:
        torch.set_num_threads(threads)


def _bench_navier_stokes(*, batch, span, dtype):
    forcing = ns_forcing(64, dtype=dtype)
    w0 = sample_grf(64, range(batch), dtype=dtype)
    w0 = solve_navier_stokes(w0, [30.0], forcing=forcing)[:, 0, ..., 0]  # spun up (B, H, W)

    def timed(fn):
        start = time.perf_counter()
        out = fn()[:, -1]
        return out, time.perf_counter() - start

    ours, t_ours = timed(lambda: solve_navier_stokes(w0, [span], forcing=forcing))
    official, t_official = timed(lambda: _ns_cn_euler_reference(w0, [span], forcing=forcing, dt=1e-3))
    fine, t_fine = timed(lambda: solve_navier_stokes(w0, [span], forcing=forcing, dt=2.5e-3))

    def err(x):
        return ((x - fine).flatten(1).norm(dim=1) / fine.flatten(1).norm(dim=1)).max().item()
    return dict(ours_s=t_ours, official_s=t_official, speedup=t_official / t_ours,
                ours_err=err(ours), official_err=err(official), fine_s=t_fine)


def bench(repeats=3):
    """Print the figures of the closing note: median seconds of repeated runs, in one process."""
    import statistics

    def median_time(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    heat = median_time(lambda: (make_heat("train", range(256), 64), make_heat("test", range(16), 64)))
    print(f"heat: whole set (272 trajectories, 40 frames, 64x64) built in {heat:.2f} s "
          f"(median of {repeats})", flush=True)
    wave = median_time(lambda: (make_wave("train", range(64), 64), make_wave("test", range(4), 64)))
    print(f"wave: whole set (68 trajectories, 160 frames, 64x64, 2 channels) built in {wave:.2f} s "
          f"(median of {repeats})", flush=True)
    runs = [bench_navier_stokes() for _ in range(repeats)]
    med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(f"navier-stokes, 8 spun-up flows, 2 time units, float64: ours {med['ours_s']:.2f} s, "
          f"CN + Euler dt 1e-3 {med['official_s']:.2f} s, speed-up {med['speedup']:.1f}x (median of "
          f"{repeats}); rel L2 error vs fine step: ours {med['ours_err']:.1e}, "
          f"CN + Euler {med['official_err']:.1e}")


# ---------------------------------------------------------------------------- command line
def main():
    parser = argparse.ArgumentParser(description="Build (or load) a DINo dataset, or run --bench.")
    parser.add_argument("pde", nargs="?", choices=[p for p in PDES if p in SPECS])
    parser.add_argument("--split", default="train")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--n-trajectories", type=int, default=None)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--bench", action="store_true", help="speed and accuracy vs the references")
    args = parser.parse_args()
    if args.bench:
        return bench()
    if args.pde is None:
        parser.error("give a pde or --bench")
    try:
        start = time.time()
        data = load_dataset(args.pde, args.split, size=args.size, data_dir=args.data_dir,
                            n_trajectories=args.n_trajectories)
    except ValueError as err:
        parser.error(str(err))  # exit status 2
    print(f"{data.pde} {data.split}: frames {tuple(data.frames.shape)}, coords "
          f"{tuple(data.coords.shape)}, t {data.t[0]:g}..{data.t[-1]:g}, "
          f"|frames| max {data.frames.abs().max():.3f}, loaded in {time.time() - start:.2f} s")


if __name__ == "__main__":
    main()
