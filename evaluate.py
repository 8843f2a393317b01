"""Evaluating DINo (arXiv:2209.14855v2, Sec. 5): forecasts from a single observed frame.

For every test window: fit the frame-0 code alpha_0 to the observed points (Adam from zero,
keeping the best code per window), integrate d alpha/dt = f_psi(alpha) over the training
horizon (In-t) and beyond it (Out-t), decode on the full grid, and compare with the truth:
    MSE over In-t / Out-t  x  In-s (observed points) / Out-s (unobserved points),
and the relative MSE (MSE / mean square of the truth over the same frames and points), so that
1.0 means "no better than predicting zero" whatever the PDE's units.

Usage:
    python evaluate.py runs/heat-quick                    # best.pt; table, metrics.json, GIFs, PNG
    python evaluate.py runs/heat-quick/last.pt --subsampling 0.25 --mask-seed 7   # a new grid (Table 3)
    python evaluate.py runs/heat-quick --resolution 64    # the same initial fields on a finer grid
    python evaluate.py runs/shallow-water-quick --resolution 64   # sphere: observe the training grid, decode 2x finer
    python evaluate.py runs/heat-quick --points 2048      # free-form points anywhere in the domain
Files land in RUN/eval[-conditions]/ (or --out) and are named in the output.

For users, `forecast(model, coords_obs, values_obs, t, coords_query)` is DINo in one call.
"""
import argparse
import json
import math
import os
import sys

import matplotlib
import numpy as np
import torch
from scipy.fft import dctn

from solvers import SPECS, SphereTransform, load_dataset, sphere_legendre
from train import (Parser, check_writable, flatten, forecast_codes, load_checkpoint, model_from_checkpoint,
                   observation_mask, rate, resolve_device)

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.animation import FuncAnimation, PillowWriter  # noqa: E402

CHANNELS = {"heat": ["u"], "wave": ["u", "du_dt"], "navier-stokes": ["vorticity"],
            "shallow-water": ["height", "vorticity"]}
# how a planar PDE's grid continues between its points: the basis of the spectral interpolation
BOUNDARY = {"heat": "cosine", "wave": "periodic", "navier-stokes": "periodic"}


# ---- DINo's promise in one call


def forecast(model, coords_obs, values_obs, t, coords_query, *, steps=None):
    """Forecast a field from one observation at arbitrary points.

    model: a trained DINo (evaluate.load_model or train.model_from_checkpoint)
    coords_obs: (N, X) physical positions where the field is observed at time t[0]
    values_obs: (N, S) the observed values there
    t: (T,) times to forecast, t[0] the time of the observation
    coords_query: (Nq, X) where to predict (any points, not necessarily the observed ones)
    returns (T, Nq, S)
    """
    codes = forecast_codes(model, model.map_coords(coords_obs), values_obs[None], t - t[0], steps=steps)
    return model.decode(model.map_coords(coords_query), codes)[0]            # (T, Nq, S)


def load_model(path, device="cpu"):
    """A trained DINo from a run folder (its best.pt) or a checkpoint file."""
    return model_from_checkpoint(load_checkpoint(path), device)[0]


# ---- the metric table


def mse_table(pred, truth, observed, n_in_t):
    """MSE and relative MSE for In-t / Out-t x In-s / Out-s / all points.
    pred, truth (B, T, N, S); observed (N,) bool. Empty cells (no unobserved point) are None."""
    table = {"mse": {}, "rel_mse": {}}
    for time_name, frames in (("in_t", slice(0, n_in_t)), ("out_t", slice(n_in_t, None))):
        for kind in table:
            table[kind][time_name] = {}
        for space_name, points in (("in_s", observed), ("out_s", ~observed), ("all", slice(None))):
            p, y = pred[:, frames][:, :, points], truth[:, frames][:, :, points]
            if p.numel() == 0:
                mse = rel = None
            else:
                mse = (p - y).pow(2).mean().item()
                rel = mse / max(y.pow(2).mean().item(), 1e-30)
            table["mse"][time_name][space_name] = mse
            table["rel_mse"][time_name][space_name] = rel
    return table


