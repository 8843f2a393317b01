"""Evaluating DINo (Yin, Kirchmeyer et al., ICLR 2023, arXiv:2209.14855v2, Sec. 5): forecasts
from a single observed frame. For every test window: fit the frame-0 code alpha_0 to the observed
points (in closed form, the ridge chosen during training on training or held-out windows; or by
Adam, --fit adam), integrate d alpha/dt = f_psi(alpha) over the training horizon (In-t) and
beyond it (Out-t), decode at every point (grid or point set), compare with the truth:
    MSE over In-t / Out-t  x  In-s (observed points) / Out-s (unobserved points),
and the relative MSE (MSE / mean square of the truth over the same frames and points), so that
1.0 means "no better than predicting zero" whatever the PDE's units.
Usage:
    python evaluate.py runs/heat-quick                    # best.pt; table, metrics.json, GIFs, PNG
    python evaluate.py runs/heat-quick/last.pt --subsampling 0.25 --mask-seed 7  # Table 3: new grid
    python evaluate.py runs/heat-quick --resolution 64    # the same initial fields on a finer grid
    python evaluate.py runs/shallow-water-quick --resolution 64   # sphere: 2x super-resolution
    python evaluate.py runs/heat-quick --points 2048      # free-form points anywhere in the domain
    python evaluate.py runs/heat-quick --fit adam         # alpha_0 by Adam, not the closed form
    python evaluate.py runs/heat-quick --time-factor 4    # also 3 times between each two frames
Files land in RUN/eval[-conditions]/ (or --out): metrics.json and the table first, then pictures.
"""
import argparse
import json
import os
import pathlib

import matplotlib
import numpy as np
import torch

import solvers
import train
from solvers import SPECS, check_writable, load_dataset, observation_mask, write_atomic

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import matplotlib.tri  # noqa: E402
from matplotlib.animation import FuncAnimation, PillowWriter  # noqa: E402


def load_model(path, device="cpu", data=None):
    """A trained DINo (autodecode.py) from a run folder (its best.pt) or checkpoint (data: its own
    file, moved): load_model(run).forecast(coords_obs, values_obs, t, coords_query), your units."""
    return train.model_from_checkpoint(train.load_checkpoint(path), device, data=data)[0]


# ---- the metric table
def relative_mse(pred, truth):
    """MSE / mean square of the truth: 1.0 is 'no better than predicting zero', in any units."""
    err, ref = train.squared_sums(pred, truth).tolist()
    return err / max(ref, 1e-30)


def mse_table(pred, truth, observed, n_in_t):
    """MSE and relative MSE for In-t / Out-t x In-s / Out-s / all points.
    pred, truth (B, T, N, S); observed (N,) bool. Empty cells (no unobserved point) are None."""
    table = {"mse": {"in_t": {}, "out_t": {}}, "rel_mse": {"in_t": {}, "out_t": {}}}
    for time_name, frames in (("in_t", slice(0, n_in_t)), ("out_t", slice(n_in_t, None))):
        for space_name, points in (("in_s", observed), ("out_s", ~observed), ("all", slice(None))):
            p, y = pred[:, frames][:, :, points], truth[:, frames][:, :, points]
            both = ((p - y).pow(2).mean().item(), relative_mse(p, y)) if p.numel() else (None, None)
            table["mse"][time_name][space_name], table["rel_mse"][time_name][space_name] = both
    return table


def format_table(table):
    def cell(value):
        return f"{value:10.3e}" if value is not None else f"{'-':>10}"
    heads = "".join(f"{h:>11}" for h in ("In-s", "Out-s", "all"))
    lines = [f"{'':6}{'MSE':>33}   {'relative MSE':>33}", f"{'':6}{heads}   {heads}"]
    for name, label in (("in_t", "In-t"), ("out_t", "Out-t")):
        cells = [[cell(v) for v in table[kind][name].values()] for kind in ("mse", "rel_mse")]
        lines.append(f"{label:6}" + " ".join(cells[0]) + "    " + " ".join(cells[1]))
    return "\n".join(lines)


