"""Auto-decoding: codes without an encoder, fitted to the observations.

DINo (Yin, Kirchmeyer et al., ICLR 2023, arXiv:2209.14855v2), Sec. 4.2 (and DeepSDF, Park et
al. 2019). There is no encoder E(v) -> alpha. Each observed frame owns a code; during training the
codes and the decoder descend the same reconstruction loss

    L_dec(phi, alpha) = mean over frames, points x, channels of (v_t(x) - D_phi(alpha_t)(x))^2,

the codes in a table indexed by (sequence, frame, channel), the decoder shared by all. At test time
the decoder is frozen and the code of a new observation is fitted to it: that is the "encoder".
Five pieces, in the order a reader meets them:

- `toy_linear_autodecoding()`: a linear decoder and its latents learned by alternating steps;
  prints the loss before and after: the whole idea on a problem solvable by hand;
- `fit_codes(decoder, coords, values, mask)`: batched test-time inference by Adam, one code per
  sample and channel, keeping each sample's best code; one vectorised optimisation;
- `fit_codes_closed_form(...)`: the same fit as a ridge-regularised least-squares solve, exact
  because the decoder is affine in the code (inr.py), and 18-70x faster than the 300 Adam steps
  it replaces (milliseconds instead of hundreds of Adam steps);
- `CodeTable`: the training-time codes, one row per sequence, each row with its own Adam state;
- `DINo`: the whole forecaster, the three parts of the model as one module: fit alpha_0 to the
  observed frame (this file), integrate d alpha/dt = f_psi(alpha) (dynamics.py), decode anywhere
  (inr.py). `DINo(...).forecast(coords_obs, values_obs, t, coords_query)` is DINo in one call.

Shapes: B batch, T frames, N points, S channels, D code dim, X coord dim.

Usage:
    python autodecode.py            # the toy example
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from dynamics import Dynamics, check_times, rk4_rollout, rollout
from inr import Decoder


# ---- 1. the idea in twenty lines: a linear decoder, latents learned by alternating steps
@dataclass
class ToyResult:
    loss_before: float
    loss_after: float


def toy_linear_autodecoding(*, n_samples=256, n_features=32, latent_dim=4, rounds=300, lr=3e-2,
                            seed=0):
    """Data v = W_true z_true; learn latents z (from zero) and a decoder W (random), no encoder."""
    gen = torch.Generator().manual_seed(seed)
    z_true = torch.randn(n_samples, latent_dim, generator=gen)
    w_true = torch.randn(latent_dim, n_features, generator=gen)
    data = z_true @ w_true
    latents = nn.Parameter(torch.zeros(n_samples, latent_dim))          # a code per sample, from 0
    decoder = nn.Parameter(0.1 * torch.randn(latent_dim, n_features, generator=gen))
    opt_latents = torch.optim.Adam([latents], lr=lr)
    opt_decoder = torch.optim.Adam([decoder], lr=lr)

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
    """ValueError naming the argument for bad shapes, empty point sets or non-finite numbers;
    returns the mask as (1 or B, N) bool (observed points)."""
    if values.dim() != 3:
        raise ValueError(f"values must be (B, N, S), got shape {tuple(values.shape)}")
    n_batch, n_points, _ = values.shape
    if n_batch < 1 or n_points < 1 or values.shape[2] < 1:
        raise ValueError("values must hold at least one sample, point and channel, "
                         f"got shape {tuple(values.shape)}")
    if coords.dim() not in (2, 3) or coords.shape[-2] != n_points or (
            coords.dim() == 3 and coords.shape[0] != n_batch):
        raise ValueError(f"coords must be (N, X) or (B, N, X) with B={n_batch}, N={n_points}, "
                         f"got shape {tuple(coords.shape)}")
    if not torch.isfinite(coords).all():
        raise ValueError("coords hold non-finite positions")
    if mask is None:
        mask = torch.ones(1, n_points, dtype=torch.bool, device=values.device)
    elif mask.dtype != torch.bool or mask.shape not in ((n_points,), (n_batch, n_points)):
        raise ValueError(f"mask must be None or bool of shape ({n_points},) "
                         f"or ({n_batch}, {n_points}), got {mask.dtype} {tuple(mask.shape)}")
    mask = mask.reshape(-1, n_points)                                   # (1 or B, N)
    if not mask.any(dim=1).all():
        raise ValueError("mask leaves a sample with no observed point")
    # unobserved values may be anything
    if not torch.isfinite(values).logical_or(~mask[..., None]).all():
        raise ValueError("values hold non-finite numbers at observed points")
    return mask


def fit_codes(decoder, coords, values, mask=None, *, steps=300, lr=1e-2, init=None):
    """Fit codes (B, S, D) to values (B, N, S) observed at coords (N, X) or (B, N, X), with Adam.

    mask: None (all points), (N,) or (B, N) bool: only observed points enter the loss, so the
    values at unobserved points may be anything (even NaN). Codes start at zero (or `init`).
    The per-sample losses are SUMMED before backward, so each sample's gradient is its own and,
    Adam being elementwise, the batched fit equals fitting every sample alone. The code with the
    lowest loss seen is kept per sample. The decoder is not changed and receives no gradient.
    A sample whose loss never became finite is an error (ValueError), not a result.

    If the decoder provides `affine_parts(coords)` (inr.Decoder does: the code-shifted MFN is affine
    in the code), the fit runs on D(alpha)(x) = offset(x) + jacobian(x) alpha, computed once, and
    each step is a (N, D) x (D, S) product per sample; otherwise every step calls
    decoder(coords, codes).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    mask = _check_fit_inputs(coords, values, mask)
    n_batch, _, n_channels = values.shape
    # per-sample MSE weights: 1 / (observed points * channels) at observed points, 0 elsewhere
    weight = mask / (mask.sum(dim=1, keepdim=True) * n_channels)        # (1 or B, N)
    if init is not None:
        codes = init.detach().clone()
    else:
        codes = values.new_zeros(n_batch, n_channels, decoder.code_dim)
    if codes.shape[:2] != (n_batch, n_channels):
        raise ValueError(f"init must be (B={n_batch}, S={n_channels}, D), "
                         f"got shape {tuple(codes.shape)}")

    decode = _fast_decode(decoder, coords)
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
    return _checked(FitResult(codes=best_codes, loss=best_loss))


