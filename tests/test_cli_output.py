"""What both command lines print: versions, help, plain unwrapped lines in pipes, `info`'s summary and JSON, plurals.

Output that depends on whether stdout is a terminal is checked in real subprocesses writing to a pipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from affextract.cli import app
from test_features_api import synthetic_video, write_features

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
LONG_KEY = "a folder with a rather long name/" + "another long sub folder name/" * 3 + "the clip itself.mp4"


def _run(*args) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                        "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """25 videos (one with a 140-character key, one with no analysed frame) and a failed one."""
    videos = {f"v{i:02d}.mp4": synthetic_video(6, i) for i in range(23)}
    videos[LONG_KEY] = synthetic_video(5, 30)
    videos["zero.mp4"] = synthetic_video(0, 31)
    return write_features(tmp_path_factory.mktemp("many") / "many.h5", videos, {"v99.mp4": "cannot decode"})


@pytest.mark.parametrize("tool", ["affextract", "seqhead"])
def test_version(tool):
    import affextract
    import seqhead

    r = _run(tool, "--version")
    version = {"affextract": affextract.__version__, "seqhead": seqhead.__version__}[tool]
    assert r.returncode == 0 and r.stdout == f"{tool} {version}\n", r.stdout + r.stderr


def test_info_in_a_pipe_is_plain_unwrapped_and_summarised(many):
    r = _run("affextract", "info", many)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(LONG_KEY in line for line in lines), "a long key was wrapped or cut"
    assert any(line.split() == ["model_sha256", "0" * 64] for line in lines), "the SHA-256 was wrapped or cut"
    assert "…" not in r.stdout and "\x1b" not in r.stdout
    # The summary: 20 videos listed, then how many more and how to see them, the totals with counts per status.
    listed = [line for line in lines if ".mp4" in line]
    assert len(listed) == 20 and LONG_KEY in listed[0] and "v18.mp4" in listed[-1]
    assert "... and 6 more videos: --all lists every one" in r.stdout
    assert "26 videos (25 complete, 1 failed), 143 frames, face found on 100.0%" in r.stdout
    r = _run("affextract", "info", many, "--all")
    assert sum(".mp4" in line for line in r.stdout.splitlines()) == 26 and "more videos" not in r.stdout
    zero = next(line for line in r.stdout.splitlines() if "zero.mp4" in line)
    assert "no frames" in zero and "%" not in zero


def test_info_json(many):
    r = runner.invoke(app, ["info", str(many), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["videos"] == 26 and d["statuses"] == {"complete": 25, "partial": 0, "failed": 1} and d["frames"] == 143
    assert d["attrs"]["model_sha256"] == "0" * 64 and d["attrs"]["format_version"] == 1
    rows = {v["key"]: v for v in d["per_video"]}
    assert len(rows) == 26 and rows["v99.mp4"]["status"] == "failed" and rows[LONG_KEY]["frames"] == 5


def test_one_video_of_no_frames_is_said_in_words(tmp_path):
    h5 = write_features(tmp_path / "one.h5", {"zero.mp4": synthetic_video(0, 1)})
    r = runner.invoke(app, ["info", str(h5)])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "1 video (1 complete), 0 frames, no frames analysed" in text, r.output
    assert "videos" not in text and "0.0%" not in text


def test_help_texts():
    import typer

    r = _run("affextract", "run", "--help")
    usage = next(line for line in r.stdout.splitlines() if "Usage:" in line)
    assert "INPUTS" in usage and usage.rstrip().endswith("OUTPUT}") and "paths" not in usage, usage
    cmds = typer.main.get_command(app).commands
    plot = " ".join(cmds["plot"].help.split())
    assert "head pose (yaw, pitch, roll)" in plot and "blendshapes" in plot, plot
    helps = {c: {p.name: getattr(p, "help", None) for p in cmd.params} for c, cmd in cmds.items()}
    assert helps["evaluate"]["batch_size"], "evaluate --batch-size has no help"
    export_format = helps["export"]["format"].replace("\\[", "[")  # (rich markup's escape)
    assert 'pip install -e ".[parquet]"' in export_format and "affextract[parquet]" not in export_format


def test_evaluate_device_defaults_to_auto_like_every_command():
    import typer

    cmds = typer.main.get_command(app).commands
    defaults = {name: p.default for name, c in cmds.items() for p in c.params if p.name == "device"}
    assert defaults and set(defaults.values()) == {"auto"}, defaults


def test_one_step_and_one_video_are_singular(capsys, tmp_path):
    from seqhead.cli import _TrainProgress
    from seqhead.train import Progress

    _TrainProgress()(Progress(epoch=1, epochs=3, step=1, steps=1, seconds=0.5, train_loss=0.9, val_mean_pearson=0.1,
                              best_epoch=1))
    err = capsys.readouterr().err
    assert "epoch 1/3: 1 step in 0.5s" in err and "1 steps" not in err, err
    write_features(tmp_path / "one.h5", {"a.mp4": synthetic_video(4, 0)})
    r = runner.invoke(app, ["export", str(tmp_path / "one.h5")])
    assert r.exit_code == 0 and "4 rows (1 video)," in " ".join(r.output.split()), r.output


def test_run_draws_its_live_progress_on_the_terminal_stderr_and_leaves_stdout_empty(tmp_path):
    """stderr a terminal, stdout a pipe (`affextract run ... > log`): the live bar belongs on stderr, where the
    terminal test looked, and nothing of it may land in the piped stdout."""
    import pty

    from conftest import noface_frames, write_video

    write_video(tmp_path / "clip.mp4", noface_frames(6))
    leader, follower = pty.openpty()
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "affextract", "run", tmp_path / "clip.mp4", tmp_path / "out.h5",
                        "--no-movement", "--workers", "1"], stdout=subprocess.PIPE, stderr=follower, env=env,
                       timeout=120)
    os.close(follower)
    drawn = b""
    try:
        while chunk := os.read(leader, 65536):
            drawn += chunk
    except OSError:  # the terminal is closed once everything is read
        pass
    os.close(leader)
    assert p.returncode == 0, drawn.decode(errors="replace")
    assert p.stdout == b""
    assert b"1/1 videos" in drawn
