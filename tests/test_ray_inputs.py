"""What `--ray` shares with every run, tested without a Ray cluster: manifest inputs (a text or CSV list of paths),
the --shards output folder, and the one-line error where the ray extra is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from affextract.cli import app
from affextract.features import open_features
from affextract.video import find_sources
from conftest import astronaut_frames, write_video

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _tree(d: Path) -> Path:
    (d / "sub").mkdir(parents=True)
    for name in ("a.mp4", "sub/b.mp4"):
        write_video(d / name, astronaut_frames(6, size=(160, 120)))
    return d


def test_text_manifest_names_videos_as_a_run_on_its_folder(tmp_path):
    d = _tree(tmp_path / "videos")
    elsewhere = write_video(tmp_path / "other.mp4", astronaut_frames(3, size=(160, 120)))
    (d / "list.txt").write_text(f"# clips\n\na.mp4\n  sub/b.mp4  \n{elsewhere}\n")
    sources, ignored = find_sources([d / "list.txt"])
    assert [s.key for s in sources] == sorted(["a.mp4", "sub/b.mp4", elsewhere.as_posix().lstrip("/")])
    assert [s.path for s in sources if s.key == "a.mp4"] == [d / "a.mp4"] and ignored == []
    folder, _ = find_sources([d])
    assert [s.key for s in folder] == ["a.mp4", "sub/b.mp4"]  # the same keys as the manifest's entries in the folder


def test_csv_manifest_reads_its_path_column_and_names_the_line_of_a_missing_file(tmp_path):
    d = _tree(tmp_path / "videos")
    (d / "list.csv").write_text("id,path\n1,a.mp4\n2,sub/b.mp4\n")
    assert [s.key for s in find_sources([d / "list.csv"])[0]] == ["a.mp4", "sub/b.mp4"]
    (d / "list.csv").write_text("id,path\n1,a.mp4\n2,sub/gone.mp4\n")
    with pytest.raises(FileNotFoundError, match=r"list.csv line 3: no such file .*sub/gone.mp4 .*fix or remove"):
        find_sources([d / "list.csv"])
    (d / "list.csv").write_text("id,file\n1,a.mp4\n")
    with pytest.raises(ValueError, match="list.csv: a CSV manifest names its videos in a `path` column; its columns "
                                         "are id, file"):
        find_sources([d / "list.csv"])


def test_run_of_a_manifest_into_a_shards_folder_reads_as_one_file_and_resumes(weights, tmp_path):
    """Without Ray: `affextract run list.txt out --shards`; info and open_features read the folder; a rerun skips
    every stored video; a merged file and a folder are not mistaken for each other."""
    d = _tree(tmp_path / "videos")
    (d / "list.txt").write_text("a.mp4\nsub/b.mp4\n")
    out = tmp_path / "out"
    args = ["run", str(d / "list.txt"), str(out), "--weights", str(weights), "--no-movement", "--shards", "-q"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.h5", "shards"]
    with open_features(out) as ff:
        assert ff.keys == ["a.mp4", "sub/b.mp4"] and len(ff["sub/b.mp4"]) == 6 and ff.pending == 0
    with h5py.File(out / "manifest.h5", "r") as f:  # links, not copies: the manifest stays small
        assert all(isinstance(f["videos"].get(n, getlink=True), h5py.ExternalLink) for n in f["videos"])
    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0 and "2 videos (2 complete)" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "0 extracted, 2 already done" in " ".join(r.output.split()), r.output
    # A plain run on the folder says what it is; --shards on a merged file too.
    r = runner.invoke(app, [*args[:2], str(tmp_path / "x.h5"), *args[3:-2]])
    assert r.exit_code == 0
    r = runner.invoke(app, [*args[:2], str(tmp_path / "x.h5"), *args[3:]])
    assert r.exit_code == 2 and "--shards writes a folder: drop --shards" in " ".join(r.output.split()), r.output


@pytest.mark.parametrize("command", ["affextract run VIDEOS OUT.h5", "seqhead sweep OUT.h5 --grid head=mean"])
def test_ray_without_the_extra_is_one_line_naming_the_install(tmp_path, command):
    """`import ray` fails in the child (sys.modules['ray'] = None), as where the extra is not installed."""
    d = _tree(tmp_path / "videos")
    package, *args = command.replace("VIDEOS", str(d)).replace("OUT.h5", str(tmp_path / "out.h5")).split()
    code = f"import sys; sys.modules['ray'] = None; from {package}.cli import app; app()"
    r = subprocess.run([sys.executable, "-c", code, *args, "--ray"], capture_output=True, text=True, timeout=120,
                       env=os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ['error: --ray needs the ray extra, which is not installed: '
                                             'pip install -e ".[ray]"'], r.stderr
    assert not (tmp_path / "out.h5").exists()


def test_shards_folder_merge_killed_between_link_and_manifest_is_completed_by_the_next_open(tmp_path, monkeypatch):
    """A kill after a finished shard got its name in shards/ but before the new manifest replaced the old one: the
    next open links it once, a replaced video's old shard is removed, nothing is left behind."""
    import affextract.store as store_module
    from affextract.store import FeatureStore
    from test_store import PROV, write

    out = tmp_path / "out"
    with FeatureStore(out, PROV, links=True) as store:
        first = write(store, "a.mp4", 5)
    old_shard = sorted((out / "shards").iterdir())
    store = FeatureStore(out, PROV, links=True).open()
    again = write(store, "a.mp4", 7)  # the same video, extracted again (changed): its new shard replaces the old
    write(store, "b.mp4", 3)
    real = os.replace

    def killed(src, dst):
        if Path(dst).name == "manifest.h5":
            raise KeyboardInterrupt  # the process dies here
        real(src, dst)

    monkeypatch.setattr(store_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        store.commit()
    store._unlock()
    monkeypatch.setattr(store_module.os, "replace", real)
    assert len(list((out / "shards").iterdir())) == 3 and len(list((out / "manifest.h5.parts").glob("*.h5"))) == 2
    with open_features(out) as ff:  # the old manifest, still whole
        assert ff.keys == ["a.mp4"] and np.array_equal(ff["a.mp4"].features, first[0])
    FeatureStore(out, PROV, links=True).open().close()
    with open_features(out) as ff:
        assert ff.keys == ["a.mp4", "b.mp4"] and np.array_equal(ff["a.mp4"].features, again[0])
    assert old_shard[0] not in set((out / "shards").iterdir()) and len(list((out / "shards").iterdir())) == 2
    assert sorted(p.name for p in out.iterdir()) == ["manifest.h5", "shards"]
