"""An interrupted `affextract run` (Ctrl-C, kill -9): what is safe is said, and what waits is found and merged.

Real processes, signalled as a user's shell would; real decoder, detector and HDF5 files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from affextract.cli import app
from affextract.features import open_features
from conftest import astronaut_frames, signal_after, write_video

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _env() -> dict:
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _videos(d: Path, lengths: list[int]) -> Path:
    d.mkdir()
    for i, n in enumerate(lengths):  # long ones repeat a short clip: quick to make, slow to analyse
        write_video(d / f"v{i}.mp4", np.resize(astronaut_frames(min(n, 20)), (n, 240, 320, 3)))
    return d


def _start(videos: Path, out: Path, weights: Path) -> subprocess.Popen:
    """`affextract run` with one worker (videos in order), no merge before the end, a progress line per event."""
    return subprocess.Popen([sys.executable, "-m", "affextract", "run", videos, out, "--weights", weights,
                             "--workers", "1", "--no-movement", "--commit-every", "100000", "--progress-every", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def test_ctrl_c_says_how_many_videos_are_safe_and_how_to_continue(weights, tmp_path):
    videos = _videos(tmp_path / "videos", [12, 600])  # the long one is still running when Ctrl-C comes
    out = tmp_path / "out.h5"
    p = _start(videos, out, weights)
    err = " ".join(signal_after(p, "progress: 1/2 videos", signal.SIGINT).split())
    assert p.returncode == 130, err
    assert "interrupted: 1 video safe in" in err and "Rerun the same command to continue" in err, err
    assert "Traceback" not in err
    with open_features(out) as ff:  # the finished video was merged before the process ended
        assert ff.keys == ["v0.mp4"] and len(ff["v0.mp4"]) == 12 and ff.pending == 0


def test_kill_9_before_the_first_merge_info_says_where_the_videos_wait_and_merge_merges_them(weights, other_weights,
                                                                                             tmp_path):
    videos = _videos(tmp_path / "videos", [10, 10, 600])
    out = tmp_path / "out.h5"
    p = _start(videos, out, weights)
    signal_after(p, "progress: 2/3 videos", signal.SIGKILL)
    assert not out.exists() and len(list((tmp_path / "out.h5.parts").glob("*.h5"))) == 2

    r = runner.invoke(app, ["info", str(out)])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "does not exist yet, but 2 finished video(s) wait in" in text, r.output
    assert f"affextract merge {out}" in text

    # A rerun with other settings must not merge them under its own provenance.
    r = runner.invoke(app, ["run", str(videos), str(out), "--weights", str(other_weights), "--no-movement", "-q"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "out.h5.parts" in text and "other settings" in text, r.output
    assert not out.exists()

    r = runner.invoke(app, ["merge", str(out)])
    assert r.exit_code == 0 and "merged 2 finished videos" in " ".join(r.output.split()), r.output
    with open_features(out) as ff:
        assert ff.keys == ["v0.mp4", "v1.mp4"] and ff.pending == 0
        assert ff.provenance.model == Path(weights).stem
    assert not (tmp_path / "out.h5.parts").exists()
