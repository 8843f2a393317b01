"""Our own PDE solvers and the DINo dataset generators (paper Sec. 5 and the data appendix).

Shallow water on the sphere: `SphereShallowWater` (spectral transform solver),
`sphere_galewsky_state`, `shallow_water_trajectories` (the DINo `shallow-water` data),
`sphere_coords`, `latitude_mask`.
"""

# ---- Shallow water on the sphere
# Imports this section needs (keep them when merging):
import math
import time

import numpy as np
import torch

# The rotating shallow-water equations on a sphere of radius R, in VORTICITY-DIVERGENCE form
#   d(zeta)/dt = -div((zeta + f) u)                          - nu (Lap + 1/R^2)^2 zeta
#   d(delta)/dt = curl((zeta + f) u) - Lap(|u|^2/2 + g h)     - nu (Lap + 1/R^2)^2 delta
#   d(h)/dt     = -H delta - div(h u)                         - nu Lap^2 h
# with h the height deviation from the mean depth H, f = 2 Omega sin(lat) (or any 2-D field) and
# u = k x grad(psi) + grad(chi), Lap psi = zeta, Lap chi = delta.
# Why vorticity-divergence and not the vector form: the state is three SCALAR fields, so a single
# scalar spherical-harmonic transform (plus its derivative table) does everything, and gravity waves
# plus hyperdiffusion become a 2x2 linear system per degree l, solved in closed form. The vector form
# would need spin-weighted (vector) harmonics for u.
# The hyperdiffusion is nu Lap^2 applied to the VELOCITY vector (the rough / connection Laplacian, as
# Dedalus's lap(lap(u))), which acts on curl and divergence as (Lap + 1/R^2)^2; on h it is nu Lap^2.
#
# Spectral transform method: Gauss-Legendre latitudes, equispaced longitudes (nlon = 2 nlat), real FFT
# in longitude, fully normalised associated Legendre functions by the standard three-term recurrence
# in float64, triangular truncation l <= lmax = nlat - 1. Products are formed on a 3/2-padded grid
# (no aliasing of quadratic terms), as Dedalus does.
# Time stepping: IMEX RK222 (Ascher, Ruuth & Spiteri 1997, the scheme Dedalus calls RK222), second
# order; gravity waves and hyperdiffusion implicit, advection and Coriolis explicit. Stable at
# dt = 600 s at 256x128 (the explicit part is limited by advection, |u| dt / dx ~ 0.4).

SPHERE_RADIUS = 6.37122e6          # m
SPHERE_OMEGA = 7.292e-5            # 1/s
SPHERE_GRAVITY = 9.80616           # m/s^2
SPHERE_MEAN_DEPTH = 1.0e4          # m
SPHERE_HYPERDIFFUSION = 1.0e5 * SPHERE_RADIUS**2 / 32**2   # m^4/s, Dedalus's "matched at l = 32"
SPHERE_DATA_NLAT = 128             # the paper's simulation grid: 256 lon x 128 lat (T127)
SPHERE_HEIGHT_SCALE = 3000.0 / SPHERE_RADIUS   # dataset channel 0: h' in Earth radii x 3000
SPHERE_VORT_SCALE = 3600.0 * 2.0               # dataset channel 1: zeta in 1/hour x 2


def sphere_gauss_latitudes(nlat):
    """Gauss-Legendre nodes mu = sin(lat), north to south, and their quadrature weights (sum 2)."""
    x, w = np.polynomial.legendre.leggauss(nlat)
    return x[::-1].copy(), w[::-1].copy()


