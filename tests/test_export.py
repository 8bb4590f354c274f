"""`affextract export`: CSV and Parquet tables that round-trip with the HDF5 values, streamed video by video."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from affextract.cli import app
from affextract.export import ExportOptions, export
from affextract.features import open_features
from affextract.schema import FEATURE_NAMES
from test_features_api import VIDEOS, synthetic, synthetic_video, write_features  # noqa: F401 (fixture)

HEAD = ["video", "frame", "timestamp", "success", "confidence", *FEATURE_NAMES]


def flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def read(path, fmt):
    return pd.read_csv(path, keep_default_na=True) if fmt == "csv" else pd.read_parquet(path)


def assert_round_trip(table: pd.DataFrame, h5, geometry: bool = False) -> None:
    """Every value of every stored video equals its cell in the table (NaN where NaN), in file order."""
    with open_features(h5) as ff:
        assert table.video.unique().tolist() == ff.keys
        for v in ff:
            rows = table[table.video == v.key]
            assert len(rows) == len(v)
            np.testing.assert_array_equal(rows.frame.to_numpy(), v.frame)
            np.testing.assert_array_equal(rows.timestamp.to_numpy(), v.time)
            np.testing.assert_array_equal(rows.success.to_numpy(), v.face.astype(int))
            np.testing.assert_array_equal(rows.confidence.to_numpy(np.float32), v.score)
            np.testing.assert_array_equal(rows[list(FEATURE_NAMES)].to_numpy(np.float32), v.features)
            if geometry:
                np.testing.assert_array_equal(rows[["face_x1", "face_y1", "face_x2", "face_y2"]].to_numpy(np.float32),
                                              v.box)
                marks = rows[[c for c in table.columns if c.endswith(("_x", "_y")) and not c.startswith("face")]]
                np.testing.assert_array_equal(marks.to_numpy(np.float32), v.landmarks.reshape(len(v), 10))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_round_trips_every_value(synthetic, tmp_path, fmt):  # noqa: F811
    h5, arrays = synthetic
    out = tmp_path / f"frames.{fmt}"
    report = export(h5, out, ExportOptions(format=fmt))
    assert report.output == out and out.exists() and not list(tmp_path.glob("*.tmp"))
    assert report.videos == 3 and report.rows == sum(len(a["frame"]) for a in arrays.values())
    table = read(out, fmt)
    assert list(table.columns) == HEAD and report.columns == tuple(HEAD)
    assert table.success.isin([0, 1]).all() and table[table.success == 0][list(FEATURE_NAMES)].isna().all().all()
    assert_round_trip(table, h5)


def test_geometry_columns_and_video_selection(synthetic, tmp_path):  # noqa: F811
    h5, _ = synthetic
    report = export(h5, tmp_path / "g.parquet", ExportOptions(format="parquet", geometry=True))
    table = read(report.output, "parquet")
    assert list(table.columns)[-14:] == ["face_x1", "face_y1", "face_x2", "face_y2", "left_eye_x", "left_eye_y",
                                         "right_eye_x", "right_eye_y", "nose_x", "nose_y", "left_mouth_x",
                                         "left_mouth_y", "right_mouth_x", "right_mouth_y"]
    assert_round_trip(table, h5, geometry=True)
    one = export(h5, tmp_path / "one.csv", ExportOptions(videos=("b%1",)))  # a unique stem is enough
    assert one.videos == 1 and set(read(one.output, "csv").video) == {"sub/b%1.mov"}


def test_cli_export_default_path_and_errors(synthetic, tmp_path):  # noqa: F811
    h5, _ = synthetic
    copy = tmp_path / "feat.h5"
    copy.write_bytes(h5.read_bytes())
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(copy), "--format", "csv"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "feat.csv").exists() and "77 rows (3 videos)" in flat(r.output)
    r = runner.invoke(app, ["export", str(copy), "--format", "xlsx"])
    assert r.exit_code == 2 and "use one of csv, parquet" in flat(r.output)
    r = runner.invoke(app, ["export", str(copy), "--video", "nope.mp4"])
    assert r.exit_code == 2 and "no video 'nope.mp4'" in flat(r.output)
    r = runner.invoke(app, ["export", str(copy), "-o", str(copy)])
    assert r.exit_code == 2 and "would overwrite the feature file" in flat(r.output)


def test_file_where_every_video_failed_is_an_error_and_writes_nothing(tmp_path):
    h5 = write_features(tmp_path / "empty.h5", {}, {"bad.mp4": "no frames"})
    r = CliRunner().invoke(app, ["export", str(h5)])
    assert r.exit_code == 2 and "nothing to export: every video of" in flat(r.output), r.output
    assert "bad.mp4: no frames" in flat(r.output) and "no file was written" in flat(r.output)
    assert not (tmp_path / "empty.csv").exists() and not (tmp_path / "empty.csv.tmp").exists()


def test_long_video_streams_in_one_piece_per_video(tmp_path):
    """A video larger than a chunk is exported whole and in order (the writer appends video by video)."""
    big = synthetic_video(5000, 7, [(100, 900)])
    h5 = write_features(tmp_path / "big.h5", {"long.mp4": big, "short.mp4": synthetic_video(3, 8)})
    table = read(export(h5, tmp_path / "big.parquet", ExportOptions(format="parquet")).output, "parquet")
    assert len(table) == 5003 and table.video.tolist()[-3:] == ["short.mp4"] * 3
    assert_round_trip(table, h5)
