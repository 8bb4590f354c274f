"""The Python reading API: open_features, per-video arrays, DataFrames, lazy top-level names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from affextract.schema import FEATURE_NAMES
from affextract.format import FormatError, Provenance
from affextract.store import FeatureStore


def synthetic_video(k: int, seed: int, gaps: list[tuple[int, int]] = ()) -> dict[str, np.ndarray]:
    """Arrays for one video of k frames as `affextract run` writes them: valid ranges, NaN where no face."""
    rng = np.random.default_rng(seed)
    face = np.ones(k, bool)
    for a, b in gaps:
        face[a:b] = False
    logits = rng.normal(size=(k, 7))
    expr = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    feats = np.concatenate([np.tanh(rng.normal(size=(k, 2))), expr, 1 / (1 + np.exp(-rng.normal(size=(k, 17))))], 1)
    x1 = rng.uniform(10, 50, (k, 1))
    box = np.concatenate([x1, x1 + 5, x1 + 80, x1 + 100], 1)
    marks = rng.uniform(20, 120, (k, 5, 2))
    feats[~face], box[~face], marks[~face] = np.nan, np.nan, np.nan
    score = np.where(face, rng.uniform(0.9, 1, k), np.nan)
    return {"features": feats.astype(np.float32), "face": face, "frame": np.arange(k, dtype=np.int32) * 2,
            "time": np.arange(k) * 2 / 25.0, "box": box.astype(np.float32), "landmarks": marks.astype(np.float32),
            "score": score.astype(np.float32)}


def write_features(path: Path, videos: dict[str, dict[str, np.ndarray]], failed: dict[str, str] = {}) -> Path:
    """Write videos through the real store (format v1), as extraction would."""
    prov = Provenance(model="synthetic", model_sha256="0" * 64, detector='{"name": "none"}', alignment="none",
                      sampling='{"fps": 12.5}')
    with FeatureStore(path, prov) as store:
        for key, d in videos.items():
            w = store.begin_video(key, {"source": key, "size_bytes": 1, "mtime": 0.0, "fps": 25.0,
                                        "frames_total": 2 * len(d["frame"]), "width": 320, "height": 240})
            half = len(d["frame"]) // 2  # two appends, as extraction writes chunk by chunk
            for sl in (slice(0, half), slice(half, None)):
                w.append(*(d[n][sl] for n in ("features", "face", "frame", "time", "box", "landmarks", "score")))
            w.finish("complete")
        for key, err in failed.items():
            store.record_failure(key, {"source": key, "size_bytes": 0, "mtime": 0.0}, err)
    return path


VIDEOS = {"a.mp4": (40, 0, [(10, 15), (38, 40)]), "sub/b%1.mov": (25, 1, []), "sub/c.mp4": (12, 2, [(0, 12)])}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    arrays = {k: synthetic_video(n, seed, gaps) for k, (n, seed, gaps) in VIDEOS.items()}
    path = write_features(tmp_path_factory.mktemp("feat") / "out.h5", arrays, {"broken.mp4": "cannot decode"})
    return path, arrays


def test_open_features_arrays_match_the_file(synthetic):
    import affextract

    path, arrays = synthetic
    with affextract.open_features(path) as ff:
        assert ff.keys == sorted(VIDEOS) and len(ff) == 3 and "sub/b%1.mov" in ff
        assert ff.feature_names == FEATURE_NAMES
        assert ff.attrs["model"] == "synthetic" and ff.attrs["format_version"] == 1
        assert ff.failed == {"broken.mp4": "cannot decode"}
        for v in ff:
            want = arrays[v.key]
            assert v.features.shape == (len(want["frame"]), 26)
            np.testing.assert_array_equal(v.features, want["features"])  # NaN compare equal here
            for name in ("face", "frame", "time", "box", "landmarks", "score"):
                np.testing.assert_array_equal(getattr(v, name), want[name])
            np.testing.assert_array_equal(v["happiness"], want["features"][:, FEATURE_NAMES.index("happiness")])
            assert v.va.shape == (len(v), 2) and v.expressions.shape == (len(v), 7) and v.aus.shape == (len(v), 17)
            assert v.attrs["fps"] == 25.0 and v.status == "complete" and v.source == v.key
        # the file's own layout is (26, K); the API is frame-major
        with h5py.File(path) as f:
            np.testing.assert_array_equal(f["videos/sub%2Fb%251.mov/features"][()], ff["sub/b%1.mov"].features.T)


def test_dataframe_has_named_columns_and_all_rows(synthetic):
    from affextract import open_features

    path, arrays = synthetic
    with open_features(path) as ff:
        df = ff.dataframe()
        one = ff.dataframe(["c"])  # a unique stem is enough
    assert list(df.columns) == ["video", "frame", "time", "face", *FEATURE_NAMES]
    assert len(df) == sum(len(a["frame"]) for a in arrays.values())
    a = df[df.video == "a.mp4"]
    np.testing.assert_array_equal(a[list(FEATURE_NAMES)].to_numpy(np.float32), arrays["a.mp4"]["features"])
    assert a.face.tolist() == arrays["a.mp4"]["face"].tolist()
    assert a[~a.face][list(FEATURE_NAMES)].isna().all().all()
    assert set(one.video) == {"sub/c.mp4"} and len(one) == 12 and not one.face.any()
    sums = a[a.face][["neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise"]].sum(axis=1)
    np.testing.assert_allclose(sums, 1, atol=1e-5)


def test_errors_name_the_file_and_what_to_do(synthetic, tmp_path):
    from affextract import open_features

    path, _ = synthetic
    with open_features(path) as ff:
        with pytest.raises(KeyError, match="no video 'nope.mp4'.*affextract info"):
            ff["nope.mp4"]
        with pytest.raises(KeyError, match="broken.mp4.*failed to decode.*cannot decode"):
            ff["broken.mp4"]
        with pytest.raises(KeyError, match="no feature named 'AU3'"):
            ff["a.mp4"]["AU3"]
    with _two_stems(tmp_path) as two, pytest.raises(KeyError, match="'x' names several videos.*give the full key"):
        two.find("x")
    with pytest.raises(FileNotFoundError, match="missing.h5.*affextract run"):
        open_features(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(FormatError, match="text.h5 is not an HDF5 file"):
        open_features(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "affextract-features"
        f.attrs["format_version"] = 99
    with pytest.raises(FormatError, match="format_version 99"):
        open_features(tmp_path / "other.h5")


def _two_stems(tmp_path):
    from affextract import open_features

    path = write_features(tmp_path / "stems.h5", {"d1/x.mp4": synthetic_video(3, 0), "d2/x.mov": synthetic_video(3, 1)})
    return open_features(path)


def test_public_names():
    import affextract

    assert callable(affextract.extract) and affextract.ExtractOptions().detector == "mtcnn"
    with pytest.raises(AttributeError, match="nope"):
        affextract.nope


def test_extract_and_export_stay_callable_after_their_modules_are_imported(synthetic, tmp_path):
    """The functions share their names with submodules; importing the submodules must not break the API."""
    code = ("import affextract; from affextract.extract import ExtractOptions; from affextract.export import export; "
            
            "assert callable(affextract.extract) and affextract.ExtractOptions is ExtractOptions; "
            f"r = affextract.export({str(synthetic[0])!r}, {str(tmp_path / 'x.csv')!r}); assert r.rows == 77")
    subprocess.run([sys.executable, "-c", code], check=True)