# ---- the evaluation
def load_split(cfg, split, *, size, data_dir, device, time_factor=1):
    """A split's windows: 'test', 'train' (those trained on), or 'val': training-split trajectories
    never trained on (its val_share, else those after n_train, up to the most allowed)."""
    spec, held = SPECS[cfg.pde], cfg.val_share > 0
    n = {"test": cfg.n_test, "train": cfg.n_train}.get(split, cfg.n_train if held else
                                                               spec.largest("train"))
    if split == "val" and n <= cfg.n_train and not held:
        raise ValueError(f"--split val: the run trained on all {n} training trajectories of "
                         f"{cfg.pde}; train with --n-train below {n} or --val-share to keep some "
                         f"for validation")
    data = load_dataset(cfg.pde, "train" if split == "val" else split, size=size, device=device,
                        data_dir=data_dir, n_trajectories=n, time_factor=time_factor)
    if split == "test":
        return data
    trained, val = train.split_off_validation(cfg, data)
    return val if split == "val" else trained


def observed_points(state, cfg, data, *, rate, seed, resolution, data_dir):
    """(N,) bool: which points of the grid the code fitting sees, and a description."""
    spec, device = SPECS[cfg.pde], data.coords.device
    if spec.cut_from and resolution != cfg.size and resolution % cfg.size == 0:  # super-resolution
        k = resolution // cfg.size
        coarse = load_split(cfg, data.split, size=cfg.size, data_dir=data_dir, device=device)
        observed = torch.zeros(data.coords.shape[:2], dtype=torch.bool, device=device)  # (H, W)
        observed[::k, ::k] = observation_mask(coarse, rate, seed)
        how = f"the {cfg.size}-latitude training grid inside the {resolution}-latitude grid"
        return observed.flatten(), how
    if resolution == cfg.size and rate == cfg.subsampling and seed == cfg.mask_seed:
        return state["mask"].flatten().to(device), "the training mask"
    how = "every point" if rate == 1 else f"a new mask (rate {rate}, seed {seed})"
    return observation_mask(data, rate, seed).flatten(), how


def check_memory(n_values, what, device):
    """ValueError when `n_values` float32 numbers, a few times over, exceed this device's memory."""
    total = (torch.cuda.get_device_properties(device).total_memory if device.startswith("cuda")
             else solvers.physical_memory())
    if 4 * 4 * n_values > total:
        raise ValueError(f"{what} needs about {16 * n_values / 2**30:.0f} GiB, more than the "
                         f"{total / 2**30:.0f} GiB here; ask for less")


def check_sizes(cfg, *, split, resolution, points, device, time_factor):
    """ValueError when the forecast at `resolution`, or at `points` free points, would not fit."""
    spec = SPECS[cfg.pde]
    n = {"test": cfg.n_test, "train": cfg.n_train}.get(split, spec.trajectories["train"])
    per_point = n * spec.windows * spec.window * time_factor * len(spec.channels)
    finer = f" --time-factor {time_factor}" if time_factor > 1 else ""
    check_memory(per_point * resolution ** 2 * spec.width_ratio,
                 f"--resolution {resolution}{finer}", device)
    if points is not None:
        legendre = 2 * spec.cut_from ** 2 if spec.cut_from else 0  # sphere truth: nlat^2 per point
        check_memory(points * (per_point + legendre), f"--points {points}", device)


