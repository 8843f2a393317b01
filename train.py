"""Training DINo (Yin, Kirchmeyer et al., ICLR 2023, arXiv:2209.14855v2, Sec. 4.2 and Alg. 1).

Two problems are solved together, as in the paper's Eq. 5-6:
  1. auto-decoding: the decoder D_phi and one code alpha_t per (window, frame, channel) minimise
     the reconstruction error of the observed points, L_dec = |v_t(x) - D_phi(alpha_t)(x)|^2;
  2. dynamics: f_psi is fitted to the learned code sequences (codes DETACHED, so the dynamics
     never bends the representation): L_dyn = |alpha_t - (alpha_0 + int_0^t f_psi(alpha) dt)|^2,
     integrated with RK4 and scheduled restarts from the learned codes (teacher forcing).
Adam with the paper's rates (decoder 1e-2, codes and dynamics 1e-3). The paper's schedule
(`--schedule epoch`, the default): the codes step after every minibatch, the decoder and the
dynamics once per epoch on gradients summed over its minibatches. `--schedule minibatch` steps
all three every minibatch (measured in README).

Usage:
    python train.py --pde heat --preset quick --threads 1  # about 6 minutes on a CPU (README)
    python train.py --pde navier-stokes --device cuda      # the paper's sizes
    python train.py --out runs/heat-quick --resume         # continue a run where it stopped
    python evaluate.py runs/heat-quick                     # metrics, GIFs, error plot
Every `eval_every` iterations one labelled line is logged (train metric used for selection, test
metric reported only) and `last.pt` / `best.pt` (best on TRAINING data) are written atomically.
"""
import argparse
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import typing
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from autodecode import CodeTable, fit_codes
from dynamics import Dynamics, epsilon_schedule, rollout, rollout_with_restarts
from inr import Decoder
from solvers import PDES, load_dataset

# ---- configuration: one table, every PDE x preset


@dataclass(frozen=True)
class Config:
    pde: str                    # 'heat' | 'wave' | 'navier-stokes' | 'shallow-water'
    # data
    size: int = 64              # grid points along H (planar H = W = size; sphere nlat = size, nlon = 2*size)
    n_train: int = 256          # training trajectories (each gives several windows of 20 frames)
    n_test: int = 16            # test trajectories (report only, never used for selection)
    subsampling: float = 1.0    # fraction of grid points observed in training (paper: 0.05 / 0.25 / 1)
    mask_seed: int = 0          # seed of that random observation mask
    # coordinates: the decoder sees (x + coord_shift) * coord_scale (the official code feeds
    # planar points in [0, 0.5], the range its input_scale of 64 was tuned for)
    coord_shift: float = 1.0    # added to physical coordinates (planar [-1, 1] -> [0, 2])
    coord_scale: float = 0.25   # then multiplied (-> [0, 0.5]); stored in every checkpoint
    # model (settings.md, "Model")
    code_dim: int = 100         # D: code size per state channel
    hidden: int = 64            # decoder width K
    layers: int = 3             # decoder hidden layers
    input_scale: float = 64.0   # decoder filter frequency scale
    dyn_hidden: int = 512       # width of the dynamics MLP f_psi
    # optimisation
    batch_size: int = 32        # windows per minibatch
    epochs: int = 10_000        # the official script ran 120,000 (stopped by hand); a re-run used 10,000
    schedule: str = "epoch"     # 'epoch': decoder and dynamics step once per epoch (paper); 'minibatch'
    lr_decoder: float = 1e-2    # Adam rate of the decoder
    lr_codes: float = 1e-3      # Adam rate of the code table
    lr_dynamics: float = 1e-3   # Adam rate of f_psi
    eps_start: float = 0.99     # teacher forcing: restart probability at iteration 0 ...
    eps_decay: float = 0.99     # ... multiplied by this ...
    eps_every: int = 100        # ... every this many iterations ...
    eps_floor: float = 1e-3     # ... and counted as 0 below this
    # evaluation
    fit_steps: int = 300        # Adam steps to fit a test window's frame-0 code (keep-best)
    fit_lr: float = 1e-2        # their rate
    eval_every: int = 500       # iterations (minibatches) between evaluations and checkpoints
    seed: int = 0               # initialisation, shuffling and restart draws


