"""`affextract export`: one table row per analysed frame, with OpenFace-like columns, as CSV or Parquet.

Columns: video, frame, timestamp, success, confidence, then the 26 features by name (FEATURE_NAMES); with measured
movement OpenFace's head pose and gaze columns (pose_Rx, pose_Ry, pose_Rz, gaze_angle_x, gaze_angle_y: radians, in
OpenFace's axes and signs, see `openface_pose` and `openface_gaze`), the face mesh's presence and the 52 blendshapes by
name; optionally the face box and the 5 landmarks. What the 26 feature columns are (valence/arousal derived from the
expressions, expressions from a FER+-only CNN, which AU columns are fused with the measured movement) depends on the
file's au_source: `fusion.describe_features`, printed by `affextract export` and `affextract info`. Differences from OpenFace's CSV worth knowing: `frame` is the
0-based index of the frame in the decoded stream (OpenFace counts from 1), `confidence` is the face detector's score
(NaN where no face), and rows without a face have NaN values instead of zeros.

The file is written video by video (one CSV append or one Parquet row group each), so memory stays at one video.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from affextract.faces.detectors import LANDMARK_NAMES
from affextract.features import VideoFeatures, open_features
from affextract.schema import BLENDSHAPE_NAMES, FEATURE_NAMES

FORMATS = ("csv", "parquet")
BOX_COLUMNS = ("face_x1", "face_y1", "face_x2", "face_y2")
POSE_COLUMNS = ("pose_Rx", "pose_Ry", "pose_Rz")  # OpenFace's names: pitch, yaw, roll in radians
GAZE_COLUMNS = ("gaze_angle_x", "gaze_angle_y")  # OpenFace's names: radians


@dataclass(frozen=True)
class ExportOptions:
    format: str = "csv"  # csv | parquet (parquet needs pyarrow: pip install pyarrow)
    videos: tuple[str, ...] | None = None  # keys (or unique names/stems) to export; None = every video
    geometry: bool = False  # add the face box (face_x1..face_y2) and landmark columns (left_eye_x, ...)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"export format {self.format!r}: use one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class ExportReport:
    output: Path
    videos: int  # videos written
    rows: int  # frames written (rows of the table)
    columns: tuple[str, ...]
    au_source: str = "cnn"  # the file's AU source (fusion.describe_features says what the columns are)


def frame_table(video: VideoFeatures, geometry: bool = False) -> "pd.DataFrame":  # noqa: F821
    """The export rows of one video (also what a user gets for one video in Python)."""
    import pandas as pd

    cols = {
        "video": np.full(len(video), video.key, dtype=object),
        "frame": video.frame.astype(np.int32),
        "timestamp": video.time.astype(np.float64),
        "success": video.face.astype(np.int8),
        "confidence": video.score.astype(np.float32),
    }
    for i, name in enumerate(FEATURE_NAMES):
        cols[name] = video.features[:, i]
    if video.pose is not None:
        cols |= dict(zip(POSE_COLUMNS, openface_pose(video.pose).T.astype(np.float32)))
        cols |= dict(zip(GAZE_COLUMNS, openface_gaze(video.gaze).T.astype(np.float32)))
        cols["presence"] = video.presence
        cols |= dict(zip(BLENDSHAPE_NAMES, video.blendshapes.T))
    if geometry:
        for i, name in enumerate(BOX_COLUMNS):
            cols[name] = video.box[:, i]
        marks = video.landmarks.reshape(len(video), 10)
        for i, name in enumerate(landmark_columns()):
            cols[name] = marks[:, i]
    return pd.DataFrame(cols)


def openface_pose(pose: np.ndarray) -> np.ndarray:
    """(n, 3) yaw, pitch, roll in degrees (schema.POSE_NAMES) -> (n, 3) OpenFace's pose_Rx, pose_Ry, pose_Rz in
    radians: the same head rotation in OpenFace's camera axes (x right, y down, z away from the camera) as Euler
    angles of R = Rx(pose_Rx) @ Ry(pose_Ry) @ Rz(pose_Rz) (OpenFace's RotationMatrix2Euler). Without cross terms,
    pose_Rx = -pitch (head up: negative), pose_Ry = -yaw (turning to the subject's right: positive), pose_Rz = -roll.
    NaN rows stay NaN."""
    yaw, pitch, roll = np.radians(np.asarray(pose, np.float64)).T
    # The stored angles' rotation, rot = Ry(yaw) @ Rx(-pitch) @ Rz(roll) in axes x right, y up, z towards the camera
    # (movement.euler_degrees), seen in OpenFace's axes: F @ rot @ F with F = diag(1, -1, -1).
    rot = _rot_y(yaw) @ _rot_x(-pitch) @ _rot_z(roll) * np.outer([1, -1, -1], [1, -1, -1])
    rx = np.arctan2(-rot[:, 1, 2], rot[:, 2, 2])
    ry = np.arcsin(np.clip(rot[:, 0, 2], -1, 1))
    rz = np.arctan2(-rot[:, 0, 1], rot[:, 0, 0])
    return np.stack([rx, ry, rz], 1)


def openface_gaze(gaze: np.ndarray) -> np.ndarray:
    """(n, 2) gaze yaw, pitch in degrees (schema.GAZE_NAMES) -> (n, 2) OpenFace's gaze_angle_x, gaze_angle_y in
    radians: atan2(g.x, -g.z) and atan2(g.y, -g.z) of the gaze direction g in OpenFace's camera axes (x right, y
    down, z away from the camera; GazeAnalysis::GetGazeAngle). gaze_angle_x > 0: looking towards the image's right
    (the subject's left) and equal to the gaze yaw; gaze_angle_y > 0: looking down."""
    yaw, pitch = np.radians(np.asarray(gaze, np.float64)).T
    # g = (cos p sin y, -sin p, -cos p cos y) in OpenFace's axes for gaze yaw y, pitch p (pitch up in ours).
    return np.stack([yaw, np.arctan2(-np.sin(pitch), np.cos(pitch) * np.cos(yaw))], 1)


def _rot_x(a: np.ndarray) -> np.ndarray:
    c, s, o, i = np.cos(a), np.sin(a), np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([i, o, o], -1), np.stack([o, c, -s], -1), np.stack([o, s, c], -1)], -2)