def evaluate(path, *, device="cpu", split="test", subsampling=None, mask_seed=None,
             resolution=None, points=None, fit=None, fit_steps=None, time_factor=1, out=None,
             data_dir="data", data=None, pictures=True, log=print):
    """Forecast each window of a split (default test) from its frame 0 and score it: metrics.json
    and the table first, then pictures in `out`. Returns the metrics ("files": what was written).
    data: the run's own data file, moved (its content unchanged)."""
    file = os.path.join(path, "best.pt") if os.path.isdir(path) else path
    state = train.load_checkpoint(file)
    model, cfg = train.model_from_checkpoint(state, device, data=data)
    model.fit = fit or model.fit
    model.fit_steps = model.fit_steps if fit_steps is None else fit_steps
    rate = cfg.subsampling if subsampling is None else subsampling
    seed = cfg.mask_seed if mask_seed is None else mask_seed
    resolution = cfg.size if resolution is None else resolution
    asked = [flag for flag, on in (("--resolution", resolution != cfg.size), ("--time-factor",
             time_factor > 1), ("--points", points is not None)) if on]
    if SPECS[cfg.pde].arrays is None:                 # a file's frames are in memory already
        check_sizes(cfg, split=split, resolution=resolution, points=points, device=device,
                    time_factor=time_factor)
    elif asked:
        raise ValueError(f"{', '.join(asked)}: {cfg.pde} holds data only, no solver to give "
                         f"other grids, times or points")
    out = out or default_out(path, cfg, split=split, rate=subsampling, seed=mask_seed,
                             res=resolution, points=points, time_factor=time_factor)
    check_writable(out)
    data, observed, how, codes, pred = forecast_split(
        state, model, cfg, split=split, resolution=resolution, rate=rate, seed=seed,
        data_dir=data_dir, device=device, time_factor=time_factor)
    truth = data.frames.flatten(2, 3)                                     # (B, T, N, S)
    grid = "x".join(str(n) for n in reversed(data.coords.shape[:2]))     # W x H (sphere: lon x lat)
    grid = f"{truth.shape[2]} points" if SPECS[cfg.pde].boundary == "points" else grid
    fitted = (f"closed form, ridge {model.ridge.item():.0e}" if model.fit == "closed-form"
              else f"{model.fit_steps} Adam steps")
    metrics = {"checkpoint": os.path.abspath(file), "pde": cfg.pde, "split": split,
               "epoch": state["progress"]["epoch"], "iteration": state["progress"]["iteration"],
               "grid": grid, "windows": len(truth), "frames": len(data.t), "n_in_t": data.n_in_t,
               "observed": how, "observed_fraction": observed.float().mean().item(), "fit": fitted,
               **score(pred, truth, observed, data.n_in_t), "t": data.t.tolist()}
    if time_factor > 1:
        metrics["between_frames"] = between_frames(pred, truth, data.n_in_t, time_factor)
    if points is not None:
        metrics["points"] = free_form(model, cfg, codes, split=split, resolution=resolution,
                                      n_points=points, seed=seed, n_in=data.n_in_t,
                                      data_dir=data_dir, device=device)
    text = json.dumps(metrics, indent=1)
    write_atomic(os.path.join(out, "metrics.json"), lambda tmp: pathlib.Path(tmp).write_text(text))
    report(metrics, log)
    drawn = draw(out, cfg, data, pred, observed=observed, every=time_factor) if pictures else []
    metrics["files"] = ["metrics.json"] + drawn
    log(f"wrote {', '.join(os.path.join(out, f) for f in metrics['files'])}")
    return metrics


def report(metrics, log):
    """The run and its conditions, the tables of DINo and persistence, the free points if any."""
    m = metrics
    log(f"{m['pde']} | {m['checkpoint']} (epoch {m['epoch']}, iteration {m['iteration']}) | "
        f"{m['windows']} {m['split']} windows on {m['grid']} | "
        f"observed: {m['observed']}, {100 * m['observed_fraction']:.1f}% | alpha_0: {m['fit']}")
    held, ratio = m["persistence"]["mse"], m["vs_persistence"]
    log(format_table(m) + "\npersistence (frame 0 held), MSE In-t / Out-t: "
        f"{held['in_t']['all']:.3e} / {held['out_t']['all']:.3e}; DINo's MSE as a fraction of "
        f"it: {ratio['in_t']:.3g} / {ratio['out_t']:.3g}")
    if ratio["out_t"] >= 1:
        log(train.NO_BETTER.format(where=f"{m['split']} windows", ratio=ratio["out_t"]))
    if "between_frames" in m:
        b = m["between_frames"]
        log(f"between the frames (time factor {b['time_factor']}), MSE at the frame times / "
            f"between them: In-t {b['in_t']['frames']:.3e} / {b['in_t']['between']:.3e}, Out-t "
            f"{b['out_t']['frames']:.3e} / {b['out_t']['between']:.3e}")
    if "points" in m:
        p = m["points"]
        log(f"free-form: {p['n']} random points ({p['truth']}): relative MSE "
            f"In-t {p['rel_mse']['in_t']:.3e}, Out-t {p['rel_mse']['out_t']:.3e}")