def format_table(table):
    def cell(v):
        return f"{v:10.3e}" if v is not None else f"{'-':>10}"
    lines = [f"{'':6}{'MSE':>33}   {'relative MSE':>33}",
             f"{'':6}" + "".join(f"{h:>11}" for h in ("In-s", "Out-s", "all")) + "   "
             + "".join(f"{h:>11}" for h in ("In-s", "Out-s", "all"))]
    for name, label in (("in_t", "In-t"), ("out_t", "Out-t")):
        row = [cell(table["mse"][name][k]) for k in ("in_s", "out_s", "all")]
        rel = [cell(table["rel_mse"][name][k]) for k in ("in_s", "out_s", "all")]
        lines.append(f"{label:6}" + " ".join(row) + "    " + " ".join(rel))
    return "\n".join(lines)


# ---- truth between the grid points: spectral interpolation


def grid_axes(coords):
    """The 1-D axes of a planar grid: coords (H, W, 2) with coords[i, j] = (x_i, y_j)."""
    xs, ys = coords[:, 0, 0], coords[0, :, 1]
    if not (torch.allclose(coords[..., 0], xs[:, None].expand_as(coords[..., 0]))
            and torch.allclose(coords[..., 1], ys[None, :].expand_as(coords[..., 1]))):
        raise ValueError("free-form points need a tensor-product grid with coords[i, j] = (x_i, y_j)")
    return xs.double(), ys.double()


def axis_basis(axis, points, boundary):
    """(Nq, n) basis of one axis at the query positions, and the axis' domain (lo, length).
    periodic: grid x_j = lo + j h, Fourier modes exp(2 pi i k (x - lo) / L), L = n h;
    cosine:   cell-centred grid x_j = lo + (j + 1/2) h, orthonormal DCT-II modes
              w_k cos(pi k (x - lo) / L): the zero-flux continuation the heat solver uses."""
    n, h = len(axis), (axis[1] - axis[0]).item()
    lo = axis[0].item() - (h / 2 if boundary == "cosine" else 0.0)
    length = n * h
    s = (points - lo) / length                                              # (Nq,) in [0, 1)
    if boundary == "periodic":
        k = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
        return torch.exp(2j * math.pi * s[:, None] * k[None, :]), (lo, length)
    k = torch.arange(n, dtype=torch.float64)
    weight = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    weight[0] = math.sqrt(1.0 / n)
    return weight * torch.cos(math.pi * s[:, None] * k[None, :]), (lo, length)


def interpolate(frames, coords, points, boundary):
    """Spectral interpolation of grid fields to arbitrary points (exact for band-limited fields).
    frames (B, T, H, W, S) on the grid `coords` (H, W, 2); points (Nq, 2) -> (B, T, Nq, S)."""
    xs, ys = grid_axes(coords.cpu())
    points = points.cpu().double()
    bx, _ = axis_basis(xs, points[:, 0], boundary)                          # (Nq, H)
    by, _ = axis_basis(ys, points[:, 1], boundary)                          # (Nq, W)
    fields = frames.cpu().double().movedim(-1, 2)                           # (B, T, S, H, W)
    if boundary == "periodic":
        coef = torch.fft.fft2(fields) / (len(xs) * len(ys))                 # (B, T, S, H, W)
        values = torch.einsum("btskq,qk->btsq", coef @ by.T, bx).real
    else:
        coef = torch.from_numpy(dctn(fields.numpy(), type=2, axes=(-2, -1), norm="ortho"))
        values = torch.einsum("btskq,qk->btsq", coef @ by.T, bx)
    return values.movedim(2, -1).float().to(frames.device)                  # (B, T, Nq, S)


def random_points(coords, boundary, n, seed):
    """n points drawn uniformly in the grid's domain (not on the grid), reproducible by seed."""
    xs, ys = grid_axes(coords.cpu())
    g = torch.Generator().manual_seed(seed)
    out = []
    for axis in (xs, ys):
        _, (lo, length) = axis_basis(axis, axis[:1], boundary)
        out.append(lo + length * torch.rand(n, generator=g, dtype=torch.float64))
    return torch.stack(out, -1).float().to(coords.device)                  # (n, 2)


