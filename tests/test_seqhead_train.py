"""seqhead end to end: train → predict → evaluate (CLI), calibration, long videos, run directory, sweep."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from seqhead import (EvaluateOptions, PredictOptions, SweepOptions, TrainOptions, Variant, evaluate, predict, sweep,
                     train)
from seqhead.cli import app
from seqhead.data import read_features
from seqhead.infer import load_run, windows
from seqhead.metrics import fit_calibration, pearson
from seqhead.sweep import PRESETS, parse_grid

from conftest import TINY, signal_after


def test_calibration_recovers_the_labels_scale():
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 1, (200, 3)).astype(np.float32)
    raw = (y - 0.5) * np.array([40.0, -3.0, 0.01]) + np.array([7.0, -2.0, 100.0])  # arbitrary scale, offset, sign
    slope, intercept = fit_calibration(raw.astype(np.float32), y)
    np.testing.assert_allclose(raw * slope + intercept, y, atol=1e-3)
    slope, intercept = fit_calibration(np.ones((5, 1), np.float32), y[:5, :1])  # constant output: the labels' mean
    assert slope[0] == 0 and np.isclose(intercept[0], y[:5, 0].mean())


def test_tiny_train_predict_evaluate_cli(sim, tmp_path):
    runner = CliRunner()
    run = tmp_path / "runs" / "mrnn"
    r = runner.invoke(app, ["train", str(sim.h5), "--out", str(run), "--head", "mrnn", "--hidden", "8", "--fc", "4",
                            "--epochs", "2", "--batch-size", "8", "--threads", "1", "--seeds", "1"])  # labels beside
    assert r.exit_code == 0, r.output
    for f in ("model.safetensors", "config.json", "metrics.json", "history.csv", "learning_curve.png"):
        assert (run / f).exists(), f
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["head"] == "mrnn" and cfg["t"] <= 40 and len(cfg["features"]["names"]) == 26
    assert cfg["targets"][0] == "Adoration" and cfg["options"]["loss"] == "pearson" and cfg["id_form"] == "stem"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["val"]["pearson"]) == set(cfg["targets"]) and -1 <= metrics["val"]["mean_pearson"] <= 1

    preds = tmp_path / "predictions.csv"
    r = runner.invoke(app, ["predict", str(run), str(sim.h5), "-o", str(preds)])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(preds, dtype={"File_ID": str})
    assert list(table.columns) == ["File_ID"] + cfg["targets"] and len(table) == sum(sim.n_videos)
    assert table["File_ID"].is_unique and np.isfinite(table[cfg["targets"]].to_numpy()).all()
    r = runner.invoke(app, ["evaluate", str(preds), "--labels", str(sim.labels), "--split", "val"])
    assert r.exit_code == 0 and "mean" in r.output, r.output
    res = evaluate(EvaluateOptions(preds, sim.labels, split="val"))
    assert res.n == sim.n_videos[1] and np.isclose(res.mean_pearson, metrics["val"]["mean_pearson"], atol=1e-4)


def test_cli_errors_are_clear(sim, tmp_path):
    r = CliRunner().invoke(app, ["train", str(sim.h5), "--labels", str(tmp_path / "nope.csv")])
    assert r.exit_code == 2 and "no such label file" in r.output


def test_unmatched_ids_name_the_cli_flag_on_the_command_line(sim, tmp_path):
    fewer = tmp_path / "fewer.csv"
    pd.read_csv(sim.labels, dtype={"File_ID": str}).iloc[3:].to_csv(fewer, index=False)
    r = CliRunner().invoke(app, ["train", str(sim.h5), "--labels", str(fewer), "--out", str(tmp_path / "r")])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "have no row" in text and "pass --allow-unmatched" in text, r.output
    assert "allow_unmatched=True" not in text


def test_predictions_are_on_the_labels_scale(sim, tmp_path):
    res = train(TrainOptions(h5=sim.h5, out=tmp_path / "r", head="mean", **TINY))
    pred = predict(PredictOptions(res.run_dir, sim.h5)).table
    labels = pd.read_csv(sim.labels, dtype={"File_ID": str}).set_index("File_ID")
    train_ids = labels.index[labels.Split == "Train"]
    p = pred.set_index("File_ID").loc[train_ids, list(res.targets)].to_numpy()
    y = labels.loc[train_ids, list(res.targets)].to_numpy()
    # The affine fit on the training videos: same mean, and slope of the residual on p is zero.
    np.testing.assert_allclose(p.mean(0), y.mean(0), atol=1e-3)
    np.testing.assert_allclose(((p - p.mean(0)) * (y - p)).mean(0), 0, atol=1e-4)


def test_windows_cover_every_frame():
    seq = np.arange(23)[:, None].astype(np.float32)
    w = windows(seq, 10)
    assert [len(x) for x in w] == [10, 10, 10] and w[-1][-1, 0] == 22 and w[0][0, 0] == 0
    assert len(windows(seq[:10], 10)) == 1


@pytest.mark.parametrize("head", ["mrnn", "attn", "ridge"])
def test_long_videos_never_crash(sim, tmp_path, head):
    res = train(TrainOptions(h5=sim.h5, out=tmp_path / head, head=head, t=10, **TINY))
    run = load_run(res.run_dir)
    videos, _ = read_features(sim.h5)
    long = [v.frames for v in videos if len(v.frames) > 25][:3]
    assert long and run.config["t"] == 10
    dev = torch.device("cpu")
    win = run.predict_seqs(long, "windows", dev)
    cut = run.predict_seqs(long, "truncate", dev)
    assert win.shape == cut.shape == (3, 7) and np.isfinite(win).all()
    np.testing.assert_allclose(cut, run.predict_seqs([s[:10] for s in long], "truncate", dev), atol=1e-5)
    # windows: the calibrated mean of the windows' raw outputs (calibration is affine, so mean of calibrated).
    each = [run.predict_seqs(windows(s, 10), "truncate", dev).mean(0) for s in long]
    np.testing.assert_allclose(win, np.stack(each), atol=1e-5)
    out = predict(PredictOptions(res.run_dir, sim.h5, long_videos="truncate"))
    assert out.n_long > 0 and len(out.table) == sum(sim.n_videos)


def test_sweep_is_resumable_and_ranked(sim, tmp_path):
    base = TrainOptions(h5=sim.h5, out=tmp_path, **TINY)
    variants = parse_grid(["head=mean,ridge"])
    assert [v.changes for v in variants] == [(("head", "mean"),), (("head", "ridge"),)]
    first = sweep(SweepOptions(base, tmp_path / "s", variants, seeds=(0, 1)))
    assert first.n_run == 4 and first.n_reused == 0
    assert list(first.ranked["rank"]) == [1, 2]
    assert first.ranked["val_mean_pearson"].is_monotonic_decreasing
    again = sweep(SweepOptions(base, tmp_path / "s", variants + (Variant("fc 2", (("head", "mean"), ("fc", 2))),),
                               seeds=(0, 1)))
    assert again.n_run == 2 and again.n_reused == 4
    assert (tmp_path / "s" / "ranked.csv").exists() and len(pd.read_csv(tmp_path / "s" / "results.csv")) == 6
    assert len(PRESETS["table4"]) == 10 and len(PRESETS["table3"]) == 11  # 7 of the paper + 4 with movement


def test_pearson_metric():
    y = np.random.default_rng(1).normal(size=(50, 2))
    np.testing.assert_allclose(pearson(2 * y + 1, y), [1, 1])
    np.testing.assert_allclose(pearson(np.c_[-y[:, 0], np.ones(50)], y), [-1, 0])


@pytest.mark.parametrize("head, kw", [("ridge", {}), ("attn", {}), ("attn", dict(stride=2, rnn="conv", bucket=True))])
def test_run_dir_reproduces_validation_metrics(sim, tmp_path, head, kw):
    res = train(TrainOptions(h5=sim.h5, out=tmp_path / head, head=head, **TINY, **kw))
    if kw:  # the stride is part of the run: t counts strided frames, and predict strides the same way
        cfg = json.loads((res.run_dir / "config.json").read_text())
        longest = max(len(v.frames) for v in read_features(sim.h5)[0])
        assert cfg["features"]["stride"] == 2 and cfg["t"] <= (longest + 1) // 2 and cfg["model"]["rnn"] == "conv"
    # Validation videos longer than t are cut during training; predict the same way to compare.
    predict(PredictOptions(res.run_dir, sim.h5, tmp_path / "p.csv", long_videos="truncate"))
    ev = evaluate(EvaluateOptions(tmp_path / "p.csv", sim.labels, split="val"))
    assert np.isclose(ev.mean_pearson, res.val_mean_pearson, atol=1e-4)
    for k, v in res.val_pearson.items():
        assert np.isclose(ev.pearson[k], v, atol=1e-4)


@pytest.mark.parametrize("bucket", [False, True])
def test_batches_cover_every_video_once_and_never_leave_one_alone(bucket):
    from seqhead.data import batches

    rng = np.random.default_rng(0)
    for n in range(2, 40):
        for size in (2, 4, 16):
            out = batches(rng.integers(1, 480, n), size, rng, bucket)
            assert sorted(np.concatenate(out).tolist()) == list(range(n)), (n, size)
            assert min(len(b) for b in out) >= 2, (n, size)


def test_threads_and_device_do_not_change_a_sweep_runs_identity(sim, tmp_path):
    variants = parse_grid(["head=mean"])
    base = TrainOptions(h5=sim.h5, out=tmp_path, **TINY)
    first = sweep(SweepOptions(replace(base, threads=1, device="cpu"), tmp_path / "s", variants))
    again = sweep(SweepOptions(replace(base, threads=2, device="auto"), tmp_path / "s", variants, devices=("cpu",)))
    assert first.n_run == 1 and again.n_run == 0 and again.n_reused == 1
    assert list(again.runs["run_dir"]) == list(first.runs["run_dir"])
    assert len(list((tmp_path / "s" / "runs").iterdir())) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_cuda_is_one_clear_line(sim, tmp_path):
    runner = CliRunner()
    res = train(TrainOptions(h5=sim.h5, out=tmp_path / "run", head="ridge", **TINY))
    for args in (["train", str(sim.h5), "--out", str(tmp_path / "r"), "--device", "cuda"],
                 ["predict", str(res.run_dir), str(sim.h5), "-o", str(tmp_path / "p.csv"), "--device", "cuda:0"],
                 ["sweep", str(sim.h5), "--out", str(tmp_path / "s"), "--grid", "head=mean", "--devices", "cuda:0"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args[0], r.output)
        assert "sees no CUDA GPU" in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) <= 2, r.output  # one message (a narrow terminal may wrap it once)
    assert not (tmp_path / "r").exists() and not (tmp_path / "s" / "runs").exists()


def test_ctrl_c_keeps_the_best_epoch_and_progress_is_plain_text(sim, tmp_path):
    """A real `seqhead train` process, interrupted by SIGINT after its second epoch began; stderr is a pipe."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "seqhead.cli", "train", str(sim.h5), "--out", str(run),
                             "--hidden", "8", "--fc", "4", "--batch-size", "8", "--epochs", "100000", "--seeds", "1",
                             "--patience", "100000"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    err = signal_after(proc, "epoch 3")
    assert proc.returncode == 130, err
    assert "holds the best epoch so far" in err and "seqhead predict" in err, err
    # Progress: steps within an epoch and seconds per epoch, as plain lines.
    assert "epoch 1/100000: step 4/8 (50%)" in err and "epoch 2/100000: 8 steps in" in err and "ms/step" in err, err
    assert "\r" not in err and "\x1b" not in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["epochs_run"] >= 2 and metrics["best_epoch"] >= 1
    hist = pd.read_csv(run / "history.csv")
    assert np.isclose(hist.val_mean_pearson.max(), hist.val_mean_pearson[metrics["best_epoch"] - 1])
    pred = predict(PredictOptions(run, sim.h5, tmp_path / "p.csv", long_videos="truncate"))
    assert len(pred.table) == sum(sim.n_videos)
    ev = evaluate(EvaluateOptions(tmp_path / "p.csv", sim.labels, split="val"))
    assert np.isclose(ev.mean_pearson, metrics["val"]["mean_pearson"], atol=1e-4)


def test_cli_defaults_are_the_libraries():
    """`seqhead train`/`sweep` without options train what TrainOptions() trains."""
    import typer
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(TrainOptions)}
    click_app = typer.main.get_command(app)
    for cmd in ("train", "sweep"):
        for p in click_app.commands[cmd].params:
            if p.name in defaults and p.name not in ("h5", "out", "targets"):
                assert p.default == defaults[p.name], (cmd, p.name, p.default, defaults[p.name])
