"""seqhead data: format checks, label validation and matching, splits, no-face policies, padding."""

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from affextract.schema import FEATURE_NAMES
from seqhead.data import (DataError, escape_key, feature_indices, find_labels, match, pad_batch, read_features,
                          read_labels, split_indices, unescape_key)
from seqhead.simulate import SimulateOptions, simulate
from seqhead.train import TrainOptions, prepare


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    return simulate(SimulateOptions(d / "out.h5", scale=0.003, max_len=40, min_len=8, no_face_videos=0.05, seed=3))


def test_simulated_file_follows_format_v1(sim):
    with h5py.File(sim.h5) as h5:
        assert h5.attrs["format"] == "affextract-features" and h5.attrs["format_version"] == 1
        assert tuple(h5.attrs["feature_names"]) == FEATURE_NAMES
        for a in ("affextract_version", "model", "model_sha256", "detector", "alignment", "created", "updated"):
            assert a in h5.attrs
        key, g = next(iter(h5["videos"].items()))
        K = g["features"].shape[1]
        assert g["features"].shape == (26, K) and g["features"].dtype == np.float32
        assert g["face"].shape == (K,) and g["face"].dtype == bool
        assert g["frame"].dtype == np.int32 and g["time"].dtype == np.float64
        assert g["box"].shape == (K, 4) and g["landmarks"].shape == (K, 5, 2) and g["score"].shape == (K,)
        assert unescape_key(key) == g.attrs["source"] and "/" not in key
        for a in ("source", "size_bytes", "mtime", "fps", "frames_total", "width", "height"):
            assert a in g.attrs
        f = g["features"][()]
        assert np.isnan(f[:, ~g["face"][()]]).all() and np.isfinite(f[:, g["face"][()]]).all()
    df = pd.read_csv(sim.labels)
    assert list(df.columns[:8]) == ["File_ID", "Adoration", "Amusement", "Anxiety", "Disgust", "Empathic-Pain",
                                    "Fear", "Surprise"]
    assert set(df["Split"]) == {"Train", "Val", "Test"}


def test_escape_is_reversible():
    for s in ("a/b/c.mp4", "100%/x y.mp4", "plain.mp4", "a%2Fb/c"):
        assert "/" not in escape_key(s) and unescape_key(escape_key(s)) == s


@pytest.mark.parametrize("attrs, message", [({"format_version": 2}, "format_version 2"),
                                            ({"format": "something-else"}, "not an affextract feature file")])
def test_refuses_other_formats(tmp_path, attrs, message):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as h5:
        h5.attrs.update({"format": "affextract-features", "format_version": 1,
                         "feature_names": np.array(FEATURE_NAMES, dtype=h5py.string_dtype()), **attrs})
        h5.create_group("videos")
    with pytest.raises(DataError, match=message):
        read_features(p)


def test_feature_subsets():
    assert feature_indices("va") == [0, 1]
    assert feature_indices("au,va") == [0, 1] + list(range(9, 26))
    assert len(feature_indices("va,expr,au")) == 26
    with pytest.raises(DataError, match="subset"):
        feature_indices("va,faces")


def test_no_face_policies(sim):
    drop, _ = read_features(sim.h5, "va", "drop")
    fill, _ = read_features(sim.h5, "va", "fill")
    for d, f in zip(drop, fill):
        assert len(d.frames) == d.n_face and len(f.frames) == (f.n_total if f.n_face else 0)
        assert np.isfinite(d.frames).all() and np.isfinite(f.frames).all()
    assert any(v.n_face == 0 for v in drop)  # the simulator's faceless videos
    x, lengths = pad_batch([v.frames for v in drop if v.n_face == 0][:1] + [drop[0].frames])
    assert lengths[0] == 1 and not x[0].any()  # a faceless video is one zero frame


def test_pad_batch_zero_pads_and_cuts():
    a, b = np.ones((3, 2), np.float32), np.ones((7, 2), np.float32)
    x, lengths = pad_batch([a, b], 5)
    assert x.shape == (2, 5, 2) and list(lengths) == [3, 5]
    assert not x[0, 3:].any() and x[1].all()


def _labels(tmp_path, df, name="labels.csv"):
    p = tmp_path / name
    df.to_csv(p, index=False)
    return p