# ---- pictures


def save_atomic(path, write):
    """write(tmp_path) then rename: no half-written file is ever left at `path`."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_gif(path, truth, pred, t, n_in_t, title):
    """Rows truth / prediction / error, one column per window, one GIF frame per time.
    truth, pred (B, T, H, W) for one channel (B a few windows)."""
    truth, pred = truth.cpu().numpy(), pred.cpu().numpy()
    err = pred - truth
    n_windows = truth.shape[0]
    # colour limits per frame (fields like heat fade 50x over a window): truth and prediction share one
    vmax = np.maximum(np.abs(truth).max(axis=(0, 2, 3)), 1e-12)                 # (T,)
    emax = np.maximum(np.abs(err).max(axis=(0, 2, 3)), 1e-12)                   # (T,)
    aspect = truth.shape[3] / truth.shape[2]                                    # W / H (sphere: 2)
    fig, axes = plt.subplots(3, n_windows, figsize=(1.6 * aspect * n_windows + 0.8, 5.4), squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.86, top=0.9, bottom=0.14, hspace=0.08, wspace=0.06)
    images = []
    for row, (name, data, lim, cmap) in enumerate((("truth", truth, vmax, "RdBu_r"),
                                                   ("prediction", pred, vmax, "RdBu_r"),
                                                   ("error", err, emax, "PuOr_r"))):
        for col in range(n_windows):
            ax = axes[row, col]
            images.append((ax.imshow(data[col, 0], cmap=cmap, vmin=-lim[0], vmax=lim[0]), data, col, lim))
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
        fig.colorbar(images[-1][0], ax=axes[row].tolist(), shrink=0.9, pad=0.02)
    # a time line under the panels: training horizon shaded, a cursor at the current frame
    line = fig.add_axes([0.08, 0.05, 0.70, 0.03])
    horizon = (t[n_in_t - 1] + t[n_in_t]) / 2 if n_in_t < len(t) else t[-1]
    line.axvspan(t[0], horizon, color="tab:green", alpha=0.3)
    line.axvspan(horizon, t[-1], color="tab:red", alpha=0.25)
    line.set_xlim(t[0], t[-1])
    line.set_yticks([])
    line.tick_params(labelsize=7)
    line.text(horizon, 1.3, "end of training horizon", ha="center", fontsize=7, transform=line.get_xaxis_transform())
    cursor = line.axvline(t[0], color="black", lw=2)
    heading = fig.suptitle("", fontsize=10)

    def draw(k):
        for image, data, col, lim in images:
            image.set_data(data[col, k])
            image.set_clim(-lim[k], lim[k])
        cursor.set_xdata([t[k], t[k]])
        when = "In-t (inside the training horizon)" if k < n_in_t else "Out-t (BEYOND the training horizon)"
        heading.set_text(f"{title}   t = {t[k]:.2f}   {when}")
        heading.set_color("black" if k < n_in_t else "firebrick")
        return [image for image, *_ in images] + [heading, cursor]

    animation = FuncAnimation(fig, draw, frames=len(t), blit=False)
    save_atomic(path, lambda tmp: animation.save(tmp, writer=PillowWriter(fps=4), dpi=72))
    plt.close(fig)


def save_error_plot(path, t, curves, n_in_t, title):
    """MSE per frame (curves: label -> (T,) values) with In-t / Out-t shaded."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    step = (t[1] - t[0]) if len(t) > 1 else 1.0
    horizon = t[n_in_t - 1] + step / 2
    ax.axvspan(t[0] - step / 2, horizon, color="tab:green", alpha=0.12, label="In-t (training horizon)")
    ax.axvspan(horizon, t[-1] + step / 2, color="tab:red", alpha=0.10, label="Out-t (extrapolation)")
    for label, values in curves.items():
        ax.plot(t, values, marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("MSE")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_atomic(path, lambda tmp: fig.savefig(tmp, dpi=90))
    plt.close(fig)


# ---- the evaluation


def observed_points(state, cfg, test, *, rate, seed, resolution, data_dir):
    """(N,) bool: which points of the test grid the code fitting sees, and a description."""
    device = test.coords.device
    if cfg.pde == "shallow-water" and resolution != cfg.size and resolution % cfg.size == 0:
        # super-resolution (paper Sec. 5): observe the training grid, decode the finer one. Both
        # grids are cuts of one simulation grid (solvers.py), so the training grid is every k-th point.
        k = resolution // cfg.size
        coarse = load_dataset(cfg.pde, "test", size=cfg.size, data_dir=data_dir, n_trajectories=cfg.n_test,
                              device=device, verbose=False)
        observed = torch.zeros(test.coords.shape[:2], dtype=torch.bool, device=device)   # (H, W)
        observed[::k, ::k] = observation_mask(coarse, rate, seed)
        return observed.flatten(), f"the {cfg.size}-latitude training grid inside the {resolution}-latitude grid"
    if resolution == cfg.size and rate == cfg.subsampling and seed == cfg.mask_seed:
        return state["mask"].flatten().to(device), "the training mask"
    return observation_mask(test, rate, seed).flatten(), f"a new mask (rate {rate}, seed {seed})"


def evaluate(path, *, device="cpu", subsampling=None, mask_seed=None, resolution=None, points=None,
             fit_steps=None, out=None, data_dir="data", pictures=True, log=print):
    """Evaluate a checkpoint on its test set; writes metrics.json (+ GIFs, PNG) to `out`, returns
    the metrics dict (its "files" lists what was written)."""
    file = os.path.join(path, "best.pt") if os.path.isdir(path) else path
    state = load_checkpoint(file)
    model, cfg = model_from_checkpoint(state, device)
    rate_ = cfg.subsampling if subsampling is None else subsampling
    seed = cfg.mask_seed if mask_seed is None else mask_seed
    resolution = cfg.size if resolution is None else resolution
    out = out or default_out(path, cfg, subsampling, mask_seed, resolution, points)
    check_writable(out)

    test = load_dataset(cfg.pde, "test", size=resolution, data_dir=data_dir, n_trajectories=cfg.n_test,
                        device=device)
    observed, how = observed_points(state, cfg, test, rate=rate_, seed=seed, resolution=resolution,
                                    data_dir=data_dir)
    truth = flatten(test.frames)                                          # (B, T, N, S)
    coords = model.map_coords(test.coords.flatten(0, 1))                  # (N, X)
    steps = model.fit_steps if fit_steps is None else fit_steps
    codes = forecast_codes(model, coords[observed], truth[:, 0][:, observed], test.t, steps=steps)
    pred = model.decode(coords, codes)                                    # (B, T, N, S)
    n_in = test.n_in_t
    grid = "x".join(str(n) for n in reversed(test.coords.shape[:2])) if cfg.pde == "shallow-water" \
        else "x".join(str(n) for n in test.coords.shape[:2])
    metrics = {
        "checkpoint": os.path.abspath(file), "pde": cfg.pde, "epoch": state["epoch"],
        "iteration": state["iteration"], "grid": grid, "windows": len(truth), "frames": len(test.t),
        "n_in_t": n_in, "observed": how, "observed_fraction": observed.float().mean().item(),
        "fit_steps": steps, **mse_table(pred, truth, observed, n_in),
        "t": test.t.tolist(),
        "mse_vs_time": (pred - truth).pow(2).mean((0, 2, 3)).tolist(),
        "rel_mse_vs_time": ((pred - truth).pow(2).mean((0, 2, 3)) / truth.pow(2).mean((0, 2, 3))).tolist()}
    if points is not None:
        metrics["points"] = free_form(model, cfg, codes, resolution, points, seed, n_in, data_dir, device)

    os.makedirs(out, exist_ok=True)
    files = []
    if pictures:
        files += draw(out, cfg, test, pred, n_in, observed)
    metrics["files"] = files + ["metrics.json"]
    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=1)
    save_atomic(os.path.join(out, "metrics.json"), write_json)
    log(f"{cfg.pde} | {metrics['checkpoint']} (epoch {state['epoch']}, iteration {state['iteration']}) | "
        f"{len(truth)} test windows on {grid} | observed: {how}, {100 * metrics['observed_fraction']:.1f}% | "
        f"alpha_0 fitted in {steps} steps")
    log(format_table(metrics))
    if "points" in metrics:
        p = metrics["points"]
        log(f"free-form: {p['n']} random points ({p['truth']}): relative MSE In-t {p['rel_mse']['in_t']:.3e}, "
            f"Out-t {p['rel_mse']['out_t']:.3e}")
    log(f"wrote {', '.join(os.path.join(out, f) for f in metrics['files'])}")
    return metrics


