"""Our own PDE solvers and the datasets DINo trains on (heat, wave, Navier-Stokes, shallow water).

DINo (Yin, Kirchmeyer et al., ICLR 2023), Sec. 5 "Experiments" and the appendix on datasets. The
official code makes its data with py-pde (wave; heat is our extension), FNO's Crank-Nicolson +
Euler script (Navier-Stokes) and Dedalus (the sphere). We replace all three with solvers that are
exact in time where the PDE is linear and fourth order (planar) or second order (sphere) where it
is not, all in torch (plus numpy for the sphere's Legendre tables), batched, on any device.

Layout. Every planar solver takes a batch of initial states (B, H, W) and output times t (T,)
(the initial state sits at time 0) and returns frames CHANNELS LAST, (B, T, H, W, S), by choice:
solvers, datasets (windows, T, H, W, S) and the model (B, T, N, S) share one layout, so a frame
flattens to points with a reshape, never a permute. Grid axis 0 (H) is x, axis 1 (W) is y.

The file reads top to bottom:
1. The data contract: PDEData (what a dataset is), PDESpec and the SPECS table (the paper's
   datasets), load_dataset and its helpers, register_file (your own .npz data), observation_mask.
   A planar trajectory is always simulated at the paper's 64x64 and evaluated on the requested
   grid through its spectral interpolant, so a 32x32 or 128x128 set holds the same fields as the
   64x64 one, point for point; the sphere is simulated at 256x128, smaller sets every k-th point.
2. Grids and spectral interpolation: trajectory seeds, planar grids, resample and interpolate.
3-5. The planar solvers (each docstring gives its method): heat (zero-flux walls) and wave
   (periodic), exact in time; Navier-Stokes (periodic): pseudo-spectral IF-RK4, Courant-bounded
   steps, an unstable one retried with half the step or refused, never taken silently.
6. The planar dataset makers: initial states from the trajectory seeds, solved in batches.
7. Shallow water on the sphere (Galewsky jets; equations in the section's comments), frames
   (B, T, nlat, 2 nlat, S) north to south, longitude from 0; the dataset's points, mask and maker.
8-9. Files and devices (atomic writes, safe torch loading, device choice); the command line.

Use:
    from solvers import load_dataset
    data = load_dataset("navier-stokes", "train")     # PDEData, frames (512, 20, 64, 64, 1)
    python solvers.py heat --split test --size 128      # build (or load) one set, print a summary
    python solvers.py shallow-water --split test        # 2 Galewsky runs of 320 h at 256x128
"""
import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch

from grf import sample_grf

PDES = ("heat", "wave", "navier-stokes", "shallow-water")


# ---------------------------------------------------------------- the data contract
@dataclass
class PDEData:
    """One split of one PDE's dataset, as load_dataset returns it."""
    pde: str                   # 'heat' | 'wave' | 'navier-stokes' | 'shallow-water'
    split: str                 # 'train' | 'test'
    frames: torch.Tensor       # (windows, T, H, W, S) float32 (points of a file: (.., N, 1, S))
    coords: torch.Tensor       # (H, W, X) physical positions, float32 (points: (N, 1, X))
    t: torch.Tensor            # (T,) times of the frames within a window, t[0] = 0
    trajectory: torch.Tensor   # (windows,) long: the trajectory each window came from
    mask: torch.Tensor | None  # (H, W) bool default observation mask, else None
    n_in_t: int                # frames inside the training horizon (10 of 20)


@dataclass(frozen=True)
class PDESpec:
    """Everything load_dataset needs to know about one PDE's dataset (the paper's table)."""
    channels: tuple          # names of the S state channels
    boundary: str            # the grid's edges: 'cosine' (zero-flux walls), 'periodic', 'sphere',
                             # 'none' (a file's grid), 'points' (a file's point set)
    spacing: float           # time between frames
    windows: int             # windows of `window` frames per trajectory
    trajectories: dict       # split -> paper count (the default)
    sizes: dict              # split -> paper grid size (H)
    make: Callable           # (split, indices, size, verbose=, device=) -> (n, T, H, W, S) on
                             # the CPU, computed on `device`; T = windows * window
    coords: Callable         # coords(size) -> (H, W, X) physical positions
    mask: Callable = lambda size: None  # size -> (H, W) bool default observation mask, or None
    settings: dict = field(default_factory=dict)  # physical settings, part of the cache key
    window: int = 20
    n_in_t: int = 10
    width_ratio: int = 1     # points along W per point along H (sphere: 2 longitudes per latitude)
    cut_from: int | None = None  # if set: other sizes' sets are every k-th point of this size's set
    most: dict | None = None     # split -> largest count allowed, where it exceeds the paper's
    arrays: dict | None = None   # your own data (register_file): split -> trajectories, and "t"

    def largest(self, split):
        """The most trajectories `split` may hold: `most` where set, else the paper's count."""
        return (self.most or self.trajectories)[split]


# The sphere's settings in SPECS (so in its cache key); its solver's other constants: its section.
SPHERE_RADIUS = 6.37122e6          # m
SPHERE_HYPERDIFFUSION = 1.0e5 * SPHERE_RADIUS**2 / 32**2   # m^4/s, Dedalus's "matched at l = 32"
SPHERE_DATA_NLAT = 128             # the paper's simulation grid: 256 lon x 128 lat (T127)

# The lambdas look up makers and grids defined further down when called: the table can come first.
SPECS = {
    "heat": PDESpec(
        channels=("u",), boundary="cosine", spacing=0.25, windows=2,
        trajectories={"train": 256, "test": 16}, sizes={"train": 64, "test": 64},
        most={"train": 512, "test": 16},  # exact and cheap: the paper preset trains on 512
        make=lambda *args, **kwargs: make_heat(*args, **kwargs),
        coords=lambda size: planar_coords(size, low=-1.0, high=1.0, cell_centred=True),
        settings=dict(diffusivity=0.1, grf=(2.5, 7.0), domain="[-1,1]^2 cell-centred, Neumann",
                      dtype="float32")),
    "wave": PDESpec(
        channels=("u", "du_dt"), boundary="periodic", spacing=0.25, windows=8,
        trajectories={"train": 64, "test": 4}, sizes={"train": 64, "test": 64},
        make=lambda *args, **kwargs: make_wave(*args, **kwargs),
        coords=lambda size: planar_coords(size, low=-1.0, high=1.0, cell_centred=False),
        settings=dict(speed=1.0 / 16, radius=(0.25, 0.30), height=(2.0, 4.0),
                      domain="[-1,1)^2 periodic", dtype="float32")),
    "navier-stokes": PDESpec(
        channels=("vorticity",), boundary="periodic", spacing=1.0, windows=2,
        trajectories={"train": 256, "test": 16}, sizes={"train": 64, "test": 64},
        make=lambda *args, **kwargs: make_navier_stokes(*args, **kwargs),
        coords=lambda size: planar_coords(size, low=0.0, high=1.0, cell_centred=False),
        settings=dict(viscosity=1e-3, spin_up=30.0, forcing="0.1(sin 2pi(x+y) + cos 2pi(x+y))",
                      grf=(2.5, 7.0), scheme="IF-RK4 cfl 2.0 float32", domain="[0,1)^2 periodic")),
    "shallow-water": PDESpec(
        channels=("height", "vorticity"), boundary="sphere", spacing=1.0, windows=8,
        trajectories={"train": 8, "test": 2}, sizes={"train": 64, "test": 64}, width_ratio=2,
        cut_from=SPHERE_DATA_NLAT, most={"train": 16, "test": 2},  # a later paper used 16 runs
        make=lambda split, indices, size, **kwargs: shallow_water_trajectories(
            split, indices, size=size, threads=1, **kwargs),
        coords=lambda size: sphere_coords(size), mask=lambda size: latitude_mask(size),
        settings=dict(galewsky_u_max=(60.0, 80.0), hours=(160, 320), sim_nlat=SPHERE_DATA_NLAT,
                      dt=600.0, hyperdiffusion=SPHERE_HYPERDIFFUSION,
                      scheme="IMEX RK222, 3/2 padding", units="h'/R*3000, zeta[1/h]*2")),
}
CACHE_VERSION = 2  # bump when a generator changes in a way the settings do not show (2: the
# Navier-Stokes spin-up re-planned every time unit)


def load_dataset(pde, split, *, size=None, data_dir="data", n_trajectories=None, device="cpu",
                 verbose=True, time_factor=1):
    """The paper's dataset for `pde` and `split` as a PDEData (see the dataclass for shapes).
    size: grid points along H (None = the paper's 64); n_trajectories: None = the paper's count,
    smaller = the first n trajectories of the full set. Generated on the first call and cached in
    data_dir, named by a hash of every setting, with a checksum of the data; an unreadable, stale or
    corrupted cache file is reported in one line and regenerated. Built on `device` (a GPU takes
    seconds where a CPU thread takes minutes; the results differ by rounding only, so the cache does
    not record where). time_factor K > 1 (planar sets): the same windows with K - 1 more frames
    between each two, K (window - 1) + 1 in all, from the same simulations (heat and wave exact in
    time). ValueError for bad arguments or a data_dir that cannot hold the cache (checked before
    any work); OSError if writing the cache fails (leaving nothing behind)."""
    spec, size, n = _resolve(pde, split, size, n_trajectories, time_factor)
    if spec.arrays is not None:              # a file of the user's: nothing to simulate or cache
        return _file_windows(pde, split, spec, n, device)
    settings = json.loads(json.dumps(dict(  # canonical form (tuples -> lists) for comparison
        pde=pde, split=split, size=size, n_trajectories=n, version=CACHE_VERSION,
        spacing=spec.spacing, window=spec.window, windows=spec.windows, channels=len(spec.channels),
        **spec.settings, **({"time_factor": time_factor} if time_factor > 1 else {}))))
    path = _cache_path(data_dir, pde=pde, split=split, size=size, n=n, settings=settings)
    span = time_factor * (spec.window - 1) + 1                             # frames per window
    payload, problem = (_read_cache(path, settings, (n * spec.windows, span, len(spec.channels)))
                        if os.path.exists(path) else (None, None))
    if problem:
        print(f"cache {path} is {problem}; regenerating it", flush=True)
    if payload is None:
        check_writable(data_dir, name="data_dir")
        start = time.time()
        if verbose:
            grid = "x".join(map(str, reversed(spec.coords(size).shape[:2])))  # W x H (lon x lat)
            print(f"generating {pde} {split}: {n} trajectories on a {grid} grid -> {path}",
                  flush=True)
        payload = _build(pde, split, size=size, n=n, spec=spec, data_dir=data_dir, verbose=verbose,
                         device=device, time_factor=time_factor)
        payload["settings"], payload["checksum"] = settings, _checksum(payload)
        save_torch(path, payload)
        if verbose:
            print(f"generated {pde} {split} in {time.time() - start:.1f} s "
                  f"({os.path.getsize(path) / 2**20:.1f} MiB)")
    on_device = {key: None if payload[key] is None else payload[key].to(device)
                 for key in ("frames", "coords", "t", "trajectory", "mask")}
    return PDEData(pde=pde, split=split, **on_device, n_in_t=time_factor * (spec.n_in_t - 1) + 1)


