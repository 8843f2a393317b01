"""Fast checks of every dino file against exact solutions, invariants and reference formulas."""
import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm

# ---- inr
from inr import Decoder, decoder_parameter_count


@pytest.fixture
def one_thread():
    """These tests use tiny tensors: on a shared, loaded machine, thread hand-offs cost far more than
    the arithmetic (seconds instead of milliseconds), so they run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def grid_coords(size, dtype=torch.float32):
    axis = torch.linspace(0, 0.5, size + 1, dtype=dtype)[:-1]
    return torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)   # (N, 2)


def naive_decode(decoder, coords, code):
    """The network exactly as the equations read, for ONE point set (N, X) and ONE code (D,),
    filters recomputed inside every layer, as the official code does for every code."""
    omega = decoder.filter_scale * decoder.filter_weight
    out = []
    for x in coords:                                                      # one point at a time
        z = None
        for l in range(decoder.layers + 1):
            phase = omega[l] @ x
            s = torch.cat([torch.sin(phase), torch.cos(phase)])
            shift = decoder.code_weight[l] @ code + decoder.bias[l]
            z = s * shift if l == 0 else s * (decoder.hidden_weight[l - 1] @ z + shift)
        out.append(decoder.out.weight[0] @ z + decoder.out.bias[0])
    return torch.stack(out)                                               # (N,)


def small_decoder(coord_dim=2, code_dim=6, hidden=8, layers=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Decoder(coord_dim=coord_dim, code_dim=code_dim, hidden=hidden, layers=layers).to(dtype)


@pytest.mark.usefixtures("one_thread")
def test_decoder_shapes_grids_point_clouds_batched():
    dec = small_decoder(dtype=torch.float32)
    coords = grid_coords(4)                                               # (16, 2)
    assert dec(coords, torch.randn(3, 5, 2, 6)).shape == (3, 5, 16, 2)    # (B, T, N, S)
    assert dec(coords, torch.randn(2, 6)).shape == (16, 2)                # one code set
    assert dec(torch.rand(4, 7, 2), torch.randn(4, 1, 6)).shape == (4, 7, 1)   # per-sample points
    assert dec(torch.rand(4, 7, 2), torch.randn(4, 3, 1, 6)).shape == (4, 3, 7, 1)
    sphere = small_decoder(coord_dim=3, dtype=torch.float32)
    xyz = torch.nn.functional.normalize(torch.randn(11, 3), dim=-1)      # a point cloud on S^2
    assert sphere(xyz, torch.randn(2, 3, 6)).shape == (2, 11, 3)


@pytest.mark.usefixtures("one_thread")
def test_decoder_fast_route_equals_direct_and_naive_formula():
    dec = small_decoder()
    coords = torch.rand(9, 2, dtype=torch.float64) * 0.5
    codes = torch.randn(2, 3, 2, 6, dtype=torch.float64)                  # (B, T, S, D)
    fast, direct = dec(coords, codes), dec.decode_direct(coords, codes)
    for b, t, s in np.ndindex(2, 3, 2):
        torch.testing.assert_close(fast[b, t, :, s], naive_decode(dec, coords, codes[b, t, s]))
    torch.testing.assert_close(fast, direct)
    # per-sample point sets
    coords_b = torch.rand(2, 9, 2, dtype=torch.float64)
    fast_b = dec(coords_b, codes)
    for b, t, s in np.ndindex(2, 3, 2):
        torch.testing.assert_close(fast_b[b, t, :, s], naive_decode(dec, coords_b[b], codes[b, t, s]))
    # same gradients, for the codes and every parameter
    grads = []
    for fn in (dec.forward, dec.decode_direct):
        c = codes.clone().requires_grad_()
        dec.zero_grad()
        (fn(coords, c) ** 2).sum().backward()
        grads.append([c.grad] + [p.grad.clone() for p in dec.parameters()])
    for g_fast, g_direct in zip(*grads):
        torch.testing.assert_close(g_fast, g_direct)


@pytest.mark.usefixtures("one_thread")
def test_decoder_is_affine_in_the_code():
    dec = small_decoder()
    coords = torch.rand(9, 2, dtype=torch.float64)
    parts = dec.affine_parts(coords)
    code = torch.randn(1, 6, dtype=torch.float64)
    torch.testing.assert_close(dec(coords, code)[:, 0], parts.offset[0] + parts.jacobian[0] @ code[0])


@pytest.mark.usefixtures("one_thread")
def test_decoder_code_changes_only_its_own_output():
    dec = small_decoder(dtype=torch.float32)
    coords, codes = grid_coords(4), torch.randn(3, 2, 6)
    before = dec(coords, codes)
    codes[1, 0] += 0.5
    after = dec(coords, codes)
    assert (after[1, :, 0] - before[1, :, 0]).abs().max() > 1e-3          # this code's field moved
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]])            # other samples did not
    torch.testing.assert_close(after[1, :, 1], before[1, :, 1])          # nor the other channel


@pytest.mark.usefixtures("one_thread")
def test_decoder_has_no_hidden_dependence_on_point_order():
    dec = small_decoder(dtype=torch.float32)
    coords, codes = grid_coords(6), torch.randn(2, 1, 6)
    perm = torch.randperm(len(coords))
    torch.testing.assert_close(dec(coords[perm], codes), dec(coords, codes)[:, perm])


@pytest.mark.parametrize("coord_dim, code_dim, hidden, layers, official", [
    (2, 100, 64, 3, 38_593),      # navier-stokes
    (2, 50, 64, 3, 25_793),       # wave (2 channels share the decoder)
    (3, 200, 256, 6, 757_121),    # shallow water
])
@pytest.mark.usefixtures("one_thread")
def test_decoder_parameter_count(coord_dim, code_dim, hidden, layers, official):
    dec = Decoder(coord_dim=coord_dim, code_dim=code_dim, hidden=hidden, layers=layers)
    count = sum(p.numel() for p in dec.parameters())
    assert count == decoder_parameter_count(coord_dim=coord_dim, code_dim=code_dim, hidden=hidden,
                                            layers=layers)
    # the official figure also counts a first-layer weight that only ever multiplies x * 0
    assert count + hidden * coord_dim == official


@pytest.mark.usefixtures("one_thread")
def test_decoder_float64_and_bad_input():
    dec = small_decoder(dtype=torch.float64)
    assert dec(torch.rand(5, 2, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="coords"):
        dec(torch.rand(5, 3, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="codes"):
        dec(torch.rand(5, 2, dtype=torch.float64), torch.randn(1, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="hidden"):
        Decoder(coord_dim=2, code_dim=4, hidden=7)


# ---- autodecode
from autodecode import CodeTable, fit_codes, toy_linear_autodecoding


def known_code_problem(n_batch=4, n_channels=2, seed=0):
    """Fields made by a random decoder from known codes: the fit must find them again."""
    dec = small_decoder(code_dim=6, hidden=16, layers=2, dtype=torch.float32, seed=seed)
    coords = grid_coords(8)                                               # (64, 2)
    true_codes = 0.5 * torch.randn(n_batch, n_channels, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        values = dec(coords, true_codes)                                  # (B, N, S)
    return dec, coords, values


class PlainDecoder(torch.nn.Module):
    """A decoder that offers only forward(coords, codes): fit_codes must take its generic path."""

    def __init__(self, decoder):
        super().__init__()
        self.inner, self.code_dim = decoder, decoder.code_dim

    def forward(self, coords, codes):
        return self.inner(coords, codes)


@pytest.mark.usefixtures("one_thread")
def test_toy_linear_autodecoding_learns(capsys):
    result = toy_linear_autodecoding(rounds=100)
    assert result.loss_after < result.loss_before / 100
    assert "loss before" in capsys.readouterr().out


@pytest.mark.usefixtures("one_thread")
def test_fit_codes_recovers_known_codes():
    dec, coords, values = known_code_problem()
    fit = fit_codes(dec, coords, values, steps=300, lr=1e-2)
    start = fit_codes(dec, coords, values, steps=0).loss                  # the loss at the zero code
    assert fit.codes.shape == (4, 2, 6) and fit.loss.shape == (4,)
    assert (fit.loss < start / 100).all(), (start, fit.loss)
    torch.testing.assert_close(fit.loss, (dec(coords, fit.codes) - values).pow(2).mean(dim=(1, 2)))


@pytest.mark.usefixtures("one_thread")
def test_fit_codes_batched_equals_each_sample_alone_and_generic_path():
    dec, coords, values = known_code_problem()
    mask = torch.rand(4, 64, generator=torch.Generator().manual_seed(1)) < 0.6    # (B, N)
    batched = fit_codes(dec, coords, values, mask, steps=50)
    for b in range(4):
        alone = fit_codes(dec, coords, values[b:b + 1], mask[b:b + 1], steps=50)
        torch.testing.assert_close(alone.codes[0], batched.codes[b])
        torch.testing.assert_close(alone.loss[0], batched.loss[b])
    generic = fit_codes(PlainDecoder(dec), coords, values, mask, steps=50)
    torch.testing.assert_close(generic.codes, batched.codes, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_fit_codes_mask_and_per_sample_points():
    dec, coords, values = known_code_problem()
    mask = torch.rand(64, generator=torch.Generator().manual_seed(2)) < 0.5      # (N,)
    polluted = values.clone()
    polluted[:, ~mask] = float("nan")                                    # never observed
    fit = fit_codes(dec, coords, polluted, mask, steps=100)
    torch.testing.assert_close(fit.codes, fit_codes(dec, coords[mask], values[:, mask], steps=100).codes)
    assert torch.isfinite(fit.codes).all()
    # the same observations given as per-sample point sets (B, N, X)
    per_sample = fit_codes(dec, coords[mask].expand(4, -1, -1), values[:, mask], steps=100)
    torch.testing.assert_close(per_sample.codes, fit.codes)


@pytest.mark.usefixtures("one_thread")
def test_fit_codes_leaves_decoder_alone_and_rejects_bad_input():
    dec, coords, values = known_code_problem()
    before = [p.clone() for p in dec.parameters()]
    fit_codes(dec, coords, values, steps=5)
    assert all(p.grad is None for p in dec.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, dec.parameters()))
    with pytest.raises(ValueError, match="mask"):
        fit_codes(dec, coords, values, torch.ones(63, dtype=torch.bool))
    with pytest.raises(ValueError, match="coords"):
        fit_codes(dec, coords[:10], values)
    with pytest.raises(ValueError, match="no observed point"):
        fit_codes(dec, coords, values, torch.zeros(4, 64, dtype=torch.bool))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("sparse", [False, True])
def test_code_table_lookup_and_own_optimiser(sparse):
    table = CodeTable(5, 3, 2, 4, sparse=sparse)
    assert table.codes.shape == (5, 3, 2, 4) and not table.codes.any()
    ids = torch.tensor([3, 1])
    opt = table.optimizer(lr=0.1)
    for _ in range(3):                                                   # rows 3, 1 get gradients...
        opt.zero_grad()
        table(ids).sub(1.0).pow(2).sum().backward()
        opt.step()
    assert table(ids).shape == (2, 3, 2, 4)
    assert (table.codes[[3, 1]] > 0.1).all()
    opt.zero_grad()
    table(torch.tensor([0])).sum().backward()                            # ... then only row 0 does
    before = table.codes.detach().clone()
    opt.step()
    moved = (table.codes - before).abs().flatten(1).amax(1) > 0         # (5,)
    # sparse: only row 0 moves, as with one parameter per sequence; dense Adam also moves 1 and 3
    assert moved.tolist() == ([True, False, False, False, False] if sparse else [True, True, False, True, False])
    with pytest.raises(ValueError, match="ids"):
        table(torch.tensor([5]))


# ---- dynamics
from dynamics import Dynamics, Swish, epsilon_schedule, rollout, rollout_with_restarts


class LinearField(torch.nn.Module):
    def __init__(self, matrix):
        super().__init__()
        self.matrix = matrix                                             # (S*D, S*D)

    def forward(self, t, alpha):
        return (alpha.flatten(-2) @ self.matrix.T).view(alpha.shape)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method, tol", [("rk4", 1e-6), ("dopri5", 1e-5)])
def test_rollout_matches_matrix_exponential(method, tol):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=gen, dtype=torch.float64) * 0.5
    alpha0 = torch.randn(3, 2, 3, generator=gen, dtype=torch.float64)  # (B, S, D), S*D = 6
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    path = rollout(LinearField(A), alpha0, t, method=method)            # (B, T, S, D)
    exact = torch.stack([alpha0.flatten(1) @ torch.from_numpy(expm(A.numpy() * ti.item())).T
                         for ti in t], dim=1).view(path.shape)
    assert path.shape == (3, 21, 2, 3)
    assert (path - exact).abs().max() < tol


@pytest.mark.usefixtures("one_thread")
def test_rk4_error_falls_sixteenfold_when_the_step_halves():
    A = torch.tensor([[0.0, 2.0], [-2.0, 0.0]], dtype=torch.float64)   # rotation
    alpha0 = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    exact = alpha0.flatten(1) @ torch.from_numpy(expm(A.numpy() * 2.0)).T
    errors = [(rollout(LinearField(A), alpha0, torch.linspace(0, 2, n + 1, dtype=torch.float64))[:, -1]
               .flatten(1) - exact).norm() for n in (10, 20)]
    assert 14 < errors[0] / errors[1] < 18


@pytest.mark.usefixtures("one_thread")
def test_restarts_extremes_and_per_sample_draws():
    torch.manual_seed(0)
    f = Dynamics(n_channels=2, code_dim=3, hidden=16).double()
    codes = torch.randn(16, 6, 2, 3, dtype=torch.float64)               # (B, T, S, D)
    t = torch.linspace(0, 1, 6, dtype=torch.float64)
    torch.testing.assert_close(rollout_with_restarts(f, codes, t, 0.0), rollout(f, codes[:, 0], t),
                               rtol=0, atol=0)
    one_step = torch.stack([codes[:, 0]] + [rollout(f, codes[:, i], t[i:i + 2])[:, -1] for i in range(5)], 1)
    torch.testing.assert_close(rollout_with_restarts(f, codes, t, 1.0), one_step)
    # epsilon 1/2: each step starts either from the integrated or from the true code, per sample
    pred = rollout_with_restarts(f, codes, t, 0.5, generator=torch.Generator().manual_seed(3))
    from_true = torch.zeros(16, 4, dtype=torch.bool)
    for i in range(1, 5):
        step_true = rollout(f, codes[:, i], t[i:i + 2])[:, -1]
        step_own = rollout(f, pred[:, i], t[i:i + 2])[:, -1]
        is_true = (pred[:, i + 1] - step_true).flatten(1).abs().amax(1) < 1e-12
        is_own = (pred[:, i + 1] - step_own).flatten(1).abs().amax(1) < 1e-12
        assert (is_true | is_own).all()
        from_true[:, i - 1] = is_true & ~is_own
    assert from_true.any(dim=0).all() and (~from_true).any(dim=0).all()  # draws differ across samples


@pytest.mark.usefixtures("one_thread")
def test_dynamics_gradients_mixing_and_parameter_counts():
    torch.manual_seed(0)
    f = Dynamics(n_channels=2, code_dim=3, hidden=16)
    codes = torch.randn(4, 5, 2, 3)
    loss = (rollout_with_restarts(f, codes, torch.arange(5.0), 0.5) - codes).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in f.parameters())
    alpha = torch.randn(1, 2, 3)
    other = alpha.clone()
    other[0, 0, 0] += 1.0
    assert not torch.allclose(f(0.0, alpha)[0, 1], f(0.0, other)[0, 1])   # channels interact
    torch.testing.assert_close(f(0.0, alpha), f(123.0, alpha))           # autonomous
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(Swish(0.5)(x), x * torch.sigmoid(math.log1p(math.exp(0.5)) * x) / 1.1)
    for S, D, hidden, official in [(1, 100, 512, 628_327), (2, 50, 256, 183_143), (2, 200, 800, 1_922_803)]:
        assert sum(p.numel() for p in Dynamics(n_channels=S, code_dim=D, hidden=hidden).parameters()) == official


@pytest.mark.usefixtures("one_thread")
def test_epsilon_schedule():
    assert epsilon_schedule(0) == 0.99 and epsilon_schedule(99) == 0.99
    assert epsilon_schedule(100) == pytest.approx(0.99 ** 2)
    assert epsilon_schedule(250) == pytest.approx(0.99 ** 3)
    k = math.ceil(math.log(1e-3 / 0.99) / math.log(0.99))             # 0.99 * 0.99**k < 1e-3 first
    assert epsilon_schedule(100 * k - 1) > 1e-3 and epsilon_schedule(100 * k) == 0.0
    with pytest.raises(ValueError, match="epsilon"):
        rollout_with_restarts(Dynamics(n_channels=1, code_dim=2, hidden=4), torch.zeros(1, 2, 1, 2),
                              torch.arange(2.0), 1.5)


@pytest.mark.slow
def test_benchmark_paper_sizes_meets_targets():
    """NS sizes on one thread: <= 4 s per training iteration, <= 60 s to fit 32 codes, <= 3 GiB."""
    import autodecode
    threads = torch.get_num_threads()
    try:
        result = autodecode.benchmark(repeats=3, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert result["iteration_s"] <= 4.0 and result["fit_s"] <= 60.0 and result["peak_gib"] <= 3.0
