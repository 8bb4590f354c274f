"""Cached features (affextract HDF5 format v1), video-level labels, splits and padding.

Everything a head needs from disk goes through here: `read_features` (one record per video, with the no-face policy
applied), `read_labels` (validated id + numeric targets + split), `match` (labels ↔ videos); and what turns videos
into batches: `batches` (an epoch's plan) and `pad_batch`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from affextract.features import FeatureFile, open_features
from affextract.schema import FEATURE_NAMES, GROUPS, MOVEMENT_GROUPS
from affextract.format import FormatError, escape_key, unescape_key  # noqa: F401 (unescape_key re-exported: Video.key is escaped)

# The Hume-Reaction layout (ABAW 2023 / MuSe 2022 Emotional Reactions).
HUME_ID = "File_ID"
HUME_TARGETS = ("Adoration", "Amusement", "Anxiety", "Disgust", "Empathic-Pain", "Fear", "Surprise")
SPLIT_NAMES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val", "devel": "val", "development": "val",
    "test": "test", "testing": "test",
}
_SPLIT_COLUMNS = ("split", "set", "partition", "subset", "fold")
_GROUP_COLUMNS = ("subject_id", "subject", "speaker", "participant", "group")
_ID_COLUMNS = (HUME_ID.lower(), "id", "video", "video_id", "file", "filename", "file_name", "path", "key", "name")
NO_FACE_POLICIES = ("drop", "fill")


class DataError(ValueError):
    """Bad input file (features or labels); the message names the file, the rows and what to do."""


class UnmatchedError(DataError):
    """Ids on one side only (labels without a video, videos without a label). The message names the API argument;
    a command line names its own flag through `naming`."""

    API_ARGUMENT = "allow_unmatched=True"

    def naming(self, option: str) -> str:
        """The message with the API argument replaced by `option` (e.g. the CLI's --allow-unmatched)."""
        return str(self).replace(self.API_ARGUMENT, option)


def feature_groups(features: str) -> list[str]:
    """The groups of a subset like 'va,expr,au,bs,pose' (va, expr, au: rows of the 26 features; bs, pose, gaze: the
    measured movement), checked."""
    parts = [p.strip().lower() for p in features.split(",") if p.strip()]
    unknown = [p for p in parts if p not in GROUPS and p not in MOVEMENT_GROUPS]
    if not parts or unknown:
        raise DataError(f"--features {features!r}: use a comma-separated subset of "
                        f"{', '.join([*GROUPS, *MOVEMENT_GROUPS])}")
    return parts


def feature_indices(features: str, names: tuple[str, ...] = FEATURE_NAMES) -> list[int]:
    """Column indices (in file order) of the 26 features for a subset like 'va,expr,au' or 'au,va' (order of the groups
    is irrelevant; movement groups take no column of the 26)."""
    parts = [p for p in feature_groups(features) if p in GROUPS]
    wanted = {FEATURE_NAMES[i] for p in parts for i in range(*GROUPS[p].indices(len(FEATURE_NAMES)))}
    missing = wanted - set(names)
    if missing:
        raise DataError(f"the features file lacks {sorted(missing)} (its feature_names: {list(names)})")
    return [i for i, n in enumerate(names) if n in wanted]


@dataclass(frozen=True)
class Video:
    """One video's kept frames."""

    key: str  # HDF5 group name under videos/
    source: str  # path relative to the extraction root (the group's `source` attribute)
    frames: np.ndarray  # (l, F) float32, the frames kept by the no-face policy, feature subset applied
    n_total: int  # K, frames analysed in the file (with and without a face)
    n_face: int  # frames with a face among them


def open_checked(path: Path) -> FeatureFile:
    """The features file opened with affextract's reader, which refuses anything but the format version it reads."""
    try:
        return open_features(path)
    except (FormatError, FileNotFoundError) as e:
        raise DataError(f"{e} (seqhead reads what `affextract run` or `seqhead simulate` writes)") from e


def read_features(path: Path, features: str = "va,expr,au", no_face: str = "drop",
                  keys: set[str] | None = None) -> tuple[list[Video], tuple[str, ...]]:
    """All videos (or those in `keys`) of an HDF5 features file, with the no-face policy applied, and the names
    of the features kept (file order).

    no_face='drop': frames without a face are removed, so l counts the frames kept (the default: the GRU never sees
    a gap marker, and the Mask/pooling work on real faces only). no_face='fill': each faceless frame repeats the
    last frame with a face (the first face for a leading gap), so l = K and timing is kept.
    A video without any face keeps zero frames; the heads see it as one all-zero frame (see `pad_batch`).
    Movement groups (bs: the 51 blendshapes without `_neutral`, pose, gaze) follow the 26 features' columns, in that
    order.
    """
    if no_face not in NO_FACE_POLICIES:
        raise DataError(f"no-face policy {no_face!r}: use one of {NO_FACE_POLICIES}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such features file")
    out = []
    groups = feature_groups(features)
    movement = [MOVEMENT_GROUPS[g] for g in MOVEMENT_GROUPS if g in groups]  # (dataset, columns kept)
    with open_checked(path) as ff:
        names = ff.feature_names
        cols = feature_indices(features, names)
        if movement and not ff.movement.get("enabled"):
            raise DataError(f"{path} has no measured movement (made by `affextract run --no-movement` or an affextract "
                            f"without it), so --features {features!r} cannot be read: re-extract without "
                            f"--no-movement, or use only {', '.join(GROUPS)}")
        value_names = {"blendshapes": ff.blendshape_names, "pose": ff.pose_names, "gaze": ff.gaze_names}
        kept = tuple(names[i] for i in cols) + tuple(n for d, c in movement for n in value_names[d][c])
        for key in sorted(ff.keys, key=escape_key):  # Video.key is the group name, in the file's order
            if keys is not None and escape_key(key) not in keys:
                continue
            v = ff.read(key, ("features", "face", *(d for d, _ in movement)))
            face = v.face.astype(bool)  # (K,)
            x = np.concatenate([v.features[:, cols], *(v.extra[d][:, c] for d, c in movement)], axis=1)
            x = np.ascontiguousarray(x, dtype=np.float32)  # (K, F)
            face &= np.isfinite(x).all(axis=1)
            if no_face == "drop":
                x = x[face]
            elif face.any():
                idx = np.where(face, np.arange(len(face)), -1)
                idx = np.maximum.accumulate(idx)
                idx[idx < 0] = np.argmax(face)
                x = x[idx]
            else:
                x = x[:0]
            out.append(Video(escape_key(key), v.source, x, int(face.shape[0]), int(face.sum())))
    if not out:
        raise DataError(f"{path}: no videos in the file")
    return out, kept


# What a head trained on one file must agree on with a file it predicts: the MMA weights, the detector and its
# settings, the alignment, the frame sampling, and (only for heads that read it) the movement stage.
PROVENANCE_FIELDS = ("model", "model_sha256", "detector", "alignment", "sampling", "movement")


def read_provenance(path: Path) -> dict:
    """What made a features file, from its attributes: model, model_sha256, alignment as text; detector,
    sampling ({"fps": null} = every frame) and movement as the JSON objects they hold."""
    with open_checked(Path(path)) as ff:
        prov = ff.provenance
    out = {}
    for name in PROVENANCE_FIELDS:
        value = getattr(prov, name)
        try:
            out[name] = json.loads(value) if name in ("detector", "sampling", "movement") else value
        except ValueError:
            out[name] = value
    return out


def provenance_mismatch(trained: dict, given: dict, features: str) -> list[str]:
    """The provenance fields on which a file differs from the one a run was trained on, as 'field: run X, file Y'
    (movement only when the run reads movement groups)."""
    uses_movement = any(g in MOVEMENT_GROUPS for g in feature_groups(features))
    return [f"{name}: run {trained.get(name)!r}, file {given.get(name)!r}" for name in PROVENANCE_FIELDS
            if (name != "movement" or uses_movement) and trained.get(name) != given.get(name)]


# ---------------------------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class Labels:
    """A validated label table: one row per id."""

    path: Path
    id_column: str
    ids: list[str]  # normalised ids, unique
    targets: tuple[str, ...]  # target column names
    y: np.ndarray  # (N, n_targets) float32; NaN only for rows of the test split
    split: list[str] | None  # 'train' | 'val' | 'test' per row, when the table has a split column
    groups: list[str] | None  # subject per row, when a group column is used


def normalize_id(s: object) -> str:
    """'[00042]' and ' 00042 ' both read as '00042' (Hume ids appear with and without brackets)."""
    s = str(s).strip()
    if len(s) > 2 and s[0] == "[" and s[-1] == "]":
        s = s[1:-1].strip()
    return s


def _find(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    low = {c.lower().strip(): c for c in columns}
    return next((low[w] for w in wanted if w in low), None)


def _examples(items: list, n: int = 5, quote: bool = True) -> str:
    shown = ", ".join(repr(i) if quote else str(i) for i in items[:n])
    return shown + (f", … ({len(items) - n} more)" if len(items) > n else "")


def read_labels(path: Path, id_column: str | None = None, targets: tuple[str, ...] | None = None,
                split_column: str | None = None, group_column: str | None = None) -> Labels:
    """Read and validate a label CSV (any id column + numeric target columns; Hume-Reaction works as is).

    Auto-detection: id = `File_ID` or a column named id/video/file/path/…, else the first column; split = a column
    named split/set/partition with Train/Val/Test-like values; targets = the 7 Hume columns when all present, else
    every other mostly-numeric column. Errors name the file, the column and the rows.
    """
    path = Path(path)
    df = _read_csv(path)
    cols = list(df.columns)
    id_col = id_column or _find(cols, _ID_COLUMNS) or cols[0]
    split_col = split_column if split_column is not None else _find(cols, _SPLIT_COLUMNS)
    for what, col in (("id", id_col), ("split", split_col), ("group", group_column)):
        if col and col not in cols:
            raise DataError(f"{path}: no {what} column {col!r} (columns: {cols})")
    target_cols = _target_columns(path, df, targets, reserved={id_col, split_col, group_column,
                                                                  _find(cols, _GROUP_COLUMNS)})
    ids = _unique_ids(path, df, id_col)
    split = _splits(path, df, split_col) if split_col else None
    y = _target_values(path, df, target_cols, split)
    groups = [g.strip() for g in df[group_column]] if group_column else None
    return Labels(path, id_col, ids, target_cols, y, split, groups)


def _read_csv(path: Path) -> pd.DataFrame:
    """Every cell as text (nothing guessed: ids keep their leading zeros, an empty cell stays '')."""
    if not path.exists():
        raise DataError(f"{path}: no such label file")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several types for malformed CSV
        raise DataError(f"{path}: cannot read as CSV ({e})") from e
    if df.empty:
        raise DataError(f"{path}: no rows")
    return df


def _target_columns(path: Path, df: pd.DataFrame, targets: tuple[str, ...] | None, reserved: set) -> tuple[str, ...]:
    """The columns given, else the 7 Hume columns when all are there, else every mostly-numeric column not
    `reserved` (id, split, group)."""
    cols = list(df.columns)
    if targets:
        missing = [t for t in targets if t not in cols]
        if missing:
            raise DataError(f"{path}: no target column(s) {missing} (columns: {cols})")
        return tuple(targets)
    if all(t in cols for t in HUME_TARGETS):
        return HUME_TARGETS
    found = tuple(
        c for c in cols if c not in reserved
        and (df[c].str.strip() != "").any()
        and pd.to_numeric(df[c].str.strip(), errors="coerce").notna().mean() >= 0.5
    )
    if not found:
        raise DataError(f"{path}: no numeric target column found (columns: {cols}); name them with --targets")
    return found


def _unique_ids(path: Path, df: pd.DataFrame, id_col: str) -> list[str]:
    """The normalised ids; an empty or repeated one is an error naming its lines (line 1 is the header)."""
    ids = [normalize_id(v) for v in df[id_col]]
    empty = [i + 2 for i, v in enumerate(ids) if not v]
    if empty:
        raise DataError(f"{path}: empty id in column {id_col!r} at line(s) {_examples(empty, quote=False)}")
    seen: dict[str, int] = {}
    dups = []
    for i, v in enumerate(ids):
        if v in seen:
            dups.append(f"{v} (lines {seen[v] + 2} and {i + 2})")
        seen.setdefault(v, i)
    if dups:
        raise DataError(f"{path}: {len(dups)} duplicate id(s) in column {id_col!r}: {_examples(dups, quote=False)}; "
                        "keep one row per video")
    return ids


def _splits(path: Path, df: pd.DataFrame, split_col: str) -> list[str]:
    """'train' | 'val' | 'test' per row, from any of the names in SPLIT_NAMES."""
    raw = [s.strip().lower() for s in df[split_col]]
    bad = [(i + 2, s) for i, s in enumerate(raw) if s not in SPLIT_NAMES]
    if bad:
        raise DataError(f"{path}: split column {split_col!r} has values other than Train/Val/Test at "
                        f"line(s) {_examples([f'{ln}: {s!r}' for ln, s in bad], quote=False)}")
    return [SPLIT_NAMES[s] for s in raw]


def _target_values(path: Path, df: pd.DataFrame, target_cols: tuple[str, ...], split: list[str] | None) -> np.ndarray:
    """(N, n_targets) float32; NaN only where a test row has no value (every train/val row needs all targets)."""
    y = np.empty((len(df), len(target_cols)), dtype=np.float32)
    for j, c in enumerate(target_cols):
        text = df[c].str.strip()
        vals = pd.to_numeric(text, errors="coerce")
        bad = [(i + 2, t) for i, (t, v) in enumerate(zip(text, vals)) if t != "" and pd.isna(v)]
        if bad:
            raise DataError(f"{path}: non-numeric value(s) in target column {c!r} at line(s) "
                            f"{_examples([f'{ln}: {t!r}' for ln, t in bad], quote=False)}; "
                            "fix them or choose --targets")
        missing = [i + 2 for i, v in enumerate(vals) if pd.isna(v) and not (split and split[i] == "test")]
        if missing:
            raise DataError(f"{path}: missing value(s) in target column {c!r} at line(s) "
                            f"{_examples(missing, quote=False)}; every train/val row needs all targets")
        y[:, j] = vals.to_numpy(dtype=np.float32, na_value=np.nan)
    return y


def find_labels(h5_path: Path, labels: Path | None) -> Path:
    """The label file to use: the one given, else labels.csv beside the features file."""
    if labels is not None:
        return Path(labels)
    beside = Path(h5_path).with_name("labels.csv")
    if beside.exists():
        return beside
    raise DataError(f"no labels given and no {beside} beside {h5_path}; pass one with --labels y.csv "
                    "(an id column matching the videos' keys, relative paths or file stems, plus numeric targets)")


# ---------------------------------------------------------------------------------------------------------- matching

# Most specific first: a row takes the first form that names exactly one video. The relative path comes before the
# HDF5 key: the two agree for a video at the top of the input folder, and predictions written in the majority form
# must name nested videos by their path, not by the escaped key ('sub%2Fb.mp4').
ID_FORMS = ("source", "key", "path", "name", "stem", "number")


def id_forms(source: str, key: str) -> dict[str, str | None]:
    """The ways a label file may name a video: HDF5 group key, relative path, path without suffix, file name,
    file stem, and for a numeric stem its number without leading zeros ('0' for '00000'; None otherwise)."""
    p = PurePosixPath(source)
    return {"key": key, "source": source, "path": str(p.with_suffix("")), "name": p.name, "stem": p.stem,
            "number": str(int(p.stem)) if p.stem.isdigit() else None}


def video_id(video: Video, form: str) -> str:
    """The video's id in one form; a form the video has no value for (number of a non-numeric stem) gives the
    relative path."""
    return id_forms(video.source, video.key)[form] or video.source


def _label_key(label_id: str, form: str) -> str | None:
    """How a label id reads in one form: itself, except 'number', where a bare numeric name (with or without a
    suffix: '7', '007.mp4') reads as its integer."""
    if form != "number":
        return label_id
    p = PurePosixPath(label_id)
    return str(int(p.stem)) if p.name == label_id and p.stem.isdigit() else None


def match_ids(label_ids: list[str], names: list[dict[str, str | None]]) -> tuple[dict[int, tuple[int, str]],
                                                                                   dict[int, str]]:
    """Pair label ids with items named in several forms (`id_forms` of each), each label row on its own.

    A row takes the first form of ID_FORMS under which its id names exactly one item. Returns ({row: (item,
    form)}, {row: form under which the id names several items}); rows in neither named nothing.
    """
    index: dict[str, dict[str, list[int]]] = {f: {} for f in ID_FORMS}
    for j, forms in enumerate(names):
        for f in ID_FORMS:
            if forms[f] is not None:
                index[f].setdefault(forms[f], []).append(j)
    found, ambiguous = {}, {}
    for r, i in enumerate(label_ids):
        for f in ID_FORMS:
            hit = index[f].get(_label_key(i, f) or "", [])
            if len(hit) == 1:
                found[r] = (hit[0], f)
                break
            if len(hit) > 1:  # less specific forms would name at least as many
                ambiguous[r] = f
                break
    return found, ambiguous


def match(labels: Labels, videos: list[Video], allow_unmatched: bool = False) -> tuple[list[int], list[int],
                                                                                         list[str]]:
    """Pair label rows with videos: (row indices, video indices, id form of each pair).

    Each row is matched on its own (see `match_ids`), so one file may mix forms ('a/clip' and 'b/clip.mp4',
    '00000.mp4' and '7'). Two rows naming one video, an id naming several videos, and (unless allow_unmatched)
    ids on one side only are errors with a count and examples.
    """
    found, ambiguous = match_ids(labels.ids, [id_forms(v.source, v.key) for v in videos])
    if not found:
        raise DataError(f"{labels.path}: no id in column {labels.id_column!r} matches a video of the features file "
                        f"(label ids like {_examples(labels.ids, 3)}; video paths like "
                        f"{_examples([v.source for v in videos], 3)}); ids must be keys, relative paths (with or "
                        "without suffix), file names or stems")
    if ambiguous:
        amb = [f"{labels.ids[r]} (by {f})" for r, f in ambiguous.items()]
        raise DataError(f"{labels.path}: {len(amb)} id(s) name several videos: {_examples(amb, quote=False)}; "
                        "use relative paths as ids")
    first: dict[int, int] = {}
    clashes = []
    for r, (j, _) in found.items():
        if j in first:
            clashes.append(f"{labels.ids[first[j]]!r} (line {first[j] + 2}) and {labels.ids[r]!r} (line {r + 2}) "
                           f"→ {videos[j].source}")
        first.setdefault(j, r)
    if clashes:
        raise DataError(f"{labels.path}: {len(clashes)} video(s) named by two rows: "
                        f"{_examples(clashes, quote=False)}; keep one row per video")
    rows = sorted(found)
    vids = [found[r][0] for r in rows]
    forms = [found[r][1] for r in rows]
    if not allow_unmatched:
        no_video = [i for r, i in enumerate(labels.ids) if r not in found]
        if no_video:
            raise UnmatchedError(f"{labels.path}: {len(no_video)} labelled id(s) have no video in the features "
                                 f"file: {_examples(no_video)}; extract them, remove the rows, or pass "
                                 f"{UnmatchedError.API_ARGUMENT}")
        matched = set(vids)
        no_label = [v.source for j, v in enumerate(videos) if j not in matched]
        if no_label:
            raise UnmatchedError(f"{len(no_label)} video(s) of the features file have no row in {labels.path}: "
                                 f"{_examples(no_label)}; add them, or pass {UnmatchedError.API_ARGUMENT} to train "
                                 "on the others")
    return rows, vids, forms


def split_indices(labels: Labels, rows: list[int], val_fraction: float, seed: int,
                  group_column_used: bool) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into `rows`) of the training and validation videos.

    With a split column: Train → train, Val → val, Test is left out. Otherwise a random fraction (seeded), kept
    apart by subject when a group column is given (scikit-learn's GroupShuffleSplit).
    """
    from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit

    if labels.split is not None:
        s = np.array([labels.split[r] for r in rows])
        tr, va = np.where(s == "train")[0], np.where(s == "val")[0]
        if len(tr) == 0 or len(va) == 0:
            raise DataError(f"{labels.path}: the split column needs Train and Val rows among the matched videos "
                            f"(found {len(tr)} train, {len(va)} val)")
        return tr, va
    if not 0 < val_fraction < 1:
        raise DataError(f"validation fraction {val_fraction} must be in (0, 1) when the labels have no split column")
    idx = np.arange(len(rows))
    if group_column_used and labels.groups is not None:
        g = np.array([labels.groups[r] for r in rows])
        tr, va = next(GroupShuffleSplit(1, test_size=val_fraction, random_state=seed).split(idx, groups=g))
    else:
        tr, va = next(ShuffleSplit(1, test_size=val_fraction, random_state=seed).split(idx))
    return np.sort(tr), np.sort(va)


# ---------------------------------------------------------------------------------------------------------- batches


def batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket: bool) -> list[np.ndarray]:
    """Index batches for one epoch; a final batch of one video joins the previous one (Pearson needs ≥ 2)."""
    order = rng.permutation(len(lengths))
    if bucket:  # sort by length inside chunks of 50 batches, then shuffle the batches
        chunk = 50 * batch_size
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                                for c in np.array_split(order, max(1, math.ceil(len(order) / chunk)))])
    out = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:  # a batch of one has no Pearson correlation: join it to the one before
        last = out.pop()
        out[-1] = np.concatenate([out[-1], last])
    if bucket:
        out = [out[i] for i in rng.permutation(len(out))]
    return out



def pad_batch(seqs: list[np.ndarray], t: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad sequences (l_i, F) to (B, T, F); T = t, or the longest in the batch when t is None.

    Returns (x (B, T, F) float32, lengths (B,) int64). A sequence with no frame (a video without any face) becomes
    one all-zero frame with l = 1, so every head has something to pool. Sequences longer than T are cut at T.
    """
    lengths = np.array([max(min(len(s), t) if t else len(s), 1) for s in seqs], dtype=np.int64)
    T = t if t else int(lengths.max())
    F = seqs[0].shape[1]
    x = np.zeros((len(seqs), T, F), dtype=np.float32)
    for i, s in enumerate(seqs):
        n = min(len(s), T)
        x[i, :n] = s[:n]
    return x, lengths
