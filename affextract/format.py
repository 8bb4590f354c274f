"""The names of the HDF5 feature file (format version 1) that its writer (affextract.store) and its reader
(affextract.features) share: the per-video datasets and their layout, key escaping, the provenance, the format check
and the files beside out.h5 while a run is going. docs/format.md describes the format."""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from affextract.schema import (BLENDSHAPE_NAMES, FEATURE_NAMES, FORMAT, FORMAT_VERSION, GAZE_NAMES, MESH_POINTS,
                               POSE_NAMES)
from affextract.version import __version__

if TYPE_CHECKING:
    import h5py

N = len(FEATURE_NAMES)


def escape_key(key: str) -> str:
    """A relative path as one HDF5 link name ('/' cannot appear in one); reversible by unescape_key."""
    return key.replace("%", "%25").replace("/", "%2F")


def unescape_key(name: str) -> str:
    return name.replace("%2F", "/").replace("%25", "%")


MOVEMENT_OFF = '{"enabled": false}'


@dataclass(frozen=True)
class Provenance:
    """What produced the features; a file only ever holds features of one provenance."""

    model: str  # name of the MMA weights
    model_sha256: str  # SHA-256 of the weights file
    detector: str  # JSON of the detector's name and settings
    alignment: str  # how faces were aligned before the model
    sampling: str  # JSON of the frame sampling ({"fps": null} = every frame)
    # JSON of the movement stage: {"enabled": false}, or enabled, whether the mesh is stored, the MediaPipe weights'
    # SHA-256s and the crop rule. Files written before the stage existed read as {"enabled": false}.
    movement: str = MOVEMENT_OFF
    # Which rule made the AU rows: "cnn" (the MMA's alone), or "fused:<version>:<SHA-256>" of the AU fusion
    # (affextract.fusion). Files written before the fusion existed read as "cnn".
    au_source: str = "cnn"

    def mismatch(self, other: "Provenance") -> list[str]:
        return [f for f in self.__dataclass_fields__ if getattr(self, f) != getattr(other, f)]

    @classmethod
    def read(cls, attrs) -> "Provenance":
        return cls(**{f.name: _str(attrs.get(f.name, "" if f.default is MISSING else f.default)) for f in fields(cls)})

    def write(self, attrs) -> None:
        for f in self.__dataclass_fields__:
            attrs[f] = getattr(self, f)


class FormatError(ValueError):
    """The file is not an affextract feature file of a version this software reads."""


def check_format(f: h5py.File, path: Path | str) -> None:
    fmt, version = _str(f.attrs.get("format", "")), f.attrs.get("format_version")
    if fmt != FORMAT:
        raise FormatError(f"{path} is not an affextract feature file (format attribute: {fmt or 'missing'})")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{path} has format_version {version}; this affextract {__version__} reads version {FORMAT_VERSION} only. "
            "Use a matching affextract release or re-extract the videos."
        )


# name -> (dtype, shape of one frame's value) of every per-video dataset of format v1. `features` is stored
# feature-major, (26, K); every other dataset frame-major, (K, ...).
DATASETS: dict[str, tuple[type, tuple[int, ...]]] = {
    "features": (np.float32, (N,)),
    "face": (np.bool_, ()),
    "frame": (np.int32, ()),
    "time": (np.float64, ()),
    "box": (np.float32, (4,)),
    "landmarks": (np.float32, (5, 2)),
    "score": (np.float32, ()),
}
# name -> (dtype, shape of one frame's value) of the per-frame datasets of measured movement (`affextract run`
# without --no-movement; `mesh` with --mesh only). Readers of format v1 that do not know them ignore them, so they
# came without a format_version bump.
MOVEMENT_DATASETS: dict[str, tuple[type, tuple[int, ...]]] = {
    "blendshapes": (np.float32, (len(BLENDSHAPE_NAMES),)),
    "pose": (np.float32, (len(POSE_NAMES),)),
    "gaze": (np.float32, (len(GAZE_NAMES),)),
    "presence": (np.float32, ()),
    "mesh": (np.float16, (MESH_POINTS, 3)),
}
# Datasets stored name-major, (C, K): one row per named value, as the 26 features. The others are frame-major.
NAME_MAJOR = ("features", "blendshapes", "pose", "gaze")


# A --shards output is a folder: MANIFEST, an HDF5 file laid out as out.h5 whose videos/<key> are external links
# into the shard files of SHARDS/ (one finished video each), and the files beside MANIFEST while a run is going.
MANIFEST = "manifest.h5"
SHARDS = "shards"


def index_file(path: Path | str) -> Path:
    """The HDF5 file to open for `path`: the file itself, or the manifest of a --shards output folder."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def parts_folder(path: Path | str) -> Path:
    """Where a run writing `path` keeps finished videos until it merges them: out.h5 -> out.h5.parts/."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def pending_parts(path: Path | str) -> list[Path]:
    """The finished videos (shard files) waiting in `path`'s parts folder to be merged into it, oldest first."""
    parts = parts_folder(path)
    return sorted(parts.glob("*.h5")) if parts.is_dir() else []


def _str(v):
    return v.decode() if isinstance(v, bytes) else v


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)
