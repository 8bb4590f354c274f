"""`affextract run` / `info` as a user runs them: real decoder, real detector, real HDF5 files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from affextract.cli import app
from affextract.features import open_features
from affextract.schema import AU
from affextract.format import Provenance, check_format
from affextract.store import FeatureStore
from affextract.video import find_sources
from conftest import (alive, astronaut_frames, descendants, garble_second_half, noface_frames, read_all,
                      truncate_download, write_video)

runner = CliRunner()


def run_cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    result.text = " ".join(result.output.split())  # rich wraps at the terminal width
    return result


def videos(path: Path):
    with h5py.File(path) as f:
        check_format(f, path)
        return {k: {n: g[n][()] for n in g} | {"attrs": dict(g.attrs)} for k, g in f["videos"].items()}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A folder as a user has it: talking-face videos, a video without faces, an image, broken files."""
    d = tmp_path_factory.mktemp("videos")
    (d / "sub").mkdir()
    write_video(d / "face.mp4", astronaut_frames(30))
    write_video(d / "sub" / "face2.avi", astronaut_frames(20, size=(256, 200)))
    write_video(d / "noface.mp4", noface_frames(12))
    garble_second_half(write_video(d / "garbled.mp4", astronaut_frames(40)))
    truncate_download(write_video(d.parent / "whole.mp4", astronaut_frames(30)), d / "cut.mp4", 12)
    import cv2
    from skimage import data
    cv2.imwrite(str(d / "still.png"), data.astronaut()[:, :, ::-1])
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("not a video\n")
    (d / "readme.txt").write_text("ignored")
    return d


def test_run_folder_end_to_end(batch, tmp_path):
    """With the shipped weights (no --weights), so the values mean something: random weights give nearly the same
    26 values for any face."""
    out = tmp_path / "out.h5"
    r = run_cli("run", batch, out, "--quiet")
    assert r.exit_code == 1, r.output  # two files failed
    assert "empty.mp4" in r.text and "text.mp4" in r.text and "partial" in r.text
    v = videos(out)
    assert set(v) == {"face.mp4", "sub%2Fface2.avi", "noface.mp4", "garbled.mp4", "cut.mp4", "still.png"}
    face = v["face.mp4"]
    assert face["features"].shape == (26, 30) and face["features"].dtype == np.float32
    assert face["face"].mean() > 0.9
    assert np.array_equal(face["frame"], np.arange(30))
    assert np.allclose(face["time"], np.arange(30) / 25.0, atol=1e-3)
    ok = face["face"]
    f = face["features"][:, ok]
    assert np.isfinite(f).all()
    assert np.all(np.abs(f[0:2]) <= 1)  # valence, arousal (tanh)
    assert np.allclose(f[2:9].sum(0), 1, atol=1e-4)  # expression probabilities
    assert np.all((f[9:] >= 0) & (f[9:] <= 1))  # AU probabilities
    assert np.isfinite(face["box"][ok]).all() and np.isfinite(face["landmarks"][ok]).all()
    assert face["attrs"]["width"] == 320 and face["attrs"]["frames_total"] == 30
    # Ranges alone hold for any weights: each stored row is what the shipped MMA gives on the face aligned from the
    # stored landmarks of that frame (decoded independently, with OpenCV), its AU rows fused with the frame's stored
    # blendshapes by the shipped fusion, and the astronaut smiles.
    import cv2
    import torch

    from affextract.faces.align import align_faces
    from affextract.fusion import load_fusion
    from affextract.model import load_mma

    cap = cv2.VideoCapture(str(batch / "face.mp4"))
    decoded = np.stack([cap.read()[1][:, :, ::-1] for _ in range(30)])
    cap.release()
    model, _ = load_mma()
    picks = [0, 11, 29]
    with torch.no_grad():
        direct = model.features(align_faces(decoded[picks], face["landmarks"][picks])).numpy()
    direct = load_fusion()(direct, face["blendshapes"][:, picks].T, face["presence"][picks])  # stored (52, K)
    np.testing.assert_allclose(face["features"][:, picks].T, direct, atol=0.02)
    expr = face["features"][2:9, ok]
    assert (expr.argmax(0) == 4).mean() > 0.9, expr.mean(1)  # happiness (row 6 of 26)
    assert (face["features"][0, ok] > face["features"][1, ok] + 0.1).all()  # valence above arousal: a smile
    nf = v["noface.mp4"]
    assert nf["features"].shape == (26, 12) and not nf["face"].any() and np.isnan(nf["features"]).all()
    assert np.isnan(nf["box"]).all() and np.isnan(nf["landmarks"]).all() and np.isnan(nf["score"]).all()
    assert np.isfinite(face["score"][ok]).all() and (face["score"][ok] > 0.5).all()
    # Damaged files: decoded again wholly by PyAV, which keeps the same frames on every run (test_video.py).
    g = v["garbled.mp4"]
    kept = sum(len(c.frame) for c in read_all(find_sources([batch / "garbled.mp4"])[0][0])[1])
    assert g["attrs"]["status"] == "partial" and g["attrs"]["decoder"] == "pyav" and 0 < kept < 40
    assert np.array_equal(g["frame"], np.arange(kept)) and g["features"].shape == (26, kept)
    cut = v["cut.mp4"]  # a download cut off after 12 of its 30 frames
    assert cut["attrs"]["status"] == "partial" and cut["attrs"]["decoder"] == "pyav"
    assert cut["attrs"]["frames_total"] == 30 and np.array_equal(cut["frame"], np.arange(12))
    assert "stream broke at frame 12" in cut["attrs"]["error"] and "truncated" in cut["attrs"]["error"]
    assert np.allclose(cut["time"], np.arange(12) / 25.0, atol=1e-3) and cut["face"].mean() > 0.9
    assert not (out.parent / (out.name + ".parts")).exists()  # the void first try of garbled.mp4 left no shard
    assert v["still.png"]["face"].tolist() == [True]
    with open_features(out) as ff:
        rows = ff.summary()
    failed = {r.key: r.error for r in rows if r.status == "failed"}
    assert set(failed) == {"empty.mp4", "text.mp4"}
    assert "empty" in failed["empty.mp4"] and "cannot decode" in failed["text.mp4"]

    info = run_cli("info", out)
    assert info.exit_code == 0
    for text in ("face.mp4", "partial", "failed", "model_sha256", "face found on"):
        assert text in info.text, text

    # rerun: finished videos skipped, failures retried (and fail again), nothing duplicated
    r2 = run_cli("run", batch, out, "--quiet")
    assert r2.exit_code == 1 and "0 extracted, 6 already done" in r2.text
    assert videos(out).keys() == v.keys()

    # a touched file (the same contents) is skipped; a changed one is re-extracted, a new one appended
    os.utime(batch / "noface.mp4", (time.time(), time.time() + 5))
    write_video(batch / "face.mp4", astronaut_frames(31))  # the same 30 frames and one more
    write_video(batch / "new.mp4", astronaut_frames(5))
    r3 = run_cli("run", batch, out, "--quiet")
    assert "2 extracted, 5 already done" in r3.text, r3.output
    v3 = videos(out)
    assert "new.mp4" in v3 and v3["face.mp4"]["features"].shape == (26, 31)
    again, before = v3["face.mp4"]["features"][:, :30], v["face.mp4"]["features"]
    assert np.allclose(again[:AU.start], before[:AU.start], atol=1e-5, equal_nan=True)
    # fused AU rows: the logit of tiny blendshape coefficients turns float noise into ~1e-4 (see the kill -9 test)
    assert np.allclose(again[AU], before[AU], atol=1e-3, equal_nan=True)
    (batch / "new.mp4").unlink()
    write_video(batch / "face.mp4", astronaut_frames(30))  # as the other tests expect it


