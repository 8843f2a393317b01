"""The decoder D_phi(alpha)(x): a Fourier multiplicative filter network modulated by a code.

DINo (Yin, Kirchmeyer et al., ICLR 2023, arXiv:2209.14855v2), Sec. 4.1, Eq. 3. A field v(x) is
represented by a small code alpha; the decoder evaluates it at ANY point x. The network is a
multiplicative filter network (MFN, Fathony et al. 2021) with Fourier filters whose hidden biases
are shifted by the code (the hypernetwork h_phi(alpha) = {W; b + W' alpha; omega}):

    s_l(x) = [sin(omega_l x), cos(omega_l x)]                 filters, l = 0..L, K/2 of each
    z_0    = s_0(x) * (W'_0 alpha + b_0)
    z_l    = s_l(x) * (W_l z_{l-1} + W'_l alpha + b_l)         l = 1..L
    D_phi(alpha)(x) = w_out . z_L + b_out                     one value per point

One decoder is shared by the state channels; each channel has its own code, so codes have shape
(..., S, D) and outputs (..., N, S). Shapes: B batch, T time, N points, S channels, D code dim,
X coord dim (2 planar, 3 xyz on the sphere), K hidden width, L = `layers`.

Two facts make this fast, and both follow from the equations above:
1. the filters s_l(x) depend on x alone, so they are computed once per point set, not once per
   code (the official code recomputes them for every sample, time and channel);
2. the code enters only through the additive shifts c_l = W'_l alpha + b_l, and nothing nonlinear
   acts on z, so the output is LINEAR in the shifts. Pushing w_out back through the layers
   (backpropagation by hand) gives per-point feature vectors that do not depend on alpha:

       v_L(x) = s_L(x) * w_out,    v_{l-1}(x) = s_{l-1}(x) * (W_l^T v_l(x))
       D_phi(alpha)(x) = b_out + sum_l v_l(x) . (W'_l alpha + b_l)            (exact)

   (proof: w.z_l = w.(s_l * (W_l z_{l-1} + c_l)) = (s_l * w).c_l + (W_l^T (s_l * w)).z_{l-1}).
   So for fixed x the decoder is affine in the code, D = a(x) + J(x) alpha, and decoding M codes on
   N points costs one (M, (L+1)K) x ((L+1)K, N) product after an O(N L K^2) pass over the points,
   instead of O(M N L K^2) and M copies of every (N, K) activation. Test-time code fitting
   (autodecode.fit_codes) becomes a least-squares problem whose Adam steps cost almost nothing.
`forward` uses this route; `decode_direct` is the same network written as the equations above (the
tests check that both agree, and agree with a per-code loop).

Parameters (official layout; the filters have no bias):
    filters (L+1) K/2 X  +  W'_l, b_l: (L+1)(K D + K)  +  W_l: L K^2  +  output K + 1.
Navier-Stokes (X 2, D 100, K 64, L 3): 38,465. The official counts (38,593 NS, 25,793 wave,
757,121 shallow water) are exactly these plus K X more: the official first layer also owns a weight
W_0 that multiplies x * 0, so it never receives a gradient; we leave it out.

Coordinates are fed as given: mapping them to the range the input scale expects (the official code
uses [0, 0.5] for planar grids with input_scale 64) is the caller's job.

Usage:
    dec = Decoder(coord_dim=2, code_dim=100)          # NS sizes: hidden 64, layers 3
    out = dec(coords, codes)      # coords (N, 2) or (B, N, 2); codes (B, T, S, 100) -> (B, T, N, S)
"""
import math
from dataclasses import dataclass

import torch
from torch import nn


