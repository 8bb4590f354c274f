"""Traps a new seqhead user hit: overwriting a run, predicting on features made otherwise, tiny validation sets,
file modes, the simulator's size, and start-up time (torch loading before the arguments are checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest
from typer.testing import CliRunner

from seqhead import PredictOptions, SimulateOptions, TrainOptions, predict, train
from seqhead.cli import app
from seqhead.data import DataError

from conftest import TINY

ROOT = Path(__file__).parents[1]


def test_a_run_is_never_replaced_without_overwrite(sim, tmp_path):
    run = tmp_path / "run"
    train(TrainOptions(h5=sim.h5, out=run, head="ridge", **TINY))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(DataError, match="already exists and is not empty: pass --overwrite"):
        train(TrainOptions(h5=sim.h5, out=run, head="mean", **TINY))
    r = CliRunner().invoke(app, ["train", str(sim.h5), "--out", str(run), "--hidden", "8"])
    assert r.exit_code == 2 and "--overwrite" in r.output and len(r.output.strip().splitlines()) <= 2, r.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written, nothing lost
    res = train(TrainOptions(h5=sim.h5, out=run, head="mean", overwrite=True, **TINY))
    assert json.loads((run / "config.json").read_text())["model"]["head"] == "mean" and res.best_epoch >= 1
    # An ensemble replaced by a single run leaves no member behind that predict could mistake for part of it.
    train(TrainOptions(h5=sim.h5, out=run, overwrite=True, **{**TINY, "members": 2}))
    assert (run / "seed1" / "config.json").exists()
    train(TrainOptions(h5=sim.h5, out=run, head="ridge", overwrite=True, **TINY))
    assert not (run / "seed0").exists() and not (run / "seed1").exists()
    assert "members" not in json.loads((run / "config.json").read_text())


def _with_attrs(src: Path, dst: Path, **attrs) -> Path:
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "a") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
    return dst


def test_predict_refuses_features_made_otherwise(sim, tmp_path):
    run = train(TrainOptions(h5=sim.h5, out=tmp_path / "run", head="mean", **TINY)).run_dir
    prov = json.loads((run / "config.json").read_text())["provenance"]
    assert prov["model"] == "simulated" and prov["sampling"] == {"fps": None}
    assert prov["detector"]["name"] == "simulated" and {"model_sha256", "alignment", "movement"} <= set(prov)
    assert predict(PredictOptions(run, sim.h5)).warnings == ()  # the training file itself

    other = _with_attrs(sim.h5, tmp_path / "10fps.h5", sampling=json.dumps({"fps": 10.0}))
    with pytest.raises(DataError, match=r"sampling: run \{'fps': None\}, file \{'fps': 10.0\}.*--ignore-provenance"):
        predict(PredictOptions(run, other))
    res = predict(PredictOptions(run, other, check_provenance=False))
    assert len(res.table) == sum(sim.n_videos) and "sampling" in res.warnings[0]
    r = CliRunner().invoke(app, ["predict", str(run), str(other), "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and "--ignore-provenance" in r.output and not (tmp_path / "p.csv").exists(), r.output
    r = CliRunner().invoke(app, ["predict", str(run), str(other), "-o", str(tmp_path / "p.csv"),
                                 "--ignore-provenance"])
    assert r.exit_code == 0 and "warning" in r.output and (tmp_path / "p.csv").exists(), r.output
    # Another model's features: refused as well.
    swapped = _with_attrs(sim.h5, tmp_path / "model.h5", model="mma_other", model_sha256="ab" * 32)
    with pytest.raises(DataError, match="model: run 'simulated', file 'mma_other'"):
        predict(PredictOptions(run, swapped))


def test_a_tiny_validation_set_does_not_pick_the_epoch(sim, tmp_path):
    df = pd.read_csv(sim.labels, dtype={"File_ID": str})
    val = df.index[df.Split == "Val"]
    df.loc[val[6:], "Split"] = "Test"  # 6 validation videos left
    labels = tmp_path / "labels.csv"
    df.to_csv(labels, index=False)
    res = train(TrainOptions(h5=sim.h5, out=tmp_path / "run", labels=labels, **{**TINY, "epochs": 3}))
    assert res.n_val == 6 and res.epochs_run == 3 and res.best_epoch == 3  # every epoch run, the last one kept
    assert "only 6 videos" in res.warnings[0]
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    assert metrics["n_val"] == 6 and metrics["n_train"] == res.n_train and metrics["selection"].startswith("last")
    r = CliRunner().invoke(app, ["train", str(sim.h5), "--labels", str(labels), "--out", str(tmp_path / "cli"),
                                 "--hidden", "8", "--fc", "4", "--epochs", "2", "--batch-size", "8", "--seeds", "1"])
    text = " ".join(r.output.split())  # rich wraps lines at the terminal's width
    assert r.exit_code == 0 and "only 6 videos" in text and f"(6 videos, {res.n_train} for training)" in text, text
    # Enough validation videos: early stopping as before.
    full = train(TrainOptions(h5=sim.h5, out=tmp_path / "full", **TINY))
    assert full.warnings == () and json.loads((full.run_dir / "metrics.json").read_text())["selection"].startswith(
        "best")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_honour_the_umask(sim, tmp_path, umask):
    old = os.umask(umask)
    try:
        run = train(TrainOptions(h5=sim.h5, out=tmp_path / "run", head="mean", **TINY)).run_dir
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in run.iterdir()}
    assert set(modes) >= {"model.safetensors", "config.json", "metrics.json", "history.csv"}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_simulate_is_small_by_default_and_says_its_size_first(tmp_path):
    assert SimulateOptions(tmp_path / "x.h5").scale <= 0.05
    out = tmp_path / "s.h5"
    r = CliRunner().invoke(app, ["simulate", str(out), "--scale", "0.003", "--max-len", "60"])
    assert r.exit_code == 0, r.output
    first = r.output.splitlines()[0]
    assert first.startswith("writing ") and "MB" in first, r.output
    expected = float(first.split("about ")[1].split(" MB")[0])
    assert 0.7 < expected / (out.stat().st_size / 1e6) < 1.3, (expected, out.stat().st_size)


def test_simulate_never_replaces_a_file_without_overwrite(tmp_path):
    a, labels = tmp_path / "a.h5", tmp_path / "labels.csv"
    small = ["--scale", "0.003", "--max-len", "20"]
    assert CliRunner().invoke(app, ["simulate", str(a), *small]).exit_code == 0
    before = {p: p.read_bytes() for p in (a, labels)}
    again = CliRunner().invoke(app, ["simulate", str(a), *small, "--seed", "1"])
    assert again.exit_code == 2 and len(again.output.strip().splitlines()) == 1, again.output
    assert str(a) in again.output and "--overwrite" in again.output, again.output
    # A second file in the same folder would take the first one's labels.csv: refused too, before writing anything.
    b = CliRunner().invoke(app, ["simulate", str(tmp_path / "b.h5"), *small])
    assert b.exit_code == 2 and str(labels) in b.output and not (tmp_path / "b.h5").exists(), b.output
    assert {p: p.read_bytes() for p in (a, labels)} == before
    replaced = CliRunner().invoke(app, ["simulate", str(a), *small, "--seed", "1", "--overwrite"])
    assert replaced.exit_code == 0 and labels.read_bytes() != before[labels], replaced.output


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_the_command_line_checks_its_arguments_before_loading_torch(tmp_path):
    r = _python(f"""
import sys
import seqhead, seqhead.cli, seqhead.train, seqhead.predict, seqhead.sweep, seqhead.evaluate
import seqhead.infer, seqhead.metrics
assert 'torch' not in sys.modules, 'importing the command line loaded torch'
try:
    seqhead.cli.app(['train', {str(tmp_path / 'x.h5')!r}, '--labels', {str(tmp_path / 'missing.csv')!r}])
except SystemExit as e:
    print('exit', e.code)
print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')
""")
    assert "exit 2" in r.stdout and "torch not loaded" in r.stdout, r.stdout + r.stderr
    assert "missing.csv: no such label file" in r.stderr, r.stderr