def test_hume_layout_out_of_the_box(sim):
    lab = read_labels(sim.labels)
    assert lab.id_column == "File_ID" and len(lab.targets) == 7 and lab.split is not None
    videos, _ = read_features(sim.h5)
    rows, vids, forms = match(lab, videos)
    assert set(forms) == {"stem"} and len(rows) == len(videos)
    tr, va = split_indices(lab, rows, 0.2, 0, False)
    assert len(tr) and len(va) and not set(tr) & set(va)


def test_generic_ids_relative_paths_and_random_grouped_split(sim, tmp_path):
    df = pd.read_csv(sim.labels, dtype={"File_ID": str})
    videos, _ = read_features(sim.h5)
    path_of = {Path(v.source).stem: v.source for v in videos}
    g = pd.DataFrame({"video": [path_of[i] for i in df.File_ID], "score_a": df.Fear, "score_b": df.Anxiety,
                      "subject": df.Subject_ID})
    lab = read_labels(_labels(tmp_path, g), group_column="subject")
    assert lab.id_column == "video" and lab.targets == ("score_a", "score_b") and lab.split is None
    rows, vids, forms = match(lab, videos)
    assert set(forms) == {"source"}
    tr, va = split_indices(lab, rows, 0.3, 1, True)
    subj = np.array(lab.groups)[rows]
    assert len(va) and not set(subj[tr]) & set(subj[va])


def test_error_ids_on_one_side_only(sim, tmp_path):
    df = pd.read_csv(sim.labels, dtype={"File_ID": str})
    videos, _ = read_features(sim.h5)
    extra = pd.concat([df, df.iloc[:2].assign(File_ID=["99998", "99999"])])
    with pytest.raises(DataError, match=r"2 labelled id\(s\) have no video.*99998"):
        match(read_labels(_labels(tmp_path, extra)), videos)
    fewer = df.iloc[3:]
    # Raised from Python, the error names the API argument, not the command line's flag.
    with pytest.raises(DataError, match=r"3 video\(s\) of the features file have no row.*allow_unmatched=True") as e:
        match(read_labels(_labels(tmp_path, fewer)), videos)
    assert "--allow-unmatched" not in str(e.value)
    rows, _, _ = match(read_labels(_labels(tmp_path, fewer)), videos, allow_unmatched=True)
    assert len(rows) == len(fewer)


def test_error_duplicate_ids(sim, tmp_path):
    df = pd.read_csv(sim.labels, dtype={"File_ID": str})
    with pytest.raises(DataError, match=r"1 duplicate id.*lines 2 and"):
        read_labels(_labels(tmp_path, pd.concat([df, df.iloc[:1]])))


def test_error_non_numeric_target(sim, tmp_path):
    df = pd.read_csv(sim.labels, dtype=str)
    df.loc[4, "Fear"] = "high"
    with pytest.raises(DataError, match=r"non-numeric.*'Fear'.*line\(s\) 6: 'high'"):
        read_labels(_labels(tmp_path, df))


def test_error_missing_target(sim, tmp_path):
    df = pd.read_csv(sim.labels, dtype=str)
    i = int(np.where(df.Split == "Train")[0][0])
    df.loc[i, "Surprise"] = ""
    with pytest.raises(DataError, match=rf"missing value.*'Surprise'.*line\(s\) {i + 2}"):
        read_labels(_labels(tmp_path, df))
    test_row = int(np.where(df.Split == "Test")[0][0])
    df.loc[i, "Surprise"] = "0.5"
    df.loc[test_row, "Surprise"] = ""  # test rows may come without targets
    assert np.isnan(read_labels(_labels(tmp_path, df)).y).sum() == 1


def test_short_form_finds_labels_beside_or_says_how(sim, tmp_path):
    assert find_labels(sim.h5, None) == sim.labels
    lone = tmp_path / "lone.h5"
    lone.write_bytes(Path(sim.h5).read_bytes())
    with pytest.raises(DataError, match="--labels"):
        find_labels(lone, None)
    with pytest.raises(DataError, match="--labels"):
        prepare(TrainOptions(h5=lone, out=tmp_path / "r"))


