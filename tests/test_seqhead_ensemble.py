"""Ensembles as one run, the moving average of weights, and the simulator's families."""

import json

import h5py
import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from seqhead import EvaluateOptions, PredictOptions, SimulateOptions, TrainOptions, evaluate, predict, simulate, train
from seqhead.cli import app
from seqhead.data import read_features
from seqhead.model import ModelConfig, SeqHead
from seqhead.fit import WeightAverage

from conftest import TINY


def test_an_ensemble_is_one_run_that_predict_averages(sim, tmp_path):
    run = tmp_path / "ens"
    r = CliRunner().invoke(app, ["train", str(sim.h5), "--out", str(run), "--seeds", "3", "--seed", "4", "--hidden",
                                 "8", "--fc", "4", "--epochs", "2", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "ensemble member 3/3" in text and "ensemble of 3: validation (19 videos, 63 for training)" in text, text
    config = json.loads((run / "config.json").read_text())
    assert config["members"] == ["seed4", "seed5", "seed6"] and "provenance" in config
    seeds = [json.loads((run / m / "config.json").read_text())["options"]["seed"] for m in config["members"]]
    assert seeds == [4, 5, 6]
    whole = predict(PredictOptions(run, sim.h5, tmp_path / "p.csv"))
    parts = [predict(PredictOptions(run / m, sim.h5)).table for m in config["members"]]
    targets = config["targets"]
    assert whole.members == 3 and not np.allclose(parts[0][targets], parts[1][targets])
    np.testing.assert_allclose(whole.table[targets], np.mean([p[targets] for p in parts], axis=0), atol=1e-5)
    metrics = json.loads((run / "metrics.json").read_text())
    ev = evaluate(EvaluateOptions(tmp_path / "p.csv", sim.labels, split="val"))
    assert np.isclose(ev.mean_pearson, metrics["val"]["mean_pearson"], atol=1e-4)
    assert set(metrics["members"]) == set(config["members"]) and metrics["n_val"] == 19


def test_weight_average_follows_the_weights_with_its_decay():
    torch.manual_seed(0)
    model = SeqHead(ModelConfig(n_features=3, n_targets=2, t=5, head="attn", rnn="conv", hidden=4, fc=2))
    start = [p.detach().clone() for p in model.parameters()]
    avg = WeightAverage(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.update(model)  # first step: warm-up decay min(0.9, 2 / 11)
    d = 2 / 11
    for a, s in zip(avg.model.parameters(), start):
        torch.testing.assert_close(a, s + (1 - d))
    for _ in range(200):
        avg.update(model)
    for a, s in zip(avg.model.parameters(), start):
        torch.testing.assert_close(a, s + 1, atol=1e-4, rtol=0)


def test_the_moving_average_is_what_the_run_keeps(sim, tmp_path):
    def weights(name, **kw):
        run = train(TrainOptions(h5=sim.h5, out=tmp_path / name, **{**TINY, "epochs": 1, **kw})).run_dir
        return load_file(str(run / "model.safetensors"))

    plain, again, averaged = weights("a"), weights("b"), weights("c", ema=0.9)
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # training is deterministic here
    assert not all(torch.equal(plain[k], averaged[k]) for k in plain)


def _frames(h5, key):
    with h5py.File(h5) as f:
        return f["videos"][key]["features"][()].T  # (K, 26)


def test_simulator_families(tmp_path):
    kw = dict(scale=0.003, max_len=80, min_len=40, seed=3, movement=False)
    # late: the labelled episode lies in the last 30 %; the middle of the video carries nothing of the signal.
    on = simulate(SimulateOptions(tmp_path / "on.h5", tmp_path / "on.csv", setting="late", **kw))
    off = simulate(SimulateOptions(tmp_path / "off.h5", tmp_path / "off.csv", setting="late", signal=0.0, **kw))
    with h5py.File(on.h5) as f:
        keys = list(f["videos"])
    late_moves = 0
    for key in keys[:10]:
        a, b = _frames(on.h5, key), _frames(off.h5, key)
        K = len(a)
        diff = np.nan_to_num(np.abs(a - b)).max(axis=1)  # (K,)
        assert diff[int(0.5 * K) + 1:int(0.7 * K)].max() < 1e-6, key
        late_moves += diff[int(0.7 * K):].max() > 1e-3
    assert late_moves >= 8
    # subject: 2 s to 5 min at 4 frames per second, long missing-face gaps, labels that depend on the subject.
    sub = simulate(SimulateOptions(tmp_path / "sub.h5", tmp_path / "sub.csv", setting="subject",
                                   **{**kw, "scale": 0.01}))
    videos, _ = read_features(sub.h5)
    lengths = np.array([v.n_total for v in videos])
    assert lengths.min() >= 8 and lengths.max() <= 1200 and lengths.max() > 400 and np.median(lengths) < 300
    assert np.mean([v.n_face < 0.7 * v.n_total for v in videos]) > 0.05
    # label noise: the same features, noisier labels.
    clean = simulate(SimulateOptions(tmp_path / "c.h5", tmp_path / "c.csv", **kw))
    noisy = simulate(SimulateOptions(tmp_path / "n.h5", tmp_path / "n.csv", label_noise=0.2, **kw))
    np.testing.assert_array_equal(_frames(clean.h5, keys[0]), _frames(noisy.h5, keys[0]))
    yc = pd.read_csv(clean.labels).iloc[:, 1:8].to_numpy()
    yn = pd.read_csv(noisy.labels).iloc[:, 1:8].to_numpy()
    assert 0.1 < np.std(yn - yc) < 0.2 and yn.min() >= 0 and yn.max() <= 1
    # groups: each group of values moves in episodes of its own targets, at their own times (in the episode
    # setting one episode moves them all at once).
    def apart(setting):
        on = simulate(SimulateOptions(tmp_path / f"{setting}1.h5", tmp_path / f"{setting}1.csv", setting=setting,
                                      **kw))
        off = simulate(SimulateOptions(tmp_path / f"{setting}0.h5", tmp_path / f"{setting}0.csv", setting=setting,
                                       signal=0.0, **kw))
        n = 0
        for key in keys[:10]:
            d = np.nan_to_num(np.abs(_frames(on.h5, key) - _frames(off.h5, key)))
            n += not np.array_equal(d[:, :9].max(1) > 1e-6, d[:, 9:17].max(1) > 1e-6)
        return n

    assert apart("groups") >= 8 and apart("episode") == 0
