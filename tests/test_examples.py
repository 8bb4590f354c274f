"""Smoke test of examples/: the walkthrough (every CLI step) and the API example on tiny real-face videos."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import astronaut_frames, noface_frames, write_video

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clips")
    (d / "sub").mkdir()
    write_video(d / "a.mp4", astronaut_frames(15), fps=10)
    write_video(d / "sub" / "b.mp4", astronaut_frames(15, size=(256, 200)), fps=10)
    write_video(d / "c.avi", np.concatenate([astronaut_frames(8), noface_frames(4), astronaut_frames(8)]), fps=10)
    write_video(d / "d.mp4", astronaut_frames(20)[:, :, ::-1].copy(), fps=10)  # mirrored
    return d


@pytest.fixture(scope="module")
def walkthrough(tiny_videos, weights, tmp_path_factory):
    wd = tmp_path_factory.mktemp("wt")
    done = subprocess.run([sys.executable, str(EXAMPLES / "walkthrough.py"), str(tiny_videos), "--workdir", str(wd),
                           "--weights", str(weights), "--fps", "10", "--segment", "0.5", "--epochs", "2",
                           "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return wd, done.stdout + done.stderr


def test_walkthrough_runs_every_step(walkthrough):
    wd, log = walkthrough
    for step in ("$ affextract run", "$ affextract info", "$ affextract plot", "$ affextract export", "SIMULATED",
                 "$ seqhead train", "$ seqhead predict", "$ seqhead evaluate"):
        assert step in log, step
    assert (wd / "timeline.png").stat().st_size > 50_000  # with the contact sheet
    from affextract import open_features

    frames = pd.read_csv(wd / "frames.csv")
    with open_features(wd / "features.h5") as ff:
        assert len(frames) == sum(len(v) for v in ff) >= 60  # 10 fps of 70 frames at 10 fps
    assert set(frames.video) == {"a.mp4", "sub/b.mp4", "c.avi", "d.mp4"}
    labels = pd.read_csv(wd / "labels.csv")
    assert list(labels.columns) == ["video", "smile_score", "tension_score", "split"]
    assert len(labels) >= 8 and set(labels.split) == {"Train", "Val"}
    assert labels.video.str.contains("sub__b.mp4_seg").any()
    pred = pd.read_csv(wd / "predictions.csv")
    assert len(pred) == len(labels) and {"smile_score", "tension_score"} <= set(pred.columns)
    assert np.isfinite(pred[["smile_score", "tension_score"]].to_numpy()).all()
    assert (wd / "run" / "model.safetensors").exists() and (wd / "run" / "metrics.json").exists()


def test_walkthrough_segments_keep_the_frames(walkthrough):
    from affextract import open_features

    wd, _ = walkthrough
    with open_features(wd / "features.h5") as whole, open_features(wd / "segments.h5") as seg:
        assert seg.attrs["model_sha256"] == whole.attrs["model_sha256"]
        for s in seg:
            v = whole[s.source]
            rows = np.searchsorted(v.frame, s.frame)
            np.testing.assert_array_equal(v.frame[rows], s.frame)
            np.testing.assert_array_equal(v.features[rows], s.features)
            assert s.face.any() and s.time[-1] - s.time[0] <= 0.5


def test_api_example_with_a_video_without_a_face(walkthrough, tiny_videos, weights, tmp_path, capsys):
    """The walkthrough's videos plus one without any face: its made-up label does not exist, and the example still
    trains (allow_unmatched) instead of stopping on the unmatched video."""
    wd, _ = walkthrough
    videos = tmp_path / "videos"
    shutil.copytree(tiny_videos, videos)  # copy2 keeps size and mtime: the four are already done
    write_video(videos / "e_noface.mp4", noface_frames(10), fps=10)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(wd / "features.h5", work / "features.h5")  # made with the same settings: only e_noface.mp4 is new
    spec = importlib.util.spec_from_file_location("api_example", EXAMPLES / "api_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([str(videos), "--workdir", str(work), "--weights", str(weights), "--epochs", "2"])
    out = capsys.readouterr().out
    assert "1 video extracted" in out and "e_noface.mp4: 10 frames, face on 0%" in out, out
    assert "validation mean Pearson" in out and "Pearson on the 4 labelled videos" in out, out
    assert len(pd.read_csv(work / "predictions.csv")) == 5  # the video without a face is predicted too
    assert len(pd.read_parquet(work / "frames.parquet")) == len(pd.read_csv(wd / "frames.csv")) + 10