def decoder_parameter_count(*, coord_dim, code_dim, hidden=64, layers=3):
    """Number of trainable parameters of Decoder (formula in the module docstring)."""
    filters = (layers + 1) * (hidden // 2) * coord_dim
    shifts = (layers + 1) * (hidden * code_dim + hidden)
    return filters + shifts + layers * hidden * hidden + hidden + 1


@dataclass
class AffineParts:
    """D_phi(alpha)(x) = offset(x) + jacobian(x) . alpha, for every point of a point set."""
    offset: torch.Tensor    # (G, N)     a(x) = D_phi(0)(x); G = 1 for shared coords, else B
    jacobian: torch.Tensor  # (G, N, D)  J(x) = dD_phi(alpha)(x) / dalpha (independent of alpha)


class Decoder(nn.Module):
    """D_phi(alpha)(x), the code-modulated Fourier MFN (see the module docstring)."""

    def __init__(self, *, coord_dim, code_dim, hidden=64, layers=3, input_scale=64.0):
        super().__init__()
        for name, value in (("coord_dim", coord_dim), ("code_dim", code_dim), ("layers", layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(hidden, int) or hidden < 2 or hidden % 2:
            raise ValueError("hidden must be a positive even int (sin and cos halves), "
                             f"got {hidden!r}")
        if not input_scale > 0:
            raise ValueError(f"input_scale must be > 0, got {input_scale!r}")
        self.coord_dim, self.code_dim = coord_dim, code_dim
        self.hidden, self.layers = hidden, layers
        K, L = hidden, layers
        # omega_l = filter_scale * filter_weight[l]: stored unscaled, as the official code does, so
        # that Adam's step size on omega is filter_scale times the learning rate.
        self.filter_scale = input_scale / math.sqrt(L + 1)
        self.filter_weight = nn.Parameter(torch.empty(L + 1, K // 2, coord_dim))   # omega_l / scale
        self.hidden_weight = nn.Parameter(torch.empty(L, K, K))                    # W_1..W_L
        self.code_weight = nn.Parameter(torch.empty(L + 1, K, code_dim))           # W'_0..W'_L
        self.bias = nn.Parameter(torch.empty(L + 1, K))                            # b_0..b_L
        self.out = nn.Linear(K, 1)                                                 # w_out, b_out
        self.reset_parameters()

    def reset_parameters(self):
        # Official initialisation: uniform(+-1/sqrt(fan_in)) everywhere (PyTorch's default for
        # Linear); b_0's fan-in is coord_dim because the official first layer reads x (times zero).
        def uniform_(tensor, fan_in):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(tensor, -bound, bound)
        with torch.no_grad():
            uniform_(self.filter_weight, self.coord_dim)
            uniform_(self.hidden_weight, self.hidden)
            uniform_(self.code_weight, self.code_dim)
            uniform_(self.bias[0], self.coord_dim)
            uniform_(self.bias[1:], self.hidden)
        self.out.reset_parameters()

    # ---- filters: depend on x only, computed once per point set
    def filters(self, coords):
        """coords (G, N, X) -> s_l(x) for l = 0..L, shape (L+1, G, N, K)."""
        omega = self.filter_scale * self.filter_weight                          # (L+1, K/2, X)
        phase = torch.einsum("gnx,lkx->lgnk", coords, omega)                    # (L+1, G, N, K/2)
        return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)          # (L+1, G, N, K)

    # ---- the equations as written: run the network once per code (reference, slow)
    def decode_direct(self, coords, codes):
        """Same contract and result as forward, computed layer by layer for every code:
        O(M N L K^2) time and (M, N, K) activations per layer. Kept as the readable reference."""
        coords, codes_g, lead = self._split(coords, codes)                      # codes_g (G, M, D)
        filters = self.filters(coords)[:, :, None]                              # (L+1, G, 1, N, K)
        # shift_l = W'_l alpha + b_l, kept as a (G, M, 1, K) broadcast, never materialised per point
        shifts = torch.einsum("gmd,lkd->lgmk", codes_g, self.code_weight)       # (L+1, G, M, K)
        shifts = (shifts + self.bias[:, None, None, :])[:, :, :, None, :]       # (L+1, G, M, 1, K)
        z = filters[0] * shifts[0]                                              # (G, M, N, K)
        for l in range(1, self.layers + 1):
            z = filters[l] * (z @ self.hidden_weight[l - 1].T + shifts[l])      # (G, M, N, K)
        values = self.out(z).squeeze(-1)                                        # (G, M, N)
        return self._merge(values, lead)

    # ---- the fast route: D_phi(alpha)(x) = b_out + sum_l v_l(x) . (W'_l alpha + b_l)
    def features(self, coords):
        """coords (G, N, X) -> v_l(x) for l = 0..L, shape (G, N, (L+1) K), independent of alpha."""
        filters = self.filters(coords)                                          # (L+1, G, N, K)
        v = filters[-1] * self.out.weight[0]                                    # v_L: (G, N, K)
        features = [v]
        for l in range(self.layers, 0, -1):
            # v_{l-1} = s_{l-1} * W_l^T v_l, (G, N, K)
            v = filters[l - 1] * (v @ self.hidden_weight[l - 1])
            features.append(v)
        return torch.cat(features[::-1], dim=-1)                                # (G, N, (L+1) K)

    def shifts(self, codes):
        """codes (..., D) -> c_l = W'_l alpha + b_l for l = 0..L, shape (..., (L+1) K)."""
        c = torch.einsum("...d,lkd->...lk", codes, self.code_weight) + self.bias  # (..., L+1, K)
        return c.flatten(-2)

    def affine_parts(self, coords):
        """coords (N, X) or (G, N, X) -> AffineParts, the decoder as an affine map of the code:
        D_phi(alpha)(x) = offset + jacobian . alpha."""
        features = self.features(self._check_coords(coords))                   # (G, N, (L+1) K)
        weight = self.code_weight.reshape(-1, self.code_dim)                    # ((L+1) K, D)
        return AffineParts(offset=features @ self.bias.reshape(-1) + self.out.bias,  # (G, N)
                           jacobian=features @ weight)                          # (G, N, D)

    def forward(self, coords, codes):
        """coords (N, X) shared by all codes, or (B, N, X) one point set per sample;
        codes (B, ..., S, D) -> values (B, ..., N, S)."""
        coords, codes_g, lead = self._split(coords, codes)                      # codes_g (G, M, D)
        features = self.features(coords)                                        # (G, N, (L+1) K)
        values = self.shifts(codes_g) @ features.transpose(1, 2) + self.out.bias  # (G, M, N)
        return self._merge(values, lead)

    # ---- shape bookkeeping shared by both routes
    def _check_coords(self, coords):
        if coords.dim() not in (2, 3) or coords.shape[-1] != self.coord_dim:
            raise ValueError(f"coords must be (N, {self.coord_dim}) or (B, N, {self.coord_dim}), "
                             f"got shape {tuple(coords.shape)}")
        return coords if coords.dim() == 3 else coords[None]                    # (G, N, X)

    def _split(self, coords, codes):
        """-> coords (G, N, X), codes (G, M, D) and the leading shape (..., S) of codes."""
        coords = self._check_coords(coords)
        if codes.dim() < 2 or codes.shape[-1] != self.code_dim:
            raise ValueError(f"codes must be (..., S, {self.code_dim}), "
                             f"got shape {tuple(codes.shape)}")
        groups = coords.shape[0]
        if groups > 1 and (codes.dim() < 3 or codes.shape[0] != groups):
            raise ValueError(f"with per-sample coords (B={groups}, N, X) "
                             f"codes must be (B, ..., S, D), got shape {tuple(codes.shape)}")
        return coords, codes.reshape(groups, -1, self.code_dim), codes.shape[:-1]

    @staticmethod
    def _merge(values, lead):
        """values (G, M, N) with M = prod(lead[1:]) -> (..., N, S) with channels last."""
        n_points = values.shape[-1]
        return values.reshape(*lead, n_points).transpose(-1, -2)               # (..., N, S)