_HEAT = Config(pde="heat")  # heat has no official config: the Navier-Stokes sizes (settings.md)
CONFIGS = {
    ("heat", "paper"): _HEAT,
    ("wave", "paper"): replace(_HEAT, pde="wave", n_train=64, n_test=4, code_dim=50, dyn_hidden=256,
                               fit_steps=500),
    ("navier-stokes", "paper"): replace(_HEAT, pde="navier-stokes", coord_shift=0.0, coord_scale=0.5),
    # sphere: xyz on the unit sphere scaled by 0.5 (quick preset: 0.5 beat 0.25, 1 and 2, README);
    # 128 x 64 grid with the latitude-thinning mask; 8 / 2 trajectories of 8 windows
    ("shallow-water", "paper"): replace(_HEAT, pde="shallow-water", n_train=8, n_test=2, coord_shift=0.0,
                                        coord_scale=0.5, code_dim=200, hidden=256, layers=6,
                                        dyn_hidden=800, batch_size=4, fit_steps=500, eval_every=200),
    # quick: small grids, fewer trajectories, smaller nets, every minibatch steps everything (the
    # paper's schedule reaches the same error 2.7x later: README); 6-7 minutes on one CPU core
    ("heat", "quick"): replace(_HEAT, size=32, n_train=128, n_test=8, code_dim=32, dyn_hidden=128,
                               batch_size=16, epochs=800, schedule="minibatch", fit_steps=200,
                               eval_every=500),
    ("wave", "quick"): replace(_HEAT, pde="wave", size=32, n_train=16, n_test=2, code_dim=32,
                               dyn_hidden=128, batch_size=16, epochs=1500, schedule="minibatch",
                               fit_steps=200, eval_every=500),
    ("navier-stokes", "quick"): replace(_HEAT, pde="navier-stokes", size=32, n_train=64, n_test=8,
                                        coord_shift=0.0, coord_scale=0.5, code_dim=32, dyn_hidden=128,
                                        batch_size=16, epochs=1500, schedule="minibatch", fit_steps=200,
                                        eval_every=500),
    ("shallow-water", "quick"): replace(_HEAT, pde="shallow-water", size=32, n_train=4, n_test=1,
                                        coord_shift=0.0, coord_scale=0.5, code_dim=32, hidden=64,
                                        layers=3, dyn_hidden=128, batch_size=8, epochs=3000,
                                        schedule="minibatch", fit_steps=200, eval_every=500),
}
PRESETS = ("quick", "paper")
SCHEDULES = ("epoch", "minibatch")
CHECKPOINT_FORMAT = "dino-run/1"  # tag that tells our checkpoints from foreign files


