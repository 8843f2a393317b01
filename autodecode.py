"""Auto-decoding: codes without an encoder, fitted by gradient descent.

DINo (Yin, Kirchmeyer et al., ICLR 2023, arXiv:2209.14855v2), Sec. 4.2 (and DeepSDF, Park et al. 2019).
There is no encoder E(v) -> alpha. Each observed frame owns a code; during training the codes and the
decoder descend the same reconstruction loss

    L_dec(phi, alpha) = mean over frames, points x, channels of (v_t(x) - D_phi(alpha_t)(x))^2,

the codes in a table indexed by (sequence, frame, channel), the decoder shared by all. At test time
the decoder is frozen and the code of a new observation is found by a few hundred Adam steps from
zero: that is the "encoder". Three pieces, in the order a reader meets them:

- `toy_linear_autodecoding()`: a linear decoder and its latents learned by alternating steps;
  prints the loss before and after (the tutorial's toy example, rewritten);
- `fit_codes(decoder, coords, values, mask)`: batched test-time inference, one code per sample and
  channel, keeping each sample's best code; one vectorised optimisation, no loop over samples;
- `CodeTable`: the training-time codes, one row per sequence, with its own Adam.

Shapes: B batch, T frames, N points, S channels, D code dim, X coord dim.

Usage:
    python autodecode.py            # the toy example
    python autodecode.py --bench    # speed and peak memory at the paper's Navier-Stokes sizes
"""
import argparse
import resource
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# ---- 1. the idea in twenty lines: a linear decoder, latents learned by alternating steps
@dataclass
class ToyResult:
    loss_before: float
    loss_after: float


def toy_linear_autodecoding(*, n_samples=256, n_features=32, latent_dim=4, rounds=300, lr=3e-2, seed=0):
    """Data v = W_true z_true; learn latents z (from zero) and a decoder W (random) with no encoder."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(n_samples, latent_dim, generator=gen) @ torch.randn(latent_dim, n_features, generator=gen)
    latents = nn.Parameter(torch.zeros(n_samples, latent_dim))          # one code per sample, from 0
    decoder = nn.Parameter(0.1 * torch.randn(latent_dim, n_features, generator=gen))
    opt_latents, opt_decoder = torch.optim.Adam([latents], lr=lr), torch.optim.Adam([decoder], lr=lr)

    def loss_fn():
        return (latents @ decoder - data).pow(2).mean()                 # L_dec, mean over samples

    loss_before = loss_fn().item()
    for _ in range(rounds):
        for opt in (opt_latents, opt_decoder):                          # "modulation", then decoder
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
    result = ToyResult(loss_before=loss_before, loss_after=loss_fn().item())
    print(f"toy auto-decoding | loss before {result.loss_before:.4f} | after {rounds} alternating "
          f"rounds {result.loss_after:.2e}")
    return result


# ---- 2. test-time inference: fit one code per sample and channel to observed values
@dataclass
class FitResult:
    codes: torch.Tensor   # (B, S, D) best code seen per sample
    loss: torch.Tensor    # (B,) its reconstruction MSE over observed points and channels


def _check_fit_inputs(coords, values, mask):
    if values.dim() != 3:
        raise ValueError(f"values must be (B, N, S), got shape {tuple(values.shape)}")
    n_batch, n_points, _ = values.shape
    if coords.dim() not in (2, 3) or coords.shape[-2] != n_points or (
            coords.dim() == 3 and coords.shape[0] != n_batch):
        raise ValueError(f"coords must be (N, X) or (B, N, X) with B={n_batch}, N={n_points}, "
                         f"got shape {tuple(coords.shape)}")
    if mask is None:
        return torch.ones(1, n_points, dtype=torch.bool, device=values.device)
    if mask.dtype != torch.bool or mask.shape not in ((n_points,), (n_batch, n_points)):
        raise ValueError(f"mask must be None or bool of shape ({n_points},) or ({n_batch}, {n_points}), "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    mask = mask.reshape(-1, n_points)                                   # (1 or B, N)
    if not mask.any(dim=1).all():
        raise ValueError("mask leaves a sample with no observed point")
    return mask


def fit_codes(decoder, coords, values, mask=None, *, steps=300, lr=1e-2, init=None):
    """Fit codes (B, S, D) to values (B, N, S) observed at coords (N, X) or (B, N, X), with Adam.

    mask: None (all points), (N,) or (B, N) bool: only observed points enter the loss, so the
    values at unobserved points may be anything (even NaN). Codes start at zero (or `init`).
    The per-sample losses are SUMMED before backward, so each sample's gradient is its own and,
    Adam being elementwise, the batched fit equals fitting every sample alone. The code with the
    lowest loss seen is kept per sample. The decoder is not changed and receives no gradient.

    If the decoder provides `affine_parts(coords)` (inr.Decoder does: the code-shifted MFN is affine
    in the code), the fit runs on D(alpha)(x) = offset(x) + jacobian(x) alpha, computed once, and
    each step is a (N, D) x (D, S) product per sample; otherwise every step calls decoder(coords, codes).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    mask = _check_fit_inputs(coords, values, mask)
    n_batch, _, n_channels = values.shape
    # per-sample MSE weights: 1 / (observed points * channels) at observed points, 0 elsewhere
    weight = mask / (mask.sum(dim=1, keepdim=True) * n_channels)        # (1 or B, N)
    if init is not None:
        codes = init.detach().clone()
    else:
        codes = values.new_zeros(n_batch, n_channels, decoder.code_dim)
    if codes.shape[:2] != (n_batch, n_channels):
        raise ValueError(f"init must be (B={n_batch}, S={n_channels}, D), got shape {tuple(codes.shape)}")

    with torch.no_grad():
        parts = decoder.affine_parts(coords) if hasattr(decoder, "affine_parts") else None

    def decode(c):                                                      # (B, S, D) -> (B, N, S)
        if parts is None:
            return decoder(coords, c)
        if parts.jacobian.shape[0] == 1:                                # shared points: one matmul
            return (parts.offset[0] + c @ parts.jacobian[0].T).transpose(1, 2)
        return parts.offset[..., None] + parts.jacobian @ c.transpose(1, 2)  # per-sample points

    codes.requires_grad_(True)
    opt = torch.optim.Adam([codes], lr=lr)
    best_loss = values.new_full((n_batch,), float("inf"))
    best_codes = codes.detach().clone()
    with torch.enable_grad():                                           # callers may be in no_grad
        for step in range(steps + 1):
            residual = torch.where(mask[..., None], decode(codes) - values, 0.0)      # (B, N, S)
            loss = (residual.pow(2) * weight[..., None]).sum(dim=(1, 2))             # (B,)
            better = loss.detach() < best_loss
            best_loss = torch.where(better, loss.detach(), best_loss)
            best_codes = torch.where(better[:, None, None], codes.detach(), best_codes)
            if step == steps:
                break
            # gradient for the codes only: the decoder's .grad stays untouched
            (codes.grad,) = torch.autograd.grad(loss.sum(), codes)
            opt.step()
    return FitResult(codes=best_codes, loss=best_loss)


