"""`affextract run --ray` on one local Ray cluster (2 CPUs) shared by every test here: the file equals a
single-process run, a killed worker or driver loses nothing, a manifest input works. Real decoder, detector, model,
HDF5 files and Ray processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from affextract.cluster import RayOptions, extract_on_ray
from affextract.extract import ExtractOptions, extract
from affextract.features import open_features
from conftest import astronaut_frames, descendants, noface_frames, signal_after, write_video

ray = pytest.importorskip("ray", reason='the ray extra is not installed: pip install -e ".[ray]"')

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: its start (about 10 s) is paid once."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Four clips (a face, a face that leaves, one long enough to be killed mid-way) and a file that is no video."""
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "a.mp4", astronaut_frames(24, size=(160, 120)))
    write_video(d / "b.mp4", np.concatenate([astronaut_frames(12, size=(160, 120)), noface_frames(12, size=(160, 120))]))
    (d / "sub").mkdir()
    write_video(d / "sub" / "c.mp4", astronaut_frames(30, size=(160, 120)))
    # Long: repeats a short clip (quick to write, slow to analyse).
    write_video(d / "z_long.mp4", np.resize(astronaut_frames(20, size=(160, 120)), (160, 120, 160, 3)))
    (d / "broken.mp4").write_bytes(b"not a video")
    return d


def _options(weights, **kw) -> ExtractOptions:
    return ExtractOptions(weights=weights, workers=1, **kw)


@pytest.fixture(scope="module")
def reference(videos, weights, tmp_path_factory) -> Path:
    """The single-process run (one worker process) every Ray run is compared with."""
    out = tmp_path_factory.mktemp("ref") / "single.h5"
    extract(videos, out, _options(weights))
    return out


def _layout(path: Path) -> dict:
    """Every attribute and dataset of a feature file (a --shards folder through its manifest's links), timestamps
    (created, updated, when) left out."""
    from affextract.format import index_file

    def attrs(obj) -> dict:
        return {k: np.asarray(v).tolist() for k, v in obj.attrs.items() if k not in ("created", "updated", "when")}

    out = {}
    with h5py.File(index_file(path), "r") as f:
        out["/"] = attrs(f)
        for grp in ("videos", "failed"):
            for name in f[grp]:
                g = f[grp][name]
                out[f"{grp}/{name}"] = attrs(g)
                for d in g:
                    out[f"{grp}/{name}/{d}"] = (g[d].dtype.str, g[d][()])
    return out


def assert_same_file(a: Path, b: Path) -> None:
    """Bit-identical: the same names, dtypes, values (NaN where NaN) and attributes."""
    la, lb = _layout(a), _layout(b)
    assert sorted(la) == sorted(lb)
    for k in la:
        if isinstance(la[k], tuple):
            assert la[k][0] == lb[k][0], k
            np.testing.assert_array_equal(la[k][1], lb[k][1], err_msg=k)
        else:
            assert la[k] == lb[k], k


def test_ray_run_of_a_manifest_equals_the_single_process_run_of_its_folder_bit_for_bit(cluster, videos, weights,
                                                                                      reference, tmp_path):
    """A manifest in the folder names its files (relative and absolute paths, a comment, a blank line): the keys and
    every value are those of the single-process run on the folder, which a folder run then continues."""
    manifest = videos / "list.txt"
    manifest.write_text(f"# the clips\na.mp4\nb.mp4\n\n{videos / 'sub' / 'c.mp4'}\nz_long.mp4\nbroken.mp4\n")
    out = tmp_path / "ray.h5"
    events = []
    try:
        report = extract_on_ray(manifest, out, _options(weights), on_event=events.append)
    finally:
        manifest.unlink()
    assert sorted(report.written) == ["a.mp4", "b.mp4", "sub/c.mp4", "z_long.mp4"]
    assert [k for k, _ in report.failed] == ["broken.mp4"]
    assert_same_file(out, reference)
    # The driver's progress, as a plain run reports it: every video ends once, the failure marked, every frame counted.
    from affextract.extract import FramesAnalysed, RunEnded, RunStarted, VideoEnded

    assert isinstance(events[0], RunStarted) and len(events[0].sizes) == 5 and events[-1] == RunEnded(True)
    assert sorted((e.index, e.failed) for e in events if isinstance(e, VideoEnded)) == [
        (0, False), (1, False), (2, True), (3, False), (4, False)]  # sorted keys: a, b, broken, sub/c, z_long
    assert sum(e.frames for e in events if isinstance(e, FramesAnalysed)) == report.frames == 24 + 24 + 30 + 160
    # Resuming from the folder finds every video stored: nothing left to do (the broken file is retried).
    again = extract_on_ray(videos, out, _options(weights))
    assert again.written == [] and len(again.skipped) == 4 and [k for k, _ in again.failed] == ["broken.mp4"]