def _fast_decode(decoder, coords):
    """codes (B, S, D) -> values (B, N, S) at fixed coords: through the decoder's affine parts when
    it has them (computed once; then one small product per call), else decoder(coords, codes)."""
    if not hasattr(decoder, "affine_parts"):
        return lambda c: decoder(coords, c)
    with torch.no_grad():
        parts = decoder.affine_parts(coords)
    if parts.jacobian.shape[0] == 1:                                    # shared points: one matmul
        return lambda c: (parts.offset[0] + c @ parts.jacobian[0].T).transpose(1, 2)
    # per-sample points: one batched matmul
    return lambda c: parts.offset[..., None] + parts.jacobian @ c.transpose(1, 2)


def _checked(result):
    failed = ~torch.isfinite(result.loss)
    if failed.any():
        samples = failed.nonzero().flatten().tolist()
        raise ValueError(f"the fit never reached a finite loss for sample(s) {samples}: "
                         "check the decoder's parameters and the scale of values and coords")
    return result


# ---- 2b. the same fit in closed form: the decoder is affine in the code
def fit_codes_closed_form(decoder, coords, values, mask=None, *, ridge=1e-2, check=True):
    """The ridge-regularised least-squares codes, per sample and channel, in one batched solve:

        alpha = argmin sum over observed x of (a(x) + J(x) alpha - v(x))^2 + ridge * N * |alpha|^2
              = (J^T J + ridge N I)^-1 J^T (v - a)            (N = observed points of the sample)

    with D_phi(alpha)(x) = a(x) + J(x) alpha from decoder.affine_parts (inr.py). Same arguments and
    result as fit_codes (FitResult; loss = the reconstruction MSE, without the ridge term), in
    milliseconds instead of hundreds of Adam steps. Why a ridge: the exact minimiser (ridge = 0)
    fits the observed frame best but may lie far outside the codes the dynamics was trained on,
    where its forecast is poor; the ridge keeps the code small, as a few hundred Adam steps from
    zero do implicitly. Solved in float64 (the normal equations square the condition number), by
    one Cholesky factorisation shared by every sample when they share their points.
    check=False (trusted data in a training loop): no input checks and no host reads, so a GPU
    never waits; ridge may then be a tensor (> 0) on the device.
    """
    if check:
        if not ridge >= 0 or not math.isfinite(ridge):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
        mask = _check_fit_inputs(coords, values, mask)
    elif mask is None:
        mask = torch.ones(1, values.shape[1], dtype=torch.bool, device=values.device)
    n_channels = values.shape[2]
    with torch.no_grad():
        parts = decoder.affine_parts(coords)            # offset (G, N), jacobian (G, N, D)
        jac = parts.jacobian.double() * mask[..., None]  # (B or 1, N, D), unobserved rows 0
        residual = torch.where(mask[..., None], values - parts.offset[..., None], 0.0).double()
        rhs = jac.transpose(1, 2) @ residual            # (B, D, S)
        gram = jac.transpose(1, 2) @ jac                # (B or 1, D, D)
        if torch.is_tensor(ridge) or ridge > 0:
            eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
            gram = gram + ridge * mask.sum(dim=1).double()[:, None, None] * eye
            factor = torch.linalg.cholesky_ex(gram).L   # _ex: no error check, no host read
            codes = torch.cholesky_solve(rhs, factor)   # (B, D, S); a (1, D, D) factor broadcasts
        else:  # may be rank-deficient: the minimum-norm least-squares solution
            codes = torch.linalg.pinv(gram, hermitian=True) @ rhs
        codes = codes.transpose(1, 2).to(values.dtype)  # (B, S, D)
        pred = parts.offset[..., None] + parts.jacobian @ codes.transpose(1, 2)     # (B, N, S)
        err = torch.where(mask[..., None], pred - values, 0.0).pow(2).sum(dim=(1, 2))
        loss = err / (mask.sum(dim=1) * n_channels)     # (B,) MSE at observed points
    result = FitResult(codes=codes, loss=loss)
    return _checked(result) if check else result