# ---- 3. training-time codes: one per (sequence, frame, channel)
class CodeTable(nn.Module):
    """All training codes, zeros at the start; table(ids) -> (len(ids), T, S, D).

    Stored as ONE parameter `weight` of shape (n_sequences, T*S*D), readable as (n_sequences, T, S, D)
    through `.codes`. The optimiser is the caller's; the paper uses Adam with lr 1e-3 for the codes
    (the decoder, lr 1e-2, and the dynamics, lr 1e-3, have their own). `table.optimizer(lr)` builds it.

    sparse: with sparse=True the lookup gives sparse gradients and `optimizer()` is SparseAdam, so a
    minibatch's step moves only its own rows, as in the official code (one parameter per sequence;
    Adam skips those without a gradient). With the default dense gradients any optimiser works, but
    Adam keeps moving rows outside the minibatch on their stale momentum for a few steps.
    """

    def __init__(self, n_sequences, n_frames, n_channels, code_dim, *, sparse=False):
        super().__init__()
        for name, value in (("n_sequences", n_sequences), ("n_frames", n_frames),
                            ("n_channels", n_channels), ("code_dim", code_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.frame_shape = (n_frames, n_channels, code_dim)
        self.sparse = sparse
        # 2-D so that a sparse lookup can hand back row-sparse gradients
        self.weight = nn.Parameter(torch.zeros(n_sequences, n_frames * n_channels * code_dim))

    @property
    def codes(self):
        """All codes as a (n_sequences, T, S, D) view."""
        return self.weight.view(-1, *self.frame_shape)

    def forward(self, ids):
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.weight.device)
        if ids.dim() != 1 or (len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < len(self.weight)):
            raise ValueError(f"ids must be 1-D in [0, {len(self.weight)}), got {ids.tolist()}")
        rows = F.embedding(ids, self.weight, sparse=self.sparse)          # (len(ids), T*S*D)
        return rows.view(len(ids), *self.frame_shape)                     # (len(ids), T, S, D)

    def optimizer(self, lr=1e-3):
        """Adam for the codes (SparseAdam when sparse; it counts bias-correction steps per table)."""
        if self.sparse:
            return torch.optim.SparseAdam(self.parameters(), lr=lr)
        return torch.optim.Adam(self.parameters(), lr=lr)


# ---- benchmark at the paper's Navier-Stokes sizes
def benchmark(*, repeats=5, threads=1, anchor=False):
    """One training iteration and one test-time fit at NS sizes; prints medians and peak memory.

    anchor=True then also times the decoder's forward + backward over the same batch through
    `decode_direct` (the equations run per code, the official code's way), once, after the peak
    memory is read: a same-machine, same-load reference for the speed-up (about 15 s, 3 GiB)."""
    from dynamics import Dynamics, rollout_with_restarts   # imported here: only the benchmark needs them
    from inr import Decoder
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n_seq, batch, frames, size, code_dim = 512, 32, 10, 64, 100
    axis = torch.linspace(0, 0.5, size + 1)[:-1]                         # official planar range
    coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)  # (N, 2)
    values = torch.randn(batch, frames, size * size, 1)                 # (B, T, N, S)
    decoder = Decoder(coord_dim=2, code_dim=code_dim, hidden=64, layers=3)
    dynamics = Dynamics(n_channels=1, code_dim=code_dim, hidden=512)
    table = CodeTable(n_seq, frames, 1, code_dim, sparse=True)
    opt_codes = table.optimizer(lr=1e-3)
    opt_decoder = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    opt_dynamics = torch.optim.Adam(dynamics.parameters(), lr=1e-3)
    t = torch.arange(frames, dtype=torch.float32)

    def iteration():
        ids = torch.randperm(n_seq)[:batch]
        codes = table(ids)                                               # (B, T, S, D)
        loss_dec = (decoder(coords, codes) - values).pow(2).mean()
        opt_codes.zero_grad(), opt_decoder.zero_grad()
        loss_dec.backward()
        opt_codes.step(), opt_decoder.step()
        pred = rollout_with_restarts(dynamics, codes.detach(), t, 0.5)
        loss_dyn = (pred - codes.detach()).pow(2).mean()
        opt_dynamics.zero_grad()
        loss_dyn.backward()
        opt_dynamics.step()

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    iteration()                                                          # warm-up
    it_times = [timed(iteration) for _ in range(repeats)]
    print(f"training iteration (B {batch}, T {frames}, 64x64, code {code_dim}): "
          f"median {statistics.median(it_times):.3f} s  (runs: {', '.join(f'{x:.3f}' for x in it_times)})")
    fields = values[:, 0]                                                # (B, N, S)
    fit_times = [timed(lambda: fit_codes(decoder, coords, fields, steps=300)) for _ in range(repeats)]
    print(f"fit_codes (32 fields, 300 Adam steps): median {statistics.median(fit_times):.3f} s  "
          f"(runs: {', '.join(f'{x:.3f}' for x in fit_times)})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux -> GiB
    print(f"peak resident memory of this process: {peak:.2f} GiB  (threads {threads})")
    result = {"iteration_s": statistics.median(it_times), "fit_s": statistics.median(fit_times),
              "peak_gib": peak}
    if anchor:
        codes = table(torch.arange(batch)).detach().requires_grad_()
        direct = timed(lambda: (decoder.decode_direct(coords, codes) - values).pow(2).mean().backward())
        fast = timed(lambda: (decoder(coords, codes) - values).pow(2).mean().backward())
        print(f"decoder forward+backward, same batch: direct per-code formula {direct:.2f} s, "
              f"ours {fast:.3f} s ({direct / fast:.0f}x)")
        result["direct_s"], result["fast_s"] = direct, fast
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", action="store_true", help="time the model at the paper's NS sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--anchor", action="store_true",
                        help="with --bench: also time the direct per-code decoder as a reference")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error(f"--repeats and --threads must be >= 1, got {args.repeats}, {args.threads}")
    if args.bench:
        benchmark(repeats=args.repeats, threads=args.threads, anchor=args.anchor)
    else:
        toy_linear_autodecoding()
