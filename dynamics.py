"""The latent dynamics d alpha/dt = f_psi(alpha), its rollouts, and scheduled restarts.

DINo (Yin, Kirchmeyer et al., ICLR 2023, arXiv:2209.14855v2), Sec. 4.1, Eq. 4 and Sec. 4.2. The
codes alpha_t (one per state channel, shape (S, D)) evolve by an autonomous ODE whose right-hand
side is an MLP on the flattened codes:

    f_psi:  S*D -> hidden -> hidden -> hidden -> S*D      (3 hidden layers, Swish activations)
    Swish(x) = x * sigmoid(softplus(beta) x) / 1.1        (one learnable beta per hidden layer)

Parameters: 2 (S D)(hidden) + S D + 2 hidden^2 + 3 hidden + 3 (betas); official NS (S D = 100,
hidden 512): 628,327; wave (2 x 50, 256): 183,143; shallow water (2 x 200, 800): 1,922,803.

Training integrates from the learned code of frame 0 with RK4 at the frame times and regresses on
the learned (detached) codes of the later frames. With teacher forcing, "scheduled restarts": at
each frame time, with probability epsilon, the integration restarts from the true code instead of
the integrated one. epsilon starts at 0.99 and is multiplied by 0.99 every 100 iterations; below
1e-3 it counts as 0. Unlike the official code, which draws one set of restart times for the whole
batch, each sample draws its own.

Shapes: B batch, T time, S channels, D code dim. torchdiffeq's odeint returns time FIRST
(T, B, ...); the functions here return (B, T, S, D) like everything else in this project.

Two kinds of integrator: `rollout` (torchdiffeq, any method, its inputs checked: for forecasts)
and the RK4 step written here, `rk4_rollout` and `rollout_with_restarts` (for the training loop and
its evaluations: they never read a value back from the device, so a GPU never waits for the host).

Usage:
    f = Dynamics(n_channels=1, code_dim=100, hidden=512)
    alphas = rollout(f, alpha0, t)                          # (B, S, D), (T,) -> (B, T, S, D)
    restart = restart_mask(torch.rand(B, T - 1), epsilon_schedule(iteration))
    pred = rollout_with_restarts(f, codes, t, restart)      # (B, T, S, D)
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
    """f_psi(alpha): an autonomous MLP vector field on the codes; forward(t, alpha) for odeint."""

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


def check_times(t):
    """ValueError unless t is a non-empty 1-D tensor of finite, strictly increasing times."""
    if not torch.is_tensor(t) or t.dim() != 1 or len(t) < 1:
        got = tuple(t.shape) if torch.is_tensor(t) else t
        raise ValueError(f"t must be a non-empty 1-D tensor of times, got {got}")
    if not torch.isfinite(t).all():
        raise ValueError("t holds non-finite times")
    if len(t) > 1 and not (t[1:] > t[:-1]).all():
        raise ValueError(f"t must be strictly increasing, got {t.tolist()}")


def rollout(f, alpha0, t, method="rk4"):
    """Integrate d alpha/dt = f(t, alpha) from alpha0 (B, S, D) to the times t (T,) -> (B, T, S, D).

    torchdiffeq does the integration, so any of its methods works ('rk4', 'dopri5', ...). With a
    fixed-step method it steps exactly from one time of t to the next, as the official code does
    ("RK4 at the frame times"). t[0] is the time of alpha0."""
    check_times(t)
    if not torch.isfinite(alpha0).all():
        raise ValueError("alpha0 holds non-finite values")
    path = odeint(f, alpha0, t.to(alpha0), method=method)       # (T, B, S, D): time first
    return path.movedim(0, 1)                                    # (B, T, S, D)


def rk4_rollout(f, alpha0, t):
    """`rollout(f, alpha0, t)` with the fixed-step RK4 below, one step from each time of t to the
    next, and no checks: torchdiffeq's 'rk4' to rounding, without its host reads (about four per
    step). alpha0 (B, S, D), t (T,) on alpha0's device -> (B, T, S, D)."""
    dt = t[1:] - t[:-1]                                     # (T-1,) on the device
    path = [alpha0]
    for i in range(len(t) - 1):                             # a loop over time steps, never samples
        path.append(rk4_step(f, t[i], path[-1], dt[i]))
    return torch.stack(path, dim=1)                         # (B, T, S, D)


