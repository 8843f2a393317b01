"""Checks for dino (run: python -m pytest -q). Each section is one topic; tiny sizes, seconds."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

# ---- train
import train as train_py

TINY = ["--set", "size=8", "--set", "n_train=4", "--set", "n_test=1", "--set", "code_dim=8",
        "--set", "hidden=16", "--set", "layers=2", "--set", "dyn_hidden=16", "--set", "fit_steps=10"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def tiny_argv(out, data_dir, *extra, batch=4, every=5):
    return ["--pde", "heat", "--preset", "quick", "--device", "cpu", "--out", str(out), "--data-dir", data_dir,
            *TINY, "--set", f"batch_size={batch}", "--set", f"eval_every={every}", *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """One tiny heat run shared by the evaluate checks: 8 windows of 8x8, 40 epochs."""
    out = tmp_path_factory.mktemp("run") / "heat"
    result = train_py.main(tiny_argv(out, data_dir, "--epochs", "40", every=20))
    return out, result


def test_train_lowers_the_loss_and_writes_a_run(tiny_run):
    out, result = tiny_run
    first, last = result.history[0], result.history[-1]
    assert result.stopped == "epochs" and result.epoch == 40 and result.iteration == 80
    assert last["loss_dec"] < first["loss_dec"] / 3          # reconstruction learned
    assert last["train_in_t"] < first["train_in_t"]          # the forecast of the training windows too
    assert {"last.pt", "best.pt", "log.txt"} <= set(os.listdir(out))
    log = (out / "log.txt").read_text()
    for label in ("epoch", "iter", "dec", "dyn", "train In-t", "test In-t", "Out-t", "ETA"):
        assert label in log.splitlines()[-1]
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["config"]["coord_scale"] == 0.25 and state["config"]["coord_shift"] == 1.0   # the map travels
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["best_train"] == min(h["train_in_t"] for h in result.history)   # selected on TRAIN data


def test_resume_after_ctrl_c_equals_uninterrupted(tmp_path, data_dir):
    # paper schedule, 3 minibatches per epoch: the Ctrl-C lands mid-epoch, with summed decoder
    # and dynamics gradients pending; the resumed run must not notice.
    base = ["--schedule", "epoch", "--epochs", "4"]
    whole = train_py.main(tiny_argv(tmp_path / "whole", data_dir, *base, batch=3, every=3))

    def interrupt_after_first_eval(line):
        if line.startswith("epoch 1 | iter 3"):
            os.kill(os.getpid(), signal.SIGINT)                 # as Ctrl-C: handled, not raised
    cfg, _, out, _ = train_py.resolve(train_py.parser().parse_args(tiny_argv(tmp_path / "split", data_dir,
                                                                              *base, batch=3, every=3)))
    part = train_py.train(cfg, out=out, epochs=4, data_dir=data_dir, log=interrupt_after_first_eval)
    assert part.stopped == "interrupted" and part.iteration == 4     # stopped mid-epoch 1
    rest = train_py.main(["--out", str(tmp_path / "split"), "--resume", "--data-dir", data_dir, "--epochs", "4"])
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    assert rest.iteration == whole.iteration == 12
    for key in ("model", "codes"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-6, atol=1e-7)
    assert rest.history[-1]["loss_dec"] == pytest.approx(whole.history[-1]["loss_dec"], rel=1e-5)
    assert rest.history[-1]["test_out_t"] == pytest.approx(whole.history[-1]["test_out_t"], rel=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    train_py.main(tiny_argv(tmp_path / "run", data_dir, "--epochs", "2"))
    good = (tmp_path / "run" / "last.pt").read_bytes()
    real = train_py.load_dataset

    def poisoned(*args, **kwargs):
        data = real(*args, **kwargs)
        data.frames[0, 1, 0, 0] = float("nan")
        return data
    monkeypatch.setattr(train_py, "load_dataset", poisoned)
    with pytest.raises(SystemExit) as stop:
        train_py.main(["--out", str(tmp_path / "run"), "--resume", "--data-dir", data_dir, "--epochs", "4"])
    assert stop.value.code == 1
    assert "non-finite loss" in capsys.readouterr().err
    assert (tmp_path / "run" / "last.pt").read_bytes() == good


def test_config_table_and_overrides():
    assert set(train_py.CONFIGS) == {(p, s) for p in train_py.PDES for s in train_py.PRESETS}
    for cfg in train_py.CONFIGS.values():
        train_py.check_config(cfg)
    cfg = train_py.override(train_py.CONFIGS[("heat", "quick")], ["code_dim=64", "lr_decoder=3e-3", "schedule=epoch"])
    assert (cfg.code_dim, cfg.lr_decoder, cfg.schedule) == (64, 3e-3, "epoch")
    for bad in (["nope=1"], ["code_dim=1.5"], ["code_dim"], ["pde=wave"]):
        with pytest.raises(ValueError, match="--set"):
            train_py.override(cfg, bad)


def test_observation_mask_rate_and_seed(data_dir):
    data = train_py.load_dataset("heat", "test", size=32, data_dir=data_dir, n_trajectories=1, verbose=False)
    a = train_py.observation_mask(data, 0.25, seed=1)
    assert a.shape == (32, 32) and abs(a.float().mean().item() - 0.25) < 0.05
    assert torch.equal(a, train_py.observation_mask(data, 0.25, seed=1))
    assert not torch.equal(a, train_py.observation_mask(data, 0.25, seed=2))
    assert train_py.observation_mask(data, 1.0, seed=1).all()


@pytest.mark.parametrize("argv, message", [
    (["--pde", "burgers"], "invalid choice: 'burgers'"),
    (["--pde", "heat", "--preset", "huge"], "invalid choice: 'huge'"),
    (["--pde", "heat", "--subsampling", "0"], "rate 0.0 is outside (0, 1]"),
    (["--pde", "heat", "--subsampling", "1.5"], "rate 1.5 is outside (0, 1]"),
    (["--pde", "heat", "--subsampling", "half"], "rate 'half' is not a number"),
    (["--pde", "heat", "--device", "tpu"], "'tpu'"),
    (["--pde", "heat", "--set", "colour=red"], "'colour=red'"),
    (["--pde", "heat", "--epochs", "-1"], "--epochs -1"),
    (["--resume"], "--resume needs --out"),
])
def test_train_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_py.main(argv + ["--out", str(tmp_path / "run")] if "--resume" not in argv else argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()                           # nothing half-written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_train_cuda_absent(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_py.main(["--pde", "heat", "--device", "cuda", "--out", str(tmp_path / "run")])
    assert stop.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_train_bad_out_and_resume(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cases = [(["--pde", "heat", "--out", str(tmp_path / "file" / "run")], "is a file, not a folder"),
             (["--out", str(tmp_path / "none"), "--resume"], "does not exist"),
             (["--out", str(tmp_path / "foreign"), "--resume"], "is not a train.py checkpoint")]
    (tmp_path / "foreign").mkdir()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign" / "last.pt")
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            train_py.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["file", "foreign"]


def test_cli_exit_status_from_the_shell(tmp_path):
    # the two scripts as a user runs them (in parallel: each pays for importing torch)
    runs = [subprocess.Popen([sys.executable, script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
            for script, argv in (("train.py", ["--pde", "burgers"]),
                                 ("evaluate.py", [str(tmp_path / "missing")]))]
    for proc, message in zip(runs, ("invalid choice: 'burgers'", "does not exist")):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and message in err and err.count("\n") == 1, err


# ---- evaluate
import evaluate as evaluate_py


def test_evaluate_writes_table_metrics_gif_and_png(tiny_run, data_dir, capsys):
    out, _ = tiny_run
    metrics = evaluate_py.main([str(out), "--data-dir", data_dir, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "In-t" in printed and "Out-t" in printed and "relative MSE" in printed
    folder = out / "eval"
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["rel_mse"] == metrics["rel_mse"] and saved["frames"] == 20 and saved["n_in_t"] == 10
    assert saved["mse"]["in_t"]["out_s"] is None                     # everything observed
    assert saved["mse"]["in_t"]["all"] == pytest.approx(sum(saved["mse_vs_time"][:10]) / 10, rel=1e-4)
    assert set(saved["files"]) == {"forecast_u.gif", "mse_vs_time.png", "metrics.json"}
    from PIL import Image
    with Image.open(folder / "forecast_u.gif") as gif:
        assert gif.n_frames == 20                                    # one frame per time
    with Image.open(folder / "mse_vs_time.png") as png:
        assert png.size[0] > 100


def test_evaluate_new_mask_resolution_and_free_points(tiny_run, data_dir):
    out, _ = tiny_run
    m = evaluate_py.main([str(out), "--data-dir", data_dir, "--subsampling", "0.5", "--mask-seed", "3",
                          "--resolution", "16", "--points", "50", "--no-pictures"])
    assert m["grid"] == "16x16" and 0.3 < m["observed_fraction"] < 0.7
    assert m["mse"]["out_t"]["out_s"] is not None and m["mse"]["out_t"]["in_s"] is not None
    assert m["points"]["n"] == 50 and m["points"]["rel_mse"]["in_t"] > 0
    assert os.path.basename(os.path.dirname(m["checkpoint"])) == "heat"
    assert (out / "eval-res16-s0.5-seed3-points50" / "metrics.json").exists()


def test_forecast_matches_the_evaluation_path(tiny_run, data_dir):
    out, _ = tiny_run
    state = train_py.load_checkpoint(str(out / "best.pt"))
    model, cfg = train_py.model_from_checkpoint(state)
    test = train_py.load_dataset("heat", "test", size=cfg.size, data_dir=data_dir, n_trajectories=cfg.n_test,
                                 verbose=False)
    coords = test.coords.flatten(0, 1)                              # (N, 2) physical
    values0 = test.frames[0, 0].flatten(0, 1)                       # (N, S)
    pred = evaluate_py.forecast(model, coords, values0, test.t, coords)
    assert pred.shape == (20, cfg.size ** 2, 1)
    codes = train_py.forecast_codes(model, model.map_coords(coords), values0[None], test.t)
    torch.testing.assert_close(pred, model.decode(model.map_coords(coords), codes)[0])
    # the query points are free: a shuffled query returns the shuffled forecast
    perm = torch.randperm(len(coords), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(evaluate_py.forecast(model, coords, values0, test.t, coords[perm]), pred[:, perm])


def test_spectral_interpolation_is_exact_for_band_limited_fields():
    n = 12
    g = torch.Generator().manual_seed(0)
    points = torch.rand(40, 2, generator=g, dtype=torch.float64) * 2 - 1        # in [-1, 1]^2
    # periodic grid on [-1, 1): x_j = -1 + j h; modes below Nyquist
    axis = -1 + torch.arange(n, dtype=torch.float64) * 2 / n
    X, Y = torch.meshgrid(axis, axis, indexing="ij")

    def wave(x, y):
        return torch.sin(math_pi * 3 * x + 0.3) * torch.cos(math_pi * 2 * y) + 0.5 * torch.cos(math_pi * 5 * y)
    math_pi = torch.pi
    frames = wave(X, Y)[None, None, :, :, None]
    got = evaluate_py.interpolate(frames, torch.stack([X, Y], -1), points, "periodic")
    torch.testing.assert_close(got[0, 0, :, 0].double(), wave(points[:, 0], points[:, 1]), atol=1e-5, rtol=0)
    # cell-centred grid with zero-flux walls: cosine modes cos(pi k (x + 1) / 2)
    axis = -1 + (torch.arange(n, dtype=torch.float64) + 0.5) * 2 / n
    X, Y = torch.meshgrid(axis, axis, indexing="ij")

    def cosines(x, y):
        return torch.cos(math_pi * 3 * (x + 1) / 2) * torch.cos(math_pi * 7 * (y + 1) / 2) + torch.cos(math_pi * (x + 1) / 2)
    frames = cosines(X, Y)[None, None, :, :, None]
    got = evaluate_py.interpolate(frames, torch.stack([X, Y], -1), points, "cosine")
    torch.testing.assert_close(got[0, 0, :, 0].double(), cosines(points[:, 0], points[:, 1]), atol=1e-5, rtol=0)


def test_evaluate_bad_input_exits_2(tiny_run, tmp_path, data_dir, capsys):
    out, _ = tiny_run
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    cases = [([str(tmp_path / "missing.pt")], "does not exist"),
             ([str(tmp_path / "notes.pt")], "is not a train.py checkpoint"),
             ([str(tmp_path / "other.pt")], "is not a train.py checkpoint"),
             ([str(out), "--subsampling", "2"], "rate 2.0 is outside (0, 1]"),
             ([str(out), "--resolution", "2"], "--resolution 2"),
             ([str(out), "--out", str(tmp_path / "notes.pt" / "x")], "is a file, not a folder")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            evaluate_py.main(argv + ["--data-dir", data_dir])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1, err
