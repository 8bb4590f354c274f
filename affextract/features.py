"""Reading a feature file from Python: per-video arrays and pandas DataFrames with named columns.

    import affextract
    with affextract.open_features("out.h5") as ff:
        for video in ff:                      # one video in memory at a time
            video.features                    # (K, 26) float32, NaN rows where no face
            video["happiness"]                # (K,) one named feature
            video.blendshapes, video.pose     # (K, 52), (K, 3) measured movement (None in files without it)
        df = ff.dataframe()                   # every video: video, frame, time, face + 26 columns (+ movement)

Arrays are frame-major, (K, 26), the transpose of the file's `features` dataset (26, K), so that rows line up with
`frame`, `time` and `face` and with the rows of the DataFrame. seqhead and the examples read the format through this
module; affextract.store opens files itself only to check one before appending to it, list what it holds and merge
parts, and `affextract.store.FeatureWriter` writes what this module returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np

from affextract.schema import AU, BLENDSHAPE_NAMES, EXPR, FEATURE_NAMES, GAZE_NAMES, POSE_NAMES, VA
from affextract.format import (DATASETS, NAME_MAJOR, FormatError, Provenance, _str, check_format, escape_key,
                               index_file, parts_folder, pending_parts, unescape_key)


@dataclass(frozen=True)
class VideoFeatures:
    """Everything stored for one video (format v1, see docs/format.md).

    A video read with `FeatureFile.read(key, datasets)` has None for the datasets that were not asked for.
    """

    key: str  # the video's path relative to the input root ('/'-separated), as passed to FeatureFile[...]
    source: str  # the `source` attribute: relative path of the video file
    features: np.ndarray  # (K, 26) float32 in FEATURE_NAMES order; NaN rows where no face was found
    face: np.ndarray  # (K,) bool, a face was found and analysed
    frame: np.ndarray  # (K,) int32 index of the frame in the decoded stream (0-based)
    time: np.ndarray  # (K,) float64 seconds from the start of the stream
    box: np.ndarray  # (K, 4) float32 x1, y1, x2, y2 of the tracked face in source pixels (NaN if none)
    landmarks: np.ndarray  # (K, 5, 2) float32 eyes, nose, mouth corners (x, y) in source pixels
    score: np.ndarray  # (K,) float32 detector confidence (NaN if none)
    # source, path, size_bytes, mtime, fps, frames_total, width, height, decoder, status, error
    attrs: dict = field(default_factory=dict)
    # Per-frame datasets beyond format v1's, name -> (K, ...) array, frame-major: the measured movement (see the
    # properties blendshapes, pose, gaze, presence, mesh) and any others a writer added.
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return next((len(a) for a in (self.frame, self.face, self.features, self.time) if a is not None), 0)

    @classmethod
    def empty(cls, key: str = "") -> "VideoFeatures":
        """A video with no analysed frame (K = 0): gives tables their columns when there is nothing to show."""
        return cls(key, key, np.zeros((0, 26), np.float32), np.zeros(0, bool), np.zeros(0, np.int32), np.zeros(0),
                   np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32))

    def take(self, rows) -> VideoFeatures:
        """The same video with only the frames `rows` (indices, a slice or a boolean mask), extra datasets included."""
        return replace(self, extra={k: v[rows] for k, v in self.extra.items()},
                       **{n: None if getattr(self, n) is None else getattr(self, n)[rows] for n in DATASETS})

    def __getitem__(self, name: str) -> np.ndarray:
        """One value over time by name, e.g. video["AU12"], video["jawOpen"], video["yaw"] -> (K,)."""
        for values, names in ((self.features, FEATURE_NAMES), (self.blendshapes, BLENDSHAPE_NAMES),
                              (self.pose, POSE_NAMES), (self.gaze, GAZE_NAMES)):
            if name in names:
                if values is None:
                    raise KeyError(f"{name!r} is measured movement, which this video does not have (made with "
                                   "--no-movement, or by an affextract without it)")
                return values[:, names.index(name)]
        raise KeyError(f"no feature named {name!r}; the features are {', '.join(FEATURE_NAMES)}; measured movement: "
                       f"{', '.join(POSE_NAMES + GAZE_NAMES)} and the blendshapes (schema.BLENDSHAPE_NAMES)")

    @property
    def va(self) -> np.ndarray:
        """(K, 2) valence, arousal in [-1, 1]."""
        return self.features[:, VA]

    @property
    def expressions(self) -> np.ndarray:
        """(K, 7) expression probabilities (schema.EXPRESSIONS order), each row sums to 1."""
        return self.features[:, EXPR]

    @property
    def aus(self) -> np.ndarray:
        """(K, 17) action-unit probabilities (schema.AU_NAMES order)."""
        return self.features[:, AU]

    @property
    def blendshapes(self) -> np.ndarray | None:
        """(K, 52) float32 MediaPipe blendshapes in [0, 1] (schema.BLENDSHAPE_NAMES; index 0, `_neutral`, carries no
        movement); NaN rows where no face; None when the file has no measured movement (--no-movement)."""
        return self.extra.get("blendshapes")

    @property
    def pose(self) -> np.ndarray | None:
        """(K, 3) float32 head yaw, pitch, roll in degrees (schema.POSE_NAMES for the signs); None without movement."""
        return self.extra.get("pose")

    @property
    def gaze(self) -> np.ndarray | None:
        """(K, 2) float32 gaze yaw, pitch in degrees, relative to the camera; None without movement."""
        return self.extra.get("gaze")

    @property
    def presence(self) -> np.ndarray | None:
        """(K,) float32 the face mesh's face-presence probability; None without movement."""
        return self.extra.get("presence")

    @property
    def mesh(self) -> np.ndarray | None:
        """(K, 478, 3) float16 face mesh in source pixels (z: relative depth, x's scale); None unless run with
        --mesh."""
        return self.extra.get("mesh")

    @property
    def status(self) -> str:
        """complete, or partial when the stream broke part-way (the frames before the break are stored)."""
        return self.attrs.get("status", "complete")

    def dataframe(self) -> "pd.DataFrame":  # noqa: F821 (pandas is imported lazily)
        """One row per analysed frame: video, frame, time, face, then the 26 features by name, then (when measured)
        yaw, pitch, roll, gaze_yaw, gaze_pitch, presence and the 52 blendshapes by name."""
        import pandas as pd

        parts = [pd.DataFrame({"video": self.key, "frame": self.frame, "time": self.time, "face": self.face}),
                 pd.DataFrame(self.features, columns=list(FEATURE_NAMES))]
        for values, names in ((self.pose, POSE_NAMES), (self.gaze, GAZE_NAMES), (self.presence, ("presence",)),
                              (self.blendshapes, BLENDSHAPE_NAMES)):
            if values is not None:
                parts.append(pd.DataFrame(values.reshape(len(values), -1), columns=list(names)))
        return pd.concat(parts, axis=1)