def check_config(cfg):
    """Raise ValueError naming the first bad field and what is allowed."""
    if cfg.pde not in PDES:
        raise ValueError(f"pde {cfg.pde!r} is unknown; allowed: {', '.join(PDES)}")
    if not 0.0 < cfg.subsampling <= 1.0:
        raise ValueError(f"subsampling {cfg.subsampling} is outside (0, 1]")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule {cfg.schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    for name in ("size", "n_train", "n_test", "code_dim", "hidden", "layers", "dyn_hidden", "batch_size",
                 "eval_every", "eps_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} = {getattr(cfg, name)} must be at least 1")
    for name in ("epochs", "fit_steps"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} = {getattr(cfg, name)} must not be negative")


def override(cfg, assignments):
    """Apply `key=value` strings, typed by the Config field; unknown keys are errors."""
    types = typing.get_type_hints(Config)
    changes = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in types or key == "pde":
            allowed = ", ".join(k for k in types if k != "pde")
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of: {allowed}")
        try:
            changes[key] = types[key](text.strip())
        except ValueError:
            raise ValueError(f"--set {item!r}: {key} needs a {types[key].__name__}") from None
    return replace(cfg, **changes)


# ---- data: observed points, flattened fields


def observation_mask(data, rate, seed):
    """(H, W) bool: the points a run observes. The PDE's own mask (sphere: latitude thinning)
    AND, for rate < 1, a uniform random draw of that fraction of the grid (paper: 5/25/100%).
    Drawn on the CPU from its own generator so a seed gives the same mask on any device."""
    H, W = data.coords.shape[:2]
    mask = torch.ones(H, W, dtype=torch.bool)
    if data.mask is not None:
        mask &= data.mask.cpu()
    if rate < 1.0:
        mask &= torch.rand(H, W, generator=torch.Generator().manual_seed(seed)) < rate
    if not mask.any():
        raise ValueError(f"subsampling rate {rate} leaves no observed point on a {H}x{W} grid")
    return mask.to(data.coords.device)


def flatten(frames):
    """(windows, T, H, W, S) -> (windows, T, N, S): the model-side layout."""
    return frames.flatten(2, 3)


# ---- model: decoder + dynamics + the coordinate map


class DINo(nn.Module):
    """The two trained networks plus what is needed to use them on raw coordinates."""

    def __init__(self, cfg, *, coord_dim, n_channels):
        super().__init__()
        self.decoder = Decoder(coord_dim=coord_dim, code_dim=cfg.code_dim, hidden=cfg.hidden,
                               layers=cfg.layers, input_scale=cfg.input_scale)
        self.dynamics = Dynamics(n_channels=n_channels, code_dim=cfg.code_dim, hidden=cfg.dyn_hidden)
        self.coord_shift, self.coord_scale = cfg.coord_shift, cfg.coord_scale
        self.fit_steps, self.fit_lr, self.hidden = cfg.fit_steps, cfg.fit_lr, cfg.hidden

    def map_coords(self, coords):
        """Physical positions (..., X) -> decoder inputs (the affine map of the config)."""
        return (coords + self.coord_shift) * self.coord_scale

    def decode(self, coords, codes, *, chunk_elements=2 ** 25):
        """Decode codes (B, T, S, D) at mapped coords (N, X) without building a graph, in chunks of
        windows so the (chunk, T, N, S, K) intermediates stay small -> (B, T, N, S)."""
        per_window = codes.shape[1] * coords.shape[0] * codes.shape[2] * self.hidden
        step = max(1, chunk_elements // max(per_window, 1))
        with torch.no_grad():
            return torch.cat([self.decoder(coords, codes[i:i + step]) for i in range(0, len(codes), step)])


def forecast_codes(model, coords_obs, values_obs, t, *, steps=None, lr=None):
    """DINo's inference (Alg. 1, bottom): fit alpha_0 to observed values (B, N, S) at mapped
    coords (N, X) or (B, N, X), keep the best code per sample, integrate -> codes (B, T, S, D)."""
    steps = model.fit_steps if steps is None else steps
    lr = model.fit_lr if lr is None else lr
    alpha0 = fit_codes(model.decoder, coords_obs, values_obs, steps=steps, lr=lr).codes   # decoder untouched
    with torch.no_grad():
        return rollout(model.dynamics, alpha0, t)


def relative_mse(pred, truth, frames):
    """MSE over the given frames / mean square of the truth there (1.0 = predicting zero)."""
    err = (pred[:, frames] - truth[:, frames]).pow(2).mean()
    return (err / truth[:, frames].pow(2).mean().clamp_min(1e-30)).item()


# ---- one training iteration: the two problems of Eq. 5-6


def decoder_loss(model, code_table, ids, values, coords_obs):
    """L_dec on one minibatch: decode all (B, T) codes at the observed points in ONE call."""
    codes = code_table(ids)                               # (B, T, S, D)
    pred = model.decoder(coords_obs, codes)               # (B, T, N_obs, S)
    return (pred - values).pow(2).mean(), codes


def dynamics_loss(model, codes, t, epsilon, generator):
    """L_dyn: integrate from the learned codes (detached: the dynamics fits the representation,
    it does not shape it), restarting from the true code with probability epsilon."""
    codes = codes.detach()                                # (B, T, S, D)
    traj = rollout_with_restarts(model.dynamics, codes, t, epsilon, generator=generator)
    return (traj - codes).pow(2).mean()


# ---- checkpoints: atomic, complete (model, codes, optimisers, RNG, position)


def save_checkpoint(path, state):
    """Write to a temporary name in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """Load one of our checkpoints (on the CPU: RNG states must stay there; the model moves to its
    device when loaded); ValueError naming the path for a missing or foreign file."""
    if os.path.isdir(path):
        path = os.path.join(path, "best.pt")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist (give a run folder or a .pt file written by train.py)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a file torch cannot read at all
        raise ValueError(f"checkpoint {path!r} is not a train.py checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a train.py checkpoint (no {CHECKPOINT_FORMAT!r} tag)")
    return state


def model_from_checkpoint(state, device="cpu"):
    """Rebuild DINo (decoder, dynamics, coordinate map) from a checkpoint dict."""
    cfg = Config(**state["config"])
    model = DINo(cfg, coord_dim=state["coord_dim"], n_channels=state["n_channels"]).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def rng_state(generators):
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            **{name: g.get_state() for name, g in generators.items()}}


def set_rng_state(saved, generators):
    torch.set_rng_state(saved["torch"])
    np.random.set_state(saved["numpy"])
    random.setstate(saved["python"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    for name, g in generators.items():
        g.set_state(saved[name])


# ---- evaluation during training: train (selection) and test (report only)


def evaluate_train(model, code_table, values, coords_obs, t):
    """Relative MSE of the forecast from the LEARNED alpha_0 over the training frames, at the
    observed points: the selection metric (it needs no test data and no code fitting)."""
    with torch.no_grad():
        alpha0 = code_table(torch.arange(len(values), device=values.device))[:, 0]   # (W, S, D)
        codes = rollout(model.dynamics, alpha0, t)                      # (W, T_in, S, D)
    pred = model.decode(coords_obs, codes)                              # (W, T_in, N_obs, S)
    return relative_mse(pred, values, slice(None))


def evaluate_test(model, test, observed, n_in_t):
    """Fit frame-0 codes of every test window on the observed points, integrate over all frames,
    decode on the full grid: relative MSE over In-t and Out-t (reported, never selected on)."""
    truth = flatten(test.frames)                                        # (B, T, N, S)
    coords = model.map_coords(test.coords.flatten(0, 1))                # (N, X)
    codes = forecast_codes(model, coords[observed], truth[:, 0][:, observed], test.t)
    pred = model.decode(coords, codes)                                  # (B, T, N, S)
    return {"in_t": relative_mse(pred, truth, slice(0, n_in_t)),
            "out_t": relative_mse(pred, truth, slice(n_in_t, None))}


# ---- the training loop


class NonFiniteLoss(RuntimeError):
    pass


class BadData(ValueError):
    """load_dataset refused the config's data settings (raised before anything is written)."""


@dataclass
class Setup:
    """Everything a run builds once: data on the device, networks, codes, optimisers, RNGs."""
    cfg: Config
    train_set: object          # PDEData, training split
    test_set: object           # PDEData, test split (report only)
    observed: torch.Tensor     # (N,) bool: observed grid points
    values: torch.Tensor       # (W, T_in, N_obs, S): training frames inside the horizon, observed points
    coords_obs: torch.Tensor   # (N_obs, X) mapped coordinates of the observed points
    t_in: torch.Tensor         # (T_in,) frame times inside the horizon
    model: DINo
    code_table: CodeTable      # alpha, one code per (window, frame, channel)
    optimisers: dict           # 'decoder' | 'codes' | 'dynamics' -> Adam
    generators: dict           # 'shuffle' (CPU) | 'restart' (device) -> torch.Generator
    n_batches: int             # minibatches per epoch


def build(cfg, *, device, data_dir):
    train_set = load_dataset(cfg.pde, "train", size=cfg.size, data_dir=data_dir, n_trajectories=cfg.n_train,
                             device=device)
    test_set = load_dataset(cfg.pde, "test", size=cfg.size, data_dir=data_dir, n_trajectories=cfg.n_test,
                            device=device)
    n_in = train_set.n_in_t
    observed = observation_mask(train_set, cfg.subsampling, cfg.mask_seed).flatten()    # (N,)
    values = flatten(train_set.frames[:, :n_in])[:, :, observed]                        # (W, T_in, N_obs, S)
    n_windows, _, _, n_channels = values.shape
    torch.manual_seed(cfg.seed)
    model = DINo(cfg, coord_dim=train_set.coords.shape[-1], n_channels=n_channels).to(device)
    # sparse lookups + SparseAdam: a minibatch's step moves only its own rows, as the official code
    # (one parameter per sequence; Adam skips those without a gradient)
    code_table = CodeTable(n_windows, n_in, n_channels, cfg.code_dim, sparse=True).to(device)
    return Setup(
        cfg=cfg, train_set=train_set, test_set=test_set, observed=observed, values=values,
        coords_obs=model.map_coords(train_set.coords.flatten(0, 1)[observed]), t_in=train_set.t[:n_in],
        model=model, code_table=code_table,
        optimisers={"decoder": torch.optim.Adam(model.decoder.parameters(), lr=cfg.lr_decoder),
                    "codes": code_table.optimizer(lr=cfg.lr_codes),
                    "dynamics": torch.optim.Adam(model.dynamics.parameters(), lr=cfg.lr_dynamics)},
        generators={"shuffle": torch.Generator().manual_seed(cfg.seed + 1),
                    "restart": torch.Generator(device=device).manual_seed(cfg.seed + 2)},
        n_batches=math.ceil(n_windows / cfg.batch_size))


def new_progress():
    """The loop's position and record: all of it goes into the checkpoint."""
    return {"epoch": 0, "position": 0, "perm": None, "iteration": 0, "elapsed": 0.0, "best_train": math.inf,
            "history": [], "sums": {"dec": 0.0, "dyn": 0.0, "n": 0}}


def minibatch_step(s, ids, epsilon_now, *, step_networks):
    """One minibatch of Alg. 1: codes step now; decoder and dynamics only if `step_networks`
    (otherwise their gradients keep summing until the end of the epoch)."""
    loss_dec, codes = decoder_loss(s.model, s.code_table, ids, s.values[ids], s.coords_obs)
    loss_dyn = dynamics_loss(s.model, codes, s.t_in, epsilon_now, s.generators["restart"])
    if not (torch.isfinite(loss_dec) and torch.isfinite(loss_dyn)):
        raise NonFiniteLoss(f"decoder loss {loss_dec.item()}, dynamics loss {loss_dyn.item()}")
    (loss_dec + loss_dyn).backward()       # two separate graphs: the codes were detached for L_dyn
    s.optimisers["codes"].step()           # codes: every minibatch
    s.optimisers["codes"].zero_grad()
    if step_networks:
        for name in ("decoder", "dynamics"):
            s.optimisers[name].step()
            s.optimisers[name].zero_grad()
    return loss_dec.item(), loss_dyn.item()


def checkpoint_state(s, progress):
    return {"format": CHECKPOINT_FORMAT, "config": asdict(s.cfg), "coord_dim": s.train_set.coords.shape[-1],
            "n_channels": s.values.shape[-1], "n_in_t": len(s.t_in),
            "mask": s.observed.view(s.train_set.coords.shape[:2]).cpu(),
            "model": s.model.state_dict(), "codes": s.code_table.state_dict(),
            "optimisers": {name: opt.state_dict() for name, opt in s.optimisers.items()},
            "grads": [None if p.grad is None else p.grad.detach().cpu() for p in trained_parameters(s.model)],
            "epsilon": epsilon(s.cfg, progress["iteration"]), "rng": rng_state(s.generators), **progress}


def restore(s, state):
    """Load a checkpoint into a fresh Setup; returns its progress dict."""
    s.model.load_state_dict(state["model"])
    s.code_table.load_state_dict(state["codes"])
    for name, opt in s.optimisers.items():
        opt.load_state_dict(state["optimisers"][name])
    device = s.values.device
    for p, g in zip(trained_parameters(s.model), state["grads"]):   # summed so far in this epoch
        p.grad = None if g is None else g.to(device)
    set_rng_state(state["rng"], s.generators)
    return {key: state[key] for key in new_progress()}


def evaluate_now(s, progress):
    """Train In-t (selection) and test In-t / Out-t (report), as a history entry."""
    n_in = len(s.t_in)
    train_rel = evaluate_train(s.model, s.code_table, s.values, s.coords_obs, s.t_in)
    test_rel = evaluate_test(s.model, s.test_set, s.observed, n_in)
    sums = progress["sums"]
    return {"epoch": progress["epoch"], "iteration": progress["iteration"],
            "epsilon": epsilon(s.cfg, progress["iteration"]),
            "loss_dec": sums["dec"] / max(sums["n"], 1), "loss_dyn": sums["dyn"] / max(sums["n"], 1),
            "train_in_t": train_rel, "test_in_t": test_rel["in_t"], "test_out_t": test_rel["out_t"]}


@dataclass
class TrainResult:
    out: str            # run folder (last.pt, best.pt, log.txt)
    epoch: int          # epochs completed
    iteration: int      # minibatches done
    stopped: str        # 'epochs' | 'minutes' | 'interrupted'
    best_train: float   # best train In-t relative MSE (selects best.pt)
    history: list       # one dict per evaluation


def train(cfg, *, out, device="cpu", epochs=None, minutes=None, resume=None, data_dir="data", log=print):
    """Train DINo with `cfg` into folder `out`; `resume`: a checkpoint dict to continue exactly."""
    check_config(cfg)
    epochs = cfg.epochs if epochs is None else epochs
    try:
        s = build(cfg, device=device, data_dir=data_dir)
    except ValueError as err:
        raise BadData(str(err)) from None
    progress = new_progress() if resume is None else restore(s, resume)
    os.makedirs(out, exist_ok=True)
    log_file = open(os.path.join(out, "log.txt"), "a")

    def say(line):
        log(line)
        log_file.write(line + "\n")
        log_file.flush()

    def save(name):
        save_checkpoint(os.path.join(out, name), checkpoint_state(s, progress))

    n_windows = len(s.values)
    say(f"{cfg.pde} | {n_windows} train windows x {len(s.t_in)} frames, {s.observed.sum().item()}/"
        f"{s.observed.numel()} points observed | {len(s.test_set.frames)} test windows | decoder "
        f"{count(s.model.decoder):,} + dynamics {count(s.model.dynamics):,} parameters | {s.n_batches} "
        f"minibatches/epoch | schedule {cfg.schedule} | {device}")
    say("metrics: relative MSE (MSE / mean square of truth); train In-t selects best.pt, test is reported only")
    # Ctrl-C: finish the minibatch, save, stop (a second Ctrl-C aborts at once)
    stop = {"signal": False}
    previous_handler = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        stop["signal"] = True
        signal.signal(signal.SIGINT, previous_handler)

    in_main_thread = threading.current_thread() is threading.main_thread()   # signals live there only
    if in_main_thread:
        signal.signal(signal.SIGINT, on_interrupt)
    start, first_iteration, elapsed_before = time.time(), progress["iteration"], progress["elapsed"]

    def evaluate_and_save():
        entry = evaluate_now(s, progress)
        session = time.time() - start
        progress["elapsed"] = entry["elapsed"] = elapsed_before + session
        eta = session / max(progress["iteration"] - first_iteration, 1) * (epochs * s.n_batches - progress["iteration"])
        if minutes is not None:
            eta = min(eta, minutes * 60 - session)
        say(f"epoch {entry['epoch']} | iter {entry['iteration']} | eps {entry['epsilon']:.3f} | "
            f"dec {entry['loss_dec']:.2e} | dyn {entry['loss_dyn']:.2e} | train In-t {entry['train_in_t']:.2e} | "
            f"test In-t {entry['test_in_t']:.2e} Out-t {entry['test_out_t']:.2e} | "
            f"{clock(entry['elapsed'])} | ETA {clock(eta)}")
        if not math.isfinite(entry["train_in_t"]):
            raise NonFiniteLoss(f"train metric {entry['train_in_t']} at iteration {progress['iteration']}")
        progress["history"].append(entry)
        progress["sums"] = {"dec": 0.0, "dyn": 0.0, "n": 0}
        improved = entry["train_in_t"] < progress["best_train"]
        progress["best_train"] = min(entry["train_in_t"], progress["best_train"])
        save("last.pt")
        if improved:
            save("best.pt")

    stopped = "epochs"
    try:
        while progress["epoch"] < epochs:
            if progress["position"] == 0:
                progress["perm"] = torch.randperm(n_windows, generator=s.generators["shuffle"])
            b = progress["position"] * cfg.batch_size
            ids = progress["perm"][b:b + cfg.batch_size].to(device)
            last_of_epoch = progress["position"] + 1 == s.n_batches
            try:
                loss_dec, loss_dyn = minibatch_step(s, ids, epsilon(cfg, progress["iteration"]),
                                                    step_networks=cfg.schedule == "minibatch" or last_of_epoch)
            except NonFiniteLoss as err:
                raise NonFiniteLoss(f"{err} at epoch {progress['epoch']}, iteration {progress['iteration']}")
            progress["iteration"] += 1
            progress["position"] = 0 if last_of_epoch else progress["position"] + 1
            progress["epoch"] += last_of_epoch
            sums = progress["sums"]
            sums["dec"], sums["dyn"], sums["n"] = sums["dec"] + loss_dec, sums["dyn"] + loss_dyn, sums["n"] + 1
            if stop["signal"]:
                stopped = "interrupted"
                break
            if minutes is not None and time.time() - start >= minutes * 60:
                stopped = "minutes"
                break
            if progress["iteration"] % cfg.eval_every == 0:
                evaluate_and_save()
        if stopped == "interrupted":
            progress["elapsed"] = elapsed_before + time.time() - start
            save("last.pt")
            say(f"interrupted at epoch {progress['epoch']}, iteration {progress['iteration']}: saved {out}/last.pt;"
                f" continue with: python train.py --out {out} --resume")
        elif not progress["history"] or progress["history"][-1]["iteration"] != progress["iteration"]:
            evaluate_and_save()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)
        log_file.close()
    return TrainResult(out=out, epoch=progress["epoch"], iteration=progress["iteration"], stopped=stopped,
                       best_train=progress["best_train"], history=progress["history"])


def clock(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def trained_parameters(model):
    return list(model.decoder.parameters()) + list(model.dynamics.parameters())


def count(module):
    return sum(p.numel() for p in module.parameters())


def epsilon(cfg, iteration):
    return epsilon_schedule(iteration, start=cfg.eps_start, decay=cfg.eps_decay, every=cfg.eps_every,
                            floor=cfg.eps_floor)


# ---- command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def rate(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rate {text!r} is not a number; allowed: (0, 1], e.g. 0.05, 0.25, 1")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"rate {value} is outside (0, 1]; e.g. 0.05, 0.25, 1")
    return value


def resolve_device(name):
    """'auto' -> cuda if present, else cpu; ValueError for a device this machine does not have."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: no CUDA device is available here; allowed: auto, cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not supported; allowed: auto, cpu, cuda, cuda:N")
    return str(device)


def check_writable(out):
    """ValueError unless a run can be written in folder `out` (probed by a real write; creates nothing)."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {out!r} cannot be created: {existing!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--out {out!r} is not writable ({err.strerror} in {existing!r})") from None


def parser():
    p = Parser(prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Train DINo (decoder, codes and latent dynamics) on one PDE.\n"
                           + __doc__[__doc__.index("Usage:"):__doc__.index("Every `eval_every`")].rstrip(),
               epilog="config fields for --set (see the Config table in train.py): "
                      + ", ".join(f.name for f in fields(Config) if f.name != "pde"))
    p.add_argument("--pde", choices=PDES, help="which dataset (required unless --resume)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="'paper': the official sizes and schedule (for a GPU); 'quick': small grid and nets, "
                        "6-7 minutes on one CPU core (default: paper)")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--subsampling", type=rate, metavar="RATE",
                   help="fraction of grid points observed, in (0, 1] (paper: 0.05, 0.25, 1); a random mask "
                        "drawn with --mask-seed; the sphere always uses its latitude-thinning mask as well")
    p.add_argument("--mask-seed", type=int, help="seed of the observation mask (default 0)")
    p.add_argument("--epochs", type=int, help="train until this many epochs in total (default: the preset's)")
    p.add_argument("--minutes", type=float, help="stop after this many minutes of this session (checkpointed)")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="'epoch': decoder and dynamics step once per epoch on summed gradients (paper); "
                        "'minibatch': every minibatch (default: the preset's)")
    p.add_argument("--seed", type=int, help="seed of initialisation, shuffling and restarts (default 0)")
    p.add_argument("--out", help="run folder (default runs/PDE-PRESET); holds last.pt, best.pt, log.txt")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--data-dir", default="data", help="dataset cache folder (default: data)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; on a busy "
                                               "machine 1 is often much faster)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set code_dim=64 (repeatable; see the list below)")
    return p