def _resolve(pde, split, size, n_trajectories, time_factor=1):
    """(spec, size, n) for load_dataset: defaults filled in, every argument checked (ValueError)."""
    if pde not in SPECS:
        raise ValueError(f"unknown pde {pde!r}; allowed: {', '.join(PDES)}")
    spec = SPECS[pde]
    if split not in spec.trajectories:
        raise ValueError(f"unknown split {split!r} for {pde}; "
                         f"allowed: {', '.join(spec.trajectories)}")
    for name, value in (("size", size), ("n_trajectories", n_trajectories)):
        if value is not None and (isinstance(value, bool) or not float(value).is_integer()):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    size = spec.sizes[split] if size is None else int(size)
    if size < 4:
        raise ValueError(f"size must be >= 4 grid points, got {size}")
    if spec.cut_from and spec.cut_from % size:
        allowed = [s for s in range(4, spec.cut_from + 1) if spec.cut_from % s == 0]
        raise ValueError(f"size {size} is not allowed for {pde}: it must divide the simulation "
                         f"grid {spec.cut_from} (allowed: {', '.join(map(str, allowed))})")
    if isinstance(time_factor, bool) or not isinstance(time_factor, int) or time_factor < 1:
        raise ValueError(f"time_factor must be a whole number >= 1, got {time_factor!r}")
    if time_factor > 1 and spec.boundary not in ("cosine", "periodic"):
        raise ValueError(f"time_factor {time_factor}: {pde}'s frames are all there is (hourly "
                         f"solver output, or a file); only the planar solvers' sets allow > 1")
    if spec.arrays is not None and size != spec.sizes[split]:
        raise ValueError(f"size {size}: {pde} holds its frames on one grid, {spec.sizes[split]}")
    n = spec.trajectories[split] if n_trajectories is None else int(n_trajectories)
    most = spec.largest(split)
    if not 1 <= n <= most:
        raise ValueError(f"n_trajectories must be in 1..{most} for {pde} {split}, "
                         f"got {n_trajectories}")
    # float32 frames, held about three times while a set is built, resampled and serialised
    need = (3 * 4 * n * spec.windows * spec.window * time_factor * size * size * spec.width_ratio
            * len(spec.channels))
    if need > physical_memory() and spec.arrays is None:   # a file's frames are in memory already
        raise ValueError(f"a {pde} {split} set of {n} trajectories at size {size} needs about "
                         f"{need / 2**30:.0f} GiB of memory, more than this machine's "
                         f"{physical_memory() / 2**30:.0f} GiB; choose a smaller size")
    return spec, size, n


def _cache_path(data_dir, *, pde, split, size, n, settings):
    """The cache file: a readable name plus a hash of every setting (new settings, new file)."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(data_dir, f"{pde}-{split}-{size}px-{n}traj-{digest}.pt")


def _checksum(payload):
    """SHA-256 of the stored tensors' bytes: a flipped byte anywhere in the data is caught on load
    (the zip container itself only notices truncation)."""
    digest = hashlib.sha256()
    for key in ("frames", "coords", "t", "trajectory", "mask"):
        if payload[key] is not None:
            digest.update(payload[key].contiguous().numpy())
    return digest.hexdigest()


def _read_cache(path, settings, expected_shape):
    """(payload, None), or (None, why) when the file is unreadable, stale or corrupted."""
    try:
        payload = load_torch(path, kind="a dataset cache")
    except ValueError as err:  # truncated, not a torch file, ...
        return None, f"unreadable ({str(err).split(' is ')[-1]})"
    if not isinstance(payload, dict) or payload.get("settings") != settings:
        return None, "its stored settings differ"
    if tuple(payload["frames"].shape[:2]) + tuple(payload["frames"].shape[4:]) != expected_shape:
        return None, "its shapes differ"
    if payload.get("checksum") != _checksum(payload):
        return None, "corrupted (checksum mismatch)"
    return payload, None


def _build(pde, split, *, size, n, spec, data_dir, verbose, device, time_factor):
    """The payload of a new cache file (all but its settings and checksum)."""
    k, span = time_factor, time_factor * (spec.window - 1) + 1
    if spec.cut_from and size != spec.cut_from:  # every k-th point of the (cached) full-size set
        stride = spec.cut_from // size
        frames = load_dataset(pde, split, size=spec.cut_from, data_dir=data_dir, n_trajectories=n,
                              verbose=verbose, device=device).frames[:, :, ::stride, ::stride].cpu()
    else:
        finer = {} if k == 1 else dict(n_frames=k * spec.windows * spec.window,
                                       spacing=spec.spacing / k)
        full = spec.make(split, range(n), size, verbose=verbose, device=device, **finer)
        starts = range(0, k * spec.windows * spec.window, k * spec.window)   # (n, T, H, W, S) ->
        frames = torch.stack([full[:, a:a + span] for a in starts], 1).flatten(0, 1)  # windows
    if not torch.isfinite(frames).all():
        raise RuntimeError(f"{pde} {split}: the generator produced non-finite values")
    mask = spec.mask(size)
    return dict(frames=frames.float().contiguous(), coords=spec.coords(size).float(),
                t=spec.spacing / k * torch.arange(span, dtype=torch.float32),
                trajectory=torch.arange(n).repeat_interleave(spec.windows),
                mask=None if mask is None else mask.bool())


def register_file(path, *, window=20, sha256=None):
    """Your own trajectories as a dataset: reads and checks the .npz file `path` and enters it in
    SPECS under its absolute path (returned), so that load_dataset(path, split) and all built on it
    work as for the solvers' sets. The file holds `frames` (trajectories, T, H, W, S), `coords`
    (H, W, X) positions, `t` (T,) increasing times and optionally `mask` (H, W) bool (the points
    that exist), `channels` (S,) names and `test_frames` (trajectories, T, H, W, S), the test split
    (else the last eighth of the trajectories, at least one). Or points: `frames` (trajectories,
    T, N, S), `coords` (N, X) distinct, `mask` (N,), held as an (N, 1) grid (boundary 'points').
    Each trajectory gives T // window windows, half of each inside the training horizon. The
    SHA-256 of its bytes is kept (in the spec's settings); `sha256` given: the file must have it.
    ValueError naming the key and what it should be, or the path and both hashes."""
    path = os.path.abspath(path)
    if sha256 and not os.path.isfile(path):
        raise ValueError(f"the run's data file {path!r} is missing (moved? give --data NEWPATH; "
                         f"its sha256: {sha256})")
    if path not in SPECS or SPECS[path].window != window:
        _register_file(path, window)
    found = SPECS[path].settings["sha256"]
    if sha256 not in (None, found):
        raise ValueError(f"{path!r} has changed since the run was trained (sha256 {found[:16]}..., "
                         f"the run's {sha256[:16]}...): give the original file (--data FILE)")
    return path


def _register_file(path, window):
    arrays, digest = _read_npz(path)
    need = functools.partial(_file_array, path, arrays)
    points = getattr(arrays.get("frames"), "ndim", 5) == 4       # (trajectories, T, N, S)
    frames = need("frames", (None,) * (4 if points else 5))
    n, steps, *where, channels = frames.shape                      # where: (H, W) or (N,)
    coords, t = need("coords", (*where, None)), need("t", (steps,))
    test = need("test_frames", (None, steps, *where, channels)) if "test_frames" in arrays else None
    mask = need("mask", tuple(where), "b") if "mask" in arrays else None
    if coords.shape[-1] < 1:
        raise ValueError(f"{path!r}: 'coords' must give at least one coordinate per point, got "
                         f"shape {coords.shape}")
    if points:  # held as an (N, 1) grid: all that flattens (H, W) -> N works on it unchanged
        unique, counts = np.unique(coords, axis=0, return_counts=True)   # two values at a point
        if counts.max() > 1:
            twice = unique[counts.argmax()].tolist()
            raise ValueError(f"{path!r}: 'coords' lists the point {twice} {counts.max()} times; "
                             f"allowed: each point once")
        frames, coords = frames[..., None, :], coords[..., None, :]   # (n, T, N, 1, S), (N, 1, X)
        test = None if test is None else test[..., None, :]
        mask = None if mask is None else mask[:, None]                 # (N, 1)
    names = tuple(need("channels", (channels,), "U")) if "channels" in arrays else tuple(
        f"u{i}" for i in range(channels))
    if (np.diff(t) <= 0).any():
        raise ValueError(f"{path!r}: 't' must increase strictly, got {t.tolist()}")
    if not 2 <= window <= steps:
        raise ValueError(f"{path!r} has {steps} frames per trajectory: --window {window} must be "
                         f"in 2..{steps}")
    starts = range(0, steps - window + 1, window)
    if any(not np.allclose(t[a:a + window] - t[a], t[:window] - t[0]) for a in starts):
        raise ValueError(f"{path!r}: 't' is not evenly spaced, windows of {window} frames would "
                         f"not share their times; use --window {steps}")
    if mask is not None and not mask.any():
        raise ValueError(f"{path!r}: 'mask' hides every point")
    if test is None and n < 2:
        raise ValueError(f"{path!r}: one trajectory and no 'test_frames': nothing to test on")
    if test is None:
        frames, test = frames[:n - max(1, n // 8)], frames[n - max(1, n // 8):]
    SPECS[path] = PDESpec(
        channels=names, boundary="points" if points else "none", spacing=float(t[1] - t[0]),
        windows=len(starts), trajectories={"train": len(frames), "test": len(test)},
        sizes={"train": where[0], "test": where[0]},
        make=None, coords=lambda size: torch.tensor(coords, dtype=torch.float32),
        mask=lambda size: None if mask is None else torch.tensor(mask), window=window,
        n_in_t=window // 2, arrays={"train": frames, "test": test, "t": t[:window] - t[0]},
        settings={"sha256": digest})


def _read_npz(path):
    """({key: array}, SHA-256 of the bytes) of an .npz file, loaded without pickles; else a
    one-line ValueError."""
    try:
        with open(path, "rb") as f:
            content = f.read()
        if content[:4] != b"PK\x03\x04":              # np.savez writes a zip archive
            raise ValueError(f"{path!r} is not an .npz file (np.savez writes one)")
        with np.load(io.BytesIO(content), allow_pickle=False) as file:
            return {key: file[key] for key in file.files}, hashlib.sha256(content).hexdigest()
    except OSError as err:
        raise ValueError(f"{path!r} cannot be read ({err.strerror or err})") from None
    except (EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path!r} is damaged ({type(err).__name__})") from None
    except ValueError as err:                       # numpy refuses object arrays: pickles
        if "pickle" in str(err):
            raise ValueError(f"{path!r} holds pickled objects: refused (loading them runs "
                             f"code)") from None
        raise


def _file_array(path, arrays, key, shape, kind="fiu"):
    """arrays[key] of register_file's `path`, checked: its shape (sizes, None for any) and numpy
    dtype kinds ('fiu' numbers, then also finite; 'b' bool; 'U' strings), else a ValueError."""
    a = arrays.get(key)
    if a is None or a.ndim != len(shape) or a.dtype.kind not in kind or any(
            want not in (None, got) for want, got in zip(shape, a.shape)):
        what = {"fiu": "numbers", "b": "bool", "U": "strings"}[kind]
        shape = " x ".join(str(size or "?") for size in shape)
        got = "missing" if a is None else f"{a.dtype} of shape {a.shape}"
        raise ValueError(f"{path!r}: {key!r} must be {what} of shape {shape}, got {got}")
    if kind == "fiu" and not np.isfinite(a).all():
        raise ValueError(f"{path!r}: {key!r} holds NaN or infinite values")
    return a


def _file_windows(pde, split, spec, n, device):
    """load_dataset for a registered file: the first n trajectories of a split, cut in windows."""
    frames = torch.tensor(spec.arrays[split][:n, :spec.windows * spec.window], dtype=torch.float32)
    mask = spec.mask(None)
    return PDEData(pde=pde, split=split, n_in_t=spec.n_in_t, coords=spec.coords(None).to(device),
                   frames=frames.reshape(-1, spec.window, *frames.shape[2:]).to(device),
                   t=torch.tensor(spec.arrays["t"], dtype=torch.float32, device=device),
                   trajectory=torch.arange(n, device=device).repeat_interleave(spec.windows),
                   mask=None if mask is None else mask.to(device))


def observation_mask(data, rate, seed):
    """(H, W) bool: the points a model observes. The PDE's own mask (sphere: latitude thinning)
    AND, for rate < 1, a uniform random draw of that fraction of the grid (paper: 5/25/100%).
    Drawn on the CPU from its own generator, so a seed gives the same mask on any device."""
    if not 0 < rate <= 1:
        raise ValueError(f"subsampling rate {rate} is outside (0, 1]")
    h, w = data.coords.shape[:2]
    mask = torch.ones(h, w, dtype=torch.bool) if data.mask is None else data.mask.cpu().clone()
    if rate < 1.0:
        mask &= torch.rand(h, w, generator=torch.Generator().manual_seed(seed)) < rate
    if not mask.any():
        raise ValueError(f"subsampling rate {rate} leaves no observed point on a {h}x{w} grid")
    return mask.to(data.coords.device)


# ---------------------------------------------------------------- grids and spectral interpolation
def trajectory_seed(split, index):
    """The seed of trajectory (split, index): index for train, 2^31 - 1 - index for test (disjoint
    sets, as the official code)."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: allowed 'train' or 'test'")
    if not 0 <= int(index) < 2**30:
        raise ValueError(f"index={index}: need 0 <= index < 2^30")
    return int(index) if split == "train" else 2**31 - 1 - int(index)