@dataclass(frozen=True)
class VideoSummary:
    """One line of `affextract info`."""

    key: str
    frames: int  # K, frames analysed
    face_rate: float  # fraction of analysed frames with a face
    status: str  # complete | partial | failed
    error: str


class FeatureFile:
    """An affextract HDF5 file opened for reading. Use as a context manager, or call close().

    Videos are read on access, one at a time, so files larger than memory can be walked through.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = index_file(self.path)  # a --shards folder is read through its manifest
        if not index.exists():
            waiting = len(pending_parts(index))
            if waiting:
                raise FileNotFoundError(
                    f"{self.path} does not exist yet, but {waiting} finished video(s) wait in "
                    f"{parts_folder(index)}/: the run writing it stopped before its first merge. "
                    f"`affextract merge {self.path}` merges them now; rerunning the same `affextract run` command "
                    "also merges them, then continues")
            raise FileNotFoundError(
                f"{self.path}: no such feature file (make one with `affextract run VIDEOS/ {self.path.name}`)")
        try:
            self._f = h5py.File(index, "r")
        except OSError as e:
            raise FormatError(f"{self.path} is not an HDF5 file ({e})") from None
        try:
            check_format(self._f, self.path)
        except FormatError:
            self._f.close()
            raise
        self.attrs: dict = {k: ([_str(x) for x in v] if isinstance(v, np.ndarray) else _str(v))
                            for k, v in self._f.attrs.items()}  # provenance: model, detector, created, ...
        # What made the features (weights, detector settings, alignment, sampling); files written from these features
        # carry it on (FeatureWriter(path, ff.provenance)).
        self.provenance: Provenance = Provenance.read(self._f.attrs)
        self.feature_names: tuple[str, ...] = tuple(self.attrs["feature_names"])
        # The measured movement (affextract run without --no-movement): {"enabled": false} for files without it;
        # else whether the mesh is stored, the MediaPipe weights' SHA-256s and the crop rule.
        self.movement: dict = json.loads(self.provenance.movement)
        self.blendshape_names: tuple[str, ...] = tuple(self.attrs.get("blendshape_names", BLENDSHAPE_NAMES))
        self.pose_names: tuple[str, ...] = tuple(self.attrs.get("pose_names", POSE_NAMES))
        self.gaze_names: tuple[str, ...] = tuple(self.attrs.get("gaze_names", GAZE_NAMES))
        videos = self._f.get("videos", {})
        self.keys: list[str] = sorted(unescape_key(n) for n in videos)  # videos stored with features
        # Finished videos waiting in the parts folder to be merged (by the run writing the file, or `affextract merge`).
        self.pending: int = len(pending_parts(index))
        failed = self._f.get("failed", {})
        # Videos that could not be decoded at all: key -> error (they are retried by the next `affextract run`).
        self.failed: dict[str, str] = {unescape_key(n): _str(g.attrs.get("error", "")) for n, g in failed.items()}

    # -- lifetime ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureFile({str(self.path)!r}, {len(self.keys)} videos, model={self.attrs.get('model')!r})"

    # -- access -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __iter__(self) -> Iterator[VideoFeatures]:
        for key in self.keys:
            yield self[key]

    def __getitem__(self, key: str) -> VideoFeatures:
        """The video stored under `key` (its path relative to the input root, e.g. "sub/clip.mp4")."""
        return self.read(key)

    def read(self, key: str, datasets: Iterable[str] | None = None) -> VideoFeatures:
        """The video stored under `key`, with only the named datasets read (default: all, extra ones included);
        the others are None. Reading ("features", "face") of many videos is several times faster than all."""
        g = self._f.get("videos", {}).get(escape_key(key))
        if g is None:
            raise KeyError(self._unknown(key))
        names = list(g) if datasets is None else list(datasets)
        missing = [n for n in names if n not in g]
        if missing:
            raise KeyError(f"video {key!r} of {self.path} has no dataset {', '.join(missing)}")
        d = {n: g[n][()] for n in names}
        for n in NAME_MAJOR:  # (C, K) in the file, (K, C) here
            if n in d:
                d[n] = np.ascontiguousarray(d[n].T)
        attrs = {k: _str(v) for k, v in g.attrs.items()}
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
        return VideoFeatures(key=key, source=str(attrs.get("source", key)), attrs=attrs,
                             extra={n: v for n, v in d.items() if n not in DATASETS},
                             **{n: d.get(n) for n in DATASETS})

    def summary(self) -> list[VideoSummary]:
        """One row per stored or failed video, sorted by key; reads only each video's `face` flags."""
        rows = [VideoSummary(key, 0, 0.0, "failed", error) for key, error in self.failed.items()]
        for key in self.keys:
            g = self._f["videos"][escape_key(key)]
            face = g["face"][()]
            rows.append(VideoSummary(key, len(face), float(face.mean()) if len(face) else 0.0,
                                     _str(g.attrs.get("status", "complete")), _str(g.attrs.get("error", ""))))
        return sorted(rows, key=lambda r: r.key)

    def find(self, name: str) -> str:
        """The key of a video given its key or a unique file name or stem ("clip" for "sub/clip.mp4")."""
        if name in self.keys:
            return name
        hits = [k for k in self.keys if Path(k).name == name or Path(k).stem == name or k.endswith("/" + name)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise KeyError(f"{name!r} names several videos of {self.path}: {', '.join(hits[:5])}; give the full key")
        raise KeyError(self._unknown(name))

    def _unknown(self, key: str) -> str:
        if key in self.failed:
            return f"{key!r} failed to decode and has no features in {self.path}: {self.failed[key]}"
        some = ", ".join(self.keys[:5]) + (", ..." if len(self.keys) > 5 else "")
        return f"no video {key!r} in {self.path}; it holds {len(self.keys)} videos ({some}); see `affextract info`"

    def dataframe(self, keys: Iterable[str] | None = None) -> "pd.DataFrame":  # noqa: F821
        """One row per analysed frame of the given videos (default: all): video, frame, time, face, 26 features.

        The whole table is built in memory; for very large files iterate over the videos instead.
        """
        import pandas as pd

        keys = self.keys if keys is None else [self.find(k) for k in keys]
        parts = [self[k].dataframe() for k in keys]
        if not parts:
            return VideoFeatures.empty().dataframe()
        return pd.concat(parts, ignore_index=True)


def open_features(path: str | Path) -> FeatureFile:
    """Open an affextract feature file (format v1) for reading.

    Raises FileNotFoundError if it does not exist and FormatError if it is not a feature file of a version this
    affextract reads.
    """
    return FeatureFile(path)