def sphere_interpolate(frames, points):
    """Exact values of band-limited sphere fields at arbitrary points: analyse the fields on the
    data's full Gauss grid into spherical harmonics (exact there: Gauss quadrature, l <= nlat - 1)
    and sum the series at the points. frames (B, T, nlat, 2 nlat, S); points (Nq, 3) xyz -> (B, T, Nq, S)."""
    nlat = frames.shape[2]
    transform = SphereTransform(nlat - 1, nlat)
    points = points.cpu().double()
    legendre = torch.from_numpy(sphere_legendre(nlat - 1, points[:, 2].numpy())[0])       # (M, L, Nq)
    lon = torch.atan2(points[:, 1], points[:, 0])
    m = torch.arange(nlat, dtype=torch.float64)
    phase = torch.exp(1j * m[:, None] * lon[None, :])                                      # (M, Nq)
    phase[1:] *= 2                       # a real field: m and -m together, m = 0 once
    out = []
    for window in frames.cpu().double():                                                   # (T, nlat, nlon, S)
        coef = transform.to_spec(window.movedim(-1, 1))                                    # (T, S, M, L)
        along = torch.einsum("tsml,mlq->tsmq", coef, legendre.to(coef.dtype))             # (T, S, M, Nq)
        out.append((along * phase).sum(2).real.movedim(1, -1))                             # (T, Nq, S)
    return torch.stack(out).float().to(frames.device)                                      # (B, T, Nq, S)