# ---- 3. training-time codes: one per (sequence, frame, channel), each row with its own Adam
class CodeTable(nn.Module):
    """All training codes, zeros at the start, and their optimiser: Adam, row by row.

    table(ids) -> (len(ids), T, S, D): a copy of the rows, a leaf the caller differentiates
    (`rows.requires_grad_()`); table.step(ids, rows.grad) then moves those rows only. The paper
    trains one parameter per sequence with Adam (lr 1e-3), so each row keeps its OWN step count
    and moments: a row that sat out k steps takes exactly the step Adam would take on it alone.
    (torch's SparseAdam counts steps per table: a row's first step after sitting out gets the
    bias correction of a later step, too large a step.) Everything stays on the device and is
    dense: gather the rows, update, write them back; no sparse gradients, no reads to the host.
    Buffers (all in state_dict): `weight` (n, T*S*D) the codes, `exp_avg`, `exp_avg_sq` the
    moments, `steps` (n,) the step count of each row. `ids` in one step must be distinct.
    """

    def __init__(self, n_sequences, n_frames, n_channels, code_dim, *, lr=1e-3, betas=(0.9, 0.999),
                 eps=1e-8):
        super().__init__()
        for name, value in (("n_sequences", n_sequences), ("n_frames", n_frames),
                            ("n_channels", n_channels), ("code_dim", code_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (lr > 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1 and eps > 0):
            raise ValueError("need lr > 0, betas in [0, 1), eps > 0; "
                             f"got lr={lr}, betas={betas}, eps={eps}")
        self.frame_shape = (n_frames, n_channels, code_dim)
        self.lr, self.betas, self.eps = lr, betas, eps
        width = n_frames * n_channels * code_dim
        self.register_buffer("weight", torch.zeros(n_sequences, width))
        self.register_buffer("exp_avg", torch.zeros(n_sequences, width))
        self.register_buffer("exp_avg_sq", torch.zeros(n_sequences, width))
        self.register_buffer("steps", torch.zeros(n_sequences))

    @property
    def codes(self):
        """All codes as a (n_sequences, T, S, D) view."""
        return self.weight.view(-1, *self.frame_shape)

    def forward(self, ids):
        """ids (B,) long on the table's device -> the codes (B, T, S, D), a copy."""
        return self.weight.index_select(0, ids).view(len(ids), *self.frame_shape)

    @torch.no_grad()
    def step(self, ids, grad):
        """One Adam step on rows `ids` with their gradients grad (B, T, S, D), as torch.optim.Adam
        computes it for a parameter that is just these rows."""
        beta1, beta2 = self.betas
        grad = grad.reshape(len(ids), -1)
        steps = self.steps.index_select(0, ids) + 1                            # (B,) per row
        exp_avg = self.exp_avg.index_select(0, ids).lerp_(grad, 1 - beta1)     # (B, T*S*D)
        exp_avg_sq = self.exp_avg_sq.index_select(0, ids).mul_(beta2)
        exp_avg_sq.addcmul_(grad, grad, value=1 - beta2)                       # (B, T*S*D)
        # bias corrections in float64, as Adam computes them (1 - 0.999 loses digits in float32)
        bias_correction1 = 1 - beta1 ** steps.double()                         # (B,)
        bias_correction2 = 1 - beta2 ** steps.double()                         # (B,)
        step_size = (self.lr / bias_correction1).to(grad.dtype)[:, None]       # (B, 1)
        denom = exp_avg_sq.sqrt() / bias_correction2.sqrt().to(grad.dtype)[:, None]
        denom.add_(self.eps)
        rows = self.weight.index_select(0, ids).sub_(step_size * (exp_avg / denom))
        updates = ((self.weight, rows), (self.exp_avg, exp_avg),
                   (self.exp_avg_sq, exp_avg_sq), (self.steps, steps))
        for buffer, value in updates:
            buffer.index_copy_(0, ids, value)


# ---- 4. DINo: fit alpha_0 (auto-decoding), integrate (dynamics.py), decode anywhere (inr.py)
class DINo(nn.Module):
    """The two trained networks and what it takes to forecast from raw observations: the map from
    physical coordinates to decoder inputs, (x + coord_shift) * coord_scale, and the test-time fit
    of alpha_0 ('closed-form' with the `ridge` buffer, or 'adam' with fit_steps and fit_lr). Every
    method takes physical coordinates (..., X) and moves its inputs to the model's device and dtype.
    train.py builds it from its Config table; the state_dict holds everything that was trained."""

    def __init__(self, *, coord_dim, n_channels, code_dim=100, hidden=64, layers=3,
                 input_scale=64.0, dyn_hidden=512, coord_shift=0.0, coord_scale=1.0,
                 fit="closed-form", fit_steps=300, fit_lr=1e-2):
        super().__init__()
        self.decoder = Decoder(coord_dim=coord_dim, code_dim=code_dim, hidden=hidden, layers=layers,
                               input_scale=input_scale)
        self.dynamics = Dynamics(n_channels=n_channels, code_dim=code_dim, hidden=dyn_hidden)
        # the map's numbers, () or (X,), held once: they go with .to(device) and the dtype, so no
        # call copies them over; not in the state_dict (the Config holds them)
        for name, value in (("coord_shift", coord_shift), ("coord_scale", coord_scale)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.get_default_dtype()),
                                 persistent=False)
        self.fit, self.fit_steps, self.fit_lr = fit, fit_steps, fit_lr
        # the ridge of the closed-form fit; train.py chooses it
        self.register_buffer("ridge", torch.tensor(1e-2))

    def _like(self, x):
        return torch.as_tensor(x).to(self.ridge)

    def map_coords(self, coords):
        """Physical positions (..., X) -> decoder inputs (the affine map above)."""
        return (self._like(coords) + self.coord_shift) * self.coord_scale

    def fit_codes(self, coords, values, *, check=True):
        """alpha_0 (B, S, D) of observations values (B, N, S) at coords (N, X): a FitResult."""
        coords, values = self.map_coords(coords), self._like(values)
        if self.fit == "closed-form":
            return fit_codes_closed_form(self.decoder, coords, values, ridge=self.ridge,
                                         check=check)
        return fit_codes(self.decoder, coords, values, steps=self.fit_steps, lr=self.fit_lr)

    def forecast_codes(self, coords, values, t, *, check=True):
        """Fit alpha_0 to values (B, N, S) observed at coords (N, X) at time t[0], then integrate
        d alpha/dt = f_psi(alpha) to the times t (T,) -> codes (B, T, S, D). check=False (the
        training loop's evaluations, on trusted data): no input checks, and the fixed-step RK4
        of dynamics.py instead of torchdiffeq's (equal to rounding): no host reads."""
        t = self._like(t)
        if check:
            check_times(t)
        integrate = rollout if check else rk4_rollout
        with torch.no_grad():
            return integrate(self.dynamics, self.fit_codes(coords, values, check=check).codes,
                             t - t[0])

    def decode(self, coords, codes):
        """Codes (B, T, S, D) -> values (B, T, N, S) at coords (N, X). The decoder is affine in the
        code (inr.py), so this is offset(x) + jacobian(x) . alpha: one product, no graph."""
        with torch.no_grad():
            # offset (1, N), jacobian (1, N, D)
            parts = self.decoder.affine_parts(self.map_coords(coords))
            return (self._like(codes) @ parts.jacobian[0].T + parts.offset[0]).transpose(-1, -2)

    def forecast(self, coords_obs, values_obs, t, coords_query):
        """DINo in one call: values_obs (N, S) observed at coords_obs (N, X) at time t[0] ->
        forecast (T, Nq, S) at any points coords_query (Nq, X).
        Values (B, N, S) give (B, T, Nq, S)."""
        values = self._like(values_obs)
        single = values.dim() == 2
        codes = self.forecast_codes(coords_obs, values[None] if single else values, t)
        pred = self.decode(coords_query, codes)
        return pred[0] if single else pred


if __name__ == "__main__":
    toy_linear_autodecoding()