def forecast_split(state, model, cfg, *, split, resolution, rate, seed, data_dir, device,
                   time_factor=1):
    """Forecast every window of a split from its frame 0, observed on the chosen points:
    (data, observed (N,), its description, codes (B, T, S, D), forecast (B, T, N, S))."""
    data = load_split(cfg, split, size=resolution, data_dir=data_dir, device=device,
                      time_factor=time_factor)
    observed, how = observed_points(state, cfg, data, rate=rate, seed=seed,
                                    resolution=resolution, data_dir=data_dir)
    truth = data.frames.flatten(2, 3)                                     # (B, T, N, S)
    coords = data.coords.flatten(0, 1)                                    # (N, X) physical
    codes = model.forecast_codes(coords[observed], truth[:, 0, observed], data.t)  # (B, T, S, D)
    return data, observed, how, codes, model.decode(coords, codes)


def score(pred, truth, observed, n_in_t):
    """Tables of DINo and of persistence (frame 0 held: the baseline to beat), DINo's MSE as a
    fraction of persistence's (all points), per-frame errors."""
    frames, table = range(truth.shape[1]), mse_table(pred, truth, observed, n_in_t)
    held = mse_table(truth[:, :1].expand_as(truth), truth, observed, n_in_t)
    mse, held_mse = table["mse"], held["mse"]
    return {**table, "persistence": held, "vs_persistence": {
                name: mse[name]["all"] / max(held_mse[name]["all"], 1e-30) for name in mse},
            "mse_vs_time": [(pred[:, k] - truth[:, k]).pow(2).mean().item() for k in frames],
            "rel_mse_vs_time": [relative_mse(pred[:, k], truth[:, k]) for k in frames]}


def between_frames(pred, truth, n_in_t, k):
    """MSE at the frame times (every k-th time: what the model was trained on) and at the times
    between them, In-t and Out-t. pred, truth (B, T, N, S) at k times the frame rate."""
    err = (pred - truth).pow(2).mean(dim=(0, 2, 3))                       # (T,)
    index = torch.arange(len(err), device=err.device)
    on_frame, inside = index % k == 0, index < n_in_t
    return {"time_factor": k, **{name: {"frames": err[part & on_frame].mean().item(),
                                        "between": err[part & ~on_frame].mean().item()}
                                 for name, part in (("in_t", inside), ("out_t", ~inside))}}


def free_form(model, cfg, codes, *, split, resolution, n_points, seed, n_in, data_dir, device):
    """Forecast at random points anywhere in the domain (codes fitted on the grid as usual). The
    truth there: the spectral interpolant of the same test fields on a grid of at least 64 points
    (the size the data are simulated at; cosine or Fourier series, exact for these band-limited
    fields) or, on the sphere, the spherical-harmonic series of the simulation grid's fields."""
    spec = SPECS[cfg.pde]
    size = spec.cut_from or max(64, resolution)
    fine = load_split(cfg, split, size=size, data_dir=data_dir, device=device)
    if spec.boundary == "sphere":
        query = solvers.sphere_random_points(n_points, seed).to(device)  # (Q, 3)
        truth = solvers.sphere_interpolate(fine.frames, query)            # (B, T, Q, S)
        how = f"spherical-harmonic series of the {2 * size}x{size} test fields"
    else:
        generator = torch.Generator().manual_seed(seed)
        s = torch.rand(n_points, 2, generator=generator, dtype=torch.float64)
        spacing = (fine.coords[1, 1] - fine.coords[0, 0]).double().cpu()  # grid step along x and y
        low = fine.coords[0, 0].double().cpu() - (spacing / 2 if spec.boundary == "cosine" else 0.0)
        query = (low + s * spacing * size).float().to(device)            # (Q, 2) physical, anywhere
        truth = solvers.interpolate(fine.frames.double(), s[:, 0], s[:, 1],
                                    boundary=spec.boundary).float()      # (B, T, Q, S)
        how = f"{spec.boundary} spectral interpolation of the {size}x{size} test fields"
    everywhere = torch.ones(n_points, dtype=torch.bool, device=device)
    table = mse_table(model.decode(query, codes), truth, everywhere, n_in)   # pred (B, T, Q, S)
    return {"n": n_points, "seed": seed, "truth": how,
            **{kind: {name: cells["all"] for name, cells in table[kind].items()} for kind in table}}


