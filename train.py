"""Training DINo (Yin, Kirchmeyer et al., ICLR 2023, arXiv:2209.14855v2, Sec. 4.2 and Alg. 1).

Alg. 1 solves two problems together (the paper's Eq. 5-6):
  1. auto-decoding: the decoder D_phi and one code alpha_t per (window, frame, channel) minimise
     the reconstruction error of the observed points, L_dec = |v_t(x) - D_phi(alpha_t)(x)|^2;
  2. dynamics: f_psi is fitted to the learned code sequences (codes DETACHED, so the dynamics
     never bends the representation): L_dyn = |alpha_t - (alpha_0 + int_0^t f_psi(alpha) dt)|^2,
     RK4 at the frame times with scheduled restarts from the learned codes (teacher forcing).
Adam at the paper's rates: decoder 1e-2, codes (an Adam per row) and dynamics 1e-3. The paper's
schedule, "epoch", steps the codes every minibatch and the networks once per epoch: as these are
then frozen and each code row is read once, just before its own step, an epoch is ONE step on all
windows' losses, each weighted by 1 / (size of its minibatch). "minibatch" steps all three every
minibatch. Under torchrun each process owns a shard of the windows and codes, and gradients are
summed over processes once per step. Nothing in an epoch waits for a GPU.

Usage:
    python train.py --pde heat                 # quick preset on a CPU, paper on a GPU
    python train.py --pde navier-stokes --preset paper --device cuda
    torchrun --standalone --nproc_per_node=4 train.py --pde navier-stokes --device cuda
    python train.py --data mine.npz            # your own trajectories (README: Your own equation)
    python train.py --out runs/heat-quick --resume  # continue where a run stopped
    python evaluate.py runs/heat-quick         # metrics table, GIFs, error plot
"""
import argparse
import contextlib
import datetime
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed as dist

import solvers
from autodecode import CodeTable, DINo, fit_codes_closed_form
from dynamics import epsilon_schedule, restart_mask, rk4_rollout, rollout_with_restarts
from solvers import SPECS, check_writable, load_dataset, load_torch, observation_mask, save_torch


# ---- configuration: one table, every PDE x preset
def setting(default, help):
    """A Config field and its --help text (every field is also a command-line flag)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    pde: str = setting(None, "a dataset of solvers.py, or your own .npz file (--data)")
    # data
    size: int = setting(64, "grid points along H (planar: H = W; sphere: nlat = H, nlon = 2 H)")
    n_train: int = setting(256, "training trajectories (each gives windows of 20 frames)")
    n_test: int = setting(16, "test trajectories (reported only, never used for selection)")
    subsampling: float = setting(1.0, "fraction of the grid observed (paper: 0.05, 0.25, 1)")
    mask_seed: int = setting(0, "seed of that random observation mask")
    window: int = setting(20, "frames per window, half in the horizon (--data; solvers': theirs)")
    # coordinates (the official code feeds planar points in [0, 0.5], where input_scale 64 is tuned)
    coord_shift: float = setting(0.0, "added to physical coordinates ...")
    coord_scale: float = setting(0.5, "... then multiplied: the decoder's input (in checkpoints)")
    # values and times alike (your own data: from its training split, see own_preset)
    value_shift: float = setting(0.0, "added to the values (per channel for --data) ...")
    value_scale: float = setting(1.0, "... then multiplied: what the decoder outputs")
    time_scale: float = setting(1.0, "times from a window's start, multiplied: f_psi's clock")
    # model (the official Navier-Stokes sizes)
    code_dim: int = setting(100, "D: code size per state channel")
    hidden: int = setting(64, "decoder width K (even: sin and cos halves)")
    layers: int = setting(3, "decoder hidden layers")
    input_scale: float = setting(64.0, "decoder filter frequency scale")
    dyn_hidden: int = setting(512, "width of the dynamics MLP f_psi")
    # optimisation
    batch_size: int = setting(32, "windows per minibatch (per process under torchrun)")
    epochs: int = setting(10_000, "training length (the official code: 10,000 in a re-run)")
    schedule: str = setting("epoch", "'epoch': networks step once per epoch (paper) | 'minibatch'")
    lr_decoder: float = setting(1e-2, "Adam rate of the decoder")
    lr_codes: float = setting(1e-3, "Adam rate of the code rows")
    lr_dynamics: float = setting(1e-3, "Adam rate of f_psi")
    lr_drop_epoch: int = setting(0, "from this epoch the networks' rates are 10x smaller; 0: never")
    lr_drop_again_epoch: int = setting(0, "... and from this one 10x smaller again; 0: never")
    eps_start: float = setting(0.99, "teacher forcing: restart probability at iteration 0 ...")
    eps_decay: float = setting(0.99, "... multiplied by this ...")
    eps_every: int = setting(100, "... every this many iterations (minibatches) ...")
    eps_floor: float = setting(1e-3, "... and counted as 0 below this")
    code_noise: float = setting(0.0, "L_dyn: f_psi starts and restarts from codes + noise of "
                                     "this std x their RMS; 0: none (paper)")
    # inference: fitting alpha_0 of a new observation
    fit: str = setting("closed-form", "'closed-form': ridge least squares | 'adam'")
    ridge: float = setting(0.0, "closed-form: this ridge; 0: chosen on training windows")
    fit_steps: int = setting(300, "'adam': steps from zero (best code kept) ...")
    fit_lr: float = setting(1e-2, "... and their rate")
    # bookkeeping
    eval_every: int = setting(500, "iterations between evaluations and checkpoints")
    seed: int = setting(0, "initialisation, shuffling and restart draws")
    val_share: float = setting(0.0, "share of n_train held out (they choose best.pt, the ridge)")


PAPER = Config(pde="navier-stokes")     # the official Navier-Stokes settings, base of every preset
# Quick: small grids, fewer trajectories, smaller nets, every minibatch steps everything, codes at
# 3e-3 (each row's own Adam steps less than a table-wide count: heat test Out-t 0.030 at 1e-3,
# 0.0078 at 3e-3). The sphere's xyz are scaled by 0.5 (better than 0.25, 1 and 2).
QUICK = replace(PAPER, size=32, code_dim=32, dyn_hidden=128, batch_size=16, schedule="minibatch",
                fit_steps=200, lr_codes=3e-3)
PLANE = dict(coord_shift=1.0, coord_scale=0.25)   # [-1, 1] -> [0, 0.5], as the official [0, 1)
CONFIGS = {
    ("navier-stokes", "paper"): PAPER,
    # heat has no official config: Navier-Stokes' sizes, the rest chosen on held-out training
    # trajectories, each step's numbers in README ("Heat, the seed experiment"): restarts fading
    # 10x sooner, every minibatch stepping all, a fixed ridge, 512 trajectories, f_psi from codes
    # + 10% noise, network rates 10x smaller from epoch 1,000 and again from 1,500.
    ("heat", "paper"): replace(PAPER, pde="heat", **PLANE, n_train=512, eps_every=10,
                               schedule="minibatch", ridge=3e-3, lr_drop_epoch=1000,
                               lr_drop_again_epoch=1500, code_noise=0.1),
    ("wave", "paper"): replace(PAPER, pde="wave", **PLANE, n_train=64, n_test=4, code_dim=50,
                               dyn_hidden=256, fit_steps=500),
    ("shallow-water", "paper"): replace(PAPER, pde="shallow-water", n_train=8, n_test=2,
                                        code_dim=200, hidden=256, layers=6, dyn_hidden=800,
                                        batch_size=4, fit_steps=500, eval_every=200),
    ("heat", "quick"): replace(QUICK, pde="heat", **PLANE, n_train=128, n_test=8, epochs=800),
    ("wave", "quick"): replace(QUICK, pde="wave", **PLANE, n_train=16, n_test=2, epochs=1500),
    ("navier-stokes", "quick"): replace(QUICK, pde="navier-stokes", n_train=64, n_test=8,
                                        epochs=1500),
    ("shallow-water", "quick"): replace(QUICK, pde="shallow-water", n_train=4, n_test=1,
                                        batch_size=8, epochs=3000),
}
PRESETS, SCHEDULES, FITS = ("quick", "paper"), ("epoch", "minibatch"), ("closed-form", "adam")
RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)   # tried by the closed-form fit (README: why)
RULES = {  # field -> (test, what is allowed); every float must also be finite
    **{name: (lambda v, c=choices: v in c, ", ".join(choices))
       for name, choices in (("pde", SPECS), ("schedule", SCHEDULES), ("fit", FITS))},
    "subsampling": (lambda v: 0 < v <= 1, "(0, 1]"), "size": (lambda v: v >= 4, ">= 4"),
    "window": (lambda v: v >= 2, ">= 2"), "val_share": (lambda v: 0 <= v < 1, "[0, 1)"),
    **{name: (lambda v: v != 0, "non-zero") for name in ("coord_scale", "value_scale")},
    "hidden": (lambda v: v >= 2 and v % 2 == 0, "even, >= 2"),
    "eps_start": (lambda v: 0 <= v <= 1, "[0, 1]"), "eps_decay": (lambda v: 0 < v <= 1, "(0, 1]"),
    "eps_floor": (lambda v: 0 <= v < 1, "[0, 1)"),
    **{name: (lambda v: v >= 0, ">= 0")
       for name in ("epochs", "fit_steps", "seed", "mask_seed", "ridge", "lr_drop_epoch",
                    "lr_drop_again_epoch", "code_noise")},
    **{name: (lambda v: v >= 1, ">= 1") for name in ("n_train", "n_test", "code_dim", "layers",
       "dyn_hidden", "batch_size", "eps_every", "eval_every")},
    **{name: (lambda v: v > 0, "> 0")
       for name in ("input_scale", "lr_decoder", "lr_codes", "lr_dynamics", "fit_lr",
                    "time_scale")},
}


def check_config(cfg):
    """ValueError naming the first bad field and what is allowed: every field, before any work."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} = {value} must be a finite number")
        test, allowed = RULES.get(f.name, (lambda v: True, ""))
        if not test(value):
            raise ValueError(f"{f.name} = {value!r} is not allowed; allowed: {allowed}")
    if math.ceil(cfg.val_share * cfg.n_train) >= cfg.n_train:
        raise ValueError(f"val_share = {cfg.val_share} holds out all {cfg.n_train} training "
                         f"trajectories: leave at least one to train on")


