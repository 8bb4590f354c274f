"""`torchrun -m affextract run`: videos sharded over 2 CPU processes (gloo) give the same file as one process."""

import subprocess
import sys

import numpy as np

from affextract.features import open_features
from conftest import astronaut_frames, noface_frames, write_video


# torchrun as the interpreter running the tests has it: no reliance on a `torchrun` script on PATH.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_two_ranks_equal_single_process(weights, tmp_path):
    d = tmp_path / "videos"
    d.mkdir()
    for i in range(4):
        write_video(d / f"v{i}.mp4", astronaut_frames(8 + i, size=(160, 120)))
    write_video(d / "nf.mp4", noface_frames(6, size=(160, 120)))
    (d / "broken.mp4").write_text("not a video")
    args = ["-m", "affextract", "run", str(d), "--weights", str(weights), "-q"]
    multi, single = tmp_path / "multi.h5", tmp_path / "single.h5"
    r = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", "29517", *args[:4], str(multi), *args[4:]],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "broken.mp4" in r.stderr  # the failure is reported, torchrun exits non-zero
    assert "No module named" not in r.stderr, r.stderr
    s = subprocess.run([sys.executable, *args[:4], str(single), *args[4:]], capture_output=True, text=True, timeout=300)
    assert s.returncode == 1 and "broken.mp4" in s.stderr, s.stderr  # one failed file: exit code 1, as with torchrun
    with open_features(multi) as fa, open_features(single) as fb:
        a, b = {v.key: v for v in fa}, {v.key: v for v in fb}
        failed = [r.key for r in fa.summary() if r.status == "failed"]
    assert sorted(a) == sorted(b) == ["nf.mp4", "v0.mp4", "v1.mp4", "v2.mp4", "v3.mp4"]
    for k in a:
        for name in ("face", "frame", "time"):
            np.testing.assert_array_equal(getattr(a[k], name), getattr(b[k], name))
        for name in ("features", "box", "landmarks", "score"):
            np.testing.assert_allclose(getattr(a[k], name), getattr(b[k], name), atol=1e-4, err_msg=f"{k} {name}")
        assert sorted(a[k].extra) == sorted(b[k].extra) == ["blendshapes", "gaze", "pose", "presence"], k
        for name in a[k].extra:  # the measured movement datasets
            np.testing.assert_allclose(a[k].extra[name], b[k].extra[name], atol=1e-3, err_msg=f"{k} {name}")
    assert failed == ["broken.mp4"]
    # resuming the merged file with a single process skips everything it holds
    r = subprocess.run([sys.executable, *args[:4], str(multi), *args[4:]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "0 extracted, 5 already done" in " ".join(r.stderr.split()), r.stderr


def test_torchrun_fails_fast_on_every_rank_when_the_file_is_locked(weights, tmp_path):
    from affextract.format import Provenance
    from affextract.store import FeatureStore

    d = tmp_path / "videos"
    d.mkdir()
    write_video(d / "v.mp4", astronaut_frames(4, size=(160, 120)))
    out = tmp_path / "out.h5"
    with FeatureStore(out, Provenance("x", "y", "z", "a", "s")):
        r = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", "29518", "-m", "affextract", "run",
                            str(d), str(out), "--weights", str(weights), "-q"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "rank 0 could not open" in r.stderr and "being written by another affextract run" in r.stderr