# ---- pictures: the README's (from several runs), then each evaluation's GIFs and error plot
def figures(folder, runs, *, device="cpu", data_dir="data", log=print):
    """Pictures from finished runs: learning_curves.png (test MSE In-t / Out-t of every run against
    its epochs, from the log kept in last.pt), between_frames.png (test relative MSE of every
    planar run at 4 times the frame rate), forecast.gif (the first planar run) and superres.png
    (the first sphere run observed on its training grid, decoded on the twice finer grid)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    fine_fig, fine_ax = plt.subplots(figsize=(6.4, 3.6))
    files = ["learning_curves.png", "between_frames.png"]
    for run in runs:
        state = train.load_checkpoint(run)
        model, cfg = train.model_from_checkpoint(state, device)
        spec = SPECS[cfg.pde]
        history = train.load_checkpoint(os.path.join(run, "last.pt"))["progress"]["history"]
        data, *_, pred = forecast_split(
            state, model, cfg, split="test", rate=cfg.subsampling, seed=cfg.mask_seed,
            resolution=cfg.size * (2 if spec.cut_from else 1), data_dir=data_dir, device=device)
        n = data.n_in_t
        for ax, key, part in zip(axes, ("test_in_t", "test_out_t"), (slice(0, n), slice(n, None))):
            square = data.frames[:, part].pow(2).mean().item()          # relative MSE -> MSE
            ax.plot([h["epoch"] for h in history], [h[key] * square for h in history], marker=".",
                    label=os.path.basename(os.path.abspath(run)))
        if spec.boundary in ("cosine", "periodic"):                      # planar: exact times
            between_frames_curve(fine_ax, state, model, cfg, run, data_dir=data_dir, device=device)
        if spec.cut_from and "superres.png" not in files:
            files.append("superres.png")
            title = (f"{cfg.pde} {spec.channels[-1]}, t = {data.t[-1]:g} (Out-t): observed on "
                     f"the {cfg.size}-latitude training grid, decoded on {data.frames.shape[2]} "
                     "latitudes")
            decoded = pred[0, -1, :, -1].view(data.frames.shape[2:4])
            save_frame(os.path.join(folder, files[-1]), data.frames[0, -1, ..., -1], decoded, title)
        elif not spec.cut_from and "forecast.gif" not in files:
            files.append("forecast.gif")
            forecast_gif(os.path.join(folder, files[-1]), cfg, data, pred, channel=0, windows=4)
    for ax, name in zip(axes, ("In-t", "Out-t")):
        ax.set(yscale="log", xlabel="epoch", title=f"test MSE, {name}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    _write_figure(fig, os.path.join(folder, files[0]), lambda tmp: fig.savefig(tmp, dpi=80))
    fine_ax.axvline(9.5, color="firebrick", lw=1, label="end of the training horizon")
    fine_ax.set(yscale="log", xlabel="t / frame spacing (dots: the frame times)",
                ylabel="test relative MSE", title="forecasts between the frames (4 per interval)")
    fine_ax.legend(fontsize=7)
    fine_fig.tight_layout()
    _write_figure(fine_fig, os.path.join(folder, files[1]),
                  lambda tmp: fine_fig.savefig(tmp, dpi=80))
    log(f"wrote {', '.join(os.path.join(folder, f) for f in files)}")
    return files


def between_frames_curve(ax, state, model, cfg, run, *, data_dir, device, k=4):
    """One curve on `ax`: a run's test relative MSE per time at k times the frame rate."""
    data, *_, pred = forecast_split(state, model, cfg, split="test", rate=cfg.subsampling,
                                    seed=cfg.mask_seed, resolution=cfg.size, data_dir=data_dir,
                                    device=device, time_factor=k)
    truth = data.frames.flatten(2, 3)                                     # (B, T, N, S)
    err = (pred - truth).pow(2).sum((0, 2, 3)) / truth.pow(2).sum((0, 2, 3))
    ax.plot((data.t / SPECS[cfg.pde].spacing).cpu(), err.cpu(), marker="o", markersize=3,
            markevery=k, label=f"{os.path.basename(os.path.abspath(run))} ({cfg.pde})")