def sphere_legendre(lmax, mu):
    """Fully normalised associated Legendre functions and their (1 - mu^2) d/dmu, float64 numpy.

    P[m, l, j] = Pbar_l^m(mu_j) with int_{-1}^{1} Pbar^2 dmu = 1 (no Condon-Shortley phase),
    H[m, l, j] = (1 - mu_j^2) dPbar_l^m/dmu (mu_j), both (lmax+1, lmax+1, len(mu)), zero where l < m.
    Recurrence in l at fixed m (stable; starts from the sectoral Pbar_m^m), so no factorials appear.
    """
    mu = np.asarray(mu, dtype=np.float64)
    n = lmax + 2                                   # one extra degree: H_l needs Pbar_{l+1}
    sin_colat = np.sqrt(1.0 - mu**2)
    P = np.zeros((lmax + 1, n, mu.size))
    ms = np.arange(lmax + 1, dtype=np.float64)
    pmm = np.full(mu.shape, math.sqrt(0.5))
    for m in range(lmax + 1):                      # sectoral: Pbar_mm = sqrt((2m+1)/(2m)) s Pbar_m-1,m-1
        # (s^m < 1e-308 near the poles for m > ~250: those functions are negligible there anyway)
        if m > 0:
            pmm = pmm * math.sqrt((2 * m + 1) / (2 * m)) * sin_colat
        P[m, m] = pmm
    for l in range(1, n):                          # Pbar_l = a (mu Pbar_{l-1} - b Pbar_{l-2}) for m < l
        m = ms[: min(l, lmax + 1)][:, None]        # (m, 1)
        a = np.sqrt((4.0 * l * l - 1.0) / (l * l - m * m))
        b = np.sqrt(np.clip(((l - 1.0) ** 2 - m * m) / max(4.0 * (l - 1.0) ** 2 - 1.0, 1.0), 0, None))
        prev2 = P[: m.size, l - 2] if l >= 2 else 0.0
        P[: m.size, l] = a * (mu * P[: m.size, l - 1] - b * prev2)
    l = np.arange(n, dtype=np.float64)[None, :]
    m = ms[:, None]
    eps = np.sqrt(np.clip((l * l - m * m) / (4.0 * l * l - 1.0), 0, None))   # (m, l): mu P_l = eps_{l+1} P_{l+1} + eps_l P_{l-1}
    H = np.zeros((lmax + 1, lmax + 1, mu.size))
    for ll in range(lmax + 1):
        lower = P[:, ll - 1] if ll >= 1 else 0.0
        H[:, ll] = -ll * eps[:, ll + 1, None] * P[:, ll + 1] + (ll + 1) * eps[:, ll, None] * lower
    H[np.arange(lmax + 1)[:, None] > np.arange(lmax + 1)[None, :]] = 0.0
    return P[:, : lmax + 1].copy(), H


