"""Training from named datasets (training.sources): what `affextract train` runs, on a FER+-layout file and a
blendshape cache the test writes."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from affextract.cli import app
from affextract.training.datasets import FERPLUS_VOTES, DatasetError
from affextract.model import MMAConfig
from affextract.schema import AUS, BLENDSHAPE_NAMES
from affextract.training.teacher import TeacherOptions
from affextract.training.augment import Augment
from affextract.training.sources import Sources, TeacherCache, load_sources, train_from_sources
from affextract.training.train import TrainOptions

TINY = MMAConfig(input_size=16, source_size=None, stem_width=8, widths=(8, 16), blocks=(1, 1), embed_dim=16, dropout=0.0)
RAW = TeacherOptions(calibration={}, distrust=())  # coefficients as they are
JAW = AUS.index(26)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A FER+-layout file (32 train, 16 valid rows: happiness bright on top, sadness at the bottom) and its blendshape
    cache: jawOpen = row / 100; rows 5 and 40 are faces the mesh missed (presence 0.2)."""
    d = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    n = 48
    cls = np.arange(n) % 2
    images = rng.integers(0, 60, (n, 48, 48)).astype(np.uint8)
    images[cls == 0, :20] += 180
    images[cls == 1, 28:] += 180
    votes = np.zeros((n, len(FERPLUS_VOTES)), np.uint8)
    votes[cls == 0, FERPLUS_VOTES.index("happiness")] = 10
    votes[cls == 1, FERPLUS_VOTES.index("sadness")] = 10
    with h5py.File(d / "f.h5", "w") as f:
        f["images"], f["votes"] = images, votes
        f["split"] = np.array(["train"] * 32 + ["valid"] * 16, dtype=h5py.string_dtype())
    blend = np.zeros((n, 52), np.float32)
    blend[:, BLENDSHAPE_NAMES.index("jawOpen")] = np.arange(n) / 100
    presence = np.full(n, 0.9, np.float32)
    presence[[5, 40]] = 0.2
    np.savez(d / "c.npz", blendshapes=blend, presence=presence, names=np.array(BLENDSHAPE_NAMES))
    return d / "f.h5", d / "c.npz"


def test_teacher_cache_fills_train_and_val_sets_with_its_options(toy):
    h5, cache = toy
    sources = Sources((f"ferplus:{h5}:train",), (f"ferplus:{h5}:valid",), True, TeacherCache(cache, RAW, 0.5))
    (tr,), (va,), meta = load_sources(sources)
    want = np.arange(32) / 100
    want[5] = np.nan  # presence below min_presence: no teacher, L_DM covers the face
    np.testing.assert_allclose(tr.teacher_au[:, JAW], want, atol=1e-6)
    assert np.isnan(va.teacher_au[8, JAW]) and va.teacher_au[0, JAW] == pytest.approx(0.32)
    assert np.isfinite(tr.va).all()  # derive_va
    assert meta == {"derived_va": True, "teacher": {"cache": str(cache), "min_presence": 0.5,
                                                    "options": {"calibration": {}, "distrust": ()}}}
    # min_presence and the calibration reach every face
    (tr,), _, _ = load_sources(Sources((f"ferplus:{h5}:train",), teacher=TeacherCache(cache, min_presence=0.1)))
    assert np.isfinite(tr.teacher_au[5, JAW]) and tr.teacher_au[5, JAW] != pytest.approx(0.05)


def test_train_from_sources_records_the_data_and_trains_the_teacher(toy, tmp_path):
    h5, cache = toy
    sources = Sources((f"ferplus:{h5}:train",), (f"ferplus:{h5}:valid",), True, TeacherCache(cache))
    opts = TrainOptions(out_dir=tmp_path, config=TINY, epochs=1, batch_size=8, lr=3e-3, warmup_epochs=0,
                        augment=Augment(erase=0), select="teacher", metadata={"command": "mine"})
    result = train_from_sources(sources, opts)
    assert result.history[0]["train"]["teacher"] > 0 and "bce_teacher" in result.best_metrics
    meta = json.loads((tmp_path / "best.json").read_text())["metadata"]
    assert meta["command"] == "mine" and meta["derived_va"] is True
    assert meta["teacher"]["cache"] == str(cache) and meta["teacher"]["options"]["distrust"] == list(
        TeacherOptions().distrust)
    assert meta["training"]["datasets"][0]["name"].startswith("ferplus:")


def test_a_missing_cache_is_named_before_anything_is_written(toy, tmp_path):
    h5, _ = toy
    with pytest.raises(DatasetError, match="nope.npz: teacher cache does not exist"):
        train_from_sources(Sources((f"ferplus:{h5}:train",), teacher=TeacherCache(tmp_path / "nope.npz")),
                           TrainOptions(out_dir=tmp_path / "run", config=TINY))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "ferplus:{h5}:train", "--teacher", "{d}/nope.npz"], "error: {d}/nope.npz: teacher cache does not exist"),
    (["--data", "ferplus:{h5}:train", "--augment", "nope"], "error: --augment 'nope' is not one of ['default', 'strong']"),
    (["--data", "ferplus:{h5}:train", "--heads", "au"], "error: training only the heads ('au',) freezes the rest"),
])
def test_cli_errors_are_one_line_with_exit_code_2(toy, tmp_path, args, message):
    h5, _ = toy
    fill = {"h5": h5, "d": tmp_path}
    r = CliRunner().invoke(app, ["train", *[a.format(**fill) for a in args], "--out", str(tmp_path / "run"),
                                 "--device", "cpu"], env={"COLUMNS": "300"})
    lines = r.output.splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith(message.format(**fill)), r.output