def rk4_step(f, t0, alpha, dt):
    """One classical fourth-order step, 3/8 rule (the form torchdiffeq's 'rk4' uses):
        k1 = f(a), k2 = f(a + dt k1/3), k3 = f(a + dt (k2 - k1/3)), k4 = f(a + dt (k1 - k2 + k3)),
        a(t + dt) = a + dt (k1 + 3 k2 + 3 k3 + k4) / 8.
    dt may be a 0-d tensor on the device: nothing here reads a value back to the host."""
    k1 = f(t0, alpha)
    k2 = f(t0 + dt / 3, alpha + dt * k1 / 3)
    k3 = f(t0 + dt * 2 / 3, alpha + dt * (k2 - k1 / 3))
    k4 = f(t0 + dt, alpha + dt * (k1 - k2 + k3))
    return alpha + (k1 + 3 * (k2 + k3) + k4) * (dt / 8)


def restart_mask(uniform, epsilon):
    """Which samples restart where: (B, T-1) bool from uniform draws (B, T-1) in [0, 1) and epsilon,
    a float or a (B,) tensor (one probability per sample). restart[b, i]: before the step from t_i,
    sample b takes its true code again; column 0 (the start) is always True."""
    epsilon = torch.as_tensor(epsilon, dtype=uniform.dtype, device=uniform.device)
    restart = uniform < epsilon.reshape(-1, 1)
    restart[:, 0] = True
    return restart


def rollout_with_restarts(f, codes, t, restart):
    """RK4 rollout with scheduled restarts from the true codes (teacher forcing), the training
    integrator: vectorised over the batch, with no host synchronisation (torchdiffeq's odeint
    inspects its time tensor on every call, which stalls a GPU; this is the same 'rk4' step).

    codes (B, T, S, D): the learned codes, used as targets only (detached here); t (T,) frame
    times; restart (B, T-1) bool from restart_mask: before the step from t_i, sample b replaces its
    integrated code by codes[b, i] where restart[b, i]. All False after column 0 is a plain
    rollout; all True gives one-step predictions from every true code.
    -> (B, T, S, D), frame 0 = codes[:, 0].
    """
    if (codes.dim() != 4 or t.dim() != 1 or codes.shape[1] != len(t)
            or restart.shape != (len(codes), len(t) - 1)):
        raise ValueError("need codes (B, T, S, D), t (T,), restart (B, T-1); "
                         f"got codes {tuple(codes.shape)}, t {tuple(t.shape)}, "
                         f"restart {tuple(restart.shape)}")
    codes, t = codes.detach(), t.to(codes)                  # targets, never trained through here
    dt = t[1:] - t[:-1]                                     # (T-1,) steps, on the device
    state = codes[:, 0]                                     # (B, S, D)
    path = [state]
    for i in range(len(t) - 1):                             # a loop over time steps, never samples
        state = torch.where(restart[:, i, None, None], codes[:, i], state)
        state = rk4_step(f, t[i], state, dt[i])
        path.append(state)
    return torch.stack(path, dim=1)                         # (B, T, S, D)


def epsilon_schedule(iteration, *, start=0.99, decay=0.99, every=100, floor=1e-3):
    """Teacher-forcing probability: start * decay**(iteration // every), 0 below floor."""
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
        restart = restart_mask(torch.rand(len(codes), len(t) - 1), eps)
        pred = rollout_with_restarts(f, codes + 0.01 * torch.randn_like(codes), t, restart)
        mse = (pred - codes).pow(2).mean()
        print(f"epsilon {eps:.1f}: mse to the noisy codes' rollout {mse:.3e}")
    print("epsilon at iterations 0, 100, 10000, 70000:",
          [round(epsilon_schedule(i), 5) for i in (0, 100, 10_000, 70_000)])