class SphereTransform:
    """Spherical-harmonic transform between a (.., nlat, nlon) grid and (.., M, L) coefficients.

    Coefficients c[.., m, l] (complex, 0 <= m <= l <= lmax, zero for l < m) of a REAL field
    f(lon, mu) = sum_{m=-lmax}^{lmax} sum_l c_lm Pbar_l^m(mu) e^{i m lon}, with c_{l,-m} = conj(c_lm).
    Default grid: nlat Gauss latitudes (north to south) and nlon equispaced longitudes from 0.
    `mu` evaluates on other latitudes (then only the grid direction `to_grid` is available).
    """

    def __init__(self, lmax, nlat, nlon=None, *, mu=None, device="cpu"):
        nlon = 2 * nlat if nlon is None else nlon
        if nlon < 2 * lmax + 1:
            raise ValueError(f"nlon={nlon} too small for lmax={lmax}: need nlon >= 2 lmax + 1")
        if mu is None:
            if nlat < lmax + 1:
                raise ValueError(f"nlat={nlat} too small for lmax={lmax}: need nlat >= lmax + 1")
            mu, w = sphere_gauss_latitudes(nlat)
            self.weights = torch.tensor(w, device=device)                  # (nlat,)
        else:
            mu = np.asarray(mu, dtype=np.float64)
            self.weights = None
        P, H = sphere_legendre(lmax, mu)
        self.lmax, self.nlat, self.nlon = lmax, mu.size, nlon
        self.mu = torch.tensor(mu, device=device)                           # (nlat,) sin(lat)
        self.cos_lat = torch.sqrt(1.0 - self.mu**2)                         # (nlat,)
        self.lon = torch.arange(nlon, device=device, dtype=torch.float64) * (2 * math.pi / nlon)
        self.P = torch.tensor(P, device=device)                             # (M, L, nlat)
        self.H = torch.tensor(H, device=device)                             # (M, L, nlat)
        self.m = torch.arange(lmax + 1, device=device, dtype=torch.float64)  # (M,)
        self.l = torch.arange(lmax + 1, device=device, dtype=torch.float64)  # (L,)

    # -- the two halves of a transform; N below is any number of stacked fields
    def fourier_forward(self, f):              # (N, nlat, nlon) real -> (N, nlat, M) complex
        return torch.fft.rfft(f, dim=-1, norm="forward")[..., : self.lmax + 1]

    def fourier_inverse(self, F):              # (N, nlat, M) complex -> (N, nlat, nlon) real
        return torch.fft.irfft(F, n=self.nlon, dim=-1, norm="forward")

    def legendre_forward(self, F, table):      # (N, nlat, M) -> (N, M, L), Gauss quadrature
        if self.weights is None:
            raise ValueError("this transform has no quadrature (built with mu=...): only to_grid works")
        X = torch.view_as_real((F * self.weights[:, None]).permute(2, 1, 0).contiguous())  # (M, nlat, N, 2)
        Y = torch.bmm(table, X.reshape(X.shape[0], X.shape[1], -1))                       # (M, L, 2N)
        return torch.view_as_complex(Y.reshape(Y.shape[0], Y.shape[1], -1, 2)).permute(2, 0, 1)

    def legendre_inverse(self, c, table):      # (N, M, L) -> (N, nlat, M)
        X = torch.view_as_real(c.permute(1, 2, 0).contiguous())                            # (M, L, N, 2)
        Y = torch.bmm(table.transpose(1, 2), X.reshape(X.shape[0], X.shape[1], -1))        # (M, nlat, 2N)
        return torch.view_as_complex(Y.reshape(Y.shape[0], Y.shape[1], -1, 2)).permute(2, 1, 0)

    # -- whole transforms for scalar fields (any leading dims)
    def to_spec(self, f):
        if tuple(f.shape[-2:]) != (self.nlat, self.nlon):
            raise ValueError(f"grid shape {tuple(f.shape)}: expected (..., {self.nlat}, {self.nlon})")
        lead = f.shape[:-2]
        F = self.fourier_forward(f.reshape(-1, *f.shape[-2:]))
        return self.legendre_forward(F, self.P).reshape(*lead, self.lmax + 1, self.lmax + 1)

    def to_grid(self, c):
        lead = c.shape[:-2]
        F = self.legendre_inverse(c.reshape(-1, *c.shape[-2:]), self.P)
        return self.fourier_inverse(F).reshape(*lead, self.nlat, self.nlon)

    # -- vector fields (u eastward, v northward) <-> curl and divergence
    def curl_div(self, u, v, radius=SPHERE_RADIUS):
        """(.., nlat, nlon) velocity -> (curl, div) coefficients, each (.., M, L).

        With U = u cos(lat): div_lm = 1/R sum_j w_j [i m U_m Pbar - V_m H] / (1 - mu_j^2), curl alike
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
        # U = u cos(lat) = (-(1-mu^2) dpsi/dmu + dchi/dlon) / R, V = (dpsi/dlon + (1-mu^2) dchi/dmu) / R
        UV = self.fourier_inverse(torch.cat([fP[:n] - fH[:n], fP[n:] + fH[n:]])) / (radius * self.cos_lat[:, None])
        return UV[:n].reshape(*lead, self.nlat, self.nlon), UV[n:].reshape(*lead, self.nlat, self.nlon)


def sphere_inverse_laplacian(l, radius=SPHERE_RADIUS):
    """(L,) factors -R^2 / (l (l+1)) of Lap^{-1} per degree, 0 for l = 0 (zero-mean solution)."""
    eig = l * (l + 1)
    return torch.where(eig > 0, -(radius**2) / torch.where(eig > 0, eig, 1.0), 0.0)


class SphereShallowWater:
    """Batched spectral-transform shallow-water solver; state x: (B, 3, M, L) complex128 coefficients
    of (relative vorticity [1/s], divergence [1/s], height deviation h' [m]).

    nlat Gauss latitudes x 2 nlat longitudes (the physical grid `self.grid`), lmax = nlat - 1, products
    on the 3/2-padded grid `self.pad`. coriolis_tilt alpha tilts the rotation axis towards lon = 0
    (Williamson test case 2): f = 2 Omega (sin(lat) cos(alpha) - cos(lon) cos(lat) sin(alpha)).
    Use: x = sphere_galewsky_state(solver); x = solver.advance(x, steps); solver.vorticity(x).
    """

    def __init__(self, nlat=SPHERE_DATA_NLAT, *, dt=600.0, hyperdiffusion=SPHERE_HYPERDIFFUSION,
                 radius=SPHERE_RADIUS, omega=SPHERE_OMEGA, gravity=SPHERE_GRAVITY,
                 mean_depth=SPHERE_MEAN_DEPTH, coriolis_tilt=0.0, device="cpu"):
        if nlat < 4 or nlat % 2:
            raise ValueError(f"nlat={nlat}: need an even number >= 4")
        if not dt > 0 or hyperdiffusion < 0:
            raise ValueError(f"dt={dt}, hyperdiffusion={hyperdiffusion}: need dt > 0, hyperdiffusion >= 0")
        lmax = nlat - 1
        self.grid = SphereTransform(lmax, nlat, 2 * nlat, device=device)
        nlat_pad = (3 * nlat + 1) // 2
        self.pad = SphereTransform(lmax, nlat_pad, 2 * nlat_pad, device=device)
        self.dt, self.nu, self.radius, self.gravity, self.mean_depth = dt, hyperdiffusion, radius, gravity, mean_depth
        self.omega, self.device = omega, device
        lat_mu, lon = self.pad.mu[:, None], self.pad.lon[None, :]
        self.coriolis = 2 * omega * (lat_mu * math.cos(coriolis_tilt)
                                     - torch.cos(lon) * self.pad.cos_lat[:, None] * math.sin(coriolis_tilt))  # (nlat_pad, nlon_pad)
        self.lap = self.grid.l * (self.grid.l + 1) / radius**2          # (L,) minus the Laplacian's eigenvalue
        self.damp_uv = hyperdiffusion * (self.lap - 1 / radius**2) ** 2  # (L,) on curl and divergence
        self.damp_h = hyperdiffusion * self.lap**2                       # (L,) on h
        self.triangle = (self.grid.l[None, :] >= self.grid.m[:, None])   # (M, L) l >= m

    # -- explicit part: advection and Coriolis, products on the padded grid
    def tendency(self, x):
        """(B, 3, M, L) -> (B, 3, M, L): all terms but gravity waves and hyperdiffusion."""
        T, B, R = self.pad, x.shape[0], self.radius
        inv_lap = sphere_inverse_laplacian(T.l, R)
        psi, chi = x[:, 0] * inv_lap, x[:, 1] * inv_lap                  # (B, M, L)
        im = 1j * T.m[:, None]
        fP = T.legendre_inverse(torch.cat([x[:, 0], x[:, 2], im * chi, im * psi]), T.P)   # (4B, nlat, M)
        fH = T.legendre_inverse(torch.cat([psi, chi]), T.H)                                # (2B, nlat, M)
        g = T.fourier_inverse(torch.cat([fP[: 2 * B], fP[2 * B: 3 * B] - fH[:B], fP[3 * B:] + fH[B:]]))
        zeta, h = g[:B], g[B: 2 * B]                                      # (B, nlat, nlon)
        u, v = g[2 * B: 3 * B] / (R * T.cos_lat[:, None]), g[3 * B:] / (R * T.cos_lat[:, None])
        q = zeta + self.coriolis                                          # absolute vorticity
        fluxes = torch.cat([q * u, q * v, h * u, h * v]) / T.cos_lat[:, None]   # vector fields / cos(lat)
        F = T.fourier_forward(torch.cat([fluxes, 0.5 * (u * u + v * v)]))       # (5B, nlat, M)
        cP, cH = T.legendre_forward(F, T.P), T.legendre_forward(F[: 4 * B], T.H)
        div_q = (im * cP[:B] - cH[B: 2 * B]) / R                          # div((zeta + f) u)
        curl_q = (im * cP[B: 2 * B] + cH[:B]) / R                         # curl((zeta + f) u)
        div_h = (im * cP[2 * B: 3 * B] - cH[3 * B: 4 * B]) / R            # div(h u)
        kinetic = cP[4 * B:]                                              # |u|^2 / 2
        out = torch.stack([-div_q, curl_q + self.lap * kinetic, -div_h], dim=1)
        return out * self.triangle

    # -- implicit part: gravity waves and hyperdiffusion, diagonal in l
    def linear(self, x):
        vort, div, h = x[:, 0], x[:, 1], x[:, 2]
        return torch.stack([-self.damp_uv * vort,
                            -self.damp_uv * div + self.gravity * self.lap * h,
                            -self.mean_depth * div - self.damp_h * h], dim=1)

    def implicit_solve(self, y, a):
        """Solve (I - a Linear) x = y per degree: closed-form 2x2 for (divergence, height)."""
        cu, ch, glap, Hd = 1 + a * self.damp_uv, 1 + a * self.damp_h, a * self.gravity * self.lap, a * self.mean_depth
        det = cu * ch + glap * Hd
        div = (ch * y[:, 1] + glap * y[:, 2]) / det
        h = (cu * y[:, 2] - Hd * y[:, 1]) / det
        return torch.stack([y[:, 0] / cu, div, h], dim=1)

    def step(self, x):
        """One IMEX RK222 step (explicit tableau [[0],[g],[d, 1-d]], implicit [[0],[0, g],[0, 1-g, g]])."""
        gam = 1 - 1 / math.sqrt(2)
        dlt = 1 - 1 / (2 * gam)
        dt = self.dt
        F0 = self.tendency(x)
        x1 = self.implicit_solve(x + (gam * dt) * F0, gam * dt)
        F1 = self.tendency(x1)
        return self.implicit_solve(x + dt * (dlt * F0 + (1 - dlt) * F1 + (1 - gam) * self.linear(x1)), gam * dt)

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
        return 4 * math.pi * R**2 * self.mean_depth + 2 * math.sqrt(2) * math.pi * R**2 * x[:, 2, 0, 0].real

    def energy(self, x):
        """(B,) int [(H + h') |u|^2 / 2 + g h'^2 / 2] dA by Gauss quadrature on the padded grid."""
        T = self.pad
        u, v = T.velocity(x[:, 0], x[:, 1], self.radius)
        h = T.to_grid(x[:, 2])
        density = 0.5 * (self.mean_depth + h) * (u * u + v * v) + 0.5 * self.gravity * h * h
        return (density.mean(-1) * T.weights).sum(-1) * 2 * math.pi * self.radius**2

    def balanced_height(self, vort, div):
        """(B, M, L) h' that makes d(div)/dt = 0 for this flow, mean zero (Dedalus's balance LBVP)."""
        x = torch.stack([vort, div, torch.zeros_like(vort)], dim=1)
        rhs = self.tendency(x)[:, 1]                     # curl((zeta+f)u) - Lap|u|^2/2 ; + g lap-part = 0
        return rhs * sphere_inverse_laplacian(self.grid.l, self.radius) / self.gravity


def sphere_galewsky_state(solver, *, u_max=80.0, bump="dedalus", mirror=False, bump_height=120.0):
    """Galewsky et al. (2004) initial state on `solver`'s grid -> (B, 3, M, L); B = len(u_max).

    Jet u = u_max/e_n exp(1/((lat-phi0)(lat-phi1))) on phi0 < lat < phi1, height in gradient-wind
    balance (mean deviation 0), then a height bump at 45 N. bump: 'dedalus' (longitude in [0, 2 pi),
    so only the eastern half of the bump, as the Dedalus example), 'galewsky' (longitude in
    (-pi, pi], the full bump) or None. mirror=True adds the mirror jet and bump at 45 S (DINo data).
    """
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
        lon = T.lon if bump == "dedalus" else torch.remainder(T.lon + math.pi, 2 * math.pi) - math.pi
        alpha, beta, phi2 = 1 / 3, 1 / 15, math.pi / 4
        shape = torch.exp(-((phi2 - lat) / beta) ** 2) + (torch.exp(-((phi2 + lat) / beta) ** 2) if mirror else 0.0)
        bump_grid = bump_height * (torch.cos(lat) * shape)[:, None] * torch.exp(-((lon / alpha) ** 2))[None, :]
        h = h + T.to_spec(bump_grid)
    return torch.stack([vort, div, h], dim=1) * solver.triangle


def sphere_williamson2_state(solver, *, alpha=0.0, u0=None):
    """Williamson et al. (1992) test case 2 (steady zonal geostrophic flow, axis tilted by alpha) ->
    (1, 3, M, L). Needs solver.mean_depth = 2.94e4 / g and coriolis_tilt = alpha to be steady."""
    T, R, om = solver.grid, solver.radius, solver.omega
    u0 = 2 * math.pi * R / (12 * 86400) if u0 is None else u0
    mu, cl, lon = T.mu[:, None], T.cos_lat[:, None], T.lon[None, :]
    u = u0 * (cl * math.cos(alpha) + torch.cos(lon) * mu * math.sin(alpha))
    v = -u0 * torch.sin(lon) * math.sin(alpha) * torch.ones_like(mu)
    s = -torch.cos(lon) * cl * math.sin(alpha) + mu * math.cos(alpha)
    h = -(R * om * u0 + u0**2 / 2) * s**2 / solver.gravity
    vort, div = T.curl_div(u[None], v[None], R)
    return torch.stack([vort, div, T.to_spec(h[None])], dim=1)


# -- The DINo `shallow-water` dataset. Every trajectory is simulated on the paper's grid (256 x 128,
# T127, dt = 600 s) unless sim_nlat asks for a cheaper one; the returned points are always points of
# the 256 x 128 Gauss grid: size=128 all of them, size=64 every other latitude and longitude (starting
# at the northernmost latitude and longitude 0), size=32 every fourth. A band-limited solution is
# evaluated exactly there whatever grid it was computed on.

def sphere_output_points(nlat, nlon=None):
    """mu = sin(lat) (nlat,) and lon (nlon,) of the points a size-nlat dataset returns."""
    nlon = 2 * nlat if nlon is None else nlon
    if nlon != 2 * nlat or nlat < 1 or SPHERE_DATA_NLAT % nlat:
        raise ValueError(f"grid {nlon}x{nlat}: need nlon = 2 nlat and nlat dividing {SPHERE_DATA_NLAT} "
                         f"(e.g. 128, 64, 32, 16)")
    stride = SPHERE_DATA_NLAT // nlat
    mu = sphere_gauss_latitudes(SPHERE_DATA_NLAT)[0][::stride]
    return mu, np.arange(nlon) * (2 * np.pi / nlon)


def sphere_coords(nlat, nlon=None):
    """(nlat, nlon, 3) float32 xyz on the unit sphere of the points shallow_water_trajectories returns."""
    mu, lon = sphere_output_points(nlat, nlon)
    cl = np.sqrt(1 - mu**2)[:, None]
    xyz = np.stack([cl * np.cos(lon)[None, :], cl * np.sin(lon)[None, :], np.broadcast_to(mu[:, None], (mu.size, lon.size))], -1)
    return torch.tensor(xyz, dtype=torch.float32)


def latitude_mask(nlat, nlon=None):
    """(nlat, nlon) bool training mask: at latitude lat keep about nlon cos(lat) equispaced
    longitudes, so the kept points are about equally spaced in area (DINo thins towards the poles)."""
    mu, lon = sphere_output_points(nlat, nlon)
    frac = np.sqrt(1 - mu**2)[:, None]                             # cos(lat), (nlat, 1)
    j = np.arange(lon.size)[None, :]
    keep = np.floor((j + 0.5) * frac) > np.floor((j - 0.5) * frac)   # one point per 1/cos(lat) columns
    return torch.tensor(keep | (j == 0))


def sphere_trajectory_seed(split, index):
    """The seed of trajectory (split, index): index for train, 2^31 - 1 - index for test (disjoint)."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: allowed 'train' or 'test'")
    if not 0 <= index < 2**30:
        raise ValueError(f"index={index}: need 0 <= index < 2^30")
    return index if split == "train" else 2**31 - 1 - index


