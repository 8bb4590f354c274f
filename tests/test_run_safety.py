"""`affextract run` as a new user meets it: nothing lost, nothing wrong, nothing left running, clear errors.

Real decoder, real detector, real HDF5 files, real processes (subprocesses where a user would start one).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from affextract.cli import app
from affextract.features import open_features
from conftest import alive, astronaut_frames, descendants, group_frames, noface_frames, write_video

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    result.text = " ".join(result.output.split())  # rich wraps at the terminal width
    return result


def _env() -> dict:
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _cli(*args):
    return [sys.executable, "-m", "affextract", *map(str, args)]


# -- data loss --------------------------------------------------------------------------------------------------------


def test_same_name_from_another_folder_never_replaces_a_stored_video(weights, tmp_path):
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    r1.mkdir(), r2.mkdir()
    write_video(r1 / "a.mp4", astronaut_frames(8))
    write_video(r2 / "a.mp4", noface_frames(11))  # another video under the same relative name
    out = tmp_path / "two.h5"
    assert run_cli("run", r1, out, "--weights", weights, "-q").exit_code == 0
    before = out.read_bytes()
    r = run_cli("run", r2, out, "--weights", weights, "-q")
    assert r.exit_code == 2, r.output
    assert "a.mp4" in r.text and str(r1 / "a.mp4") in r.text and "another output file" in r.text
    assert "Traceback" not in r.output and out.read_bytes() == before
    with open_features(out) as ff:
        assert len(ff["a.mp4"]) == 8 and ff["a.mp4"].face.all()
    # The same file seen through another path (the folder was moved or copied, size and mtime kept) is the same video.
    moved = tmp_path / "moved"
    shutil.copytree(r1, moved)
    r = run_cli("run", moved, out, "--weights", weights, "-q")
    assert r.exit_code == 0 and "0 extracted, 1 already done" in r.text, r.output


# -- clear errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "directory"])
def test_output_that_is_not_a_feature_file_is_refused_in_one_line(kind, weights, tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    write_video(d / "a.mp4", astronaut_frames(4))
    out = tmp_path / "out.h5"
    if kind == "text":
        out.write_text("my notes, not HDF5\n")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("x")
    r = subprocess.run(_cli("run", d, out, "--weights", weights, "-q"), capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(out) in " ".join(r.stderr.split())
    if kind == "text":
        assert out.read_text() == "my notes, not HDF5\n"
    else:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "v"]


def test_empty_input_folder_says_so_and_fails(weights, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no videos here")
    r = run_cli("run", tmp_path / "empty", tmp_path / "out.h5", "--weights", weights, "-q")
    assert r.exit_code == 2 and "no video or image" in r.text, r.output
    assert not (tmp_path / "out.h5").exists()


def test_worker_that_cannot_set_up_stops_the_run_with_its_error(weights, tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    for i in range(3):
        write_video(d / f"a{i}.mp4", astronaut_frames(4))
    bogus = tmp_path / "det.onnx"
    bogus.write_text("not an onnx model")
    out = tmp_path / "out.h5"
    r = subprocess.run(_cli("run", d, out, "--weights", weights, "--detector", "scrfd", "--detector-model", bogus,
                            "-q", "--workers", "2"), capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 2, r.stderr
    text = " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr and text.count(str(bogus)) == 1, r.stderr
    assert "crashed" not in text
    if out.exists():  # no video is blamed for the detector's failure
        with open_features(out) as ff:
            assert not ff.failed and not ff.keys


def test_progress_lines_when_stderr_is_not_a_terminal(weights, tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    for i in range(3):
        write_video(d / f"a{i}.mp4", astronaut_frames(6))
    p = subprocess.Popen(_cli("run", d, tmp_path / "out.h5", "--weights", weights, "--progress-every", "0",
                              "--workers", "1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=_env())
    lines = []
    for line in p.stderr:
        lines.append((line.strip(), p.poll() is None))
    p.wait(timeout=300)
    progress = [(text, running) for text, running in lines if text.startswith("progress:")]
    assert len(progress) >= 3, lines
    assert any("1/3 videos" in text for text, _ in progress)
    assert "frames" in progress[0][0] and "≥" in progress[0][0]  # the total is a lower bound until every video opened
    assert progress[-1][0].startswith("progress: 3/3 videos") and "≥" not in progress[-1][0]


def test_the_library_prints_nothing_its_progress_comes_as_events(weights, tmp_path, capfd):
    """extract() reports to on_event and writes nothing to stdout or stderr (its workers' included): drawing is the
    command line's."""
    from affextract.extract import (ExtractOptions, FramesAnalysed, RunEnded, RunStarted, VideoEnded, VideoOpened,
                                    extract)

    d = tmp_path / "v"
    d.mkdir()
    write_video(d / "a.mp4", astronaut_frames(4))
    write_video(d / "b.mp4", noface_frames(3))
    events = []
    report = extract([d], tmp_path / "out.h5", ExtractOptions(weights=weights, workers=1, movement=False),
                     on_event=events.append)
    out, err = capfd.readouterr()
    assert (out, err) == ("", ""), (out, err)
    assert events[0] == RunStarted(tuple((d / n).stat().st_size for n in ("a.mp4", "b.mp4")))
    assert events[-1] == RunEnded(complete=True)
    assert {e for e in events if isinstance(e, (VideoOpened, VideoEnded))} == {
        VideoOpened(0, 4), VideoOpened(1, 3), VideoEnded(0), VideoEnded(1)}
    assert sum(e.frames for e in events if isinstance(e, FramesAnalysed)) == report.frames == 7


def test_ctrl_c_dropped_where_it_landed_still_stops_the_run(weights, tmp_path):
    """Ctrl-C handled while the main thread runs a weakref callback or a __del__ raises KeyboardInterrupt there, and
    Python prints and drops it. Modelled here by calling the SIGINT handler and dropping its exception, as such a
    callback does, after the first video: the run must still stop, with that video safe."""
    import signal

    import pytest

    from affextract.extract import ExtractOptions, Interrupted, VideoEnded, extract

    d = tmp_path / "v"
    d.mkdir()
    write_video(d / "a.mp4", noface_frames(3))
    write_video(d / "b.mp4", noface_frames(40))

    def on_event(event) -> None:
        if isinstance(event, VideoEnded):
            try:
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            except KeyboardInterrupt:
                pass  # what Python does with an exception raised inside a weakref callback

    with pytest.raises(Interrupted) as stop:
        extract([d], tmp_path / "out.h5", ExtractOptions(weights=weights, workers=1, movement=False),
                on_event=on_event)
    assert stop.value.report.stored == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run gives Ctrl-C back


def test_rerun_with_nothing_to_do_starts_no_worker_and_loads_no_model(weights, tmp_path, monkeypatch):
    d = tmp_path / "v"
    d.mkdir()
    write_video(d / "a.mp4", astronaut_frames(4))
    out = tmp_path / "out.h5"
    assert run_cli("run", d, out, "--weights", weights, "-q").exit_code == 0
    import multiprocessing.context

    import affextract.model

    def refuse(*a, **k):
        raise AssertionError("nothing to do, yet this was called")

    monkeypatch.setattr(affextract.model, "load_mma", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", refuse)
    r = run_cli("run", d, out, "--weights", weights, "-q")
    assert r.exit_code == 0 and "0 extracted, 1 already done" in r.text, r.output


# -- the Python API in a plain script -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["script", "-c"])
def test_api_in_a_plain_script_without_main_guard(how, weights, tmp_path):
    d = tmp_path / "videos"
    d.mkdir()
    write_video(d / "a.mp4", astronaut_frames(6))
    write_video(d / "b.mp4", noface_frames(5))
    code = textwrap.dedent(f"""\
        import affextract
        report = affextract.extract([{str(d)!r}], {str(tmp_path / 'out.h5')!r},
                                    affextract.ExtractOptions(weights={str(weights)!r}, workers=2))
        print("written", len(report.written), "failed", len(report.failed))
        """)
    script = tmp_path / "myscript.py"
    script.write_text(code)
    argv = [sys.executable, str(script)] if how == "script" else [sys.executable, "-c", code]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == ["written 2 failed 0"], r.stdout + r.stderr
    assert "Error" not in r.stderr


# -- nothing left running ----------------------------------------------------------------------------------------------


def test_no_process_outlives_kill_9_of_the_run(weights, tmp_path):
    d = tmp_path / "videos"
    d.mkdir()
    for i in range(4):
        write_video(d / f"v{i}.mp4", astronaut_frames(60))
    p = subprocess.Popen(_cli("run", d, tmp_path / "out.h5", "--weights", weights, "-q", "--workers", "2",
                              "--batch-size", "4"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 120
    workers: set[int] = set()
    while time.monotonic() < deadline and p.poll() is None and len(workers) < 2:
        workers = descendants(p.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the workers did not start"
    time.sleep(1.0)  # let them get into their work
    workers |= descendants(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(w) for w in workers):
        time.sleep(0.1)
    left = [w for w in workers if alive(w)]
    for w in left:  # do not leave them behind even when the test fails
        os.kill(w, signal.SIGKILL)
    assert not left, f"{len(left)} of {len(workers)} processes outlived kill -9 of their parent"


# -- wrong results -------------------------------------------------------------------------------------------------


def test_fps_5_on_a_multi_person_clip_keeps_the_front_face(weights, tmp_path):
    from affextract.faces.detectors import get_detector
    from affextract.faces.tracking import box_iou

    frames = group_frames(100)  # 4 s at 25 fps, three people, a hand-held camera
    write_video(tmp_path / "group.mp4", frames)
    out = tmp_path / "out.h5"
    r = run_cli("run", tmp_path / "group.mp4", out, "--weights", weights, "--fps", "5", "-q")
    assert r.exit_code == 0, r.output
    with open_features(out) as ff:
        v = ff["group.mp4"]
    assert len(v) == 20
    # The front (largest) face as a full detection finds it on each analysed frame of the decoded clip.
    from affextract.video import Source, open_video

    path = tmp_path / "group.mp4"
    _, chunks = open_video(Source(path, "group.mp4", path.stat().st_size, path.stat().st_mtime), 5.0, 64)
    decoded = np.concatenate([c.frames for c in chunks])
    found = get_detector("mtcnn").detect(decoded)
    front = np.stack([f.boxes[np.argmax(f.areas)] for f in found])
    assert v.face.mean() >= 0.95, v.face.astype(int)
    on_front = [box_iou(v.box[i], front[i])[0, 0] > 0.5 for i in np.flatnonzero(v.face)]
    assert all(on_front)