def save_frame(path, truth, pred, title):
    """One frame, truth / prediction / error side by side (H, W each)."""
    truth, pred = truth.cpu().numpy(), pred.cpu().numpy()
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.6))
    limit, err = np.abs(truth).max(), pred - truth
    panels = zip(("truth", "prediction", "error"), (truth, pred, err),
                 (limit, limit, np.abs(err).max()), ("RdBu_r", "RdBu_r", "PuOr_r"))
    for ax, (name, image, lim, cmap) in zip(axes, panels):
        fig.colorbar(ax.imshow(image, cmap=cmap, vmin=-lim, vmax=lim), ax=ax, shrink=0.8)
        ax.set(title=name, xticks=[], yticks=[])
    fig.suptitle(title, fontsize=9)
    _write_figure(fig, path, lambda tmp: fig.savefig(tmp, dpi=80))


def save_gif(path, truth, pred, t, *, n_in_t, title, coords=None):
    """Rows truth / prediction / error, one column per window, one GIF frame per time, and a time
    line with the training horizon marked. truth, pred (B, T, H, W): one channel, a few windows;
    or (B, T, N) at the points coords (N, X), as `painter` draws them (X = 1: truth and prediction
    as curves in one row, the error below)."""
    truth, pred = truth.cpu().numpy(), pred.cpu().numpy()
    rows = (("truth", truth, "RdBu_r"), ("prediction", pred, "RdBu_r"),
            ("error", pred - truth, "PuOr_r"))
    limits = [np.maximum(np.abs(data).max(axis=(0, *range(2, data.ndim))), 1e-12)  # per frame
              for data in (truth, truth, pred - truth)]  # (heat fades 50x); prediction: truth's
    draw, aspect = painter(coords, truth.shape)                   # panel width / height
    place = (0, 0, 1) if coords is not None and coords.shape[1] == 1 else (0, 1, 2)  # rows' axes
    n_windows = truth.shape[0]
    fig, axes = plt.subplots(place[-1] + 1, n_windows, squeeze=False,
                             figsize=(1.6 * aspect * n_windows + 0.8, 1.8 * place[-1] + 1.8))
    fig.subplots_adjust(left=0.08, right=0.86, top=0.9, bottom=0.14, hspace=0.08, wspace=0.06)
    panels = []
    for (name, data, cmap), lim, row in zip(rows, limits, place):
        for col, ax in enumerate(axes[row]):
            image, redraw = draw(ax, data[col, 0], cmap=cmap, lim=lim[0], label=name)
            panels.append((redraw, data, col, lim))
            ax.set(xticks=[], yticks=[], ylabel=name if col == 0 and image is not None else "")
        if image is None:                                         # curves: named in a legend
            axes[row, 0].legend(fontsize=7, loc="upper right")
        else:
            fig.colorbar(image, ax=axes[row].tolist(), shrink=0.9, pad=0.02)
    cursor, heading = time_line(fig, t, n_in_t), fig.suptitle("", fontsize=10)

    def frame(k):
        for redraw, data, col, lim in panels:
            redraw(data[col, k], lim[k])
        cursor.set_xdata([t[k], t[k]])
        when = ("In-t (inside the training horizon)" if k < n_in_t
                else "Out-t (BEYOND the training horizon)")
        heading.set_text(f"{title}   t = {t[k]:.2f}   {when}")
        heading.set_color("black" if k < n_in_t else "firebrick")
    animation = FuncAnimation(fig, frame, frames=len(t))
    _write_figure(fig, path, lambda tmp: animation.save(tmp, writer=PillowWriter(fps=4), dpi=72))