def shallow_water_trajectories(split, indices, *, size=64, sim_nlat=SPHERE_DATA_NLAT, hours=(160, 320),
                               hyperdiffusion=None, threads=None, device="cpu", verbose=True):
    """DINo's sphere data: Galewsky jets with u_max ~ U(60, 80) m/s, mirror jet and bump at 45 S
    (one-sided bump as the Dedalus example), 1-hour frames.

    Returns (len(indices), hours[1] - hours[0], size, 2 size, 2) float32: frames at hours
    hours[0] .. hours[1]-1 (default 160 .. 319, so 8 windows of 20), channels
    (h' / R * 3000, zeta [1/hour] * 2). Trajectory i depends only on (split, indices[i]).
    sim_nlat: simulation grid (sim_nlat x 2 sim_nlat, default 128 = the paper's); cheaper grids for
    quick presets and tests use dt = 3600 / ceil(6 sim_nlat / 128) s and the same hyperdiffusion
    (Dedalus's nu: e-folding 26 min at l = 127, 4 days at l = 32; scaling nu up for coarse grids
    would damp the jet itself).
    All trajectories advance together in one batch. threads: torch CPU threads during the run
    (None: leave torch's setting); on a busy machine 1 thread per process is much faster than 2
    (measured 0.50 vs 0.9-1.6 s per model hour per trajectory), so split big builds over processes.
    """
    if sim_nlat < 8 or sim_nlat % 2:
        raise ValueError(f"sim_nlat={sim_nlat}: need an even number >= 8")
    if not 0 <= hours[0] < hours[1]:
        raise ValueError(f"hours={hours}: need 0 <= start < stop")
    mu_out, _ = sphere_output_points(size)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("indices is empty: give at least one trajectory index")
    seeds = [sphere_trajectory_seed(split, i) for i in indices]
    u_max = [float(np.random.default_rng(s).uniform(60.0, 80.0)) for s in seeds]
    steps_per_hour = math.ceil(6 * sim_nlat / SPHERE_DATA_NLAT)
    nu = SPHERE_HYPERDIFFUSION if hyperdiffusion is None else hyperdiffusion
    solver = SphereShallowWater(sim_nlat, dt=3600.0 / steps_per_hour, hyperdiffusion=nu, device=device)
    nlon_eval = 2 * max(SPHERE_DATA_NLAT, sim_nlat)          # evaluate on the full longitudes, then thin
    out_grid = SphereTransform(sim_nlat - 1, mu_out.size, nlon_eval, mu=mu_out, device=device)
    stride = nlon_eval // (2 * size)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _sphere_run_frames(solver, out_grid, stride=stride, u_max=u_max, split=split, size=size,
                                  hours=hours, steps_per_hour=steps_per_hour, verbose=verbose)
    finally:
        torch.set_num_threads(previous_threads)


