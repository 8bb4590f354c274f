"""A worker process that dies part-way through a video (kill -9 from outside: a real crash, no hook): that video's
shard is dropped and recorded as failed, a new worker takes the remaining videos, and a rerun completes the file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from affextract.features import open_features
from conftest import alive, astronaut_frames, descendants, write_video


def _is_worker(pid: int) -> bool:
    try:
        return b"affextract.workers import serve" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_worker_killed_mid_video_costs_that_video_only(weights, tmp_path):
    d = tmp_path / "videos"
    d.mkdir()
    lengths = {"a.mp4": 120, "b.mp4": 10, "c.mp4": 12}  # a is long: the worker is killed while it is on it
    for name, n in lengths.items():
        write_video(d / name, astronaut_frames(n, size=(160, 120)))
    out, parts = tmp_path / "out.h5", tmp_path / "out.h5.parts"
    cmd = [sys.executable, "-m", "affextract", "run", str(d), str(out), "--weights", str(weights), "--workers", "1",
           "--batch-size", "4", "--commit-every", "0", "-q"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and p.poll() is None and not any(parts.glob("*.tmp")):
            time.sleep(0.02)  # a video's shard is open: its first frames arrived
        workers = [w for w in descendants(p.pid) if _is_worker(w)]
        assert p.poll() is None and len(workers) == 1, "the run ended before a video was part-way"
        os.kill(workers[0], signal.SIGKILL)
        _, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert not alive(workers[0])
    assert p.returncode == 1, err  # one file failed
    with open_features(out) as ff:
        failed = ff.failed
        done = {v.key: len(v) for v in ff}
    assert len(failed) == 1, (failed, done)
    (crashed, error), = failed.items()
    assert "the worker crashed on this file" in error and "-9" in error, error
    # the other videos were analysed in full by the worker that took over; nothing of the crashed one was kept
    assert done == {k: n for k, n in lengths.items() if k != crashed}, done
    assert not parts.exists()  # the dropped shard is gone with the rest
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    with open_features(out) as ff:
        assert {v.key: len(v) for v in ff} == lengths and not ff.failed