def painter(coords, shape):
    """How save_gif draws a frame in a panel, draw(ax, values, *, cmap, lim, label) -> (colour
    image or None, redraw(values, lim)), and a panel's width / height. values (H, W), an image of
    shape (.., H, W); or (N,) at the points coords (N, X): Delaunay triangles coloured (X = 2;
    none over 4 median sides: no bridge over a gap in the domain), dots on the first two axes
    (X > 2), a curve over x (X = 1)."""
    if coords is not None and coords.shape[1] == 2:
        mesh = matplotlib.tri.Triangulation(*coords.T)
        sides = np.hypot(*(coords[mesh.triangles] - coords[np.roll(mesh.triangles, 1, 1)]).T)
        mesh.set_mask(sides.max(0) > 4 * np.median(sides))        # sides (3, triangles)

    def draw(ax, values, *, cmap, lim, label):
        if coords is not None and coords.shape[1] == 1:
            order = np.argsort(coords[:, 0])
            line = ax.plot(coords[order, 0], values[order], lw=1, label=label)[0]
            return None, lambda v, m: (line.set_ydata(v[order]), ax.set_ylim(-1.1 * m, 1.1 * m))
        colours = dict(cmap=cmap, vmin=-lim, vmax=lim)
        art = (ax.imshow(values, **colours) if coords is None else
               ax.tripcolor(mesh, values, shading="gouraud", **colours) if coords.shape[1] == 2
               else ax.scatter(*coords[:, :2].T, c=values, s=3e3 / len(coords), **colours))
        ax.set_aspect("equal")
        return art, lambda v, lim: ((art.set_data if coords is None else art.set_array)(v),
                                    art.set_clim(-lim, lim))
    spread = None if coords is None else np.ptp(coords[:, :2], axis=0)
    return draw, (shape[-1] / shape[-2] if coords is None else 2.0 if len(spread) == 1  # W / H
                  else float(np.clip(spread[0] / max(spread[1], 1e-12), 0.5, 2)))


def _write_figure(fig, path, save):
    """write_atomic(path, save), then close `fig` whether or not the write succeeded."""
    try:
        write_atomic(path, save)
    finally:
        plt.close(fig)


def time_line(fig, t, n_in_t):
    """The time line under a GIF's panels, In-t green and Out-t red; returns its cursor."""
    line = fig.add_axes([0.08, 0.05, 0.70, 0.03])
    horizon = (t[n_in_t - 1] + t[n_in_t]) / 2 if n_in_t < len(t) else t[-1]
    line.axvspan(t[0], horizon, color="tab:green", alpha=0.3)
    line.axvspan(horizon, t[-1], color="tab:red", alpha=0.25)
    line.set(xlim=(t[0], t[-1]), yticks=[])
    line.tick_params(labelsize=7)
    line.text(horizon, 1.3, "end of training horizon", ha="center", fontsize=7,
              transform=line.get_xaxis_transform())
    return line.axvline(t[0], color="black", lw=2)


