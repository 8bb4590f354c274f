"""The HDF5 feature file (format version 1): crash-safe writing, resume bookkeeping and reading.

Crash safety: results never go straight into out.h5. Each video is written to its own shard file in
`out.h5.parts/` (as `*.tmp`, renamed to `*.h5` once complete), and shards are merged into a copy of out.h5 that then
atomically replaces it. A kill at any moment leaves out.h5 as it was after the last merge plus complete shards that the
next run merges first, so no video is lost or stored twice.
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

import h5py
import numpy as np

from affextract import __version__
from affextract.schema import FEATURE_NAMES, FORMAT, FORMAT_VERSION

N = len(FEATURE_NAMES)


def escape_key(key: str) -> str:
    """A relative path as one HDF5 link name ('/' cannot appear in one); reversible by unescape_key."""
    return key.replace("%", "%25").replace("/", "%2F")


def unescape_key(name: str) -> str:
    return name.replace("%2F", "/").replace("%25", "%")


@dataclass(frozen=True)
class Provenance:
    """What produced the features; a file only ever holds features of one provenance."""

    model: str  # name of the MMA weights
    model_sha256: str  # SHA-256 of the weights file
    detector: str  # JSON of the detector's name and settings
    alignment: str  # how faces were aligned before the model
    sampling: str  # JSON of the frame sampling ({"fps": null} = every frame)

    def mismatch(self, other: "Provenance") -> list[str]:
        return [f for f in self.__dataclass_fields__ if getattr(self, f) != getattr(other, f)]

    @classmethod
    def read(cls, attrs) -> "Provenance":
        return cls(**{f: _str(attrs.get(f, "")) for f in cls.__dataclass_fields__})

    def write(self, attrs) -> None:
        for f in self.__dataclass_fields__:
            attrs[f] = getattr(self, f)


class FormatError(ValueError):
    """The file is not an affextract feature file of a version this software reads."""


class LockedError(RuntimeError):
    """Another process is writing the same output file."""


class IncompatibleError(ValueError):
    """The output file holds features of another provenance."""


def check_format(f: h5py.File, path: Path | str) -> None:
    fmt, version = _str(f.attrs.get("format", "")), f.attrs.get("format_version")
    if fmt != FORMAT:
        raise FormatError(f"{path} is not an affextract feature file (format attribute: {fmt or 'missing'})")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{path} has format_version {version}; this affextract {__version__} reads version {FORMAT_VERSION} only. "
            "Use a matching affextract release or re-extract the videos."
        )


class ShardWriter:
    """Writes one video's results frame chunk by frame chunk, so memory does not grow with the video's length."""

    def __init__(self, path: Path, key: str, attrs: dict):
        self.final = path
        self.tmp = path.with_suffix(".tmp")
        self.f = h5py.File(self.tmp, "w")
        g = self.f.create_group("videos").create_group(escape_key(key))
        for k, v in attrs.items():
            g.attrs[k] = v
        c = 1024
        self.ds = {
            "features": g.create_dataset("features", (N, 0), np.float32, maxshape=(N, None), chunks=(N, c)),
            "face": g.create_dataset("face", (0,), bool, maxshape=(None,), chunks=(c,)),
            "frame": g.create_dataset("frame", (0,), np.int32, maxshape=(None,), chunks=(c,)),
            "time": g.create_dataset("time", (0,), np.float64, maxshape=(None,), chunks=(c,)),
            "box": g.create_dataset("box", (0, 4), np.float32, maxshape=(None, 4), chunks=(c, 4)),
            "landmarks": g.create_dataset("landmarks", (0, 5, 2), np.float32, maxshape=(None, 5, 2), chunks=(c, 5, 2)),
            "score": g.create_dataset("score", (0,), np.float32, maxshape=(None,), chunks=(c,)),
        }
        self.group = g
        self.k = 0

    def append(self, features, face, frame, time, box, landmarks, score) -> None:
        """features (n, 26); face (n,); frame (n,); time (n,); box (n, 4); landmarks (n, 5, 2); score (n,)."""
        n = len(frame)
        k0, self.k = self.k, self.k + n
        self.ds["features"].resize((N, self.k))
        self.ds["features"][:, k0:] = np.asarray(features, np.float32).T
        for name, value in (("face", face), ("frame", frame), ("time", time), ("box", box),
                            ("landmarks", landmarks), ("score", score)):
            d = self.ds[name]
            d.resize((self.k,) + d.shape[1:])
            d[k0:] = value

    def finish(self, status: str, error: str = "") -> None:
        self.group.attrs["status"] = status
        self.group.attrs["error"] = error
        self.f.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


class FeatureStore:
    """An output file opened for writing by one process at a time (an exclusive lock beside it)."""

    def __init__(self, path: Path | str, provenance: Provenance, merge: bool = True):
        """`merge=False`: only write shards (the other ranks of a torchrun job); the merging process owns the lock."""
        self.path = Path(path)
        self.merge = merge
        self.provenance = provenance
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd: int | None = None
        self._n = 0
        self.last_commit_s = 0.0  # how long the last merge took; callers pace merges by it

    # -- lifetime ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "FeatureStore":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            if self.path.exists():
                with h5py.File(self.path, "r") as f:
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

    def __exit__(self, *exc) -> None:
        try:
            self.commit()
            if self.parts.exists() and not any(self.parts.iterdir()):
                self.parts.rmdir()
        finally:
            self._unlock()

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
            detail = "; ".join(f"{d}: file has {getattr(theirs, d)!r}, this run {getattr(self.provenance, d)!r}"
                               for d in diff)
            raise IncompatibleError(
                f"{where} holds features made with other settings ({detail}). Features of different models or "
                "detector settings must not be mixed in one file: write to a new output file, or rerun with the "
                "options the file was made with."
            )

    # -- state ------------------------------------------------------------------------------------------------
    def stored(self) -> dict[str, tuple[int, float]]:
        """Key -> (size_bytes, mtime) of every video stored with features (failures are not included)."""
        out: dict[str, tuple[int, float]] = {}
        if self.path.exists():
            with h5py.File(self.path, "r") as f:
                for name, g in f.get("videos", {}).items():
                    out[unescape_key(name)] = (int(g.attrs["size_bytes"]), float(g.attrs["mtime"]))
        return out

    # -- writing ----------------------------------------------------------------------------------------------
    def _shard_path(self) -> Path:
        self._n += 1
        return self.parts / f"{os.getpid()}-{time.time_ns()}-{self._n}.h5"

    def begin_video(self, key: str, attrs: dict) -> ShardWriter:
        return ShardWriter(self._shard_path(), key, attrs)

    def record_failure(self, key: str, attrs: dict, error: str) -> None:
        path = self._shard_path()
        tmp = path.with_suffix(".tmp")
        with h5py.File(tmp, "w") as f:
            g = f.create_group("failed").create_group(escape_key(key))
            for k, v in attrs.items():
                g.attrs[k] = v
            g.attrs["error"] = error
            g.attrs["when"] = _now()
        os.replace(tmp, path)

    def commit(self) -> int:
        """Merge complete shards into out.h5 (copy, add, atomic replace). Returns how many were merged."""
        shards = sorted(self.parts.glob("*.h5")) if self.parts.exists() else []
        if not shards:
            return 0
        t0 = time.perf_counter()
        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.path.exists():
            shutil.copyfile(self.path, tmp)
        with h5py.File(tmp, "a" if self.path.exists() else "w") as f:
            if "format" not in f.attrs:
                self._init_root(f)
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

    def _init_root(self, f: h5py.File) -> None:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["feature_names"] = np.array(FEATURE_NAMES, dtype=h5py.string_dtype())
        f.attrs["affextract_version"] = __version__
        self.provenance.write(f.attrs)
        f.attrs["created"] = _now()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _str(v):
    return v.decode() if isinstance(v, bytes) else v


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)
