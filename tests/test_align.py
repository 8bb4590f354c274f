"""The ArcFace alignment is computed without insightface and equals insightface's; without insightface the default
detector runs and --detector scrfd says in one line what to install."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from affextract.faces.align import ARCFACE_TEMPLATE, alignment_matrices
from conftest import astronaut_frames, write_video

ROOT = Path(__file__).resolve().parent.parent


def _landmark_sets(n: int) -> np.ndarray:
    """(n, 5, 2) faces: the template rotated any way, scaled 0.3-8x, moved, jittered; every third one mirrored (a
    reflection, which the fit must not follow)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a, s = rng.uniform(-np.pi, np.pi), rng.uniform(0.3, 8)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        marks = ARCFACE_TEMPLATE.astype(np.float64) @ rot.T * s + rng.uniform(-300, 900, 2)
        marks += rng.normal(0, 3 * s, (5, 2))
        out.append(marks * ([-1, 1] if i % 3 == 0 else 1))
    return np.stack(out)


@pytest.mark.parametrize("size", [112, 224, 128])
def test_alignment_equals_insightface_estimate_norm(size):
    face_align = pytest.importorskip("insightface.utils.face_align", reason="insightface (the scrfd extra) absent")
    marks = _landmark_sets(300)
    ours = alignment_matrices(marks, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # skimage 0.26 deprecates what insightface calls
        theirs = np.stack([face_align.estimate_norm(m, image_size=size) for m in marks])
    assert np.abs(ours - theirs).max() < 1e-9
    assert (np.linalg.det(ours[:, :, :2]) > 0).all()  # never a reflection, mirrored faces included


def test_alignment_of_degenerate_landmarks_is_nan_not_an_error():
    marks = np.stack([np.full((5, 2), np.nan), np.zeros((5, 2)), ARCFACE_TEMPLATE.astype(np.float64)])
    m = alignment_matrices(marks)
    assert np.isnan(m[:2]).all()
    np.testing.assert_allclose(m[2], [[1, 0, 0], [0, 1, 0]], atol=1e-5)  # the template onto itself (float32 mean)


def test_without_insightface_the_default_path_runs_and_scrfd_says_what_to_install(weights, tmp_path):
    """A process where insightface and onnxruntime cannot be imported (as after `pip install -e .` without extras)."""
    videos = tmp_path / "v"
    videos.mkdir()
    write_video(videos / "a.mp4", astronaut_frames(6))
    code = textwrap.dedent(f"""\
        import sys
        sys.modules["insightface"] = sys.modules["onnxruntime"] = None  # import fails as if not installed
        sys.argv = ["affextract"] + sys.argv[1:]
        from affextract.cli import app
        app()
        """)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def run(*args):
        return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                              timeout=300)

    r = run("run", videos, tmp_path / "out.h5", "--weights", weights, "--no-movement", "-q", "--workers", "1")
    assert r.returncode == 0 and "1 extracted" in r.stderr, r.stderr
    r = run("run", videos, tmp_path / "s.h5", "--weights", weights, "--detector", "scrfd", "-q")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[scrfd]'" in lines[0] and "Traceback" not in r.stderr, r.stderr