def save_error_plot(path, t, curves, *, n_in_t, title, every=1):
    """MSE per time (curves: label -> (T,) values) with In-t / Out-t shaded; a marker at every
    `every`-th time (the frame times when times between them are forecast too)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    half = (t[1] - t[0]) / 2 if len(t) > 1 else 0.5                   # half a frame step
    horizon = t[n_in_t - 1] + half
    ax.axvspan(t[0] - half, horizon, color="tab:green", alpha=0.12, label="In-t (training horizon)")
    ax.axvspan(horizon, t[-1] + half, color="tab:red", alpha=0.10, label="Out-t (extrapolation)")
    for label, values in curves.items():
        ax.plot(t, values, marker="o", markersize=3, markevery=every, label=label)
    ax.set(yscale="log", xlabel="t", ylabel="MSE")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _write_figure(fig, path, lambda tmp: fig.savefig(tmp, dpi=90))


def draw(out, cfg, data, pred, *, observed, every=1):
    """One GIF per state channel (a few windows) and the MSE-vs-time PNG; returns file names."""
    B, T, H, W, S = data.frames.shape
    files = [f"forecast_{name}.gif" for name in SPECS[cfg.pde].channels]
    for s, file in enumerate(files):
        forecast_gif(os.path.join(out, file), cfg, data, pred, channel=s,
                     windows=4 if H == W or W == 1 else 2)       # the sphere's panels are 2:1
    t = data.t.cpu().numpy()
    err = (pred - data.frames.flatten(2, 3)).pow(2).mean(-1).mean(0)     # (T, N)
    curves = {"all points": err.mean(1).cpu().numpy()}
    if not observed.all():
        curves["observed (In-s)"] = err[:, observed].mean(1).cpu().numpy()
        curves["unobserved (Out-s)"] = err[:, ~observed].mean(1).cpu().numpy()
    marked = " (dots: frame times)" if every > 1 else ""
    save_error_plot(os.path.join(out, "mse_vs_time.png"), t, curves, n_in_t=data.n_in_t,
                    title=f"{cfg.pde}: {data.split} MSE per time ({B} windows){marked}",
                    every=every)
    return files + ["mse_vs_time.png"]


def forecast_gif(path, cfg, data, pred, *, channel, windows):
    """save_gif of a channel of the first windows of `data` and of their forecast pred (B, T, N, S),
    on the grid or at the points of a point set ((N, 1) grid frames: (B, T, N, S))."""
    spec = SPECS[cfg.pde]
    points = data.coords.flatten(0, 1).cpu().numpy() if spec.boundary == "points" else None
    truth = data.frames[:windows] if points is None else data.frames[:windows].flatten(2, 3)
    save_gif(path, truth[..., channel], pred[:windows].view_as(truth)[..., channel],
             data.t.cpu().numpy(), n_in_t=data.n_in_t, coords=points,
             title=f"{os.path.basename(cfg.pde)} {spec.channels[channel]}")


def default_out(path, cfg, *, split, rate, seed, res, points, time_factor):
    run = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    name = os.path.splitext(os.path.basename(path))[0]
    tags = [] if os.path.isdir(path) or name == "best" else [name]
    tags += [split] if split != "test" else []
    conditions = (("res", res if res != cfg.size else None), ("s", rate), ("seed", seed),
                  ("points", points), ("tf", time_factor if time_factor > 1 else None))
    tags += [f"{flag}{value:g}" for flag, value in conditions if value is not None]
    return os.path.join(run, "-".join(["eval"] + tags))


# ---- command line
def parser():
    usage = __doc__[__doc__.index("Usage:"):__doc__.index("Files land")].rstrip()
    p = argparse.ArgumentParser(
        prog="evaluate.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Forecast every test window from its first frame and score it.\n" + usage)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")   # one line
    add = p.add_argument
    add("run", nargs="+",
        help="run folder (its best.pt) or a checkpoint of train.py (several: --figures only)")
    add("--split", choices=("test", "train", "val"), default="test",
        help="forecast the test (default) or training windows, or 'val': training trajectories "
             "the run left out (--n-train)")
    add("--subsampling", type=float, metavar="RATE",
        help="observe this fraction of the grid (default: the run's)")
    add("--mask-seed", type=int, help="seed of the observation mask: a new grid (paper Table 3)")
    add("--resolution", type=int, metavar="N",
        help="the same fields at N x N (sphere: N latitudes x 2N longitudes)")
    add("--points", type=int, metavar="N",
        help="also forecast at N random points anywhere in the domain")
    add("--fit", choices=train.FITS, help="how alpha_0 is fitted (default: the run's, closed-form)")
    add("--fit-steps", type=int, help="Adam steps with --fit adam (default: the run's)")
    add("--time-factor", type=int, metavar="K", default=1, help="forecast K times per frame "
        "interval and score the times between frames too (planar PDEs; default 1)")
    add("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    add("--data-dir", default="data", help="dataset cache folder (default: data)")
    add("--data", metavar="FILE.npz", help="the run's own data file, moved (same content)")
    add("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    add("--out", help="output folder (default: RUN/eval[-conditions])")
    add("--no-pictures", action="store_true", help="skip the GIFs and the PNG")
    add("--figures", metavar="DIR", help="write the README's pictures of the given runs into DIR")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    for name, low in (("resolution", 4), ("points", 1), ("fit_steps", 0), ("threads", 1),
                      ("time_factor", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser().error(f"--{name.replace('_', '-')} {value} must be at least {low}")
    if args.subsampling is not None and not 0 < args.subsampling <= 1:
        parser().error(f"--subsampling {args.subsampling} is outside (0, 1]")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if len(args.run) > 1 and not args.figures:
        parser().error(f"give one run (several only with --figures), got {len(args.run)}")
    try:
        device = solvers.resolve_device(args.device)
        if args.figures:
            return figures(args.figures, args.run, device=device, data_dir=args.data_dir)
        return evaluate(args.run[0], device=device, split=args.split, subsampling=args.subsampling,
                        mask_seed=args.mask_seed, resolution=args.resolution, points=args.points,
                        fit=args.fit, fit_steps=args.fit_steps, time_factor=args.time_factor,
                        out=args.out, data_dir=args.data_dir, data=args.data,
                        pictures=not args.no_pictures)
    except (ValueError, OSError) as err:
        parser().error(str(err))


if __name__ == "__main__":
    main()