def planar_coords(size, *, low, high, cell_centred):
    """(size, size, 2) physical positions (x along H, y along W) of a square grid on [low, high)."""
    dx = (high - low) / size
    x = low + dx * (torch.arange(size, dtype=torch.float64) + (0.5 if cell_centred else 0.0))
    return torch.stack(torch.meshgrid(x, x, indexing="ij"), dim=-1)  # (H, W, 2)


def cosine_modes(n, s, **opts):
    """(len(s), n): cos(pi m s) for m = 0..n-1 at positions s (fractions of the domain, [0, 1]).
    At the cell centres s = (i + 1/2)/n this is the DCT-II: the modes of a zero-flux grid."""
    m = torch.arange(n, **opts)
    return torch.cos(math.pi * torch.as_tensor(s, **opts)[:, None] * m[None, :])


def cosine_synthesis_weights(n, **opts):
    """Weights of the inverse DCT-II: 1/n for mode 0, 2/n for the others."""
    weight = torch.full((n,), 2.0 / n, **opts)
    weight[0] = 1.0 / n
    return weight


def spectral_basis(n, s, *, boundary, dtype=torch.float64, device="cpu"):
    """(len(s), n) matrix evaluating the spectral interpolant of n grid values at positions s,
    fractions of the domain's length from its low end: the one interpolation helper (new grid
    sizes, free points, the tests' truth). 'cosine': cell-centred values at (i + 1/2)/n, zero-flux
    walls: the heat solver's cosine (DCT-II) series. 'periodic': values at i/n of one period: the
    trigonometric interpolant (n even; the Nyquist mode split evenly, so the interpolant is real).
    Exact for fields with no modes above the grid's."""
    opts = dict(dtype=torch.float64)
    s = torch.as_tensor(s, **opts)
    if boundary == "cosine":
        synthesis = cosine_modes(n, s, **opts) * cosine_synthesis_weights(n, **opts)  # (Q, n)
        basis = synthesis @ cosine_modes(n, (torch.arange(n, **opts) + 0.5) / n, **opts).T
    elif boundary == "periodic":
        if n % 2:
            raise ValueError(f"periodic interpolation needs an even number of grid points, got {n}")
        offset = s[:, None] - torch.arange(n, **opts)[None, :] / n          # (Q, n) in periods
        k = torch.arange(1, n // 2, **opts)
        harmonics = torch.cos(2 * math.pi * k * offset[..., None]).sum(-1)  # modes 1 .. n/2 - 1
        basis = (1 + 2 * harmonics + torch.cos(math.pi * n * offset)) / n
    else:
        raise ValueError(f"boundary {boundary!r} has no planar interpolant; "
                         f"allowed: cosine, periodic")
    return basis.to(dtype=dtype, device=device)


def grid_fractions(size, *, boundary):
    """Positions of a size-point grid as fractions of its domain (cell centres for 'cosine')."""
    return (torch.arange(size, dtype=torch.float64) + (0.5 if boundary == "cosine" else 0.0)) / size


def resample(frames, size, *, boundary):
    """Evaluate (..., H, W, S) grid frames on a size x size grid of the same domain through their
    spectral interpolant (boundary 'cosine' or 'periodic', as spectral_basis)."""
    h, w = frames.shape[-3], frames.shape[-2]
    if (h, w) == (size, size):
        return frames
    opts = dict(boundary=boundary, dtype=frames.dtype, device=frames.device)
    r_x = spectral_basis(h, grid_fractions(size, boundary=boundary), **opts)  # (size, H)
    r_y = spectral_basis(w, grid_fractions(size, boundary=boundary), **opts)  # (size, W)
    return torch.einsum("ih,...hws,jw->...ijs", r_x, frames, r_y)


def interpolate(frames, s_x, s_y, *, boundary):
    """Grid frames (..., H, W, S) at free points (s_x[q], s_y[q]), positions as fractions of the
    domain along H and W (Q,) each, through the spectral interpolant -> (..., Q, S)."""
    opts = dict(boundary=boundary, dtype=frames.dtype, device=frames.device)
    b_x = spectral_basis(frames.shape[-3], s_x, **opts)                        # (Q, H)
    b_y = spectral_basis(frames.shape[-2], s_y, **opts)                        # (Q, W)
    return torch.einsum("qh,...hws,qw->...qs", b_x, frames, b_y)


# ---------------------------------------------------------------- heat
def solve_heat(u0, t, *, diffusivity=0.1, length=2.0):
    """du/dt = k Lap u on a square of side `length`, zero-flux walls, cell-centred grid.
    u0 (B, H, W), t (T,) -> (B, T, H, W, 1). Exact in time; spectral in space: the grid values
    define a cosine series sum a_mn cos(pi m s_x) cos(pi n s_y) (s in [0, 1] across the box), each
    term an eigenfunction of the Neumann Laplacian with eigenvalue -(pi/length)^2 (m^2 + n^2).
    The DCT-II is a dense cosine matrix here: exact, any device and dtype with torch alone (torch
    has no DCT), and for grids of a few hundred points a matmul is as fast as an FFT."""
    b, h, w = u0.shape
    opts = dict(dtype=u0.dtype, device=u0.device)
    t = torch.as_tensor(t, **opts)
    d_x = cosine_modes(h, (torch.arange(h, **opts) + 0.5) / h, **opts).T  # (m, i) DCT-II matrix
    d_y = cosine_modes(w, (torch.arange(w, **opts) + 0.5) / w, **opts).T
    coeff = d_x @ u0 @ d_y.T  # (B, H, W) cosine coefficients a_mn (unnormalised DCT-II)
    lam_x = (math.pi * torch.arange(h, **opts) / length) ** 2  # (H,)
    lam_y = (math.pi * torch.arange(w, **opts) / length) ** 2  # (W,)
    decay = torch.exp(-diffusivity * t[:, None, None] * (lam_x[:, None] + lam_y[None, :]))
    weight_x, weight_y = cosine_synthesis_weights(h, **opts), cosine_synthesis_weights(w, **opts)
    coeff = coeff * weight_x[:, None] * weight_y[None, :]  # inverse DCT-II: these weights, then d^T
    u = d_x.T @ (coeff[:, None] * decay) @ d_y  # (B, T, H, W); decay is (T, H, W)
    return u.unsqueeze(-1)  # (B, T, H, W, 1)


# ---------------------------------------------------------------- wave
def solve_wave(u0, v0, t, *, speed=1.0 / 16, length=2.0):
    """d2u/dt2 = c^2 Lap u on the periodic square [0, length)^2, state (u, v = du/dt).
    u0, v0 (B, H, W), t (T,) -> (B, T, H, W, 2) with channels (u, du/dt). Exact in time: each
    Fourier mode with wavenumber |k| turns (u_k, v_k) at the frequency omega = c|k|:
        u_k(t) = u_k cos(omega t) + v_k sin(omega t) / omega,
        v_k(t) = -omega u_k sin(omega t) + v_k cos(omega t)
    (omega = 0: u_k + v_k t). Spectral in space, so the energy 1/2 int v^2 + c^2 |grad u|^2 is
    conserved to rounding."""
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


# ---------------------------------------------------------------- Navier-Stokes
@dataclass
class SpectralOps:
    """Fourier multipliers of an rfft2 grid on the unit torus, shared by the NS time steppers."""
    lap: torch.Tensor      # (H, W//2+1) |k|^2 (angular k = 2 pi * integer), 1 at k = 0
    to_fields: torch.Tensor  # (4, H, W//2+1) w_h -> (u, v, dw/dx, dw/dy) in Fourier space
    dealias: torch.Tensor  # (H, W//2+1) bool: 2/3 rule, keeps |k_i| <= (2/3)(n/2)
    k_max: float           # largest de-aliased |k|, turns max(|u| + |v|) into a Courant rate
    shape: tuple


def spectral_ops(nx, ny, *, dtype, device):
    """The Fourier multipliers of an nx x ny grid of the unit torus (see SpectralOps)."""
    kx_int = torch.fft.fftfreq(nx, d=1.0 / nx, dtype=dtype, device=device)[:, None]  # (H, 1)
    ky_int = torch.fft.rfftfreq(ny, d=1.0 / ny, dtype=dtype, device=device)[None, :]  # (1, W//2+1)
    k_x, k_y = 2 * math.pi * kx_int, 2 * math.pi * ky_int
    lap = k_x**2 + k_y**2
    lap[0, 0] = 1.0  # psi's mean is arbitrary: its multipliers below are 0 at k = 0 (no 0/0)
    # -Lap psi = w  =>  psi_h = w_h / |k|^2;  u = d psi/dy, v = -d psi/dx, plus grad w.
    multipliers = (1j * k_y / lap, -1j * k_x / lap, 1j * k_x, 1j * k_y)
    to_fields = torch.stack(torch.broadcast_tensors(*multipliers))
    # 2/3 rule: products of two fields with |k_i| <= n/3 alias only onto modes above n/3, removed.
    dealias = (kx_int.abs() <= (2.0 / 3.0) * (nx // 2)) & (ky_int.abs() <= (2.0 / 3.0) * (ny // 2))
    k_max = 2 * math.pi * (2.0 / 3.0) * max(nx // 2, ny // 2)
    return SpectralOps(lap=lap, to_fields=to_fields, dealias=dealias, k_max=k_max, shape=(nx, ny))


def ns_forcing(size, *, amplitude=0.1, dtype=torch.float64, device="cpu"):
    """The paper's forcing 0.1 (sin 2pi(x+y) + cos 2pi(x+y)) on the n x n grid of [0, 1)^2."""
    xy = planar_coords(size, low=0.0, high=1.0, cell_centred=False).to(dtype=dtype, device=device)
    phase = 2 * math.pi * (xy[..., 0] + xy[..., 1])
    return amplitude * (torch.sin(phase) + torch.cos(phase))  # (H, W)


def ns_advection(w_h, ops):
    """-u . grad w in Fourier space, de-aliased: w_h (B, H, W//2+1) -> (B, H, W//2+1)."""
    return _ns_advection_and_velocity(w_h, ops)[0]


class AdvectionAndRate(NamedTuple):
    advection: torch.Tensor  # (B, H, W//2+1) as ns_advection returns it
    rate: torch.Tensor       # (B,) max(|u| + |v|) * k_max: times dt, the Courant number


def ns_advection_and_rate(w_h, ops):
    """ns_advection and each trajectory's Courant rate, the rate from the velocity the advection
    computes anyway (no extra transform): w_h (B, H, W//2+1) -> AdvectionAndRate."""
    advection, u, v = _ns_advection_and_velocity(w_h, ops)
    return AdvectionAndRate(advection, rate=(u.abs() + v.abs()).amax(dim=(-2, -1)) * ops.k_max)


def _ns_advection_and_velocity(w_h, ops):
    """(advection (B, H, W//2+1), u (B, H, W), v (B, H, W)): the grid velocity and vorticity
    gradient come from one batched inverse FFT, the advection from one forward FFT."""
    u, v, dw_dx, dw_dy = torch.fft.irfft2(w_h[:, None] * ops.to_fields, s=ops.shape).unbind(1)
    return -torch.fft.rfft2(u * dw_dx + v * dw_dy) * ops.dealias, u, v


def _ifrk4_step(w_h, dt_b, ops, *, viscosity, f_h):
    """One Lawson integrating-factor RK4 step of w_h' = -nu |k|^2 w_h + N(w_h), dt_b (B, 1, 1)
    each trajectory's step dt. With E = exp(-nu |k|^2 dt / 2) the substitution
    z = exp(nu |k|^2 t) w_h removes the stiff term and classical RK4 is applied to z: fourth
    order, viscosity exact (any |k| is stable)."""
    e = torch.exp(-viscosity * ops.lap * dt_b / 2)  # (B, H, W//2+1), half-step factor
    e[..., 0, 0] = 1.0  # lap holds 1 at k = 0 only for the Poisson solve; the mean does not decay
    first = ns_advection_and_rate(w_h, ops)
    n1 = first.advection + f_h
    n2 = ns_advection(e * (w_h + dt_b / 2 * n1), ops) + f_h
    n3 = ns_advection(e * w_h + dt_b / 2 * n2, ops) + f_h
    n4 = ns_advection(e * e * w_h + dt_b * e * n3, ops) + f_h
    w_new = e * e * w_h + dt_b / 6 * (e * e * n1 + 2 * e * (n2 + n3) + n4)
    return w_new, first.rate * dt_b[:, 0, 0]  # new state, (B,) Courant number at the step's start


def solve_navier_stokes(w0, t, *, viscosity=1e-3, forcing=None, dt=None, cfl=2.0, max_cfl=2.6,
                        max_halvings=4):
    """2D incompressible Navier-Stokes in vorticity form on the periodic [0, 1)^2,
        dw/dt + u . grad w = nu Lap w + f,   u = (d psi/dy, -d psi/dx),   -Lap psi = w:
    pseudo-spectral (2/3 de-aliasing), Lawson IF-RK4: order 4 in time, spectral in space.
    w0 (B, H, W) vorticity, t (T,) non-decreasing output times >= 0 -> (B, T, H, W, 1).
    forcing: (H, W) tensor or None (= no forcing; use ns_forcing(n) for the paper's). Time step:
    dt=None picks, per trajectory and per interval (an output interval, cut into pieces of at most
    one time unit), the largest step with Courant number dt * max(|u| + |v|) * k_max <= cfl
    (k_max the largest de-aliased wavenumber; RK4 is stable up to 2.83 on the imaginary axis). If
    a step then exceeds max_cfl or produces a non-finite value, that trajectory alone redoes the
    interval with half the step (up to max_halvings times) before a RuntimeError. A fixed dt
    (for convergence studies) is refused with a ValueError when it exceeds max_cfl. Each
    trajectory's steps depend on it alone, so a trajectory does not change with the batch it is
    computed in."""
    b, nx, ny = w0.shape
    opts = dict(dtype=w0.dtype, device=w0.device)
    if not torch.isfinite(w0).all():
        raise ValueError("w0 holds non-finite values")
    t = torch.as_tensor(t, dtype=torch.float64).tolist()
    if any(later < earlier for earlier, later in zip([0.0] + t, t)):
        raise ValueError(f"output times must be >= 0 and non-decreasing, got {t}")
    if dt is not None and dt <= 0:
        raise ValueError(f"dt must be positive or None, got {dt}")
    ops = spectral_ops(nx, ny, **opts)
    f_h = (torch.fft.rfft2(torch.as_tensor(forcing, **opts)) if forcing is not None else
           torch.zeros(nx, ny // 2 + 1, dtype=torch.fft.rfft2(w0[:1]).dtype, device=w0.device))
    w_h, now, frames = torch.fft.rfft2(w0), 0.0, []
    for target in t:
        # at most one time unit at a time, each planned from the Courant number at its start: over
        # a long span (the 30-unit spin-up) the flow speeds up, and steps planned once at the
        # start would overrun max_cfl and be redone
        while target > now:
            later = min(target, now + 1.0)
            w_h = _ns_interval(w_h, later - now, ops, viscosity=viscosity, f_h=f_h, dt=dt,
                               cfl=cfl, max_cfl=max_cfl, max_halvings=max_halvings)
            now = later
        frames.append(torch.fft.irfft2(w_h, s=(nx, ny)))
    return torch.stack(frames, dim=1).unsqueeze(-1)  # (B, T, H, W, 1)


def _ns_interval(w_h, span, ops, *, viscosity, f_h, dt, cfl, max_cfl, max_halvings):
    """Advance every trajectory by `span`, each with its own number of equal steps; only the
    trajectories that overran max_cfl (or went non-finite) are redone, at twice their steps."""
    b = w_h.shape[0]  # dt=None: steps from each trajectory's Courant bound at the interval's start
    steps = (torch.ceil(span * ns_advection_and_rate(w_h, ops).rate / cfl).clamp_min(1)
             if dt is None else torch.full((b,), math.ceil(span / dt - 1e-9), dtype=torch.float64))
    steps, todo, done = steps.to(torch.float64).cpu(), torch.arange(b), w_h  # todo: rows stepped
    for attempt in range(max_halvings + 1):     # the first time all rows: no index to copy over
        start = w_h if attempt == 0 else w_h[todo.to(w_h.device)]
        state, worst = _ns_steps(start, span, steps[todo], ops, viscosity=viscosity, f_h=f_h)
        bad = (~(worst <= max_cfl) | ~torch.isfinite(state).all(dim=(-2, -1))).cpu()  # (todo,)
        done = state if attempt == 0 else done.index_copy(0, todo.to(w_h.device), state)
        if not bad.any():
            return done
        if dt is not None:
            raise ValueError(f"dt={dt} is unstable here: Courant number {worst.max():.2f} > "
                             f"max_cfl={max_cfl} (or non-finite values); "
                             "use a smaller dt or dt=None")
        todo = todo[bad]
        steps[todo] *= 2
    raise RuntimeError(f"Navier-Stokes step still unstable after {max_halvings} halvings for "
                       f"trajectories {todo.tolist()}: the state is blowing up")


def _ns_steps(w_h, span, steps, ops, *, viscosity, f_h):
    """w_h (B, H, W//2+1) advanced by `span` in steps (B,) (CPU, float64) equal steps each ->
    (state, (B,) largest Courant number met)."""
    steps_dev = steps.to(w_h.device)
    dt_b = (span / steps_dev).to(ops.lap.dtype)[:, None, None]  # (B, 1, 1) own step each
    state, worst = w_h, torch.zeros(len(w_h), dtype=ops.lap.dtype, device=w_h.device)
    for i in range(int(steps.max())):
        active = i < steps_dev  # (B,) trajectories still stepping
        new, courant = _ifrk4_step(state, dt_b, ops, viscosity=viscosity, f_h=f_h)
        state = torch.where(active[:, None, None], new, state)
        worst = torch.maximum(worst, torch.where(active, courant, 0.0))  # NaN propagates
    return state, worst


# ---------------------------------------------------------------- the dataset makers
def in_batches(make_batch, indices, *, batch, label="", verbose=False, device="cpu", bytes_each=0):
    """Concatenate make_batch(indices[i:i + batch]) over consecutive batches (dim 0), on the CPU.
    Each trajectory depends on its index only, so batching changes speed, never results. On a CPU,
    small batches keep the working set in cache, and we run single-threaded: these 64x64 transforms
    are too small to share between threads, and on a busy machine threads waiting for each other
    made generation much slower (measured). On a GPU, batches as large as its free memory allows:
    GPU_SLACK times `bytes_each` (one trajectory's output) per trajectory."""
    if device.startswith("cuda") and bytes_each:
        batch = max(batch, int(torch.cuda.mem_get_info(device)[0] // (GPU_SLACK * bytes_each)))
    indices, out, start = list(indices), [], time.time()
    threads, last_print = torch.get_num_threads(), start
    torch.set_num_threads(1)
    try:
        for lo in range(0, len(indices), batch):
            out.append(make_batch(indices[lo:lo + batch]).cpu())
            done, now = min(lo + batch, len(indices)), time.time()
            if verbose and (now - last_print > 10 or done == len(indices)):
                last_print, spent = now, now - start
                print(f"  {label}: {done}/{len(indices)} trajectories, {spent:.0f} s, "
                      f"eta {spent / done * (len(indices) - done):.0f} s", flush=True)
    finally:
        torch.set_num_threads(threads)
    return torch.cat(out)


GPU_SLACK = 40  # dataset makers' memory per output byte (generous: a few dozen frame-sized fields)


def make_heat(split, indices, size, *, diffusivity=0.1, n_frames=40, spacing=0.25, verbose=False,
              device="cpu", dtype=torch.float32):
    """(n, n_frames, size, size, 1): GRF(alpha 2.5, tau 7) on the 64x64 cell centres of [-1,1]^2.
    Solved in float32 by default (exact in time; ~1e-6 relative round-off), on size x size."""
    times = spacing * torch.arange(n_frames)

    def make_batch(idx):
        seeds = [trajectory_seed(split, i) for i in idx]
        u0 = sample_grf(64, seeds, dtype=dtype, device=device)                  # (b, 64, 64)
        return resample(solve_heat(u0, times, diffusivity=diffusivity), size, boundary="cosine")
    return in_batches(make_batch, indices, batch=16, label=f"heat {split}", verbose=verbose,
                      device=device, bytes_each=4 * n_frames * max(size, 64) ** 2)


def wave_bump(size, seeds, *, dtype=torch.float64):
    """Gaussian bumps height * exp(-d^2 / (2 r^2)) on the periodic [-1, 1)^2 grid, r ~ U(0.25,
    0.30), height ~ U(2, 4), centre uniform (a random periodic shift): (n, size, size)."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]  # CPU, one per seed
    draws = torch.stack([torch.rand(4, generator=g, dtype=torch.float64) for g in generators])
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


def make_wave(split, indices, size, *, speed=1.0 / 16, n_frames=160, spacing=0.25, verbose=False,
              device="cpu", dtype=torch.float32):
    """(n, n_frames, size, size, 2): bump at rest on the periodic 64x64 grid, channels (u, du/dt).
    Solved in float32 by default (exact in time), evaluated on size x size."""
    times = spacing * torch.arange(n_frames)

    def make_batch(idx):
        u0 = wave_bump(64, [trajectory_seed(split, i) for i in idx], dtype=dtype).to(device)
        frames = solve_wave(u0, torch.zeros_like(u0), times, speed=speed)
        return resample(frames, size, boundary="periodic")
    return in_batches(make_batch, indices, batch=4, label=f"wave {split}", verbose=verbose,
                      device=device, bytes_each=8 * n_frames * max(size, 64) ** 2)


def make_navier_stokes(split, indices, size, *, viscosity=1e-3, spin_up=30.0, n_frames=40,
                       spacing=1.0, dtype=torch.float32, verbose=False, device="cpu"):
    """(n, n_frames, size, size, 1): GRF(alpha 2.5, tau 7) vorticity on 64x64, spun up for
    `spin_up` time units under the paper's forcing, then one frame every `spacing`.
    float32 by default: faster than float64 on a CPU; the round-off it adds, grown by the flow,
    is ~1e-5..1e-4 relative at t = 69 against float64 (measured), below the first-order official
    scheme's own error over 2 time units (1e-4)."""
    times = spin_up + spacing * torch.arange(n_frames, dtype=torch.float64)

    def make_batch(idx):
        w0 = sample_grf(64, [trajectory_seed(split, i) for i in idx], dtype=dtype, device=device)
        forcing = ns_forcing(64, dtype=dtype, device=device)
        frames = solve_navier_stokes(w0, times, viscosity=viscosity, forcing=forcing)
        return resample(frames, size, boundary="periodic")
    return in_batches(make_batch, indices, batch=8, label=f"navier-stokes {split}", verbose=verbose,
                      device=device, bytes_each=4 * n_frames * max(size, 64) ** 2)


# ---------------------------------------------------------------- shallow water on the sphere
# The rotating shallow-water equations on a sphere of radius R, in VORTICITY-DIVERGENCE form
#   d(zeta)/dt = -div((zeta + f) u)                          - nu (Lap + 1/R^2)^2 zeta
#   d(delta)/dt = curl((zeta + f) u) - Lap(|u|^2/2 + g h)     - nu (Lap + 1/R^2)^2 delta
#   d(h)/dt     = -H delta - div(h u)                         - nu Lap^2 h
# with h the height deviation from the mean depth H, f = 2 Omega sin(lat) (or any 2-D field) and
# u = k x grad(psi) + grad(chi), Lap psi = zeta, Lap chi = delta.
# Why not the vector form (it needs spin-weighted harmonics for u): here the state is three SCALAR
# fields, so one scalar spherical-harmonic transform (plus its derivative table) does everything,
# and gravity waves plus hyperdiffusion become a 2x2 linear system per degree l, in closed form.
# The hyperdiffusion is nu Lap^2 applied to the VELOCITY vector (the rough / connection Laplacian,
# as Dedalus's lap(lap(u))), which acts on curl and divergence as (Lap + 1/R^2)^2; on h, nu Lap^2.
# Spectral transform: Gauss-Legendre latitudes, equispaced longitudes (nlon = 2 nlat), real FFT in
# longitude, fully normalised associated Legendre functions by the standard three-term recurrence in
# float64, triangular truncation l <= lmax = nlat - 1; products on a 3/2-padded grid (no aliasing of
# quadratic terms), as Dedalus. Time stepping: IMEX RK222 (Ascher, Ruuth & Spiteri 1997, Dedalus's
# RK222), second order; gravity waves and hyperdiffusion implicit, advection and Coriolis explicit.
# Stable at dt = 600 s at 256x128 (the explicit part is limited by advection, |u| dt / dx ~ 0.4).

# SPHERE_RADIUS, SPHERE_HYPERDIFFUSION and SPHERE_DATA_NLAT stand beside the SPECS table (top).
SPHERE_OMEGA = 7.292e-5            # 1/s
SPHERE_GRAVITY = 9.80616           # m/s^2
SPHERE_MEAN_DEPTH = 1.0e4          # m
SPHERE_HEIGHT_SCALE = 3000.0 / SPHERE_RADIUS   # dataset channel 0: h' in Earth radii x 3000
SPHERE_VORT_SCALE = 3600.0 * 2.0               # dataset channel 1: zeta in 1/hour x 2


def sphere_gauss_latitudes(nlat):
    """Gauss-Legendre nodes mu = sin(lat), north to south, and their quadrature weights (sum 2)."""
    mu, weights = np.polynomial.legendre.leggauss(nlat)
    return mu[::-1].copy(), weights[::-1].copy()


def sphere_legendre(lmax, mu):
    """Fully normalised associated Legendre functions and their (1 - mu^2) d/dmu, float64 numpy:
    P[m, l, j] = Pbar_l^m(mu_j) with int_{-1}^{1} Pbar^2 dmu = 1 (no Condon-Shortley phase),
    H[m, l, j] = (1 - mu_j^2) dPbar_l^m/dmu (mu_j), both (lmax+1, lmax+1, len(mu)), 0 for l < m.
    Recurrence in l at fixed m (stable; from the sectoral Pbar_m^m), so no factorials appear."""
    mu = np.asarray(mu, dtype=np.float64)
    n_degrees = lmax + 2             # one extra degree: H_l needs Pbar_{l+1}
    sin_colat = np.sqrt(1.0 - mu**2)
    P = np.zeros((lmax + 1, n_degrees, mu.size))
    ms = np.arange(lmax + 1, dtype=np.float64)
    pmm = np.full(mu.shape, math.sqrt(0.5))
    for m in range(lmax + 1):        # sectoral: Pbar_mm = sqrt((2m+1)/(2m)) s Pbar_m-1,m-1
        # (s^m < 1e-308 near the poles for m > ~250: those functions are negligible there anyway)
        if m > 0:
            pmm = pmm * math.sqrt((2 * m + 1) / (2 * m)) * sin_colat
        P[m, m] = pmm
    for l in range(1, n_degrees):    # Pbar_l = a (mu Pbar_{l-1} - b Pbar_{l-2}) for m < l
        m = ms[: min(l, lmax + 1)][:, None]  # (m, 1)
        a = np.sqrt((4.0 * l * l - 1.0) / (l * l - m * m))
        b2 = ((l - 1.0) ** 2 - m * m) / max(4.0 * (l - 1.0) ** 2 - 1.0, 1.0)
        b = np.sqrt(np.clip(b2, 0, None))
        prev2 = P[: m.size, l - 2] if l >= 2 else 0.0
        P[: m.size, l] = a * (mu * P[: m.size, l - 1] - b * prev2)
    l, m = np.arange(n_degrees, dtype=np.float64)[None, :], ms[:, None]
    # eps (m, l): mu P_l = eps_{l+1} P_{l+1} + eps_l P_{l-1}
    eps = np.sqrt(np.clip((l * l - m * m) / (4.0 * l * l - 1.0), 0, None))
    H = np.zeros((lmax + 1, lmax + 1, mu.size))
    for ll in range(lmax + 1):
        lower = P[:, ll - 1] if ll >= 1 else 0.0
        H[:, ll] = -ll * eps[:, ll + 1, None] * P[:, ll + 1] + (ll + 1) * eps[:, ll, None] * lower
    H[np.arange(lmax + 1)[:, None] > np.arange(lmax + 1)[None, :]] = 0.0
    return P[:, : lmax + 1].copy(), H


class SphereTransform:
    """Spherical-harmonic transform between a (.., nlat, nlon) grid and (.., M, L) coefficients:
    c[.., m, l] (complex, 0 <= m <= l <= lmax, zero for l < m) of a REAL field
    f(lon, mu) = sum_{m=-lmax}^{lmax} sum_l c_lm Pbar_l^m(mu) e^{i m lon}, c_{l,-m} = conj(c_lm).
    Default grid: nlat Gauss latitudes (north to south) and nlon equispaced longitudes from 0.
    `mu` evaluates on other latitudes (then only the grid direction `to_grid` is available)."""

    def __init__(self, lmax, nlat, nlon=None, *, mu=None, device="cpu"):
        nlon = 2 * nlat if nlon is None else nlon
        if nlon < 2 * lmax + 1:
            raise ValueError(f"nlon={nlon} too small for lmax={lmax}: need nlon >= 2 lmax + 1")
        if mu is None:
            if nlat < lmax + 1:
                raise ValueError(f"nlat={nlat} too small for lmax={lmax}: need nlat >= lmax + 1")
            mu, weights = sphere_gauss_latitudes(nlat)
            self.weights = torch.tensor(weights, device=device)            # (nlat,)
        else:
            mu = np.asarray(mu, dtype=np.float64)
            self.weights = None
        self.P, self.H = [torch.tensor(a, device=device) for a in sphere_legendre(lmax, mu)]
        self.lmax, self.nlat, self.nlon = lmax, mu.size, nlon
        self.mu = torch.tensor(mu, device=device)                           # (nlat,) sin(lat)
        self.cos_lat = torch.sqrt(1.0 - self.mu**2)                         # (nlat,)
        self.lon = torch.arange(nlon, device=device, dtype=torch.float64) * (2 * math.pi / nlon)
        self.m = torch.arange(lmax + 1, device=device, dtype=torch.float64)  # (M,)
        self.l = torch.arange(lmax + 1, device=device, dtype=torch.float64)  # (L,)

    # -- the two halves of a transform; N below is any number of stacked fields
    def fourier_forward(self, f):              # (N, nlat, nlon) real -> (N, nlat, M) complex
        return torch.fft.rfft(f, dim=-1, norm="forward")[..., : self.lmax + 1]

    def fourier_inverse(self, F):              # (N, nlat, M) complex -> (N, nlat, nlon) real
        return torch.fft.irfft(F, n=self.nlon, dim=-1, norm="forward")

    def legendre_forward(self, F, table):      # (N, nlat, M) -> (N, M, L), Gauss quadrature
        if self.weights is None:
            raise ValueError("this transform has no quadrature (built with mu=...): "
                             "only to_grid works")
        weighted = (F * self.weights[:, None]).permute(2, 1, 0)                 # (M, nlat, N)
        X = torch.view_as_real(weighted.contiguous())                            # (M, nlat, N, 2)
        Y = torch.bmm(table, X.reshape(*X.shape[:2], -1))                        # (M, L, 2N)
        return torch.view_as_complex(Y.reshape(Y.shape[0], Y.shape[1], -1, 2)).permute(2, 0, 1)

    def legendre_inverse(self, c, table):      # (N, M, L) -> (N, nlat, M)
        X = torch.view_as_real(c.permute(1, 2, 0).contiguous())                  # (M, L, N, 2)
        Y = torch.bmm(table.transpose(1, 2), X.reshape(*X.shape[:2], -1))       # (M, nlat, 2N)
        return torch.view_as_complex(Y.reshape(Y.shape[0], Y.shape[1], -1, 2)).permute(2, 1, 0)

    # -- whole transforms for scalar fields (any leading dims)
    def to_spec(self, f):
        if tuple(f.shape[-2:]) != (self.nlat, self.nlon):
            raise ValueError(f"grid shape {tuple(f.shape)}: "
                             f"expected (..., {self.nlat}, {self.nlon})")
        F = self.fourier_forward(f.reshape(-1, *f.shape[-2:]))
        return self.legendre_forward(F, self.P).reshape(*f.shape[:-2], self.lmax + 1, self.lmax + 1)

    def to_grid(self, c):
        F = self.legendre_inverse(c.reshape(-1, *c.shape[-2:]), self.P)
        return self.fourier_inverse(F).reshape(*c.shape[:-2], self.nlat, self.nlon)

    # -- vector fields (u eastward, v northward) <-> curl and divergence
    def curl_div(self, u, v, radius=SPHERE_RADIUS):
        """(.., nlat, nlon) velocity -> (curl, div) coefficients, each (.., M, L). With
        U = u cos(lat): div_lm = 1/R sum_j w_j [i m U_m Pbar - V_m H] / (1 - mu_j^2), curl alike
        (the mu-derivative moved onto Pbar by parts, so the poles never enter)."""
        lead = u.shape[:-2]
        n = u[..., 0, 0].numel()
        uv = torch.stack([u, v]).reshape(2 * n, *u.shape[-2:]) / self.cos_lat[:, None]
        F = self.fourier_forward(uv)
        cP, cH = self.legendre_forward(F, self.P), self.legendre_forward(F, self.H)
        im = 1j * self.m[:, None]
        curl = (im * cP[n:] + cH[:n]) / radius
        div = (im * cP[:n] - cH[n:]) / radius
        shape = (*lead, self.lmax + 1, self.lmax + 1)
        return curl.reshape(shape), div.reshape(shape)

    def velocity(self, vort, div, radius=SPHERE_RADIUS):
        """Coefficients of curl and divergence (.., M, L) -> grid (u, v), each (.., nlat, nlon)."""
        lead = vort.shape[:-2]
        n = vort[..., 0, 0].numel()
        psi = vort.reshape(n, *vort.shape[-2:]) * sphere_inverse_laplacian(self.l, radius)
        chi = div.reshape(n, *div.shape[-2:]) * sphere_inverse_laplacian(self.l, radius)
        im = 1j * self.m[:, None]
        fP = self.legendre_inverse(torch.cat([im * chi, im * psi]), self.P)
        fH = self.legendre_inverse(torch.cat([psi, chi]), self.H)
        # U = u cos(lat) = (-(1-mu^2) dpsi/dmu + dchi/dlon) / R,
        # V = v cos(lat) = (dpsi/dlon + (1-mu^2) dchi/dmu) / R
        UV = self.fourier_inverse(torch.cat([fP[:n] - fH[:n], fP[n:] + fH[n:]]))  # (2n, nlat, nlon)
        uv = (UV / (radius * self.cos_lat[:, None])).reshape(2, *lead, self.nlat, self.nlon)
        return uv[0], uv[1]


def sphere_inverse_laplacian(l, radius=SPHERE_RADIUS):
    """(L,) factors -R^2 / (l (l+1)) of Lap^{-1} per degree, 0 for l = 0 (zero-mean solution)."""
    eig = l * (l + 1)
    return torch.where(eig > 0, -(radius**2) / torch.where(eig > 0, eig, 1.0), 0.0)


class SphereShallowWater:
    """Batched spectral-transform shallow-water solver; state x: (B, 3, M, L) complex128
    coefficients of (relative vorticity [1/s], divergence [1/s], height deviation h' [m]).
    nlat Gauss latitudes x 2 nlat longitudes (the physical grid `self.grid`), lmax = nlat - 1,
    products on the 3/2-padded grid `self.pad`. coriolis_tilt alpha tilts the rotation axis to
    lon = 0 (Williamson case 2): f = 2 Omega (sin(lat) cos(alpha) - cos(lon) cos(lat) sin(alpha)).
    Use: x = sphere_galewsky_state(solver); x = solver.advance(x, steps); solver.vorticity(x)."""

    def __init__(self, nlat=SPHERE_DATA_NLAT, *, dt=600.0, hyperdiffusion=SPHERE_HYPERDIFFUSION,
                 radius=SPHERE_RADIUS, omega=SPHERE_OMEGA, gravity=SPHERE_GRAVITY,
                 mean_depth=SPHERE_MEAN_DEPTH, coriolis_tilt=0.0, device="cpu"):
        if nlat < 4 or nlat % 2:
            raise ValueError(f"nlat={nlat}: need an even number >= 4")
        if not dt > 0 or hyperdiffusion < 0:
            raise ValueError(f"dt={dt}, hyperdiffusion={hyperdiffusion}: "
                             f"need dt > 0, hyperdiffusion >= 0")
        lmax = nlat - 1
        self.grid = SphereTransform(lmax, nlat, 2 * nlat, device=device)
        nlat_pad = (3 * nlat + 1) // 2
        self.pad = SphereTransform(lmax, nlat_pad, 2 * nlat_pad, device=device)
        self.dt, self.nu, self.radius, self.omega = dt, hyperdiffusion, radius, omega
        self.gravity, self.mean_depth, self.device = gravity, mean_depth, device
        lat_mu, lon = self.pad.mu[:, None], self.pad.lon[None, :]
        tilt = torch.cos(lon) * self.pad.cos_lat[:, None] * math.sin(coriolis_tilt)
        self.coriolis = 2 * omega * (lat_mu * math.cos(coriolis_tilt) - tilt)  # padded (nlat, nlon)
        self.lap = self.grid.l * (self.grid.l + 1) / radius**2  # (L,) minus Lap's eigenvalue
        self.damp_uv = hyperdiffusion * (self.lap - 1 / radius**2) ** 2  # (L,) on curl, divergence
        self.damp_h = hyperdiffusion * self.lap**2                       # (L,) on h
        self.triangle = (self.grid.l[None, :] >= self.grid.m[:, None])   # (M, L) l >= m

    # -- explicit part: advection and Coriolis, products on the padded grid
    def tendency(self, x):
        """(B, 3, M, L) -> (B, 3, M, L): all terms but gravity waves and hyperdiffusion."""
        T, B, R = self.pad, x.shape[0], self.radius
        inv_lap = sphere_inverse_laplacian(T.l, R)
        psi, chi = x[:, 0] * inv_lap, x[:, 1] * inv_lap                  # (B, M, L)
        im = 1j * T.m[:, None]
        fP = T.legendre_inverse(torch.cat([x[:, 0], x[:, 2], im * chi, im * psi]), T.P)
        fH = T.legendre_inverse(torch.cat([psi, chi]), T.H)  # (2B, nlat, M), fP (4B, nlat, M)
        fields = T.fourier_inverse(torch.cat([fP[: 2 * B], fP[2 * B: 3 * B] - fH[:B],
                                              fP[3 * B:] + fH[B:]]))
        zeta, h = fields[:B], fields[B: 2 * B]                            # (B, nlat, nlon)
        u, v = (fields[2 * B:] / (R * T.cos_lat[:, None])).chunk(2)
        q = zeta + self.coriolis                                          # absolute vorticity
        fluxes = torch.cat([q * u, q * v, h * u, h * v]) / T.cos_lat[:, None]  # vectors / cos(lat)
        F = T.fourier_forward(torch.cat([fluxes, 0.5 * (u * u + v * v)]))       # (5B, nlat, M)
        cP, cH = T.legendre_forward(F, T.P), T.legendre_forward(F[: 4 * B], T.H)
        div_q = (im * cP[:B] - cH[B: 2 * B]) / R                          # div((zeta + f) u)
        curl_q = (im * cP[B: 2 * B] + cH[:B]) / R                         # curl((zeta + f) u)
        div_h = (im * cP[2 * B: 3 * B] - cH[3 * B: 4 * B]) / R            # div(h u)
        kinetic = cP[4 * B:]                                              # |u|^2 / 2
        return torch.stack([-div_q, curl_q + self.lap * kinetic, -div_h], dim=1) * self.triangle

    # -- implicit part: gravity waves and hyperdiffusion, diagonal in l
    def linear(self, x):
        vort, div, h = x[:, 0], x[:, 1], x[:, 2]
        return torch.stack([-self.damp_uv * vort,
                            -self.damp_uv * div + self.gravity * self.lap * h,
                            -self.mean_depth * div - self.damp_h * h], dim=1)

    def implicit_solve(self, y, a):
        """Solve (I - a Linear) x = y per degree: closed-form 2x2 for (divergence, height)."""
        cu, ch = 1 + a * self.damp_uv, 1 + a * self.damp_h
        glap, Hd = a * self.gravity * self.lap, a * self.mean_depth
        det = cu * ch + glap * Hd
        div = (ch * y[:, 1] + glap * y[:, 2]) / det
        h = (cu * y[:, 2] - Hd * y[:, 1]) / det
        return torch.stack([y[:, 0] / cu, div, h], dim=1)

    def step(self, x):
        """One IMEX RK222 step (explicit [[0],[g],[d, 1-d]], implicit [[0],[0, g],[0, 1-g, g]])."""
        gam, dt = 1 - 1 / math.sqrt(2), self.dt
        dlt = 1 - 1 / (2 * gam)
        F0 = self.tendency(x)
        x1 = self.implicit_solve(x + (gam * dt) * F0, gam * dt)
        F1 = self.tendency(x1)
        rhs = x + dt * (dlt * F0 + (1 - dlt) * F1 + (1 - gam) * self.linear(x1))
        return self.implicit_solve(rhs, gam * dt)

    def advance(self, x, steps):
        for _ in range(steps):
            x = self.step(x)
        return x

    # -- diagnostics on the physical grid
    def vorticity(self, x):     # (B, nlat, nlon) 1/s
        return self.grid.to_grid(x[:, 0])

    def height(self, x):        # (B, nlat, nlon) m, deviation from the mean depth
        return self.grid.to_grid(x[:, 2])

    def mass(self, x):
        """(B,) total mass per unit density int (H + h') dA, from the l = 0 coefficient (exact)."""
        R = self.radius
        at_rest = 4 * math.pi * R**2 * self.mean_depth
        return at_rest + 2 * math.sqrt(2) * math.pi * R**2 * x[:, 2, 0, 0].real

    def energy(self, x):
        """(B,) int [(H + h') |u|^2 / 2 + g h'^2 / 2] dA by Gauss quadrature on the padded grid."""
        T = self.pad
        u, v = T.velocity(x[:, 0], x[:, 1], self.radius)
        h = T.to_grid(x[:, 2])
        density = 0.5 * (self.mean_depth + h) * (u * u + v * v) + 0.5 * self.gravity * h * h
        return (density.mean(-1) * T.weights).sum(-1) * 2 * math.pi * self.radius**2

    def balanced_height(self, vort, div):
        """(B, M, L) h' with d(div)/dt = 0 for this flow, mean zero (Dedalus's balance LBVP)."""
        x = torch.stack([vort, div, torch.zeros_like(vort)], dim=1)
        rhs = self.tendency(x)[:, 1]  # curl((zeta+f)u) - Lap|u|^2/2 ; + g lap-part = 0
        return rhs * sphere_inverse_laplacian(self.grid.l, self.radius) / self.gravity


def sphere_galewsky_state(solver, *, u_max=80.0, bump="dedalus", mirror=False, bump_height=120.0):
    """Galewsky et al. (2004) initial state on `solver`'s grid -> (B, 3, M, L); B = len(u_max).
    Jet u = u_max/e_n exp(1/((lat-phi0)(lat-phi1))) on phi0 < lat < phi1, height in gradient-wind
    balance (mean deviation 0), then a height bump at 45 N. bump: 'dedalus' (longitude in [0, 2 pi),
    so only the eastern half of the bump, as the Dedalus example), 'galewsky' (longitude in
    (-pi, pi], the full bump) or None. mirror=True: the mirror jet and bump at 45 S (DINo data)."""
    if bump not in ("dedalus", "galewsky", None):
        raise ValueError(f"bump={bump!r}: allowed 'dedalus', 'galewsky' or None")
    T = solver.grid
    u_max = torch.as_tensor(u_max, dtype=torch.float64, device=T.mu.device).reshape(-1)   # (B,)
    lat = torch.asin(T.mu)                                                  # (nlat,)
    phi0, phi1 = math.pi / 7, math.pi / 2 - math.pi / 7
    e_n = math.exp(-4 / (phi1 - phi0) ** 2)

    def jet(phi):                                                           # (nlat,) per unit u_max
        inside = (phi > phi0) & (phi < phi1)
        core = torch.where(inside, (phi - phi0) * (phi - phi1), -1.0)
        return torch.where(inside, torch.exp(1 / core) / e_n, 0.0)
    profile = jet(lat) + (jet(-lat) if mirror else 0.0)
    u = u_max[:, None, None] * profile[None, :, None].expand(-1, -1, T.nlon)   # (B, nlat, nlon)
    vort, div = T.curl_div(u, torch.zeros_like(u), solver.radius)
    h = solver.balanced_height(vort, div)
    if bump is not None:
        centred = torch.remainder(T.lon + math.pi, 2 * math.pi) - math.pi  # (-pi, pi]
        lon = T.lon if bump == "dedalus" else centred
        alpha, beta, phi2 = 1 / 3, 1 / 15, math.pi / 4
        south = torch.exp(-((phi2 + lat) / beta) ** 2) if mirror else 0.0
        shape = torch.exp(-((phi2 - lat) / beta) ** 2) + south
        along_lon = torch.exp(-((lon / alpha) ** 2))
        h = h + T.to_spec(bump_height * (torch.cos(lat) * shape)[:, None] * along_lon[None, :])
    return torch.stack([vort, div, h], dim=1) * solver.triangle


# -- The DINo `shallow-water` dataset: simulated on the paper's grid (256 x 128, T127, dt = 600 s)
# unless sim_nlat asks for a cheaper one, it returns points of the 256 x 128 Gauss grid: all at
# size 128, every other latitude and longitude (from the northernmost and longitude 0) at 64, every
# fourth at 32, where a band-limited solution is exact whatever grid it was computed on.

def sphere_output_points(nlat, nlon=None):
    """mu = sin(lat) (nlat,) and lon (nlon,) of the points a size-nlat dataset returns."""
    nlon = 2 * nlat if nlon is None else nlon
    if nlon != 2 * nlat or nlat < 1 or SPHERE_DATA_NLAT % nlat:
        raise ValueError(f"grid {nlon}x{nlat}: need nlon = 2 nlat and nlat dividing "
                         f"{SPHERE_DATA_NLAT} (e.g. 128, 64, 32, 16)")
    mu = sphere_gauss_latitudes(SPHERE_DATA_NLAT)[0][::SPHERE_DATA_NLAT // nlat]
    return mu, np.arange(nlon) * (2 * np.pi / nlon)


def sphere_coords(nlat, nlon=None):
    """(nlat, nlon, 3) float32: xyz on the unit sphere of shallow_water_trajectories' points."""
    mu, lon = sphere_output_points(nlat, nlon)
    cl = np.sqrt(1 - mu**2)[:, None]
    z = np.broadcast_to(mu[:, None], (mu.size, lon.size))
    xyz = np.stack([cl * np.cos(lon)[None, :], cl * np.sin(lon)[None, :], z], -1)
    return torch.tensor(xyz, dtype=torch.float32)


def latitude_mask(nlat, nlon=None):
    """(nlat, nlon) bool training mask: at latitude lat keep about nlon cos(lat) equispaced
    longitudes, so the kept points are about equally spaced in area (DINo thins near the poles)."""
    mu, lon = sphere_output_points(nlat, nlon)
    frac = np.sqrt(1 - mu**2)[:, None]                             # cos(lat), (nlat, 1)
    j = np.arange(lon.size)[None, :]
    keep = np.floor((j + 0.5) * frac) > np.floor((j - 0.5) * frac)  # a point per 1/cos(lat) columns
    return torch.tensor(keep | (j == 0))


def sphere_interpolate(frames, points):
    """Band-limited sphere fields at free points: analyse the fields on their Gauss grid into
    spherical harmonics (exact there: Gauss quadrature, l <= nlat - 1) and sum the series at the
    points. frames (B, T, nlat, 2 nlat, S); points (Q, 3) xyz on the unit sphere -> (B, T, Q, S)."""
    nlat = frames.shape[2]
    transform = SphereTransform(nlat - 1, nlat)
    points = points.cpu().double()
    legendre = torch.from_numpy(sphere_legendre(nlat - 1, points[:, 2].numpy())[0])  # (M, L, Q)
    m = torch.arange(nlat, dtype=torch.float64)
    phase = torch.exp(1j * m[:, None] * torch.atan2(points[:, 1], points[:, 0])[None, :])  # (M, Q)
    phase[1:] *= 2                       # a real field: m and -m together, m = 0 once
    out = []
    for window in frames.cpu().double():                                    # (T, nlat, nlon, S)
        coef = transform.to_spec(window.movedim(-1, 1))                     # (T, S, M, L)
        along = torch.einsum("tsml,mlq->tsmq", coef, legendre.to(coef.dtype))  # (T, S, M, Q)
        out.append((along * phase).sum(2).real.movedim(1, -1))              # (T, Q, S)
    return torch.stack(out).to(frames)                                      # (B, T, Q, S)


def sphere_random_points(n, seed):
    """n points uniform on the unit sphere (z uniform in [-1, 1], longitude uniform), by seed."""
    generator = torch.Generator().manual_seed(seed)
    z = 2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1
    lon = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    r = torch.sqrt(1 - z ** 2)
    return torch.stack([r * torch.cos(lon), r * torch.sin(lon), z], -1).float()          # (n, 3)


def shallow_water_trajectories(split, indices, *, size=64, sim_nlat=SPHERE_DATA_NLAT,
                               hours=(160, 320), hyperdiffusion=None, threads=None, device="cpu",
                               verbose=True):
    """DINo's sphere data: Galewsky jets with u_max ~ U(60, 80) m/s, mirror jet and bump at 45 S
    (one-sided bump as the Dedalus example), 1-hour frames.
    Returns (len(indices), hours[1] - hours[0], size, 2 size, 2) float32: frames at hours
    hours[0] .. hours[1]-1 (default 160 .. 319, so 8 windows of 20), channels (h' / R * 3000,
    zeta [1/hour] * 2). Trajectory i depends only on (split, indices[i]). sim_nlat: simulation
    grid (sim_nlat x 2 sim_nlat, default 128 = the paper's); cheaper grids for quick presets and
    tests use dt = 3600 / ceil(6 sim_nlat / 128) s and the same hyperdiffusion (Dedalus's nu:
    e-folding 26 min at l = 127, 4 days at l = 32; scaling nu up for coarse grids would damp the
    jet itself). All trajectories advance together in one batch. threads: torch CPU threads during
    the run (None: leave torch's setting); on a busy 2-core machine one thread per process was
    much faster than two, so split big builds over processes."""
    if sim_nlat < 8 or sim_nlat % 2:
        raise ValueError(f"sim_nlat={sim_nlat}: need an even number >= 8")
    if not 0 <= hours[0] < hours[1]:
        raise ValueError(f"hours={hours}: need 0 <= start < stop")
    mu_out, _ = sphere_output_points(size)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("indices is empty: give at least one trajectory index")
    seeds = [trajectory_seed(split, i) for i in indices]
    u_max = [float(np.random.default_rng(seed).uniform(60.0, 80.0)) for seed in seeds]
    steps_per_hour = math.ceil(6 * sim_nlat / SPHERE_DATA_NLAT)
    nu = SPHERE_HYPERDIFFUSION if hyperdiffusion is None else hyperdiffusion
    solver = SphereShallowWater(sim_nlat, dt=3600.0 / steps_per_hour, hyperdiffusion=nu,
                                device=device)
    nlon_eval = 2 * max(SPHERE_DATA_NLAT, sim_nlat)  # evaluate on the full longitudes, then thin
    out_grid = SphereTransform(sim_nlat - 1, mu_out.size, nlon_eval, mu=mu_out, device=device)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _sphere_run_frames(solver, out_grid, stride=nlon_eval // (2 * size), u_max=u_max,
                                  split=split, size=size, hours=hours,
                                  steps_per_hour=steps_per_hour, verbose=verbose)
    finally:
        torch.set_num_threads(previous_threads)


def _sphere_run_frames(solver, out_grid, *, stride, u_max, split, size, hours, steps_per_hour,
                       verbose):
    """The time loop of shallow_water_trajectories: (B, T, size, 2 size, 2) float32 frames."""
    device = solver.device
    x = sphere_galewsky_state(solver, u_max=u_max, bump="dedalus", mirror=True)
    frames = torch.empty(len(u_max), hours[1] - hours[0], size, 2 * size, 2, device=device)
    start = time.perf_counter()
    for hour in range(hours[1]):
        if hour >= hours[0]:  # (B, 2, H, W) fields, scaled to the dataset's units
            fields = out_grid.to_grid(torch.stack([x[:, 2], x[:, 0]], dim=1))[..., ::stride]
            scale = torch.tensor([SPHERE_HEIGHT_SCALE, SPHERE_VORT_SCALE], dtype=fields.dtype,
                                 device=device)
            frames[:, hour - hours[0]] = (fields * scale[:, None, None]).permute(0, 2, 3, 1).float()
        if hour + 1 < hours[1]:  # the last frame needs no step after it
            x = solver.advance(x, steps_per_hour)
        if verbose and ((hour + 1) % 40 == 0 or hour + 1 == hours[1]):
            elapsed, nlat = time.perf_counter() - start, solver.grid.nlat
            eta = elapsed / (hour + 1) * (hours[1] - hour - 1)
            print(f"  shallow-water {split} x{len(u_max)} at {2 * nlat}x{nlat}: "
                  f"hour {hour + 1}/{hours[1]}, {elapsed:.0f} s, ETA {eta:.0f} s", flush=True)
    if not torch.isfinite(frames).all():
        raise RuntimeError("shallow-water simulation blew up (non-finite values); "
                           "reduce the time step")
    return frames.cpu()


# ---------------------------------------------------------------- files and devices
# Every file the project writes (data cache, checkpoints, metrics, pictures) goes through
# write_atomic: written under a temporary name in the same folder, then renamed, so a crash, a
# full disk or a kill never leaves a partial file under the real name.
_TEMPORARY = re.compile(r"\.tmp-(\d+)(\.\w+)?$")  # name.tmp-PID[.ext]


def check_writable(folder, *, name="--out"):
    """ValueError unless files can be written in `folder` (created later if missing): probed by
    a real write in the nearest existing parent, which leaves nothing behind."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{name} {folder!r} cannot be created: "
                         f"{existing!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{name} {folder!r} is not writable "
                         f"({err.strerror} in {existing!r})") from None


def remove_stale_temporaries(folder):
    """Delete temporary files of write_atomic left in `folder` by processes that no longer run."""
    for entry in os.listdir(folder):
        match = _TEMPORARY.search(entry)
        if match and not _process_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, entry))


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def write_atomic(path, write):
    """All-or-nothing file write: write(tmp) fills a temporary file beside `path`, which is then
    renamed to `path`. On any failure the temporary file is removed and an OSError says which file
    and why in one line; the old `path`, if any, is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"  # the extension stays last: writers pick formats by it
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def load_torch(path, *, kind):
    """torch.load of a file this project wrote, on the CPU, with weights_only=True: tensors and
    plain values only, so a crafted file cannot run code. ValueError naming the path otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"                  # torch.save writes a zip archive
        if zipped and "Weights only load failed" in str(err):
            raise ValueError(f"{path!r} holds objects other than tensors and plain values: "
                             f"refused, loading it could run code") from None
        what = "damaged: truncated or corrupted" if zipped else f"not {kind}"
        raise ValueError(f"{path!r} is {what} ({type(err).__name__})") from None


def save_torch(path, obj):
    """torch.save through write_atomic. Serialised in memory first: torch's own file writer reports
    a full disk as an opaque RuntimeError, Python's file.write as the OSError it is."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the real file
    write_atomic(path, write)


def resolve_device(name):
    """'auto' -> cuda if present, else cpu; ValueError for a device this machine does not have."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; "
                         f"allowed: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not supported; allowed: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: no such CUDA device here "
                         f"({torch.cuda.device_count()} found); allowed: auto, cpu")
    return str(device)


def physical_memory():
    """Bytes of RAM on this machine (the bound for what a dataset or an evaluation may allocate)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------- command line
def main():
    parser = argparse.ArgumentParser(description="Build (or load) a DINo dataset.")
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")  # one line
    parser.add_argument("pde", nargs="?", choices=PDES)
    parser.add_argument("--split", default="train")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--n-trajectories", type=int, default=None)
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    if args.pde is None:
        parser.error("give a pde")
    try:
        start = time.time()
        data = load_dataset(args.pde, args.split, size=args.size, data_dir=args.data_dir,
                            n_trajectories=args.n_trajectories)
    except (ValueError, OSError) as err:
        parser.error(str(err))  # one line, exit status 2
    print(f"{data.pde} {data.split}: frames {tuple(data.frames.shape)}, coords "
          f"{tuple(data.coords.shape)}, t {data.t[0]:g}..{data.t[-1]:g}, "
          f"|frames| max {data.frames.abs().max():.3f}, loaded in {time.time() - start:.2f} s")


if __name__ == "__main__":
    main()