def resolve(args):
    """The run's (config, resume checkpoint or None, out folder, device) or ValueError."""
    device = resolve_device(args.device)
    given = {"subsampling": args.subsampling, "mask_seed": args.mask_seed, "schedule": args.schedule,
             "seed": args.seed}
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out RUN_FOLDER (the run to continue)")
        state = load_checkpoint(os.path.join(args.out, "last.pt"))
        cfg = Config(**state["config"])
        changed = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None and v != getattr(cfg, k)]
        if args.pde not in (None, cfg.pde) or args.preset or args.set or changed:
            raise ValueError(f"--resume continues {args.out!r} with its own settings ({cfg.pde}); "
                             f"only --epochs, --minutes, --device, --threads and --data-dir may be given")
        check_writable(args.out)
        return cfg, state, args.out, device
    if args.pde is None:
        raise ValueError(f"--pde is required; allowed: {', '.join(PDES)}")
    preset = args.preset or "paper"
    cfg = override(CONFIGS[(args.pde, preset)], args.set)
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    check_config(cfg)
    out = args.out or os.path.join("runs", f"{cfg.pde}-{preset}")
    if os.path.exists(os.path.join(out, "last.pt")):
        raise ValueError(f"--out {out!r} already holds a run (last.pt); pass --resume to continue it "
                         f"or choose another --out")
    check_writable(out)
    return cfg, None, out, device


def main(argv=None):
    args = parser().parse_args(argv)
    for name in ("epochs", "minutes"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser().error(f"--{name} {value} must not be negative")
    if args.threads is not None:
        if args.threads < 1:
            parser().error(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    try:
        cfg, state, out, device = resolve(args)
    except ValueError as err:
        parser().error(str(err))
    try:
        return train(cfg, out=out, device=device, epochs=args.epochs, minutes=args.minutes, resume=state,
                     data_dir=args.data_dir)
    except BadData as err:
        parser().error(str(err))
    except NonFiniteLoss as err:
        print(f"train.py: stopped: non-finite loss ({err}); the last good checkpoint is {out}/last.pt "
              f"(if any). Try a smaller learning rate (--set lr_decoder=...).", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
