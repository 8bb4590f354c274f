"""seqhead learns what the features carry: the loss's sign, the run directory's best epoch, the weights' digest,
Ctrl-C before the first epoch, and sweeps in several processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from seqhead import PredictOptions, SweepOptions, TrainOptions, predict, sweep, train
from seqhead.data import DataError
from seqhead.infer import load_run
from seqhead.metrics import pearson, pearson_loss
from seqhead.sweep import parse_grid
from conftest import signal_after
from test_features_api import synthetic_video, write_features

ROOT = Path(__file__).parents[1]


def carried_file(folder: Path, n_train: int, n_val: int, frames: int, noise: float, seed: int = 0) -> tuple[Path, Path]:
    """A features file (real store, format v1) whose label `Target` is carried by the valence row: each video's
    valence sits around 2·y − 1 with Gaussian noise of sd `noise`; every other row is unrelated. labels.csv beside
    it names the split."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    y = rng.uniform(0, 1, n)
    videos = {}
    for i in range(n):
        v = synthetic_video(frames, seed + 1000 + i)
        v["features"][:, 0] = np.clip(2 * y[i] - 1 + rng.normal(0, noise, frames), -1, 1)
        videos[f"v{i:04d}.mp4"] = v
    h5 = write_features(folder / "feat.h5", videos)
    pd.DataFrame({"File_ID": [f"v{i:04d}" for i in range(n)], "Target": y.round(5),
                  "Split": ["Train"] * n_train + ["Val"] * n_val}).to_csv(folder / "labels.csv", index=False)
    return h5, folder / "labels.csv"


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
    return carried_file(tmp_path_factory.mktemp("carried"), 64, 32, 12, noise=0.6)


def test_pearson_loss_is_one_minus_r_for_predictions_that_vary():
    y = torch.tensor([[0.1, 1.0], [0.4, 2.0], [0.3, 0.5], [0.9, 3.0]])
    assert pearson_loss(3 * y + 1, y).item() == pytest.approx(0.0, abs=1e-5)  # perfectly correlated
    assert pearson_loss(-y, y).item() == pytest.approx(2.0, abs=1e-5)  # anti-correlated
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    want = 1 - pearson(pred.numpy(), y.numpy()).mean()
    assert pearson_loss(pred, y).item() == pytest.approx(want, abs=1e-5)


def test_training_learns_a_target_the_features_carry(carried, tmp_path):
    """A tiny head reaches a validation Pearson a constant or an anti-correlated model never would, and
    its calibration keeps the sign: a flipped loss learns r → −1 on training videos, which a negative slope would
    turn back into a positive validation r."""
    h5, labels = carried
    res = train(TrainOptions(h5=h5, out=tmp_path / "run", labels=labels, head="mean", hidden=8, fc=8, epochs=3,
                             batch_size=8, lr=3e-3, threads=1, members=1))
    assert res.val_mean_pearson > 0.5, res.history
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["calibration"]["slope"][0] > 0, cfg["calibration"]
    # the raw (uncalibrated) network output already correlates positively with the labels
    run = load_run(res.run_dir)
    raw = predict(PredictOptions(res.run_dir, h5, long_videos="truncate")).table
    truth = pd.read_csv(labels, dtype={"File_ID": str}).set_index("File_ID")
    val = truth[truth.Split == "Val"].index
    got = raw.set_index("File_ID").loc[val, "Target"].to_numpy()
    assert run.config["calibration"]["slope"][0] > 0
    assert pearson(got[:, None], truth.loc[val, ["Target"]].to_numpy())[0] > 0.5


def test_ridge_learns_a_single_target(carried, tmp_path):
    """One target: sklearn drops the target axis, and (N,) predictions against (N, 1) labels broadcast into a
    meaningless Pearson. The ridge baseline must learn the carried target like any head, and predict must agree."""
    h5, labels = carried
    res = train(TrainOptions(h5=h5, out=tmp_path / "run", labels=labels, head="ridge", threads=1, members=1))
    assert res.val_mean_pearson > 0.5, res.val_mean_pearson
    table = predict(PredictOptions(res.run_dir, h5, long_videos="truncate")).table
    assert table.shape[0] == 96 and table["Target"].notna().all()