def _ray_processes(title: str) -> list[int]:
    """Processes of the test's cluster whose title (Ray's `ray::<task or actor>`) starts with `title`."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if cmd.startswith(title):
            found.append(pid)
    return found


def test_ray_workers_killed_mid_run_lose_nothing_and_write_nothing_twice(cluster, videos, weights, reference,
                                                                        tmp_path):
    """Kill -9 the task process analysing the long video while it is being written, then the model's actor while
    the retried video is: the run retries both, and the folder of shards it writes equals the single-process file."""
    out = tmp_path / "out"
    done: dict = {}
    run = threading.Thread(target=lambda: done.setdefault("report", extract_on_ray(
        videos, out, _options(weights, shards=True, commit_every=0))))
    run.start()
    parts = out / "manifest.h5.parts"
    killed = []
    deadline = time.monotonic() + 120
    for victim in ("ray::affextract-faces:z_long.mp4", "ray::_Analyser"):
        while time.monotonic() < deadline and run.is_alive():
            writing_long = any(parts.glob("*.tmp")) and _ray_processes("ray::affextract-faces:z_long.mp4")
            pids = [p for p in _ray_processes(victim) if p not in killed] if writing_long else []
            if pids:
                assert run.is_alive()  # the run is still going when the worker dies
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                break
            time.sleep(0.05)
    run.join(300)
    assert len(killed) == 2, "the long video was not seen in progress twice"
    report = done["report"]
    assert sorted(report.written) == ["a.mp4", "b.mp4", "sub/c.mp4", "z_long.mp4"]  # each once
    assert_same_file(out, reference)
    with h5py.File(out / "manifest.h5", "r") as f:
        linked = sorted(Path(f["videos"].get(n, getlink=True).filename).name for n in f["videos"])
    assert sorted(p.name for p in (out / "shards").iterdir()) == linked  # no stray shard of a killed attempt
    assert sorted(p.name for p in out.iterdir()) == ["manifest.h5", "shards"]  # nor a part-written one
    # The folder reads as one file for the readers: seqhead, `affextract info` and `export`.
    from typer.testing import CliRunner

    from affextract.cli import app
    from seqhead.data import read_features

    for (x, y) in zip(read_features(out)[0], read_features(reference)[0]):
        assert x.key == y.key and np.array_equal(x.frames, y.frames)
    r = CliRunner().invoke(app, ["info", str(out)])
    assert r.exit_code == 0 and "5 videos (4 complete, 1 failed)" in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(app, ["export", str(out), "-o", str(tmp_path / "out.csv")])
    assert r.exit_code == 0 and len((tmp_path / "out.csv").read_text().splitlines()) == 1 + 24 + 24 + 30 + 160


def test_driver_killed_mid_run_then_rerun_gives_the_full_file(cluster, videos, weights, reference, tmp_path):
    out = tmp_path / "out.h5"
    cmd = [sys.executable, "-m", "affextract", "run", str(videos), str(out), "--weights", str(weights),
           "--workers", "1", "--ray", "--ray-address", cluster, "--commit-every", "100000", "--progress-every", "0"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # Four videos ended (the broken file among them): the long one is the one in progress.
    err = signal_after(p, "progress: 4/5 videos", signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL, err
    assert "progress: 4/5 videos (1 failed), " in err, err  # the driver's one view: videos, failures, frames, rate
    assert not out.exists() and len(list((tmp_path / "out.h5.parts").glob("*.h5"))) == 4, err
    # The rerun (in this process, on the same cluster) merges the four and does the long video only.
    report = extract_on_ray(videos, out, _options(weights))
    assert report.written == ["z_long.mp4"] and [k for k, _ in report.failed] == ["broken.mp4"]
    assert_same_file(out, reference)


def test_seqhead_sweep_on_ray_gives_what_one_process_gives_and_resumes(cluster, sim, tmp_path):
    from seqhead.cluster import RaySweep
    from seqhead.sweep import SweepOptions, parse_grid, sweep
    from seqhead.train import TrainOptions
    from conftest import TINY

    base = TrainOptions(h5=sim.h5, out=tmp_path, **TINY)
    variants = parse_grid(["head=mean,ridge"])  # ridge: no network to train, so the second task is quick
    here = sweep(SweepOptions(base, tmp_path / "here", variants))
    first = sweep(SweepOptions(base, tmp_path / "ray", variants, ray=RaySweep()))
    assert first.n_run == 2 and first.n_reused == 0
    cols = ["config", "seed", "val_mean_pearson", "best_epoch", "epochs_run"]
    assert first.runs[cols].equals(here.runs[cols])  # the same runs, in the same order, with the same scores
    again = sweep(SweepOptions(base, tmp_path / "ray", variants, ray=RaySweep()))
    assert again.n_run == 0 and again.n_reused == 2


def test_an_actor_that_cannot_start_is_the_runs_one_error(cluster, videos, weights, tmp_path):
    """A GPU asked for on a cluster without one: the model's actor cannot start; the run says why, once, and writes
    nothing."""
    with pytest.raises(RuntimeError, match="actor running the model could not start: .*sees no CUDA GPU"):
        extract_on_ray(videos, tmp_path / "out.h5", _options(weights, device="cuda"))
    assert not (tmp_path / "out.h5").exists()