def test_other_weights_refused_without_touching_file(batch, weights, other_weights, tmp_path):
    out = tmp_path / "out.h5"
    assert run_cli("run", batch / "face.mp4", out, "--weights", weights, "-q").exit_code == 0
    before = out.read_bytes()
    r = run_cli("run", batch / "noface.mp4", out, "--weights", other_weights, "-q")
    assert r.exit_code == 2 and "other settings" in r.text and "new output file" in r.text
    assert out.read_bytes() == before


def test_fps_subsampling(batch, weights, tmp_path):
    out = tmp_path / "out.h5"
    assert run_cli("run", batch / "face.mp4", out, "--weights", weights, "--fps", "5", "-q").exit_code == 0
    v = videos(out)["face.mp4"]
    assert v["frame"].tolist() == [0, 5, 10, 15, 20, 25] and v["features"].shape == (26, 6)
    assert np.allclose(v["time"], v["frame"] / 25.0, atol=1e-3)
    # a file made at another sampling rate is not extended with every frame
    r = run_cli("run", batch / "noface.mp4", out, "--weights", weights, "-q")
    assert r.exit_code == 2 and "sampling" in r.text


def test_missing_weights_and_bad_output_name(batch, tmp_path):
    r = run_cli("run", batch / "face.mp4", tmp_path / "out.h5", "--weights", tmp_path / "none.safetensors")
    assert r.exit_code == 2 and "no such weights file" in r.text
    r = run_cli("run", batch / "face.mp4", tmp_path / "out.csv")
    assert r.exit_code != 0 and "must end in .h5" in r.text


def test_concurrent_run_fails_fast(batch, weights, tmp_path):
    out = tmp_path / "out.h5"
    prov = Provenance("x", "y", "z", "a", "s")
    with FeatureStore(out, prov):
        t0 = time.monotonic()
        r = run_cli("run", batch / "face.mp4", out, "--weights", weights, "-q")
        assert time.monotonic() - t0 < 30
    assert r.exit_code == 2 and "being written by another affextract run" in r.text


