"""The latent dynamics d alpha/dt = f_psi(alpha), its rollouts, and scheduled restarts.

DINo (Yin, Kirchmeyer et al., ICLR 2023, arXiv:2209.14855v2), Sec. 4.1, Eq. 4 and Sec. 4.2. The codes
alpha_t (one per state channel, shape (S, D)) evolve by an autonomous ODE whose right-hand side is an
MLP on the flattened codes:

    f_psi:  S*D -> hidden -> hidden -> hidden -> S*D      (3 hidden layers, Swish activations)
    Swish(x) = x * sigmoid(softplus(beta) x) / 1.1        (one learnable beta per hidden layer)

Parameters: 2 (S D)(hidden) + S D + 2 hidden^2 + 3 hidden + 3 (betas); official NS (S D = 100,
hidden 512): 628,327; wave (2 x 50, 256): 183,143; shallow water (2 x 200, 800): 1,922,803.

Training integrates from the learned code of frame 0 with RK4 at the frame times and regresses on
the learned (detached) codes of the later frames. With teacher forcing, "scheduled restarts": at each
frame time, with probability epsilon, the integration restarts from the true code instead of the
integrated one. epsilon starts at 0.99 and is multiplied by 0.99 every 100 iterations; below 1e-3 it
counts as 0. Unlike the official code, which draws one set of restart times for the whole batch,
each sample draws its own.

Shapes: B batch, T time, S channels, D code dim. torchdiffeq's odeint returns time FIRST (T, B, ...);
the functions here return (B, T, S, D) like everything else in this project.

Usage:
    f = Dynamics(n_channels=1, code_dim=100, hidden=512)
    alphas = rollout(f, alpha0, t)                          # (B, S, D), (T,) -> (B, T, S, D)
    pred = rollout_with_restarts(f, codes, t, epsilon_schedule(iteration))
"""
import torch
import torch.nn.functional as F
from torch import nn
from torchdiffeq import odeint


class Swish(nn.Module):
    """x * sigmoid(softplus(beta) x) / 1.1 with a learnable beta (softplus keeps the slope > 0)."""

    def __init__(self, beta=0.5):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor([float(beta)]))

    def forward(self, x):
        return x * torch.sigmoid(F.softplus(self.beta) * x) / 1.1


class Dynamics(nn.Module):
    """f_psi(alpha): an autonomous MLP vector field on the codes, forward(t, alpha) as odeint expects."""

    def __init__(self, *, n_channels, code_dim, hidden=512):
        super().__init__()
        for name, value in (("n_channels", n_channels), ("code_dim", code_dim), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.n_channels, self.code_dim = n_channels, code_dim
        width = n_channels * code_dim
        self.net = nn.Sequential(
            nn.Linear(width, hidden), Swish(),
            nn.Linear(hidden, hidden), Swish(),
            nn.Linear(hidden, hidden), Swish(),
            nn.Linear(hidden, width),
        )

    def forward(self, t, alpha):
        """t is ignored (the system is autonomous); alpha (..., S, D) -> d alpha/dt (..., S, D)."""
        flat = alpha.flatten(-2)                                   # (..., S*D): channels interact
        return self.net(flat).view(alpha.shape)


def rollout(f, alpha0, t, method="rk4"):
    """Integrate d alpha/dt = f(t, alpha) from alpha0 (B, S, D) to the times t (T,): -> (B, T, S, D).

    With a fixed-step method ('rk4', 'euler', ...) torchdiffeq steps exactly from one time of t to
    the next, as the official code does ("RK4 at the frame times")."""
    if t.dim() != 1 or len(t) < 1:
        raise ValueError(f"t must be a 1-D tensor of times, got shape {tuple(t.shape)}")
    path = odeint(f, alpha0, t.to(alpha0), method=method)       # (T, B, S, D): time first
    return path.movedim(0, 1)                                    # (B, T, S, D)


def rollout_with_restarts(f, codes, t, epsilon, *, generator=None, method="rk4"):
    """Rollout with scheduled restarts from the true codes (teacher forcing), vectorised over B.

    codes (B, T, S, D): the learned codes, used as targets only (detached here); t (T,).
    Before the step from t_i to t_{i+1} (i >= 1), each sample independently, with probability
    epsilon, replaces its integrated code by the true code codes[:, i]; frame 0 always starts from
    codes[:, 0]. epsilon = 0 is a plain rollout; epsilon = 1 gives one-step predictions from every
    true code. Returns the integrated codes (B, T, S, D), frame 0 equal to codes[:, 0].
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
    if codes.dim() != 4 or t.dim() != 1 or codes.shape[1] != len(t):
        raise ValueError(f"codes must be (B, T, S, D) with T = len(t); got codes {tuple(codes.shape)}, "
                         f"t {tuple(t.shape)}")
    codes = codes.detach()                                       # targets, never trained through here
    if epsilon == 0.0:
        return rollout(f, codes[:, 0], t, method=method)
    n_batch, n_times = codes.shape[:2]
    device = generator.device if generator is not None else codes.device
    # restart[b, i] for i = 0..T-2: sample b restarts at t_i. Frame 0 is always a "restart".
    restart = torch.rand(n_batch, n_times - 1, generator=generator, device=device).to(codes.device) < epsilon
    restart[:, 0] = True
    t = t.to(codes)
    state = codes[:, 0]
    path = [state]
    # A loop over time intervals (not samples): each step integrates the whole batch at once.
    for i in range(n_times - 1):
        state = torch.where(restart[:, i, None, None], codes[:, i], state)      # (B, S, D)
        state = odeint(f, state, t[i:i + 2], method=method)[-1]                  # (B, S, D)
        path.append(state)
    return torch.stack(path, dim=1)                                              # (B, T, S, D)


def epsilon_schedule(iteration, *, start=0.99, decay=0.99, every=100, floor=1e-3):
    """Teacher-forcing probability at an iteration: start * decay**(iteration // every), 0 below floor."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration!r}")
    epsilon = start * decay ** (iteration // every)
    return 0.0 if epsilon < floor else epsilon


if __name__ == "__main__":
    # A small demonstration: a random f_psi, rolled out with and without restarts.
    torch.manual_seed(0)
    f = Dynamics(n_channels=1, code_dim=100)
    print(f"Dynamics(1 x 100, hidden 512): {sum(p.numel() for p in f.parameters()):,} parameters")
    t = torch.arange(10.0)
    codes = rollout(f, 0.1 * torch.randn(4, 1, 100), t)
    for eps in (0.0, 0.5, 1.0):
        pred = rollout_with_restarts(f, codes + 0.01 * torch.randn_like(codes), t, eps)
        print(f"epsilon {eps:.1f}: mse to the noisy codes' rollout {(pred - codes).pow(2).mean():.3e}")
    print("epsilon at iterations 0, 100, 10000, 70000:",
          [round(epsilon_schedule(i), 5) for i in (0, 100, 10_000, 70_000)])