def build_model(cfg, *, coord_dim, n_channels):
    """The DINo (autodecode.py) that `cfg` describes, freshly initialised."""
    model = DINo(coord_dim=coord_dim, n_channels=n_channels, code_dim=cfg.code_dim,
                 hidden=cfg.hidden, layers=cfg.layers, input_scale=cfg.input_scale,
                 dyn_hidden=cfg.dyn_hidden, coord_shift=cfg.coord_shift,
                 coord_scale=cfg.coord_scale, value_shift=cfg.value_shift,
                 value_scale=cfg.value_scale, time_scale=cfg.time_scale, fit=cfg.fit,
                 fit_steps=cfg.fit_steps, fit_lr=cfg.fit_lr)
    if cfg.ridge:                   # a fixed ridge; otherwise each evaluation chooses one (measure)
        model.ridge.fill_(cfg.ridge)
    return model


# ---- one training step of Alg. 1: both problems, on any set of windows
def train_step(run, rows, weight, restart, noise=None):
    """One optimiser step on this process's windows `rows` (R,): each window's L_dec + L_dyn,
    times weight (R,), summed; restart (R, T-1) the teacher-forcing draws; noise (R, T, S, D)
    standard normal or None (cfg.code_noise). The code rows and the networks (their gradients
    summed over processes) step once; the losses stay on the device."""
    run.flat_grad.zero_()                                          # every .grad is a view of it
    for lo in range(0, len(rows), run.chunk):                      # chunks if memory needs them
        part = slice(lo, lo + run.chunk)                           # no index tensor to copy over
        ids, w = rows[part], weight[part]
        codes = run.codes(ids).requires_grad_()                    # (R, T, S, D)
        pred = run.model.decoder(run.coords, codes)                # (R, T, N_obs, S)
        truth = run.values.index_select(0, ids)
        loss_dec = (pred - truth).pow(2).mean(dim=(1, 2, 3))       # (R,)
        target = codes.detach()                                    # L_dyn never bends the codes
        starts = target
        if noise is not None:   # f_psi learns to bring codes near the learned ones back to them
            scale = run.cfg.code_noise * target.pow(2).mean().sqrt()   # a tensor: no host read
            starts = target + scale * noise[part]
        path = rollout_with_restarts(run.model.dynamics, starts, run.t, restart[part])
        if noise is not None:                                      # frame 0 is no forecast
            path = torch.cat([target[:, :1], path[:, 1:]], dim=1)
        loss_dyn = (path - target).pow(2).mean(dim=(1, 2, 3))      # (R,)
        ((loss_dec + loss_dyn) * w).sum().backward()               # two graphs, one backward
        run.codes.step(ids, codes.grad)                            # an Adam per row, at once
        run.loss_sums += torch.stack([(loss_dec * w).sum(), (loss_dyn * w).sum()]).detach()
    run.group.sum_(run.flat_grad)                                  # one all-reduce (SUM)
    run.optimiser.step()