def sphere_points(n, seed):
    """n points uniform on the unit sphere (z uniform in [-1, 1], longitude uniform), by seed."""
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.rand(n, generator=g, dtype=torch.float64) - 1
    lon = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    r = torch.sqrt(1 - z ** 2)
    return torch.stack([r * torch.cos(lon), r * torch.sin(lon), z], -1).float()          # (n, 3)


def free_form(model, cfg, codes, resolution, n_points, seed, n_in, data_dir, device):
    """Forecast at random points anywhere in the domain (codes fitted on the grid as usual).
    Truth off the grid: planar PDEs by spectral interpolation (cosine series for heat's walls,
    Fourier series for the periodic ones) of the same test fields on a grid of at least 64 points
    (the size the data are simulated at); the sphere by spherical harmonics of the full 256x128 grid."""
    if cfg.pde == "shallow-water":
        nlat = SPECS[cfg.pde].cut_from                                    # the simulation grid
        fine = load_dataset(cfg.pde, "test", size=nlat, data_dir=data_dir, n_trajectories=cfg.n_test,
                            device=device)
        query = sphere_points(n_points, seed).to(device)                  # (Nq, 3)
        truth = sphere_interpolate(fine.frames, query)                    # (B, T, Nq, S)
        how = f"spherical-harmonic series of the {2 * nlat}x{nlat} test fields"
    else:
        boundary = BOUNDARY[cfg.pde]
        size = max(64, resolution)
        fine = load_dataset(cfg.pde, "test", size=size, data_dir=data_dir, n_trajectories=cfg.n_test,
                            device=device)
        query = random_points(fine.coords, boundary, n_points, seed)      # (Nq, 2)
        truth = torch.cat([interpolate(fine.frames[i:i + 1], fine.coords, query, boundary)
                           for i in range(len(fine.frames))])             # (B, T, Nq, S)
        how = f"{boundary} spectral interpolation of the {size}x{size} test fields"
    pred = model.decode(model.map_coords(query), codes)                   # (B, T, Nq, S)
    result = {"n": n_points, "seed": seed, "truth": how, "mse": {}, "rel_mse": {}}
    for name, frames in (("in_t", slice(0, n_in)), ("out_t", slice(n_in, None))):
        mse = (pred[:, frames] - truth[:, frames]).pow(2).mean().item()
        result["mse"][name] = mse
        result["rel_mse"][name] = mse / max(truth[:, frames].pow(2).mean().item(), 1e-30)
    return result


