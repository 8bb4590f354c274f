"""Writing the HDF5 feature file (format version 1): the one writer of its layout, crash-safe runs, resume bookkeeping.

`VideoWriter` writes one video's group, chunk by chunk; `FeatureStore` is the output of `affextract run` (locked,
resumable, crash-safe); `FeatureWriter` writes a new file in one go (simulated data, derived files). Reading is
`affextract.features.open_features`; the names both share (layout, key escaping, provenance, the format check) are in
affextract.format.

Crash safety of `FeatureStore`: results never go straight into out.h5. Each video is written to its own shard file
in `out.h5.parts/` (as `*.tmp`, renamed to `*.h5` once complete), and shards are merged into a copy of out.h5 that
then atomically replaces it. A kill at any moment leaves out.h5 as it was after the last merge plus complete shards
that the next run merges first, so no video is lost or stored twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from affextract.format import (DATASETS, MOVEMENT_DATASETS, MOVEMENT_OFF, NAME_MAJOR, FormatError, Provenance, _str,
                               check_format, escape_key, parts_folder, pending_parts, unescape_key)
from affextract.schema import BLENDSHAPE_NAMES, FEATURE_NAMES, FORMAT, FORMAT_VERSION, GAZE_NAMES, POSE_NAMES
from affextract.version import __version__

if TYPE_CHECKING:
    from affextract.features import VideoFeatures


class LockedError(RuntimeError):
    """Another process is writing the same output file."""


class IncompatibleError(ValueError):
    """The output file holds features of another provenance."""


_CHUNK = 1024  # frames per HDF5 chunk, at most: HDF5 allocates whole chunks, so short videos get shorter ones


class VideoWriter:
    """Writes one video's group under `videos/` of an open HDF5 file, chunk after chunk of frames, so memory does not
    grow with the video's length.

    Besides the datasets of format v1, a video may carry extra per-frame datasets (named arrays whose first axis is
    the frame): those of MOVEMENT_DATASETS are stored as the format says, others frame-major as given. `datasets`
    names the extra ones every chunk brings (a video without frames still gets them, empty); without it, the first
    `append` fixes which, and every later one brings the same.
    """

    def __init__(self, f: h5py.File, key: str, attrs: dict, frames: int | None = None, datasets: tuple[str, ...] = ()):
        """`frames`: how many frames the video will have, when known (sizes the HDF5 chunks)."""
        self.group = f.require_group("videos").create_group(escape_key(key))
        for k, v in attrs.items():
            self.group.attrs[k] = v
        self.chunk = min(_CHUNK, max(1, frames)) if frames is not None else _CHUNK
        unknown = [d for d in datasets if d not in MOVEMENT_DATASETS]
        if unknown:
            raise ValueError(f"no layout known for datasets {unknown}; known: {', '.join(MOVEMENT_DATASETS)}")
        self.expected = tuple(datasets)
        self.ds: dict[str, h5py.Dataset] = {}
        self.k = 0  # frames written

    def _create(self, name: str, dtype, row: tuple[int, ...]) -> h5py.Dataset:
        if name in NAME_MAJOR:
            (c,) = row
            return self.group.create_dataset(name, (c, 0), dtype, maxshape=(c, None), chunks=(c, self.chunk))
        return self.group.create_dataset(name, (0, *row), dtype, maxshape=(None, *row), chunks=(self.chunk, *row))

    def append(self, features, face, frame, time, box, landmarks, score, **extra) -> None:
        """features (n, 26); face (n,); frame (n,); time (n,); box (n, 4); landmarks (n, 5, 2); score (n,); each
        extra dataset (n, ...)."""
        arrays = dict(features=features, face=face, frame=frame, time=time, box=box, landmarks=landmarks,
                      score=score)
        arrays |= {k: np.asarray(v) for k, v in extra.items()}
        n = len(frame)
        bad = [k for k, v in arrays.items() if len(v) != n]
        if bad:
            raise ValueError(f"{', '.join(bad)}: one row per frame needed ({n} frames)")
        if self.expected and not self.ds and set(extra) != set(self.expected):
            raise ValueError(f"this video's chunks bring the datasets {sorted(self.expected)}, this one "
                             f"{sorted(extra)}")
        if not self.ds:
            for name, value in arrays.items():
                dtype, row = (DATASETS | MOVEMENT_DATASETS).get(name, (value.dtype, value.shape[1:]))
                self.ds[name] = self._create(name, dtype, row)
        elif arrays.keys() != self.ds.keys():
            raise ValueError(f"every chunk of a video brings the same datasets: {sorted(self.ds)}, "
                             f"this one {sorted(arrays)}")
        k0, self.k = self.k, self.k + n
        for name, value in arrays.items():
            d = self.ds[name]
            if name in NAME_MAJOR:
                d.resize((d.shape[0], self.k))
                d[:, k0:] = np.asarray(value, d.dtype).T
            else:
                d.resize((self.k, *d.shape[1:]))
                d[k0:] = value

    def finish(self, status: str = "complete", error: str = "") -> None:
        """status: complete, or partial (the stream broke; `error` says how)."""
        if not self.ds:  # a video with no analysed frame still has every dataset, empty
            for name in (*DATASETS, *self.expected):
                self._create(name, *(DATASETS | MOVEMENT_DATASETS)[name])
        self.group.attrs["status"] = status
        self.group.attrs["error"] = error

    def add(self, video: VideoFeatures) -> None:
        """A whole video as the reader returns it (affextract.features.VideoFeatures), `extra` included."""
        self.append(video.features, video.face, video.frame, video.time, video.box, video.landmarks, video.score,
                    **video.extra)
        self.finish(video.attrs.get("status", "complete"), video.attrs.get("error", ""))


class ShardWriter(VideoWriter):
    """A VideoWriter into its own shard file: the file appears (renamed from *.tmp) only when the video is finished.
    The shard carries the run's provenance, so that it is never merged into a file of other settings and can be
    merged without the run that wrote it (`merge_parts`)."""

    def __init__(self, path: Path, key: str, attrs: dict, frames: int | None = None, datasets: tuple[str, ...] = (),
                 provenance: Provenance | None = None):
        self.final = path
        self.tmp = path.with_suffix(".tmp")
        self.f = h5py.File(self.tmp, "w")
        if provenance is not None:
            provenance.write(self.f.attrs)
        super().__init__(self.f, key, attrs, frames, datasets)

    def finish(self, status: str = "complete", error: str = "") -> None:
        super().finish(status, error)
        self.f.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_root(f: h5py.File, provenance: Provenance, attrs: dict | None = None) -> None:
    """The file attributes of format v1 (format, version, feature names, provenance, created; the names of the
    movement values when the provenance has measured movement) plus `attrs`."""
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["feature_names"] = np.array(FEATURE_NAMES, dtype=h5py.string_dtype())
    f.attrs["affextract_version"] = __version__
    provenance.write(f.attrs)
    if json.loads(provenance.movement or MOVEMENT_OFF).get("enabled"):
        for name, names in (("blendshape_names", BLENDSHAPE_NAMES), ("pose_names", POSE_NAMES),
                            ("gaze_names", GAZE_NAMES)):
            f.attrs[name] = np.array(names, dtype=h5py.string_dtype())
    for k, v in (attrs or {}).items():
        f.attrs[k] = v
    f.attrs["created"] = f.attrs["updated"] = _now()


class FeatureWriter:
    """A new feature file written in one go by one process (no lock, no shards): simulated data, files derived from
    another feature file. Refuses to overwrite an existing file unless `overwrite`.

        with FeatureWriter("segments.h5", ff.provenance) as out:
            out.add(video)                          # a VideoFeatures, e.g. from open_features(...)
    """

    def __init__(self, path: str | Path, provenance: Provenance, attrs: dict | None = None, overwrite: bool = False,
                 datasets: tuple[str, ...] = ()):
        """`datasets`: extra per-frame datasets (of MOVEMENT_DATASETS) that every video of `video()` carries."""
        self.path = Path(path)
        self.datasets = tuple(datasets)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; remove it or write to another file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = h5py.File(self.path, "w")
        write_root(self.f, provenance, attrs)
        self.f.require_group("videos")

    def video(self, key: str, attrs: dict, frames: int | None = None) -> VideoWriter:
        """A writer for one video stored under `key`, to fill chunk by chunk (append, then finish)."""
        return VideoWriter(self.f, key, attrs, frames, self.datasets)

    def add(self, video: VideoFeatures) -> None:
        """One whole video under video.key, with its attrs."""
        VideoWriter(self.f, video.key, video.attrs, len(video)).add(video)

    def close(self) -> None:
        self.f.attrs["updated"] = _now()
        self.f.close()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class StoredVideo:
    """What the output file knows about a video it holds: enough to tell whether a source is the same file."""

    size_bytes: int
    mtime: float
    path: str  # absolute path of the source when it was extracted ("" in files written before it was recorded)
    sha256: str = ""  # SHA-256 of the source's contents ("" in files written before it was recorded)


class FeatureStore:
    """An output file opened for writing by one process at a time (an exclusive lock beside it).

        store = FeatureStore("out.h5", provenance).open()   # or: with FeatureStore(...) as store:
        ...
        store.close()                                        # the final merge, then the lock is released
    """

    def __init__(self, path: Path | str, provenance: Provenance, merge: bool = True, attrs: dict | None = None,
                 datasets: tuple[str, ...] = ()):
        """`merge=False`: only write shards (the other ranks of a torchrun job); the merging process owns the lock.
        `attrs`: file attributes beyond format v1's, written when the file is created. `datasets`: the extra
        per-frame datasets (of MOVEMENT_DATASETS) every video carries."""
        self.path = Path(path)
        self.datasets = tuple(datasets)
        self.merge = merge
        self.provenance = provenance
        self.attrs = dict(attrs or {})
        self.parts = parts_folder(self.path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd: int | None = None
        self._n = 0
        self.last_commit_s = 0.0  # how long the last merge took; callers pace merges by it

    # -- lifetime ---------------------------------------------------------------------------------------------
    def open(self) -> FeatureStore:
        """Lock the file, check it is a feature file of this provenance, merge what a crashed run left."""
        if self.path.is_dir():
            raise FormatError(f"{self.path} is a folder, not a feature file; give a file name ending in .h5")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            if self.path.exists():
                try:
                    f = h5py.File(self.path, "r")
                except OSError:
                    raise FormatError(f"{self.path} exists and is not an HDF5 file; it was left as it is: "
                                      "write to another output file") from None
                with f:
                    check_format(f, self.path)
                    self._check_compatible(Provenance.read(f.attrs), str(self.path))
            self.parts.mkdir(exist_ok=True)
            for tmp in self.parts.glob("*.tmp"):  # a shard cut off by a crash: its video is redone
                tmp.unlink()
            self.commit()  # complete shards left by a crashed run
        except BaseException:
            self._unlock()
            raise
        return self

    def close(self) -> None:
        """Merge what is left and release the lock."""
        try:
            self.commit()
            if self.parts.exists() and not any(self.parts.iterdir()):
                self.parts.rmdir()
        finally:
            self._unlock()

    def __enter__(self) -> FeatureStore:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _lock(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LockedError(
                    f"{self.path} is being written by another affextract run (pid {holder}); wait for it to finish, "
                    "or write to another file"
                ) from None
            # The lock file may have been removed by the previous holder between our open and flock.
            if os.path.exists(self.lock_path) and os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            self.lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_compatible(self, theirs: Provenance, where: str) -> None:
        diff = self.provenance.mismatch(theirs)
        if diff:
            detail = "; ".join(_describe_difference(d, getattr(theirs, d), getattr(self.provenance, d)) for d in diff)
            raise IncompatibleError(
                f"{where} holds features made with other settings ({detail}). Features of different models, "
                "detector, movement or AU-row settings must not be mixed in one file: write to a new output file, or "
                "rerun with the options the file was made with."
            )

    # -- state ------------------------------------------------------------------------------------------------
    def stored(self) -> dict[str, StoredVideo]:
        """Key -> what is known of every video stored with features (failures are not included)."""
        out: dict[str, StoredVideo] = {}
        if self.path.exists():
            with h5py.File(self.path, "r") as f:
                for name, g in f.get("videos", {}).items():
                    a = g.attrs
                    out[unescape_key(name)] = StoredVideo(int(a["size_bytes"]), float(a["mtime"]),
                                                          _str(a.get("path", "")), _str(a.get("sha256", "")))
        return out

    # -- writing ----------------------------------------------------------------------------------------------
    def _shard_path(self) -> Path:
        self._n += 1
        return self.parts / f"{os.getpid()}-{time.time_ns()}-{self._n}.h5"

    def begin_video(self, key: str, attrs: dict, frames: int | None = None) -> ShardWriter:
        """A writer for one video (`frames`: how many it will have, when known)."""
        return ShardWriter(self._shard_path(), key, attrs, frames, self.datasets, self.provenance)

    def record_failure(self, key: str, attrs: dict, error: str) -> None:
        path = self._shard_path()
        tmp = path.with_suffix(".tmp")
        with h5py.File(tmp, "w") as f:
            self.provenance.write(f.attrs)
            g = f.create_group("failed").create_group(escape_key(key))
            for k, v in attrs.items():
                g.attrs[k] = v
            g.attrs["error"] = error
            g.attrs["when"] = _now()
        os.replace(tmp, path)

    def commit(self) -> int:
        """Merge complete shards into out.h5 (copy, add, atomic replace). Returns how many were merged."""
        shards = pending_parts(self.path)
        if not shards:
            return 0
        for shard in shards:
            with h5py.File(shard, "r") as s:
                theirs = Provenance.read(s.attrs) if "model_sha256" in s.attrs else self.provenance  # (older shards)
            if self.provenance.mismatch(theirs):
                self._check_compatible(theirs, f"{self.parts} (videos of a run that stopped before merging them)")
        t0 = time.perf_counter()
        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.path.exists():
            shutil.copyfile(self.path, tmp)
        with h5py.File(tmp, "a" if self.path.exists() else "w") as f:
            if "format" not in f.attrs:
                write_root(f, self.provenance, self.attrs)
            for grp in ("videos", "failed"):
                f.require_group(grp)
            for shard in shards:
                with h5py.File(shard, "r") as s:
                    for grp in ("videos", "failed"):
                        for name in s.get(grp, {}):
                            for other in ("videos", "failed"):  # a retried failure or a changed video replaces the old entry
                                if name in f[other]:
                                    del f[other][name]
                            s.copy(s[grp][name], f[grp], name=name)
            f.attrs["updated"] = _now()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        for shard in shards:
            shard.unlink()
        self.last_commit_s = time.perf_counter() - t0
        return len(shards)


def merge_parts(path: Path | str) -> int:
    """Merge the finished videos a stopped run left in `path`'s parts folder into `path` (created if missing), as the
    next `affextract run` would; returns how many. Refuses shards of other settings than the file's."""
    path = Path(path)
    shards = pending_parts(path)
    if not shards:
        return 0
    if path.exists():
        with h5py.File(path, "r") as f:
            check_format(f, path)
            provenance = Provenance.read(f.attrs)
    else:
        with h5py.File(shards[0], "r") as s:
            if "model_sha256" not in s.attrs:
                raise FormatError(f"{shards[0]} does not record the settings it was made with (written by an older "
                                  "affextract): rerun the `affextract run` command that wrote it; it merges them")
            provenance = Provenance.read(s.attrs)
    FeatureStore(path, provenance).open().close()  # opening merges them (under the run's lock), closing unlocks
    return len(shards)


def describe_movement(text: str) -> str:
    """A `movement` provenance attribute in words, with the options that make it."""
    m = json.loads(text or MOVEMENT_OFF)
    if not m.get("enabled"):
        return "without measured movement (--no-movement)"
    return "with measured movement" + (" and the mesh (--mesh)" if m.get("mesh") else " (without --mesh)")


def _describe_difference(field: str, theirs: str, ours: str) -> str:
    if field == "movement":
        a, b = describe_movement(theirs), describe_movement(ours)
        if a == b:  # the same options, other MediaPipe weights or crop rule
            a, b = f"{a}, {theirs}", f"{b}, {ours}"
        return f"movement: the file was made {a}, this run is {b}"
    if field == "au_source":
        return (f"AU rows: the file's are {_describe_au_source(theirs)}, this run's would be "
                f"{_describe_au_source(ours)}")
    return f"{field}: file has {theirs!r}, this run {ours!r}"


def _describe_au_source(source: str) -> str:
    if source == "cnn":
        return "the CNN's alone (--no-movement, --cnn-aus, or a file made before the AU fusion)"
    return f"fused with the movement ({source})"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