@dataclass
class EpochPlan:
    """An epoch's draws, from the CPU generator: the same on any device and number of processes."""
    rows: torch.Tensor          # (R,) this process's windows (local rows) in the order they step
    weight: torch.Tensor        # (R,) loss weight: 1 / (windows in its minibatch, all processes)
    restart: torch.Tensor       # (R, T-1) bool teacher-forcing restarts
    noise: torch.Tensor         # (R, T, S, D) standard normal for cfg.code_noise, or None
    steps: list                 # slices of rows, one per optimiser step
    iterations: int             # minibatches counted per step

    def step_inputs(self, s):
        """train_step's keyword arguments for the step over slice `s` of the rows."""
        return dict(rows=self.rows[s], weight=self.weight[s], restart=self.restart[s],
                    noise=None if self.noise is None else self.noise[s])


def plan_epoch(run, progress):
    cfg, (lo, hi), n, bs = run.cfg, run.shard, run.n_windows, run.cfg.batch_size
    run.generator.set_state(progress.rng)                          # the state at the epoch's start
    perm = torch.randperm(n, generator=run.generator)              # the global shuffle
    uniform = torch.rand(n, len(run.t) - 1, generator=run.generator)   # restart draws, by window
    noise = None                                                   # drawn only if asked: a run
    if cfg.code_noise:                                             # without it repeats older ones
        noise = torch.randn(n, *run.codes.frame_shape, generator=run.generator)
    if cfg.schedule == "epoch":  # ONE step; the shuffle's minibatches give weights and epsilon
        position = torch.empty_like(perm)
        position[perm] = torch.arange(n)
        mine = torch.arange(lo, hi)
        batch = position[mine] // bs                               # (R,) its minibatch
        size = (n - batch * bs).clamp(max=bs)
        n_batches = -(-n // bs)
        steps, iterations = [slice(0, hi - lo)], n_batches
    else:  # a step per minibatch of this process's windows; its size counts every process's
        mine = perm[(perm >= lo) & (perm < hi)]
        batch = torch.arange(hi - lo) // bs                        # (R,) its step
        sizes = [b - a for a, b in run.group.shards(n)]
        n_batches, shards = -(-max(sizes) // bs), torch.tensor(sizes)
        size = (shards[None] - bs * torch.arange(n_batches)[:, None]).clamp(0, bs).sum(1)[batch]
        steps, iterations = [slice(k * bs, (k + 1) * bs) for k in range(n_batches)], 1
    start = progress.iteration - progress.step * iterations        # iteration at the epoch start
    eps = torch.tensor([epsilon(cfg, start + k) for k in range(n_batches)])[batch]   # (R,)
    return EpochPlan(rows=run.to_device(mine - lo), weight=run.to_device(1.0 / size),
                     restart=run.to_device(restart_mask(uniform[mine], eps)), steps=steps,
                     iterations=iterations,
                     noise=None if noise is None else run.to_device(noise[mine]))


def epsilon(cfg, iteration):
    return epsilon_schedule(iteration, start=cfg.eps_start, decay=cfg.eps_decay,
                            every=cfg.eps_every, floor=cfg.eps_floor)


# ---- the loop: Alg. 1, with an evaluation and a checkpoint every eval_every iterations
def train(cfg, *, out, device="cpu", minutes=None, resume=None, data_dir="data", label="",
          log=print):
    """Train DINo with `cfg` into `out`, or continue exactly the checkpoint dict `resume` (from any
    device and number of processes). The Progress; `stopped`: 'epochs', 'minutes' or a signal."""
    check_config(cfg)
    run = setup(cfg, device=device, data_dir=data_dir)
    progress = Progress(rng=run.generator.get_state()) if resume is None else restore(run, resume)
    say, clock = Log(out, log if run.group.rank == 0 else None), Clock(progress, minutes, device)
    with stop_requests() as asked:
        while progress.epoch < cfg.epochs and not progress.stopped:
            plan = plan_epoch(run, progress)
            drop = 0.1 ** sum(0 < e <= progress.epoch for e in (cfg.lr_drop_epoch,
                                                                cfg.lr_drop_again_epoch))
            for group, lr in zip(run.optimiser.param_groups, (cfg.lr_decoder, cfg.lr_dynamics)):
                group["lr"] = lr * drop                            # this epoch's network rates
            for s in plan.steps[progress.step:]:
                train_step(run, **plan.step_inputs(s))
                crossed = progress.advance(plan, run.generator, cfg.eval_every)
                if clock.first_line_due(crossed):
                    say(summary(run, label, clock, progress))
                if crossed:
                    evaluate_and_save(run, progress, say=say, out=out, clock=clock)
                progress.stopped = run.group.agree_stop(asked, clock, crossed)
                if progress.stopped:
                    break
    if clock.ends and not clock.said:                              # a session of a single step
        say(summary(run, label, clock, progress))
    if progress.stopped in (None, "minutes"):
        if not progress.history or progress.history[-1]["iteration"] != progress.iteration:
            evaluate_and_save(run, progress, say=say, out=out, clock=clock)
    else:
        progress.elapsed = clock.elapsed()
        save(run, progress, [os.path.join(out, "last.pt")])
        say(f"stopped by {progress.stopped} at epoch {progress.epoch}, iteration "
            f"{progress.iteration}: saved {out}/last.pt; continue with: python train.py --out "
            f"{out} --resume")
    progress.stopped = progress.stopped or "epochs"
    best = min(progress.history, key=selection_score, default=None)   # best.pt vs persistence
    held = "val" if run.val is not None else "test"
    if best and best[held + "_vs_persistence"][1] >= 1:
        say(f"best.pt (epoch {best['epoch']}): " + NO_BETTER.format(
            where=f"{held} windows", ratio=best[held + "_vs_persistence"][1]))
    return progress


NO_BETTER = ("beyond the training horizon (Out-t) the {where}' MSE is {ratio:.3g} x that of "
             "persistence (frame 0 held): no better than holding the first frame. Try longer "
             "training (--epochs), more trajectories, or shorter windows (--window)")


@dataclass
class Progress:
    """Where a run stands; all of it but `stopped` goes into the checkpoint."""
    rng: torch.Tensor              # the CPU generator's state at the start of the current epoch
    epoch: int = 0                 # epochs completed
    step: int = 0                  # optimiser steps done in the current epoch
    iteration: int = 0             # minibatches done (the epsilon schedule and eval_every count)
    summed: int = 0                # minibatches whose losses run.loss_sums holds
    elapsed: float = 0.0           # seconds of training, all sessions
    best_train: float = math.inf   # best selection_score so far (chooses best.pt)
    history: list = field(default_factory=list)   # one dict per evaluation
    stopped: str = None            # why this session stopped, once it has

    def advance(self, plan, generator, eval_every):
        """Count one optimiser step; True when it crosses a multiple of eval_every."""
        before = self.iteration
        self.step, self.iteration = self.step + 1, self.iteration + plan.iterations
        self.summed += plan.iterations
        if self.step == len(plan.steps):                           # the epoch is done
            self.epoch, self.step, self.rng = self.epoch + 1, 0, generator.get_state()
        return self.iteration // eval_every > before // eval_every


# ---- evaluation: train In-t, held-out windows (val: selection and ridge; test: report only),
# all on the device and read ONCE
def squared_sums(pred, truth):
    """(sum of squared errors, sum of squared truth), (2,): their ratio is the relative MSE."""
    return torch.stack([(pred - truth).pow(2).sum(), truth.pow(2).sum()])


def window_sums(run, data):
    """(6,): squared_sums In-t, Out-t of `data`'s windows forecast from frame 0 (observed points
    fitted, all scored, the user's units), then persistence's (frame 0 held) squared errors."""
    n, truth = data.n_in_t, data.frames.flatten(2, 3)                     # (B, T, N, S)
    points, seen = data.coords.flatten(0, 1), run.observed                # (N, X), (N_obs,)
    codes = run.model.forecast_codes(points[seen], truth[:, 0, seen], data.t, check=False)
    pred, held = run.model.decode(points, codes), truth[:, :1]
    return torch.cat([squared_sums(pred[:, :n], truth[:, :n]),
                      squared_sums(pred[:, n:], truth[:, n:]),
                      squared_sums(held, truth[:, :n])[:1], squared_sums(held, truth[:, n:])[:1]])


def measure(run):
    """The evaluation's numbers, on the device, summed over processes: loss sums (2), train In-t of
    the LEARNED alpha_0 (2), a non-finite flag, the closed-form ridge (chosen here unless fixed, by
    forecasts from fitted alpha_0 of the validation windows, else of training windows), then
    window_sums of the validation windows (if any) and of the test windows (process 0)."""
    state = [p.detach().sum() for p in run.model.parameters()]
    state = torch.stack(state + [run.loss_sums.sum(), run.codes.weight.sum()])
    starts = [run.codes.codes[:, 0]]                                # (R, S, D) each
    choose = run.cfg.fit == "closed-form" and not run.cfg.ridge
    if choose and run.val is None:
        starts += [fit_codes_closed_form(run.model.decoder, run.coords, run.values[:, 0],
                                         ridge=r, check=False).codes for r in RIDGES]
    starts = torch.stack(starts)                                    # (K, R, S, D), K = 1 or 7
    codes = rk4_rollout(run.model.dynamics, starts.flatten(0, 1), run.t)   # (K R, T_in, S, D)
    sums = torch.stack([squared_sums(run.model.decode(run.points, c, model_units=True), run.values)
                        for c in codes.unflatten(0, starts.shape[:2])])   # (K, 2): their forecasts
    flag = (~torch.isfinite(state).all()).float()[None]
    numbers = run.group.sum_(torch.cat([run.loss_sums, sums[0], flag, sums[1:].flatten()]))
    if choose and run.val is None:                                # the best forecast of training
        err, ref = numbers[5:].view(-1, 2).T                      # windows from fitted alpha_0
        run.model.ridge.copy_(run.ridges.gather(0, torch.argmin(err / ref)[None])[0])
    held = []
    if run.val is not None:                       # every process alike: the same model and data
        ridges, tries = run.ridges if choose else run.model.ridge[None].clone(), []
        for ridge in ridges:
            run.model.ridge.copy_(ridge)
            tries.append(window_sums(run, run.val))
        tries = torch.stack(tries)                                # (ridges, 6)
        fractions = tries[:, 0:3:2] / tries[:, 4:].clamp_min(1e-30)   # of persistence
        best = torch.argmin(fractions.sum(1))                     # In-t + Out-t
        run.model.ridge.copy_(ridges[best])
        held.append(tries[best])
    held.append(window_sums(run, run.test) if run.group.rank == 0 else numbers.new_zeros(6))
    return torch.cat([numbers[:5], run.model.ridge[None]] + held)


def evaluate_and_save(run, progress, *, say, out, clock):
    """The metrics and a log line, then last.pt (and best.pt when selection_score improved)."""
    cfg, n = run.cfg, max(progress.summed, 1)
    with torch.no_grad():
        values = measure(run).tolist()                             # the evaluation's one read
    if not all(map(math.isfinite, values[:-6])) or values[4]:      # all but test: every process
        raise NonFiniteLoss(f"at epoch {progress.epoch}, iteration {progress.iteration}")
    entry = {"epoch": progress.epoch, "iteration": progress.iteration,
             "epsilon": epsilon(cfg, progress.iteration), "loss_dec": values[0] / n,
             "loss_dyn": values[1] / n, "train_in_t": values[2] / max(values[3], 1e-30)}
    if cfg.fit == "closed-form":
        entry["ridge"] = values[5]
    held = ["val"] * (run.val is not None) + ["test"]              # the held-out windows
    for name, sums in zip(held, (values[6:12], values[12:18])):    # (test: process 0 only)
        err_in, ref_in, err_out, ref_out, held_in, held_out = (max(v, 1e-30) for v in sums)
        entry.update({f"{name}_in_t": err_in / ref_in, f"{name}_out_t": err_out / ref_out,
                      f"{name}_vs_persistence": [err_in / held_in, err_out / held_out]})
    run.loss_sums.zero_()
    progress.summed = 0
    entry["elapsed"] = progress.elapsed = clock.elapsed()
    eta = clock.eta(progress, cfg.epochs * run.iterations_per_epoch)
    shown = [f"{name} In-t {entry[name + '_in_t']:.2e} Out-t {entry[name + '_out_t']:.2e}"
             for name in held]
    shown[0] += " ({:.3g} / {:.3g} of persistence)".format(*entry[held[0] + "_vs_persistence"])
    say(f"epoch {entry['epoch']} | iter {entry['iteration']} | eps {entry['epsilon']:.3f} | "
        f"dec {entry['loss_dec']:.2e} | dyn {entry['loss_dyn']:.2e} | train In-t "
        f"{entry['train_in_t']:.2e} | {' | '.join(shown)}"
        + (f" | ridge {entry['ridge']:.0e}" if "ridge" in entry else "")
        + f" | {hms(entry['elapsed'])} | ETA {hms(eta)}")
    progress.history.append(entry)
    score = selection_score(entry)
    names = ["last.pt"] + (["best.pt"] if score < progress.best_train else [])
    progress.best_train = min(progress.best_train, score)
    save(run, progress, [os.path.join(out, name) for name in names])


def selection_score(entry):
    """What chooses best.pt: val In-t + Out-t as fractions of persistence, or else train In-t."""
    return sum(entry.get("val_vs_persistence") or [entry["train_in_t"]])


class NonFiniteLoss(RuntimeError):
    """A loss, parameter or metric is not finite: the run stops before saving anything."""


class BadData(ValueError):
    """The run's data, processes or checkpoint were refused (before anything is written)."""


# ---- data and set-up
BYTES_PER_VALUE = 64  # memory of a training step per (window, frame, point, channel) value,
# intermediates included (measured on the CPU: about 1.2 GiB for the 21M values of an epoch)
CPU_CHUNK = 2 ** 26   # values per chunk on a CPU: 256 MiB per float32 tensor, 4 GiB in all


@dataclass
class Run:
    """All a training run holds: this process's windows and codes, the model, its optimiser."""
    cfg: Config
    group: "Group"                # this process among the torchrun processes (1 of 1 without)
    model: DINo
    optimiser: torch.optim.Adam   # two groups: decoder (lr_decoder), dynamics (lr_dynamics)
    flat_grad: torch.Tensor       # every network gradient in one buffer (.grad are views of it)
    codes: CodeTable              # alpha: this process's rows, one per (window, frame, channel)
    generator: torch.Generator    # on the CPU: shuffles and restart draws, the same everywhere
    n_windows: int                # training windows, all processes
    shard: tuple                  # (lo, hi): the windows this process owns
    iterations_per_epoch: int     # minibatches per epoch (per process under 'minibatch')
    values: torch.Tensor          # (R, T_in, N_obs, S): its windows in the horizon, observed
    points: torch.Tensor          # (N_obs, X) physical positions of the observed points
    coords: torch.Tensor          # (N_obs, X) the same, mapped for the decoder
    t: torch.Tensor               # (T_in,) frame times inside the horizon, model units, from 0
    mask: torch.Tensor            # (H, W) bool: the observed grid points (CPU: saved as is)
    observed: torch.Tensor        # (N_obs,) long: their indices in the flattened grid
    val: object                   # PDEData: held-out training trajectories (selection), or None
    test: object                  # PDEData: the test split (report only)
    ridges: torch.Tensor          # (len(RIDGES),) the candidate ridges, on the device
    chunk: int                    # windows per chunk of a training step (memory)
    loss_sums: torch.Tensor       # (2,) weighted L_dec and L_dyn since the last evaluation

    def to_device(self, tensor):
        """A CPU tensor on the run's device without blocking the host (through pinned memory)."""
        on_cpu = self.values.device.type == "cpu"
        return tensor if on_cpu else tensor.pin_memory().to(self.values.device, non_blocking=True)


def setup(cfg, *, device, data_dir):
    group = Group(device)
    train_set, test = load_data(cfg, device=device, data_dir=data_dir, group=group)
    mask = observation_mask(train_set, cfg.subsampling, cfg.mask_seed).cpu()    # (H, W)
    train_set, val = split_off_validation(cfg, train_set)
    n_windows, n_in = len(train_set.frames), train_set.n_in_t
    if group.world > n_windows:
        raise BadData(f"{group.world} processes for {n_windows} training windows: each process "
                      f"needs at least one; use at most {n_windows} processes")
    shards = group.shards(n_windows)
    lo, hi = shards[group.rank]
    observed = mask.flatten().nonzero().squeeze(1).to(device)                   # (N_obs,)
    values = train_set.frames[lo:hi, :n_in].flatten(2, 3)[:, :, observed]       # (R, T, N, S)
    points = train_set.coords.flatten(0, 1)[observed]                           # (N_obs, X)
    torch.manual_seed(cfg.seed)                                   # the same networks everywhere
    model = build_model(cfg, coord_dim=points.shape[-1], n_channels=values.shape[-1]).to(device)
    values, t = model.map_values(values), model.map_times(train_set.t[:n_in])   # model units
    params = list(model.parameters())
    flat_grad = torch.zeros(sum(p.numel() for p in params), device=device)
    for p, grad in zip(params, flat_grad.split([p.numel() for p in params])):
        p.grad = grad.view_as(p)                                  # backward accumulates into it
    optimiser = torch.optim.Adam([
        {"params": model.decoder.parameters(), "lr": cfg.lr_decoder},
        {"params": model.dynamics.parameters(), "lr": cfg.lr_dynamics}], fused=True)
    per_process = max(b - a for a, b in shards) if cfg.schedule == "minibatch" else n_windows
    codes = CodeTable(hi - lo, n_in, values.shape[-1], cfg.code_dim, lr=cfg.lr_codes)
    return Run(cfg=cfg, group=group, model=model, optimiser=optimiser, flat_grad=flat_grad,
               codes=codes.to(device), generator=torch.Generator().manual_seed(cfg.seed + 1),
               n_windows=n_windows, shard=(lo, hi),
               iterations_per_epoch=-(-per_process // cfg.batch_size), values=values,
               points=points, coords=model.map_coords(points), mask=mask, observed=observed,
               t=t, val=val, test=test, ridges=torch.tensor(RIDGES, device=device),
               chunk=max(1, chunk_values(device) // values[0].numel()),
               loss_sums=torch.zeros(2, device=device))


def split_off_validation(cfg, data):
    """(windows trained on, held-out windows or None) of a training split: those after the first
    n_train - ceil(val_share n_train) trajectories' are held out (stored trajectory-wise)."""
    cut = (cfg.n_train - math.ceil(cfg.val_share * cfg.n_train)) * SPECS[cfg.pde].windows
    if cut == len(data.frames):
        return data, None
    return (replace(data, frames=data.frames[:cut], trajectory=data.trajectory[:cut]),
            replace(data, split="val", frames=data.frames[cut:], trajectory=data.trajectory[cut:]))


def chunk_values(device):
    """How many (window, frame, point, channel) values a chunk of a training step may hold."""
    cuda = device.startswith("cuda")
    return torch.cuda.mem_get_info(device)[0] // (2 * BYTES_PER_VALUE) if cuda else CPU_CHUNK


def load_data(cfg, *, device, data_dir, group):
    """(train, test) PDEData on `device`, built when missing (under torchrun: by process 0)."""
    def load(verbose):
        return [load_dataset(cfg.pde, split, size=cfg.size, data_dir=data_dir, n_trajectories=n,
                             device=device, verbose=verbose)
                for split, n in (("train", cfg.n_train), ("test", cfg.n_test))]
    sets, error = None, None
    if group.rank == 0:
        try:
            sets = load(verbose=True)
        except (ValueError, OSError) as err:
            error = err
    if group.any(error is not None):                               # the others wait here
        raise BadData(str(error) if error else "process 0 could not load the data (its message)")
    return sets or load(verbose=False)


# ---- several processes (torchrun): shards of windows, summed gradients, agreed decisions
AGREE_EVERY = 10      # steps between agreed stop checks under torchrun (and at every evaluation)
GROUP_TIMEOUT = datetime.timedelta(minutes=60)   # a collective may wait this long: process 0
# may build a dataset meanwhile (the sphere set: 10-25 CPU minutes)


class Group:
    """This process among the torchrun processes; rank 0 of 1, with no process group, otherwise."""

    def __init__(self, device):
        running = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if running else (0, 1)
        self.device, self.steps = device, 0

    def shards(self, n):
        """[(lo, hi)] per process: contiguous blocks of n windows, sizes differing by at most 1."""
        return [(r * n // self.world, (r + 1) * n // self.world) for r in range(self.world)]

    def sum_(self, tensor):
        """Sum over processes, in place (NCCL on CUDA, gloo on CPU)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag):
        """True in every process when `flag` is true in any (one small all-reduce)."""
        if self.world == 1:
            return bool(flag)
        return bool(self.sum_(torch.tensor([float(flag)], device=self.device)))

    def agree_stop(self, asked, clock, evaluated):
        """None, or why every process stops now: a signal in any process, or the time budget."""
        self.steps += 1
        sig, out_of_time = max(asked, default=0), clock.out_of_time()
        if self.world > 1:
            if not (evaluated or self.steps % AGREE_EVERY == 0):  # no step waits for the others
                return None
            flags = torch.tensor([sig, int(out_of_time)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)        # a signal anywhere stops all
            sig, out_of_time = flags.tolist()
        return signal.Signals(sig).name if sig else "minutes" if out_of_time else None

    def gather_rows(self, tensor, n):
        """(n, ...): every process's shard of rows, in window order (all processes take part)."""
        if self.world == 1:
            return tensor
        shards = self.shards(n)
        padded = tensor.new_zeros(max(b - a for a, b in shards), *tensor.shape[1:])
        padded[:len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in shards]
        dist.all_gather(parts, padded)
        return torch.cat([part[:b - a] for part, (a, b) in zip(parts, shards)])


def start_processes(device):
    """Pin this process to its device (returned) and, under torchrun, join the process group."""
    local, cuda = os.environ.get("LOCAL_RANK"), device.startswith("cuda")
    if cuda and local is not None:
        gpus, here = torch.cuda.device_count(), os.environ.get("LOCAL_WORLD_SIZE")
        if here is None or int(here) > gpus:   # Slurm-style launchers may set LOCAL_RANK only
            raise BadData("LOCAL_RANK is set but LOCAL_WORLD_SIZE (the processes on this machine) "
                          "is not: set both, as torchrun does" if here is None else
                          f"{here} processes on this machine but {gpus} GPU(s): start at most "
                          f"{gpus} (torchrun --nproc_per_node={gpus}), or use --device cpu")
        device = f"cuda:{local}"
    if torch.device(device).index is not None:
        torch.cuda.set_device(device)               # pinned memory and NCCL use this GPU
    if local is not None:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=GROUP_TIMEOUT,
                                device_id=torch.device(device) if cuda else None)
    return device


# ---- checkpoints: one complete file whatever the number of processes, any device, no code
FORMAT = "dino-run/3"  # our checkpoints' tag (2: per-row code Adam; 3: Progress.summed)
KEYS = {"format", "config", "coord_dim", "n_channels", "mask", "world_size", "model", "codes",
        "optimiser", "loss_sums", "progress"}


def save(run, progress, paths):
    """One checkpoint to every path from process 0, all or nothing (the networks are the same in
    every process: they step on gradients summed over all; test_dino.py checks 2 against 1)."""
    codes = {k: run.group.gather_rows(v, run.n_windows) for k, v in run.codes.state_dict().items()}
    error = None
    if run.group.rank == 0:
        state = to_cpu({"model": run.model.state_dict(), "codes": codes, "mask": run.mask,
                        "optimiser": run.optimiser.state_dict(), "loss_sums": run.loss_sums})
        state.update(format=FORMAT, config=asdict(run.cfg), coord_dim=run.points.shape[-1],
                     data_sha256=SPECS[run.cfg.pde].settings.get("sha256"),
                     n_channels=run.values.shape[-1], world_size=run.group.world,
                     progress={f.name: getattr(progress, f.name) for f in fields(progress)
                               if f.name != "stopped"})
        try:
            for path in paths:
                save_torch(path, state)
        except OSError as err:
            error = err
    if run.group.any(error is not None):
        raise error or OSError("process 0 could not write a checkpoint")


def to_cpu(tree):
    """A copy of `tree` (nested dicts and lists) with its tensors on the CPU: ONE copy per dtype."""
    def walk(node, visit):
        if isinstance(node, (dict, list)):
            pairs = node.items() if isinstance(node, dict) else enumerate(node)
            done = {key: walk(value, visit) for key, value in pairs}
            return done if isinstance(node, dict) else list(done.values())
        return visit(node) if torch.is_tensor(node) and node.device.type != "cpu" else node
    found, host = [], {}
    walk(tree, found.append)
    for dtype in {t.dtype for t in found}:
        same = [t for t in found if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in same]).cpu()
        host.update({id(t): part.view(t.shape) for t, part in
                     zip(same, flat.split([t.numel() for t in same]))})
    return walk(tree, lambda t: host[id(t)])


def restore(run, state):
    """Continue from a checkpoint: this process's rows of the code table, the rest whole."""
    lo, hi = run.shard
    try:
        run.model.load_state_dict(state["model"])
        run.codes.load_state_dict({k: v[lo:hi] for k, v in state["codes"].items()})
        run.optimiser.load_state_dict(state["optimiser"])
        run.loss_sums.copy_(state["loss_sums"])
        progress = Progress(**state["progress"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise BadData(f"the checkpoint does not fit this run ({type(err).__name__}: "
                      f"{str(err).splitlines()[0]})") from None
    if progress.step and state["world_size"] != run.group.world:
        raise BadData(f"the checkpoint stopped inside an epoch of the minibatch schedule, with "
                      f"{state['world_size']} process(es): resume it with as many")
    return progress


def load_checkpoint(path):
    """One of our checkpoints (a run folder means its best.pt), as a dict on the CPU: loaded with
    weights_only=True, so a crafted file cannot run code. ValueError naming the path otherwise."""
    path = os.path.join(path, "best.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist (give a run folder or a .pt file "
                         f"written by train.py)")
    state = load_torch(path, kind="a train.py checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a train.py checkpoint (no {FORMAT!r} tag)")
    if KEYS - state.keys():
        raise ValueError(f"checkpoint {path!r} lacks {', '.join(sorted(KEYS - state.keys()))}: "
                         f"damaged, or written by another version")
    return state


def model_from_checkpoint(state, device="cpu", data=None):
    """(DINo, Config) from a checkpoint dict, on `device`; your data's file is read (or `data`)."""
    try:
        cfg = Config(**state["config"])
        if cfg.pde.endswith(".npz"):                    # your own data: read and checked again
            cfg = replace(cfg, pde=solvers.register_file(data or cfg.pde, window=cfg.window,
                                                         sha256=state.get("data_sha256")))
        model = build_model(cfg, coord_dim=state["coord_dim"], n_channels=state["n_channels"])
        model.to(device).load_state_dict(state["model"])
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"the checkpoint's model does not load ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]})") from None
    return model.eval(), cfg


# ---- signals, time and the log
@contextlib.contextmanager
def stop_requests():
    """Ctrl-C, SIGTERM and SIGHUP ask the loop to stop after the step; the list yielded has them."""
    asked, previous = [], {}
    with contextlib.suppress(ValueError):                   # signal.signal refuses other threads
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # SIGTERM: Slurm, docker, timeout
            previous[s] = signal.signal(s, lambda signum, frame: asked.append(signum))
    try:
        yield asked
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Clock:
    """This session's wall time: the --minutes budget, the time of one step, the ETA."""

    def __init__(self, progress, minutes, device):
        self.start, self.before, self.minutes = time.time(), progress.elapsed, minutes
        self.first_iteration, self.device = progress.iteration, device
        self.ends, self.said = [], False       # end times of the session's first two steps

    def first_line_due(self, evaluating):
        """Note a step's end; True once: after step 2 (step 1 warms up) or an earlier evaluation."""
        if len(self.ends) < 2:
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)    # the GPU is waited for at these steps only
            self.ends.append(time.time())
        due = not self.said and (len(self.ends) == 2 or evaluating)
        self.said |= due
        return due

    def session(self):
        return time.time() - self.start

    def elapsed(self):
        return self.before + self.session()

    def out_of_time(self):
        return self.minutes is not None and self.session() >= 60 * self.minutes

    def eta(self, progress, total_iterations):
        done = max(progress.iteration - self.first_iteration, 1)
        eta = self.session() / done * (total_iterations - progress.iteration)
        return eta if self.minutes is None else min(eta, 60 * self.minutes - self.session())


def summary(run, label, clock, progress):
    """The first log line: what is trained, where, and how long it will take."""
    cfg, world, ends = run.cfg, run.group.world, clock.ends
    step = ends[1] - ends[0] if len(ends) > 1 else clock.session()   # one step, warmed up
    batch = f"{cfg.batch_size}" + (f" per process, {world * cfg.batch_size} in all"
                                   if world > 1 and cfg.schedule == "minibatch" else "")
    per_epoch = step * (1 if cfg.schedule == "epoch" else run.iterations_per_epoch)
    decoder, dynamics = (sum(p.numel() for p in m.parameters()) for m in run.model.children())
    return (f"{cfg.pde} | {label or 'config given'} | {cfg.epochs} epochs of {run.n_windows} "
            f"windows x {len(run.t)} frames, {len(run.observed)}/{run.mask.numel()} points "
            f"observed | decoder {decoder:,} + dynamics {dynamics:,} parameters | schedule "
            f"{cfg.schedule}, minibatch {batch} | {world} process(es) on {run.group.device} | a "
            f"step takes {step:.2f} s: about {hms((cfg.epochs - progress.epoch) * per_epoch)} of "
            f"training to go (evaluations add some)\nmetrics: relative MSE (MSE / mean square of "
            f"truth); (x / y of persistence): MSE In-t / Out-t / that of holding frame 0; "
            + (f"val ({len(run.val.frames)} windows never trained on) In-t + Out-t" if run.val
               else "train In-t") + " selects best.pt, test is reported only")


def hms(seconds):
    s = int(max(seconds, 0))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Log:
    """Lines to the console and to OUT/log.txt; silent in processes other than 0."""

    def __init__(self, out, echo):
        self.path, self.echo = os.path.join(out, "log.txt"), echo

    def __call__(self, text):
        if self.echo is None:
            return
        self.echo(text)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(text + "\n")
        except OSError as err:
            raise OSError(f"cannot write {self.path}: {err.strerror or err}") from None


# ---- command line: every Config field is a flag (--code-dim 64), its help the field's text
RANK = int(os.environ.get("RANK", 0))                       # under torchrun only process 0 prints
FLAGS = [f for f in fields(Config) if f.name != "pde"]      # the fields given as --name-with-dashes
CHOICES = {"schedule": SCHEDULES, "fit": FITS}


def parser():
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train DINo (decoder, codes and latent dynamics) on one PDE.\n"
                    + __doc__[__doc__.index("Usage:"):].rstrip())
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n"
                                        if RANK == 0 else "")
    p.add_argument("--pde", choices=SPECS, help="which dataset (or --data; not with --resume)")
    p.add_argument("--data", metavar="FILE.npz", help="your own trajectories (README: Your own "
                   "equation): frames, coords, t")
    p.add_argument("--preset", choices=PRESETS, help="'paper': the official sizes and schedule; "
                   "'quick': small grids and nets (default: paper on CUDA, quick on a CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    p.add_argument("--minutes", type=float, help="stop after this many minutes (checkpointed)")
    p.add_argument("--out", help="run folder (default runs/PDE-PRESET): last.pt, best.pt, log.txt")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (last.pt)")
    p.add_argument("--data-dir", default="data", help="dataset cache folder (default: data)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (busy machine: 1 is faster)")
    table = p.add_argument_group("config fields (default: the preset's, train.py's Config table)")
    for f in FLAGS:                                         # argparse reads % in help as a format
        table.add_argument("--" + f.name.replace("_", "-"), type=f.type,
                           choices=CHOICES.get(f.name), metavar=f.type.__name__.upper(),
                           help=f.metadata["help"].replace("%", "%%"))
    return p


def resolve(args):
    """(config, checkpoint to resume or None, out folder, device, label), or ValueError."""
    device = solvers.resolve_device(args.device)
    given = {f.name: getattr(args, f.name) for f in FLAGS if getattr(args, f.name) is not None}
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes >= 0):
        raise ValueError(f"--minutes {args.minutes} must be a finite number >= 0")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be at least 1")
    if args.resume:
        return resume_settings(args, given, device)
    if (args.pde is None) == (args.data is None):
        raise ValueError(f"give --pde or --data FILE.npz; --pde allows: {', '.join(SPECS)}")
    preset = args.preset or ("paper" if device.startswith("cuda") else "quick")
    pde = args.pde or solvers.register_file(args.data, window=given.get("window", 20))
    spec = SPECS[pde]
    if given.setdefault("window", spec.window) != spec.window:
        raise ValueError(f"--window {given['window']}: {pde}'s windows have {spec.window} frames; "
                         f"--window is for --data files")
    label = f"preset {preset}"
    if not args.preset:
        other = "quick" if preset == "paper" else "paper"
        label += f" (the default on {device.split(':')[0].upper()}; --preset {other} for the other)"
    cfg = (replace(CONFIGS[pde, preset], **given) if (pde, preset) in CONFIGS
           else own_preset(pde, preset, given))
    name = os.path.splitext(os.path.basename(cfg.pde))[0]
    out = args.out or os.path.join("runs", f"{name}-{preset}")
    if os.path.exists(os.path.join(out, "last.pt")):
        raise ValueError(f"--out {out!r} already holds a run (last.pt); pass --resume to continue "
                         f"it or choose another --out")
    check_writable(out)
    return cfg, None, out, device, label


# Your own data: a recipe chosen on held-out windows of three equations (README: the numbers)
STEP = 0.25         # the frame spacing in the model's time units (heat's and wave's)
WORK = 4.5e9        # quick: epochs x windows x frames x (points + OVERHEAD), ~7 min of one core
OVERHEAD = 2048     # a step's fixed cost in points (1 core: 0.03 s at 64 points, 0.07 at 4,096)


def own_preset(pde, preset, given):
    """The Config of a PDE without a preset (your file or solver), flags `given`: its counts, grid
    and units (bounding box -> [0, 0.5] per axis, frame spacing -> STEP, a file's channels -> mean
    0, variance 1 over its training split, last eighth held out), a code of N / 8 for N points
    (quick: 32-128), epochs from WORK (>= 500), restarts and rate drops at shares of them."""
    spec = SPECS[pde]
    coords = spec.coords(spec.sizes["train"]).flatten(0, -2)       # (N, X)
    low, span = coords.amin(0), (coords.amax(0) - coords.amin(0)).clamp_min(1e-12)
    cfg = replace(PAPER if preset == "paper" else QUICK, pde=pde, size=spec.sizes["train"],
                  n_train=spec.trajectories["train"], n_test=spec.trajectories["test"],
                  coord_shift=tuple((-low).tolist()), coord_scale=tuple((0.5 / span).tolist()),
                  time_scale=STEP / spec.spacing, code_noise=0.1)
    if spec.arrays is not None:
        frames = spec.arrays["train"]                              # (n, T, H, W, S) numpy
        mean, std = frames.mean(axis=(0, 1, 2, 3)), frames.std(axis=(0, 1, 2, 3))
        cfg = replace(cfg, value_shift=tuple((-mean).tolist()), val_share=0.125,
                      value_scale=tuple((1 / std.clip(1e-30)).tolist()))
    if preset == "quick":
        cfg = replace(cfg, code_dim=min(128, max(32, len(coords) // 8)), dyn_hidden=256)
    cfg = replace(cfg, **given)
    windows = cfg.n_train * (1 - cfg.val_share) * spec.windows
    epochs = given.get("epochs", cfg.epochs if preset == "paper" else int(min(10_000, max(
        500, round(WORK / (windows * spec.n_in_t * (len(coords) + OVERHEAD)), -2)))))
    fade, floor = epochs * math.ceil(windows / cfg.batch_size) / 5, max(cfg.eps_floor, 1e-9)
    decays = math.log(floor / max(cfg.eps_start, 1e-9)) / math.log(min(cfg.eps_decay, 1 - 1e-9))
    every, decay = ((max(1, round(fade / decays)), cfg.eps_decay) if fade >= decays else  # short
                    (1, (floor / 2 / max(cfg.eps_start, 1e-9)) ** (1 / fade)))  # runs: faster
    return replace(cfg, **{"epochs": epochs, "eps_every": every, "eps_decay": decay,
                           "lr_drop_epoch": round(0.6 * epochs),
                           "lr_drop_again_epoch": round(0.8 * epochs), **given})


def resume_settings(args, given, device):
    if args.out is None:
        raise ValueError("--resume needs --out RUN_FOLDER (the run to continue)")
    state = load_checkpoint(os.path.join(args.out, "last.pt"))
    cfg = replace(model_from_checkpoint(state, data=args.data)[1], **given)
    if args.pde not in (None, cfg.pde) or args.preset or set(given) - {"epochs"}:
        raise ValueError(f"--resume continues {args.out!r} with its own settings ({cfg.pde}); only "
                         f"--epochs, --minutes, --device, --threads, --data (the same file, "
                         f"moved) and --data-dir may be given")
    done = state["progress"]["epoch"]
    if cfg.epochs <= done:
        raise ValueError(f"--epochs {cfg.epochs}: the run in {args.out!r} is already at epoch "
                         f"{done}; give a larger --epochs to continue it")
    check_writable(args.out)
    return cfg, state, args.out, device, f"resumed at epoch {done}"


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        cfg, state, out, device, label = resolve(args)
        check_config(cfg)
    except ValueError as err:
        parser().error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        progress = train(cfg, out=out, device=start_processes(device), minutes=args.minutes,
                         resume=state, data_dir=args.data_dir, label=label)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # leave together: a gloo process whose peer tore down first aborted
        return progress
    except BadData as err:
        parser().error(str(err))
    except (NonFiniteLoss, OSError) as err:
        why = (f"non-finite loss or parameters ({err}); try a smaller learning rate (--lr-decoder "
               f"...)" if isinstance(err, NonFiniteLoss) else str(err))
        if RANK == 0:
            print(f"train.py: stopped: {why}. The last good checkpoint, if any, is {out}/last.pt",
                  file=sys.stderr)
        raise SystemExit(1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if "LOCAL_RANK" in os.environ:  # torchrun: skip Python's shutdown, where gloo's threads, torn
        sys.stdout.flush()          # down late, now and then abort a finished process ("terminate
        sys.stderr.flush()          # called without an active exception"); all is written by now
        os._exit(0)