def draw(out, cfg, test, pred, n_in, observed):
    """One GIF per state channel (a few windows) and the MSE-vs-time PNG; returns file names."""
    B, T, H, W, S = test.frames.shape
    shown = min(B, 4 if H == W else 2)                                    # the sphere's panels are 2:1
    grid_pred = pred[:shown].view(shown, T, H, W, S)
    t = test.t.cpu().numpy()
    files = []
    for s, name in enumerate(CHANNELS.get(cfg.pde, [f"c{s}" for s in range(S)])[:S]):
        file = f"forecast_{name}.gif"
        save_gif(os.path.join(out, file), test.frames[:shown, ..., s], grid_pred[..., s], t, n_in,
                 f"{cfg.pde} {name}")
        files.append(file)
    err = (pred - flatten(test.frames)).pow(2).mean(-1).mean(0)           # (T, N)
    curves = {"all points": err.mean(1).cpu().numpy()}
    if not observed.all():
        curves["observed (In-s)"] = err[:, observed].mean(1).cpu().numpy()
        curves["unobserved (Out-s)"] = err[:, ~observed].mean(1).cpu().numpy()
    save_error_plot(os.path.join(out, "mse_vs_time.png"), t, curves, n_in,
                    f"{cfg.pde}: test MSE per frame ({B} windows)")
    return files + ["mse_vs_time.png"]


def default_out(path, cfg, subsampling, mask_seed, resolution, points):
    run = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    tags = [] if os.path.isdir(path) or os.path.basename(path) == "best.pt" else \
        [os.path.splitext(os.path.basename(path))[0]]
    if resolution != cfg.size:
        tags.append(f"res{resolution}")
    if subsampling is not None:
        tags.append(f"s{subsampling:g}")
    if mask_seed is not None:
        tags.append(f"seed{mask_seed}")
    if points is not None:
        tags.append(f"points{points}")
    return os.path.join(run, "-".join(["eval"] + tags))


# ---- command line


def parser():
    p = Parser(prog="evaluate.py", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Forecast every test window from its first frame and score it.\n"
                           + __doc__[__doc__.index("Usage:"):__doc__.index("For users,")].rstrip())
    p.add_argument("run", help="run folder (uses its best.pt) or a checkpoint file written by train.py")
    p.add_argument("--subsampling", type=rate, metavar="RATE",
                   help="observe this fraction of the grid, in (0, 1] (default: the training rate)")
    p.add_argument("--mask-seed", type=int, help="seed of the observation mask: a new grid (paper Table 3)")
    p.add_argument("--resolution", type=int, metavar="N",
                   help="evaluate on the same test fields at N x N (sphere: N latitudes x 2N longitudes)")
    p.add_argument("--points", type=int, metavar="N",
                   help="also forecast at N random points anywhere in the domain (not on the grid)")
    p.add_argument("--fit-steps", type=int, help="Adam steps fitting alpha_0 (default: the run's)")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--data-dir", default="data", help="dataset cache folder (default: data)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", help="output folder (default: RUN/eval[-conditions])")
    p.add_argument("--no-pictures", action="store_true", help="skip the GIFs and the PNG")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    for name, low in (("resolution", 4), ("points", 1), ("fit_steps", 0), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser().error(f"--{name.replace('_', '-')} {value} must be at least {low}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        return evaluate(args.run, device=device, subsampling=args.subsampling, mask_seed=args.mask_seed,
                        resolution=args.resolution, points=args.points, fit_steps=args.fit_steps,
                        out=args.out, data_dir=args.data_dir, pictures=not args.no_pictures)
    except ValueError as err:
        parser().error(str(err))


if __name__ == "__main__":
    main()