def test_run_directory_keeps_the_best_epoch_not_the_last(tmp_path):
    """Few noisy training videos and a high learning rate: validation peaks early, then the head overfits. The
    run directory's weights must score what history.csv records for the best epoch."""
    h5, labels = carried_file(tmp_path, 24, 32, 10, noise=1.2, seed=3)
    res = train(TrainOptions(h5=h5, out=tmp_path / "run", labels=labels, hidden=16, fc=16, epochs=8, patience=8,
                             batch_size=4, lr=3e-2, threads=1, seed=1, members=1))
    hist = pd.read_csv(res.run_dir / "history.csv")
    assert res.best_epoch < res.epochs_run == len(hist), hist  # the premise: the last epoch is not the best
    assert hist.val_mean_pearson.iloc[-1] < hist.val_mean_pearson.max() - 0.02, hist
    best_r = hist.val_mean_pearson[res.best_epoch - 1]
    table = predict(PredictOptions(res.run_dir, h5, long_videos="truncate")).table.set_index("File_ID")
    truth = pd.read_csv(labels, dtype={"File_ID": str}).set_index("File_ID")
    val = truth[truth.Split == "Val"].index
    r = pearson(table.loc[val, ["Target"]].to_numpy(), truth.loc[val, ["Target"]].to_numpy())[0]
    slope = json.loads((res.run_dir / "config.json").read_text())["calibration"]["slope"][0]
    assert r * np.sign(slope) == pytest.approx(best_r, abs=1e-4), (r, best_r, hist)
    assert json.loads((res.run_dir / "metrics.json").read_text())["best_epoch"] == res.best_epoch


def test_predict_refuses_weights_whose_digest_differs_from_config(carried, tmp_path):
    h5, labels = carried
    a = train(TrainOptions(h5=h5, out=tmp_path / "a", labels=labels, head="mean", hidden=8, fc=8, epochs=1,
                           batch_size=8, threads=1, members=1)).run_dir
    b = train(TrainOptions(h5=h5, out=tmp_path / "b", labels=labels, head="mean", hidden=8, fc=8, epochs=1,
                           batch_size=8, threads=1, seed=1, members=1)).run_dir
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())  # same shapes, other weights
    with pytest.raises(DataError, match="SHA-256 differs from the one config.json names"):
        predict(PredictOptions(a, h5))
    from typer.testing import CliRunner

    from seqhead.cli import app

    r = CliRunner().invoke(app, ["predict", str(a), str(h5), "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and "SHA-256 differs" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "p.csv").exists()


def test_ctrl_c_before_the_first_epoch_ends_keeps_nothing(tmp_path):
    """A real `seqhead train` process, SIGINT during its first epoch: one clear line, exit code 130, no traceback,
    and no half-written run directory."""
    h5, labels = carried_file(tmp_path, 200, 8, 60, noise=0.5)  # 100 steps of 2 videos: time to interrupt
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "seqhead.cli", "train", str(h5), "--labels", str(labels),
                             "--out", str(run), "--batch-size", "2", "--epochs", "5"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    err = signal_after(proc, "epoch 1/5: step")  # still in its first epoch when interrupted
    assert not any(s.startswith("epoch 1/5: 100 steps") for s in err.splitlines()), err  # the epoch never ended
    assert proc.returncode == 130, err
    assert "interrupted before the first epoch ended: nothing kept in" in " ".join(err.split()), err
    assert "Traceback" not in err
    assert not run.exists()


def test_sweep_in_two_processes_gives_what_one_process_gives(carried, tmp_path):
    h5, labels = carried
    base = TrainOptions(h5=h5, out=tmp_path, labels=labels, hidden=8, fc=8, epochs=2, batch_size=8, threads=1,
                        members=1)  # as `seqhead sweep` does: the seeds are the sweep's own axis
    variants = parse_grid(["head=mean,ridge"])
    one = sweep(SweepOptions(base, tmp_path / "one", variants, seeds=(0,), workers=1))
    two = sweep(SweepOptions(base, tmp_path / "two", variants, seeds=(0,), workers=2))
    assert one.n_run == two.n_run == 2
    a, b = one.runs.set_index("config"), two.runs.set_index("config")
    assert sorted(a.index) == sorted(b.index) and len(a) == 2
    for c in a.index:
        assert a.loc[c, "val_mean_pearson"] == pytest.approx(b.loc[c, "val_mean_pearson"], abs=1e-6), c
        assert Path(b.loc[c, "run_dir"]).is_relative_to(tmp_path / "two")
        cfg = json.loads((Path(b.loc[c, "run_dir"]) / "config.json").read_text())
        assert cfg["model"]["head"] == c.split("=")[1], c  # each row names its own run
    assert list(one.ranked.config) == list(two.ranked.config)
    assert (tmp_path / "two" / "ranked.csv").exists()