def test_identical_copy_is_skipped_other_contents_refused_unless_replace(weights, tmp_path):
    videos_dir, api, other = tmp_path / "videos", tmp_path / "api" / "videos", tmp_path / "other"
    for d in (videos_dir, api, other):
        d.mkdir(parents=True)
    write_video(videos_dir / "a.mp4", astronaut_frames(6))
    write_video(videos_dir / "b.mp4", noface_frames(5))
    out = tmp_path / "out.h5"
    opts = ("--weights", weights, "--no-movement", "--workers", "1", "-q")
    assert run_cli("run", videos_dir, out, *opts).exit_code == 0
    before = videos(out)
    assert len(before["a.mp4"]["attrs"]["sha256"]) == 64

    # `cp -r videos/ api/videos/`: the same contents, new times
    for name in ("a.mp4", "b.mp4"):
        (api / name).write_bytes((videos_dir / name).read_bytes())
        os.utime(api / name, (time.time() + 60, time.time() + 60))
    r = run_cli("run", api, out, *opts)
    assert r.exit_code == 0 and "0 extracted, 2 already done" in r.text, r.output
    # files written before the checksum was recorded: the stored source, still there and unchanged, is hashed
    with h5py.File(out, "a") as f:
        del f["videos/a.mp4"].attrs["sha256"]
    assert "0 extracted, 1 already done" in run_cli("run", api / "a.mp4", out, *opts).text

    # another video under the same name is refused, and the file is left as it was
    write_video(other / "a.mp4", astronaut_frames(9))
    untouched = out.read_bytes()
    r = run_cli("run", other, out, *opts)
    assert r.exit_code == 2 and "already holds a different video under the same name: 'a.mp4'" in r.text
    assert "other contents" in r.text and "--replace" in r.text and out.read_bytes() == untouched

    r = run_cli("run", other, out, *opts, "--replace")
    assert r.exit_code == 0 and "1 extracted" in r.text and "replaced" in r.text and "a.mp4" in r.text, r.output
    after = videos(out)
    assert after["a.mp4"]["frame"].tolist() == list(range(9)) and after["a.mp4"]["attrs"]["path"] == str(other / "a.mp4")
    for name, array in before["b.mp4"].items():  # the other video is untouched
        if name != "attrs":
            assert np.array_equal(after["b.mp4"][name], array, equal_nan=True), name


def _cli(*args):
    return [sys.executable, "-m", "affextract", *map(str, args)]


def test_kill_9_then_rerun_completes_without_loss_or_duplicates(weights, tmp_path):
    d = tmp_path / "videos"
    d.mkdir()
    for i in range(6):
        write_video(d / f"v{i}.mp4", astronaut_frames(24 + i))
    out = tmp_path / "out.h5"
    cmd = _cli("run", d, out, "--weights", weights, "--commit-every", "0", "-q", "--batch-size", "8")
    for wait_for in ("first shard", "first merge"):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            parts = tmp_path / "out.h5.parts"
            if wait_for == "first shard" and parts.exists() and any(parts.glob("*.tmp")):
                break
            if wait_for == "first merge" and out.exists():
                break
            time.sleep(0.02)
        workers = descendants(p.pid)
        assert p.poll() is None, f"the run ended by itself before {wait_for}: nothing was killed"
        assert workers, "the run had no worker process when it was killed"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if alive(w)], "worker processes outlived the killed run"
        if out.exists():  # whatever was merged is readable
            with open_features(out) as ff:
                rows = ff.summary()
            assert all(r.status == "complete" for r in rows)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    v = videos(out)
    assert sorted(v) == [f"v{i}.mp4" for i in range(6)]
    assert [v[f"v{i}.mp4"]["features"].shape[1] for i in range(6)] == [24 + i for i in range(6)]
    assert not (tmp_path / "out.h5.parts").exists() and not (tmp_path / "out.h5.tmp").exists()
    # identical to an uninterrupted run
    ref = tmp_path / "ref.h5"
    subprocess.run(_cli("run", d, ref, "--weights", weights, "-q"), check=True, capture_output=True, timeout=300)
    r = videos(ref)
    for k in r:
        np.testing.assert_allclose(v[k]["features"][:AU.start], r[k]["features"][:AU.start], atol=1e-5)
        # The fused AU rows take the logit of blendshape coefficients as small as 1e-5, which turns the float noise
        # of another batch size (--batch-size 8 here, 64 in the reference) into about 1e-4.
        np.testing.assert_allclose(v[k]["features"][AU], r[k]["features"][AU], atol=1e-3)


def test_real_clip_carphone(carphone, weights, tmp_path):
    out = tmp_path / "out.h5"
    r = run_cli("run", carphone, out, "--weights", weights, "-q")
    assert r.exit_code == 0, r.output
    v = videos(out)["carphone_pristine.mp4"]
    assert v["features"].shape == (26, 120) and v["face"].mean() > 0.9