def _rename_videos(src: Path, dst: Path, sources: dict[str, str]) -> None:
    """Copy a features file, giving some videos new relative paths (group key and `source` attribute)."""
    import shutil

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as h5:
        for old, new in sources.items():
            h5.move(f"videos/{escape_key(old)}", f"videos/{escape_key(new)}")
            h5[f"videos/{escape_key(new)}"].attrs["source"] = new


def test_every_promised_id_form_matches_row_by_row(sim, tmp_path):
    df = pd.read_csv(sim.labels, dtype={"File_ID": str})
    split_of = dict(zip(df.File_ID, df.Split))
    ids = list(df.File_ID)
    # Videos 0 and 1 move to a/clip.mp4 and b/clip.mp4: same stem and file name, different folders.
    h5 = tmp_path / "renamed.h5"
    _rename_videos(sim.h5, h5, {f"{split_of[ids[0]]}/{ids[0]}.mp4": "a/clip.mp4",
                                f"{split_of[ids[1]]}/{ids[1]}.mp4": "b/clip.mp4"})
    written = ["a/clip", "b/clip.mp4",  # mixed forms naming two videos with one stem
               f"{ids[2]}.mp4",  # file name with suffix
               str(int(ids[3])), f"{int(ids[4])}.mp4",  # leading zeros lost (with and without suffix)
               f"{split_of[ids[5]]}/{ids[5]}",  # relative path without suffix
               escape_key(f"{split_of[ids[6]]}/{ids[6]}.mp4")] + ids[7:]  # HDF5 key, then stems
    lab = read_labels(_labels(tmp_path, df.assign(File_ID=written)))
    videos, _ = read_features(h5)
    rows, vids, forms = match(lab, videos)
    assert len(rows) == len(videos) == len(df)
    source_of_row = {r: videos[j].source for r, j in zip(rows, vids)}
    assert source_of_row[0] == "a/clip.mp4" and source_of_row[1] == "b/clip.mp4"
    for r in range(2, len(df)):
        assert Path(source_of_row[r]).stem == ids[r], (r, written[r], source_of_row[r])
    assert forms[:8] == ["path", "source", "name", "number", "number", "path", "key", "stem"]


def test_id_errors_name_rows_and_forms(sim, tmp_path):
    df = pd.read_csv(sim.labels, dtype={"File_ID": str})
    videos, _ = read_features(sim.h5)
    two_names = df.assign(File_ID=[str(int(df.File_ID[1]))] + list(df.File_ID[1:]))  # '1' and '00001': one video
    with pytest.raises(DataError, match=r"1 video\(s\) named by two rows: '1' \(line 2\) and '00001' \(line 3\)"):
        match(read_labels(_labels(tmp_path, two_names)), videos)
    h5 = tmp_path / "renamed.h5"
    split_of = dict(zip(df.File_ID, df.Split))
    _rename_videos(sim.h5, h5, {f"{split_of[i]}/{i}.mp4": f"{d}/clip.mp4" for i, d in zip(df.File_ID[:2], "ab")})
    clip = df.assign(File_ID=["clip"] + list(df.File_ID[1:]))
    with pytest.raises(DataError, match=r"1 id\(s\) name several videos: clip \(by stem\)"):
        match(read_labels(_labels(tmp_path, clip)), read_features(h5)[0])


def test_peak_setting_differs_in_lengths_and_labels(tmp_path):
    kw = dict(scale=0.004, max_len=60, min_len=8, seed=2)
    ep = simulate(SimulateOptions(tmp_path / "e.h5", tmp_path / "e.csv", **kw))
    pk = simulate(SimulateOptions(tmp_path / "p.h5", tmp_path / "p.csv", setting="peak", **kw))
    assert pk.n_videos == ep.n_videos and pk.n_frames < 0.85 * ep.n_frames  # shorter videos on average
    with h5py.File(pk.h5) as h5:
        assert '"setting": "peak"' in h5.attrs["detector"]
    videos, _ = read_features(pk.h5)
    rows, vids, forms = match(read_labels(pk.labels), videos)
    assert len(rows) == len(videos) and set(forms) == {"stem"}
    with pytest.raises(ValueError, match="setting 'sideways'"):
        SimulateOptions(tmp_path / "x.h5", setting="sideways")
