import h5py
import numpy as np
import pytest

from affextract.schema import FEATURE_NAMES
from affextract.features import open_features
from affextract.format import FormatError, Provenance, escape_key, unescape_key
from affextract.store import FeatureStore, FeatureWriter, IncompatibleError, LockedError

PROV = Provenance(model="m", model_sha256="0" * 64, detector='{"name": "mtcnn"}', alignment="arcface",
                  sampling='{"fps": null}')
ATTRS = {"source": "x", "size_bytes": 10, "mtime": 1.5, "fps": 25.0, "frames_total": 5, "width": 64, "height": 48}


def rows(k, face=None):
    rng = np.random.default_rng(k)
    face = np.ones(k, bool) if face is None else face
    feats = rng.random((k, 26)).astype(np.float32)
    feats[~face] = np.nan
    return (feats, face, np.arange(k, dtype=np.int32), np.arange(k) / 25.0, rng.random((k, 4)),
            rng.random((k, 5, 2)), rng.random(k))


def write(store, key, k, chunks=2, status="complete", error=""):
    w = store.begin_video(key, ATTRS | {"source": key})
    r = rows(k)
    for part in np.array_split(np.arange(k), chunks):
        w.append(*(a[part] for a in r))
    w.finish(status, error)
    return r


@pytest.mark.parametrize("key", ["a.mp4", "dir/sub/b c.mp4", "100%/x%2F.mp4", ".hidden/v.mov"])
def test_key_escaping_round_trip(key):
    name = escape_key(key)
    assert "/" not in name and unescape_key(name) == key


def test_layout_matches_format_v1(tmp_path):
    out = tmp_path / "out.h5"
    with FeatureStore(out, PROV) as store:
        r = write(store, "d/v.mp4", 7, chunks=3)
    with h5py.File(out) as f:
        assert f.attrs["format"] == "affextract-features" and f.attrs["format_version"] == 1
        assert tuple(x.decode() if isinstance(x, bytes) else x for x in f.attrs["feature_names"]) == FEATURE_NAMES
        for a in ("affextract_version", "model", "model_sha256", "detector", "alignment", "created", "updated"):
            assert a in f.attrs
        g = f["videos"]["d%2Fv.mp4"]
        expect = {"features": ((26, 7), np.float32), "face": ((7,), bool), "frame": ((7,), np.int32),
                  "time": ((7,), np.float64), "box": ((7, 4), np.float32), "landmarks": ((7, 5, 2), np.float32),
                  "score": ((7,), np.float32)}
        for name, (shape, dtype) in expect.items():
            assert g[name].shape == shape and g[name].dtype == dtype, name
        np.testing.assert_array_equal(g["features"][()], r[0].T)
        for a in ("source", "size_bytes", "mtime", "fps", "frames_total", "width", "height"):
            assert a in g.attrs
        assert g.attrs["source"] == "d/v.mp4" and g.attrs["status"] == "complete"
    with open_features(out) as ff:
        v = ff["d/v.mp4"]
    assert ff.keys == ["d/v.mp4"] and np.array_equal(v.frame, np.arange(7))
    assert not (tmp_path / "out.h5.parts").exists() and not (tmp_path / "out.h5.lock").exists()


def test_failures_recorded_and_replaced_by_success(tmp_path):
    out = tmp_path / "out.h5"
    with FeatureStore(out, PROV) as store:
        store.record_failure("bad.mp4", {"source": "bad.mp4", "size_bytes": 0, "mtime": 0.0}, "cannot decode")
    with open_features(out) as ff:
        summary = ff.summary()
    assert [(s.key, s.status, s.error) for s in summary] == [("bad.mp4", "failed", "cannot decode")]
    with FeatureStore(out, PROV) as store:
        assert store.stored() == {}  # failures are retried
        write(store, "bad.mp4", 3)
    with open_features(out) as ff:
        summary = ff.summary()
    assert [(s.key, s.status, s.frames) for s in summary] == [("bad.mp4", "complete", 3)]


def test_incompatible_provenance_refused_and_file_untouched(tmp_path):
    out = tmp_path / "out.h5"
    with FeatureStore(out, PROV) as store:
        write(store, "a.mp4", 4)
    before = out.read_bytes()
    other = Provenance(**{**PROV.__dict__, "model_sha256": "1" * 64})
    with pytest.raises(IncompatibleError, match="model_sha256.*new output file"):
        with FeatureStore(out, other):
            pass
    assert out.read_bytes() == before