def _sphere_run_frames(solver, out_grid, *, stride, u_max, split, size, hours, steps_per_hour, verbose):
    """The time loop of shallow_water_trajectories: (B, T, size, 2 size, 2) float32 frames."""
    device = solver.device
    x = sphere_galewsky_state(solver, u_max=u_max, bump="dedalus", mirror=True)
    frames = torch.empty(len(u_max), hours[1] - hours[0], size, 2 * size, 2)
    start = time.perf_counter()
    for hour in range(hours[1]):
        if hour >= hours[0]:
            fields = out_grid.to_grid(torch.stack([x[:, 2], x[:, 0]], dim=1))[..., ::stride]   # (B, 2, H, W)
            scale = torch.tensor([SPHERE_HEIGHT_SCALE, SPHERE_VORT_SCALE], dtype=fields.dtype, device=device)
            frames[:, hour - hours[0]] = (fields * scale[:, None, None]).permute(0, 2, 3, 1).float().cpu()
        if hour + 1 < hours[1]:                               # the last frame needs no step after it
            x = solver.advance(x, steps_per_hour)
        if verbose and ((hour + 1) % 40 == 0 or hour + 1 == hours[1]):
            elapsed = time.perf_counter() - start
            print(f"  shallow-water {split} x{len(u_max)} at {2 * solver.grid.nlat}x{solver.grid.nlat}: hour {hour + 1}/{hours[1]}, "
                  f"{elapsed:.0f} s, ETA {elapsed / (hour + 1) * (hours[1] - hour - 1):.0f} s", flush=True)
    if not torch.isfinite(frames).all():
        raise RuntimeError("shallow-water simulation blew up (non-finite values); reduce the time step")
    return frames