def _rot_y(a: np.ndarray) -> np.ndarray:
    c, s, o, i = np.cos(a), np.sin(a), np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([c, o, s], -1), np.stack([o, i, o], -1), np.stack([-s, o, c], -1)], -2)


def _rot_z(a: np.ndarray) -> np.ndarray:
    c, s, o, i = np.cos(a), np.sin(a), np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([c, -s, o], -1), np.stack([s, c, o], -1), np.stack([o, o, i], -1)], -2)


def landmark_columns() -> tuple[str, ...]:
    """left_eye_x, left_eye_y, ... in the stored landmark order (image left/right)."""
    return tuple(f"{n}_{c}" for n in LANDMARK_NAMES for c in "xy")


def default_output(h5: Path, format: str) -> Path:
    return Path(h5).with_suffix("." + format)


class NothingToExport(ValueError):
    """The feature file holds no video with features (every video failed, or none was extracted): no table is written,
    rather than one with a header only that would pass for a result."""


def _nothing(ff) -> str:
    if ff.failed:
        some = "; ".join(f"{k}: {e}" for k, e in list(ff.failed.items())[:3])
        return (f"nothing to export: every video of {ff.path} failed ({len(ff.failed)}: {some}"
                f"{'; ...' if len(ff.failed) > 3 else ''}); no file was written. `affextract info {ff.path}` lists "
                "them; rerunning `affextract run` retries them")
    return f"nothing to export: {ff.path} holds no video; no file was written"


def export(h5: str | Path, output: str | Path | None = None, options: ExportOptions = ExportOptions()) -> ExportReport:
    """Write the frames of `h5` as one CSV or Parquet table at `output` (default: beside h5, .csv / .parquet)."""
    output = Path(output) if output is not None else default_output(Path(h5), options.format)
    if output.resolve() == Path(h5).resolve():
        raise ValueError(f"the export would overwrite the feature file {h5}; choose another output path")
    if options.format == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise RuntimeError("Parquet export needs pyarrow: pip install pyarrow (or, in a clone of affextract, "
                               'pip install -e ".[parquet]"), or use --format csv') from None
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")  # a cut-off export never looks like a finished one
    rows = n_videos = 0
    columns: tuple[str, ...] = ()
    writer = None
    with open_features(h5) as ff:
        au_source = str(ff.attrs.get("au_source", "cnn"))
        keys = ff.keys if options.videos is None else [ff.find(k) for k in options.videos]
        if not keys:
            raise NothingToExport(_nothing(ff))
        try:
            for key in keys:
                table = frame_table(ff[key], options.geometry)
                columns = tuple(table.columns)
                if options.format == "csv":
                    # float32 values print with their shortest round-trip form, so the text reads back exactly.
                    table.to_csv(tmp, mode="a" if n_videos else "w", header=n_videos == 0, index=False)
                else:
                    t = pa.Table.from_pandas(table, preserve_index=False)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, t.schema)
                    writer.write_table(t)
                rows += len(table)
                n_videos += 1
        except BaseException:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)
            raise
    if writer is not None:
        writer.close()
    tmp.replace(output)
    return ExportReport(output=output, videos=n_videos, rows=rows, columns=columns, au_source=au_source)