def test_lock_refuses_second_writer(tmp_path):
    out = tmp_path / "out.h5"
    with FeatureStore(out, PROV):
        with pytest.raises(LockedError, match="being written by another affextract run"):
            with FeatureStore(out, PROV):
                pass
    with FeatureStore(out, PROV):  # released afterwards
        pass


def test_leftover_shards_of_a_crash_are_merged_and_partial_ones_dropped(tmp_path):
    out = tmp_path / "out.h5"
    store = FeatureStore(out, PROV).open()
    write(store, "done.mp4", 5)
    w = store.begin_video("cut.mp4", ATTRS)  # a video cut off mid-way: its shard is still *.tmp
    w.append(*rows(2))
    w.f.flush()
    # simulate kill -9: no commit, no unlock (release the lock fd as the OS would)
    import os
    os.close(store._lock_fd)
    assert not out.exists()
    assert (tmp_path / "out.h5.parts").exists()  # the crash left its shards behind
    with FeatureStore(out, PROV) as again:
        assert set(again.stored()) == {"done.mp4"}
    assert not (tmp_path / "out.h5.parts").exists()  # merged or dropped, every shard is gone
    with open_features(out) as ff:
        assert ff.keys == ["done.mp4"] and len(ff["done.mp4"]) == 5


def test_reader_refuses_unknown_version(tmp_path):
    p = tmp_path / "v2.h5"
    with h5py.File(p, "w") as f:
        f.attrs["format"], f.attrs["format_version"] = "affextract-features", 2
    with pytest.raises(FormatError, match="format_version 2.*reads version 1"):
        open_features(p)
    q = tmp_path / "other.h5"
    h5py.File(q, "w").close()
    with pytest.raises(FormatError, match="not an affextract feature file"):
        open_features(q)


def test_open_and_close_without_a_with_block(tmp_path):
    out = tmp_path / "out.h5"
    store = FeatureStore(out, PROV).open()
    assert (tmp_path / "out.h5.lock").exists()
    write(store, "a.mp4", 3)
    store.close()
    assert not (tmp_path / "out.h5.lock").exists() and not (tmp_path / "out.h5.parts").exists()
    with open_features(out) as ff:
        assert ff.keys == ["a.mp4"]


def test_writer_and_reader_round_trip_provenance_extra_datasets_and_attributes(tmp_path):
    src = tmp_path / "src.h5"
    rng = np.random.default_rng(0)
    moves = rng.random((7, 52)).astype(np.float32)  # e.g. measured movement beside the 26 features
    with FeatureStore(src, PROV, attrs={"movement_names": "m0 m1"}) as store:
        w = store.begin_video("d/v.mp4", ATTRS | {"source": "d/v.mp4"}, frames=7)
        r = rows(7)
        for part in (slice(0, 4), slice(4, 7)):
            w.append(*(a[part] for a in r), movement=moves[part])
        w.finish("complete")
    with open_features(src) as ff:
        assert ff.provenance == PROV and ff.attrs["movement_names"] == "m0 m1"
        v = ff["d/v.mp4"]
        np.testing.assert_array_equal(v.extra["movement"], moves)
        np.testing.assert_array_equal(v.features, r[0])
        light = ff.read("d/v.mp4", ("features", "face"))
        assert light.box is None and light.extra == {} and len(light) == 7
        derived = tmp_path / "derived.h5"
        with FeatureWriter(derived, ff.provenance) as out:
            out.add(v.take(v.time < 0.1))  # frames 0, 1, 2 (25 fps)
        with pytest.raises(FileExistsError, match="derived.h5 exists"):
            FeatureWriter(derived, ff.provenance)
    with open_features(derived) as ff:
        d = ff["d/v.mp4"]
        assert ff.provenance == PROV and len(d) == 3 and d.attrs["source"] == "d/v.mp4"
        np.testing.assert_array_equal(d.extra["movement"], moves[:3])
        np.testing.assert_array_equal(d.landmarks, r[5][:3].astype(np.float32))
    with h5py.File(derived) as f:
        assert f["videos/d%2Fv.mp4/features"].shape == (26, 3) and f["videos/d%2Fv.mp4/movement"].shape == (3, 52)


def test_every_chunk_of_a_video_brings_the_same_datasets(tmp_path):
    with FeatureWriter(tmp_path / "x.h5", PROV) as out:
        w = out.video("a.mp4", ATTRS)
        w.append(*rows(2), movement=np.zeros((2, 3)))
        with pytest.raises(ValueError, match="same datasets"):
            w.append(*rows(2))
        with pytest.raises(ValueError, match="movement: one row per frame"):
            w.append(*rows(2), movement=np.zeros((5, 3)))
