"""Labelled face datasets for MMA training and evaluation, read in their own published layouts.

Every adapter returns a `FaceSet`: images plus per-task labels in this package's orders
(schema.EXPRESSIONS, schema.AUS), with NaN wherever a task is not annotated, so one training loop
covers datasets that annotate different tasks (paper §3.1). Labels are checked while reading: a bad
row is an error naming the file and row, never a silently dropped or mangled sample.

Images come in three framings:
- "aligned": ArcFace-aligned 112x112 RGB crops (Aff-Wild2's cropped_aligned, or any aligned set);
- "native":  images already framed like the network input (FER+: 48x48 grayscale, loosely cropped);
- "raw":     photos that go through the same face detector + alignment as `affextract run`
             (with the dataset's own landmarks where it ships them, e.g. AffectNet).
`prepare_inputs` turns all three into the network's input tensors with the model's own preprocessing.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from affextract.pixels import LUMA, to_pixels, to_unit
from affextract.schema import AUS, EXPRESSIONS
from affextract.video import IMAGE_EXTENSIONS

FRAMINGS = ("aligned", "native", "raw")


class DatasetError(ValueError):
    """A dataset file is unusable; the message names the file (and row) and what to fix."""


@dataclass
class FaceSet:
    """Images with VA / expression / AU labels; NaN = not annotated for that task."""

    name: str  # e.g. "ferplus:train", shown in logs and reports
    framing: str  # one of FRAMINGS
    # uint8 (N, H, W) grayscale or (N, H, W, 3) RGB in memory, or N image file paths.
    images: np.ndarray | list[Path]
    va: np.ndarray  # (N, 2) float32 valence, arousal in [-1, 1]
    expr: np.ndarray  # (N, 7) float32 distribution over EXPRESSIONS (one-hot for hard labels)
    au: np.ndarray  # (N, 17) float32 in {0, 1} over AUS
    landmarks: np.ndarray | None = None  # (N, 5, 2) float32 source-pixel landmarks for "raw" images, NaN = detect
    origin: list[str] = field(default_factory=list)  # (N,) "file:row" of each sample, for error messages
    # (N,) source of each sample (e.g. "jaffe", "kdef" in a labelled folder), so scores can be split by
    # source; empty = one source.
    groups: list[str] = field(default_factory=list)
    # (N, 17) float32 teacher AU probabilities over AUS (e.g. from measured facial movement), NaN where the
    # teacher has no value (AU11/AU23 have no counterpart); None = no teacher. Trained by L_teacher.
    teacher_au: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.framing not in FRAMINGS:
            raise ValueError(f"{self.name}: framing {self.framing!r} is not one of {FRAMINGS}")
        if n == 0:
            raise DatasetError(f"{self.name}: the dataset is empty (no usable samples); check its paths and filters")
        for attr, width in (("va", 2), ("expr", len(EXPRESSIONS)), ("au", len(AUS))):
            a = getattr(self, attr)
            if a.shape != (n, width):
                raise ValueError(f"{self.name}: {attr} has shape {a.shape}, expected ({n}, {width})")
        if self.groups and len(self.groups) != n:
            raise ValueError(f"{self.name}: {len(self.groups)} groups for {n} samples")
        if self.teacher_au is not None:
            t = self.teacher_au
            if t.shape != (n, len(AUS)):
                raise ValueError(f"{self.name}: teacher_au has shape {t.shape}, expected ({n}, {len(AUS)})")
            bad = np.isfinite(t) & ((t < 0) | (t > 1))
            if bad.any():
                r = int(np.argwhere(bad)[0, 0])
                raise DatasetError(f"{self.origin[r] if self.origin else self.name}: teacher AU values must be in [0, 1]")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def tasks(self) -> list[str]:
        """The tasks with at least one label in this set."""
        return [t for t, a in (("va", self.va), ("expr", self.expr), ("au", self.au)) if np.isfinite(a).any()]

    def subset(self, idx: np.ndarray) -> FaceSet:
        imgs = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        return FaceSet(
            self.name, self.framing, imgs, self.va[idx], self.expr[idx], self.au[idx],
            None if self.landmarks is None else self.landmarks[idx],
            [self.origin[i] for i in idx] if self.origin else [],
            [self.groups[i] for i in idx] if self.groups else [],
            None if self.teacher_au is None else self.teacher_au[idx],
        )


def _nan(n: int, width: int) -> np.ndarray:
    return np.full((n, width), np.nan, np.float32)


def _one_hot(codes: list[int]) -> np.ndarray:
    e = np.zeros((len(codes), len(EXPRESSIONS)), np.float32)
    for i, c in enumerate(codes):
        if c < 0:
            e[i] = np.nan
        else:
            e[i, c] = 1.0
    return e


def _check_va(value: str, where: str, what: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise DatasetError(f"{where}: {what} {value!r} is not a number") from None
    if not -1.0 <= v <= 1.0:
        raise DatasetError(f"{where}: {what} {v} is outside [-1, 1]")
    return v


def _check_files(paths: list[Path], origin: list[str]) -> None:
    for p, o in zip(paths, origin):
        if not p.is_file():
            raise DatasetError(f"{o}: image file {p} does not exist; fix the path or remove the row")


# --- FER+ --------------------------------------------------------------------------------------------

# FER+ vote columns -> our expression index; contempt, unknown and NF are not among our 7 and are dropped.
FERPLUS_VOTES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF")
FERPLUS_MIN_VOTES = 6  # keep an image only if >= 6 of its 10 votes name one of our 7 expressions


def load_ferplus(path: str | Path, split: str, min_votes: int = FERPLUS_MIN_VOTES) -> FaceSet:
    """FER+ in the ferplus.h5 layout: images uint8 (N, 48, 48), votes (N, 10), split, name.

    The expression target is the annotators' vote distribution over our 7 expressions; contempt/unknown/NF
    votes are dropped and images left with fewer than `min_votes` votes are skipped.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: FER+ file does not exist")
    with h5py.File(path, "r") as f:
        for k in ("images", "votes", "split"):
            if k not in f:
                raise DatasetError(f"{path}: no dataset {k!r}; expected the ferplus.h5 layout (images, votes, split)")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["votes"].attrs.get("vote_names", f.attrs.get("vote_names", FERPLUS_VOTES))]
        if tuple(names) != FERPLUS_VOTES:
            raise DatasetError(f"{path}: vote_names {names} differ from FER+'s {list(FERPLUS_VOTES)}")
        splits = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in f["split"][:]])
        known = sorted(set(splits))
        if split not in known:
            raise DatasetError(f"{path}: no split {split!r}; it has {known}")
        rows = np.flatnonzero(splits == split)
        votes = f["votes"][:][rows].astype(np.float32)
        images = f["images"][:][rows]
    if images.ndim != 3:
        raise DatasetError(f"{path}: images have shape {images.shape}, expected (N, H, W) grayscale")
    if (votes < 0).any():
        r = int(rows[np.argwhere(votes < 0)[0, 0]])
        raise DatasetError(f"{path}: row {r} has a negative vote count")
    ours = np.zeros((len(rows), len(EXPRESSIONS)), np.float32)
    for j, name in enumerate(FERPLUS_VOTES[:7]):
        ours[:, EXPRESSIONS.index(name)] = votes[:, j]
    keep = ours.sum(1) >= min_votes
    ours = ours[keep] / ours[keep].sum(1, keepdims=True)
    n = int(keep.sum())
    return FaceSet(
        name=f"ferplus:{split}", framing="native", images=images[keep], va=_nan(n, 2), expr=ours, au=_nan(n, len(AUS)),
        origin=[f"{path}:{r}" for r in rows[keep]],
    )


# Per-expression (valence, arousal) centroids: the pleasure and arousal coordinates of Russell & Mehrabian
# (1977), "Evidence for a three-factor theory of emotions", J. Research in Personality 11:273-294, for
# happy, sad, afraid, angry, surprised, disgusted (as tabulated in Gebhard 2005, ALMA); neutral at the origin.
VA_CENTROIDS = {
    "neutral": (0.0, 0.0),
    "anger": (-0.51, 0.59),
    "disgust": (-0.60, 0.35),
    "fear": (-0.64, 0.60),
    "happiness": (0.81, 0.51),
    "sadness": (-0.63, -0.27),
    "surprise": (0.40, 0.67),
}


def derive_va(fs: FaceSet, centroids: dict[str, tuple[float, float]] = VA_CENTROIDS) -> FaceSet:
    """Fill missing VA with the expression distribution's expected centroid: va = sum_e p(e) * c(e)."""
    c = np.array([centroids[e] for e in EXPRESSIONS], np.float32)  # (7, 2)
    missing = ~np.isfinite(fs.va).all(1) & np.isfinite(fs.expr).all(1)
    va = fs.va.copy()
    va[missing] = fs.expr[missing] @ c
    return replace(fs, va=va)


# --- AffectNet ---------------------------------------------------------------------------------------

# AffectNet's expression codes: 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger,
# 7 Contempt, 8 None, 9 Uncertain, 10 Non-Face. Codes 7-10 are not among our 7 and are skipped.
AFFECTNET_TO_OURS = {0: "neutral", 1: "happiness", 2: "sadness", 3: "surprise", 4: "fear", 5: "disgust", 6: "anger"}
AFFECTNET_SKIPPED = {7, 8, 9, 10}
AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "facial_landmarks", "expression", "valence", "arousal")


def five_from_68(pts: np.ndarray) -> np.ndarray:
    """(68, 2) iBUG landmarks -> (5, 2) ArcFace order: eye centres (image left first), nose tip, mouth corners."""
    return np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]]).astype(np.float32)


def load_affectnet(csv_path: str | Path, image_root: str | Path | None = None) -> FaceSet:
    """AffectNet's training/validation CSV; images under `image_root` (default: the CSV's folder).

    The CSV's 68 landmarks give the 5 alignment points, so no detector runs on AffectNet images.
    """
    csv_path = Path(csv_path)
    root = Path(image_root) if image_root else csv_path.parent
    paths, codes, va, lms, origin = [], [], [], [], []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in AFFECTNET_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{csv_path}: missing AffectNet columns {missing}; expected {list(AFFECTNET_COLUMNS)}")
        for i, row in enumerate(reader, start=2):
            where = f"{csv_path}:{i}"
            try:
                code = int(row["expression"])
            except ValueError:
                raise DatasetError(f"{where}: expression {row['expression']!r} is not an integer code") from None
            if code in AFFECTNET_SKIPPED:
                continue
            if code not in AFFECTNET_TO_OURS:
                raise DatasetError(f"{where}: unknown AffectNet expression code {code} (expected 0-10)")
            pts = np.array([float(v) for v in row["facial_landmarks"].split(";") if v.strip()], np.float32)
            if pts.size != 136:
                raise DatasetError(f"{where}: facial_landmarks has {pts.size} numbers, expected 136 (68 x, y pairs)")
            paths.append(root / row["subDirectory_filePath"])
            codes.append(EXPRESSIONS.index(AFFECTNET_TO_OURS[code]))
            va.append((_check_va(row["valence"], where, "valence"), _check_va(row["arousal"], where, "arousal")))
            lms.append(five_from_68(pts.reshape(68, 2)))
            origin.append(where)
    _check_files(paths, origin)
    n = len(paths)
    return FaceSet(
        name=f"affectnet:{csv_path.stem}", framing="raw", images=paths,
        va=np.array(va, np.float32).reshape(n, 2), expr=_one_hot(codes), au=_nan(n, len(AUS)),
        landmarks=np.array(lms, np.float32).reshape(n, 5, 2), origin=origin,
    )


# --- Aff-Wild2 (ABAW layout) -------------------------------------------------------------------------

ABAW_TASKS = {
    "va": ("VA_Estimation_Challenge", ["valence", "arousal"]),
    "expr": ("EXPR_Recognition_Challenge", ["Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise"]),
    "au": ("AU_Detection_Challenge", ["AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26"]),
}


def _read_abaw(path: Path, task: str) -> np.ndarray:
    """One ABAW annotation txt -> (frames, width) float32 with NaN for the invalid markers."""
    lines = path.read_text().splitlines()
    if not lines:
        raise DatasetError(f"{path}: empty annotation file")
    header = [h.strip() for h in lines[0].split(",")]
    expected = ABAW_TASKS[task][1]
    if task == "expr":
        if header[:7] != expected:
            raise DatasetError(f"{path}:1: header {header} is not the ABAW expression header {expected}(,Other)")
    elif header != expected:
        raise DatasetError(f"{path}:1: header {header} is not the ABAW {task} header {expected}")
    width = len(EXPRESSIONS) if task == "expr" else len(expected)
    out = np.full((len(lines) - 1, width), np.nan, np.float32)
    for i, line in enumerate(lines[1:]):
        where = f"{path}:{i + 2}"
        vals = [v.strip() for v in line.split(",")]
        try:
            nums = [float(v) for v in vals]
        except ValueError:
            raise DatasetError(f"{where}: {line!r} is not numeric") from None
        if task == "va":
            if len(nums) != 2:
                raise DatasetError(f"{where}: expected 2 values (valence, arousal), got {len(nums)}")
            if nums[0] == -5 or nums[1] == -5:  # ABAW's invalid-frame marker
                continue
            out[i] = (_check_va(vals[0], where, "valence"), _check_va(vals[1], where, "arousal"))
        elif task == "expr":
            if len(nums) != 1 or nums[0] != int(nums[0]):
                raise DatasetError(f"{where}: expected one integer expression code, got {line!r}")
            c = int(nums[0])
            if c == -1 or c == 7:  # -1 invalid; 7 "Other" is not among our 7
                continue
            if not 0 <= c <= 6:
                raise DatasetError(f"{where}: unknown ABAW expression code {c} (expected -1..7)")
            out[i] = 0.0
            out[i, c] = 1.0  # ABAW's order is ours
        else:
            if len(nums) != len(expected):
                raise DatasetError(f"{where}: expected {len(expected)} AU values, got {len(nums)}")
            if any(v == -1 for v in nums):  # ABAW marks the whole frame invalid with -1
                continue
            if any(v not in (0.0, 1.0) for v in nums):
                raise DatasetError(f"{where}: AU values must be 0, 1 or -1, got {line!r}")
            out[i] = nums
    return out


def load_affwild2(root: str | Path, split: str = "Train_Set") -> FaceSet:
    """Aff-Wild2 as distributed for ABAW: root/cropped_aligned/<video>/<00001>.jpg and
    root/<Task>_Challenge/<split>/<video>.txt for any of VA / EXPR / AU (line k+1 = frame k).

    Frames are joined across tasks; a frame without its cropped_aligned image (no face) is skipped.
    """
    root = Path(root)
    frames_dir = root / "cropped_aligned"
    if not frames_dir.is_dir():
        raise DatasetError(f"{frames_dir}: missing; expected the ABAW layout (cropped_aligned/<video>/00001.jpg)")
    per_video: dict[str, dict[str, np.ndarray]] = {}
    for task, (folder, _) in ABAW_TASKS.items():
        d = root / folder / split
        if d.is_dir():
            for txt in sorted(d.glob("*.txt")):
                per_video.setdefault(txt.stem, {})[task] = _read_abaw(txt, task)
    if not per_video:
        raise DatasetError(f"{root}: no annotation files under */{split}/ ({', '.join(f for f, _ in ABAW_TASKS.values())})")
    au_cols = [AUS.index(int(a[2:])) for a in ABAW_TASKS["au"][1]]
    paths, va, expr, au, origin = [], [], [], [], []
    for video, ann in sorted(per_video.items()):
        n_frames = max(len(a) for a in ann.values())
        for k in range(n_frames):
            row = {t: a[k] if k < len(a) else None for t, a in ann.items()}
            v = row.get("va")
            e = row.get("expr")
            u = row.get("au")
            labelled = any(x is not None and np.isfinite(x).all() for x in (v, e, u))
            img = frames_dir / video / f"{k + 1:05d}.jpg"
            if not labelled or not img.is_file():
                continue
            full_au = np.full(len(AUS), np.nan, np.float32)
            if u is not None:
                full_au[au_cols] = u
            paths.append(img)
            va.append(v if v is not None else np.full(2, np.nan, np.float32))
            expr.append(e if e is not None else np.full(len(EXPRESSIONS), np.nan, np.float32))
            au.append(full_au)
            origin.append(f"{video}:{k + 1}")
    n = len(paths)
    return FaceSet(
        name=f"affwild2:{split}", framing="aligned", images=paths,
        va=np.array(va, np.float32).reshape(n, 2), expr=np.array(expr, np.float32).reshape(n, len(EXPRESSIONS)),
        au=np.array(au, np.float32).reshape(n, len(AUS)), origin=origin,
    )


# --- EmotioNet and the generic manifest ---------------------------------------------------------------

PATH_COLUMNS = ("path", "image", "file", "URL")


def _au_columns(header: list[str], where: str) -> dict[str, int]:
    cols = {}
    for h in header:
        if h.upper().startswith("AU") and h[2:].strip().isdigit():
            num = int(h[2:])
            if num not in AUS:
                raise DatasetError(f"{where}: column {h} is not one of the 17 AUs {list(AUS)}")
            cols[h] = AUS.index(num)
    return cols


def _parse_au(value: str, where: str, col: str, missing: tuple[str, ...]) -> float:
    v = value.strip()
    if v in missing:
        return math.nan
    if v not in ("0", "1", "0.0", "1.0"):
        raise DatasetError(f"{where}: {col} = {v!r}; expected 0, 1 or empty/{'/'.join(m for m in missing if m)}")
    return float(v)


def load_emotionet(csv_path: str | Path, image_root: str | Path | None = None, aligned: bool = False) -> FaceSet:
    """EmotioNet AU table: an image column (path / image / file / URL) and AU<n> columns with 1 present,
    0 absent, 999 or empty not annotated. Images are detected + aligned unless `aligned`."""
    csv_path = Path(csv_path)
    root = Path(image_root) if image_root else csv_path.parent
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        pcol = next((c for c in PATH_COLUMNS if c in header), None)
        aus = _au_columns(header, str(csv_path))
        if pcol is None or not aus:
            raise DatasetError(
                f"{csv_path}: need an image column (one of {list(PATH_COLUMNS)}) and AU<n> columns; got {header}"
            )
        paths, au, origin = [], [], []
        for i, row in enumerate(reader, start=2):
            where = f"{csv_path}:{i}"
            a = np.full(len(AUS), np.nan, np.float32)
            for col, j in aus.items():
                a[j] = _parse_au(row[col] or "", where, col, ("", "999"))
            paths.append(root / row[pcol])
            au.append(a)
            origin.append(where)
    _check_files(paths, origin)
    n = len(paths)
    return FaceSet(
        name=f"emotionet:{csv_path.stem}", framing="aligned" if aligned else "raw", images=paths,
        va=_nan(n, 2), expr=_nan(n, len(EXPRESSIONS)), au=np.array(au, np.float32).reshape(n, len(AUS)), origin=origin,
    )


def load_manifest(csv_path: str | Path, aligned: bool = True) -> FaceSet:
    """Generic manifest CSV: path, valence, arousal, expression (name or 0-6 index in our order), AU<n>
    columns; an empty cell = not annotated. Relative paths are resolved against the CSV's folder.
    `aligned`: the images are ArcFace-aligned 112x112 crops; else they are detected + aligned like `run`."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        aus = _au_columns(header, str(csv_path))
        label_cols = [c for c in ("valence", "arousal", "expression") if c in header]
        if "path" not in header or not (label_cols or aus):
            raise DatasetError(
                f"{csv_path}: a manifest needs a 'path' column and at least one of valence, arousal, expression, "
                f"AU<n> (AU in {list(AUS)}); got columns {header}"
            )
        if ("valence" in header) != ("arousal" in header):
            raise DatasetError(f"{csv_path}: valence and arousal columns come together; got {header}")
        paths, va, codes, au, origin = [], [], [], [], []
        for i, row in enumerate(reader, start=2):
            where = f"{csv_path}:{i}"
            if not (row.get("path") or "").strip():
                raise DatasetError(f"{where}: empty path")
            v = (math.nan, math.nan)
            if "valence" in header and (row["valence"] or "").strip() and (row["arousal"] or "").strip():
                v = (_check_va(row["valence"], where, "valence"), _check_va(row["arousal"], where, "arousal"))
            code = -1
            e = (row.get("expression") or "").strip()
            if e:
                if e in EXPRESSIONS:
                    code = EXPRESSIONS.index(e)
                elif e.isdigit() and int(e) < len(EXPRESSIONS):
                    code = int(e)
                else:
                    raise DatasetError(f"{where}: unknown expression {e!r}; use one of {list(EXPRESSIONS)} or 0-6")
            a = np.full(len(AUS), np.nan, np.float32)
            for col, j in aus.items():
                a[j] = _parse_au(row[col] or "", where, col, ("",))
            p = Path(row["path"].strip())
            paths.append(p if p.is_absolute() else csv_path.parent / p)
            va.append(v)
            codes.append(code)
            au.append(a)
            origin.append(where)
    _check_files(paths, origin)
    n = len(paths)
    return FaceSet(
        name=f"manifest:{csv_path.stem}", framing="aligned" if aligned else "raw", images=paths,
        va=np.array(va, np.float32).reshape(n, 2), expr=_one_hot(codes).reshape(n, len(EXPRESSIONS)),
        au=np.array(au, np.float32).reshape(n, len(AUS)), origin=origin,
    )


# --- Labelled image folders ---------------------------------------------------------------------------

def load_folder(root: str | Path) -> FaceSet:
    """Photos sorted into class folders named after the expressions: root/<expression>/*.jpg, or
    root/<source>/<expression>/*.jpg (several sources, e.g. jaffe/, kdef/; scores can then be split
    by source). Images are detected + aligned like `affextract run`; files that are not images are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; expected class folders named {list(EXPRESSIONS)}")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if any(d.name in EXPRESSIONS for d in subdirs):
        sources = [(None, root)]
    else:
        sources = [(d.name, d) for d in subdirs if any(c.is_dir() and c.name in EXPRESSIONS for c in d.iterdir())]
    if not sources:
        raise DatasetError(f"{root}: no class folders named {list(EXPRESSIONS)} in it or in its subfolders")
    paths, codes, groups = [], [], []
    for source, base in sources:
        for d in sorted(base.iterdir()):
            if not d.is_dir():
                continue
            if d.name not in EXPRESSIONS:
                raise DatasetError(f"{d}: folder name is not one of the expressions {list(EXPRESSIONS)}; rename or move it")
            for p in sorted(d.iterdir()):
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                    paths.append(p)
                    codes.append(EXPRESSIONS.index(d.name))
                    groups.append(source or root.name)
    n = len(paths)
    if n == 0:
        raise DatasetError(f"{root}: the class folders hold no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return FaceSet(
        name=f"folder:{root.name}", framing="raw", images=paths, va=_nan(n, 2), expr=_one_hot(codes),
        au=_nan(n, len(AUS)), origin=[str(p) for p in paths], groups=groups if len(sources) > 1 else [],
    )


# --- Images -> network inputs -------------------------------------------------------------------------


def _read_rgb(path: Path, where: str) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"{where}: cannot decode image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def raw_points(fs: FaceSet, i: int, img: np.ndarray, detector=None):
    """(5, 2) face points of raw photo `i` of `fs` (RGB `img`): the dataset's own where it has them, otherwise the
    most confident MTCNN face; and the detector (made on first need, for reuse)."""
    lm = None if fs.landmarks is None else fs.landmarks[i]
    if lm is None or not np.isfinite(lm).all():
        from affextract.faces.detectors import get_detector

        detector = detector or get_detector("mtcnn")
        found = detector.detect(img[None])[0]
        if len(found) == 0:
            raise DatasetError(f"{fs.origin[i]}: no face found in {fs.images[i]}; remove the image (or its row) or crop it")
        lm = found.landmarks[0]  # best score first
    return np.asarray(lm, np.float32), detector


def align_raw(fs: FaceSet, idx: list[int]) -> torch.Tensor:
    """Raw photos -> (n, 3, 112, 112) aligned crops in [-1, 1], with the detector + alignment of `affextract run`.

    The dataset's own landmarks are used where it has them; otherwise the most confident MTCNN face.
    """
    from affextract.faces.align import align_faces  # lazy: the detector stack is only needed for unaligned images

    crops = []
    detector = None
    for i in idx:
        img = _read_rgb(fs.images[i], fs.origin[i])
        lm, detector = raw_points(fs, i, img, detector)
        crops.append(align_faces(img[None], lm[None])[0])
    return torch.stack(crops)


def read_image(fs: FaceSet, i: int) -> np.ndarray:
    """Image `i` of `fs` as stored (uint8 grey (H, W) or RGB (H, W, 3))."""
    return fs.images[i] if isinstance(fs.images, np.ndarray) else _read_rgb(fs.images[i], fs.origin[i])


def prepare_inputs(fs: FaceSet, model, batch_size: int = 256) -> torch.Tensor:
    """All images of `fs` -> uint8 (N, C, S, S) network inputs, through the model's own preprocessing.

    Aligned (and raw, once aligned) crops go through `model.preprocess` exactly as at inference; native
    images (already framed like the input) are only resized to the input size.
    """
    from affextract.model import to_input

    c = model.config
    out = []
    for s in range(0, len(fs), batch_size):
        idx = list(range(s, min(s + batch_size, len(fs))))
        if fs.framing == "native":
            imgs = fs.images[idx] if isinstance(fs.images, np.ndarray) else np.stack([_read_rgb(fs.images[i], fs.origin[i]) for i in idx])
            x = torch.from_numpy(np.ascontiguousarray(imgs)).float()
            x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
            if c.grayscale and x.shape[1] == 3:
                x = (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
            elif not c.grayscale and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            z = to_input(x, c.input_size)
        else:
            if fs.framing == "raw":
                x = align_raw(fs, idx)
            else:
                imgs = fs.images[idx] if isinstance(fs.images, np.ndarray) else np.stack(
                    [_read_rgb(fs.images[i], fs.origin[i]) for i in idx])
                if imgs.shape[1:] != (112, 112, 3):
                    where = fs.origin[idx[0]] if fs.origin else fs.name
                    raise DatasetError(f"{where}: aligned images must be 112x112 RGB, got {imgs.shape[1:]}")
                x = to_unit(torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2))
            with torch.no_grad():
                z = to_pixels(model.preprocess(x.to(model._theta.device)).cpu())
        out.append(z.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


# --- "kind:path[:arg]" specs, as the command line takes them -------------------------------------------

SPEC_KINDS = {
    "ferplus": "ferplus:PATH.h5:SPLIT (train/valid/test)",
    "affectnet": "affectnet:PATH.csv[:IMAGE_ROOT]",
    "affwild2": "affwild2:ROOT[:SPLIT] (Train_Set/Validation_Set)",
    "emotionet": "emotionet:PATH.csv[:IMAGE_ROOT]",
    "manifest": "manifest:PATH.csv[:raw] (raw = images not yet aligned)",
    "folder": "folder:DIR (DIR/<expression>/*.jpg or DIR/<source>/<expression>/*.jpg)",
}


def load_spec(spec: str, derive: bool = False) -> FaceSet:
    """Load a dataset named as "kind:path[:arg]" (see SPEC_KINDS); `derive` fills missing VA via derive_va."""
    kind, _, rest = spec.partition(":")
    if kind not in SPEC_KINDS or not rest:
        raise DatasetError(f"dataset {spec!r}: expected one of " + "; ".join(SPEC_KINDS.values()))
    path, _, arg = rest.partition(":")
    if kind == "ferplus":
        fs = load_ferplus(path, arg or "train")
    elif kind == "affectnet":
        fs = load_affectnet(path, arg or None)
    elif kind == "affwild2":
        fs = load_affwild2(path, arg or "Train_Set")
    elif kind == "emotionet":
        fs = load_emotionet(path, arg or None)
    elif kind == "folder":
        fs = load_folder(rest)
    else:
        if arg not in ("", "raw", "aligned"):
            raise DatasetError(f"dataset {spec!r}: manifest option must be 'raw' or 'aligned', got {arg!r}")
        fs = load_manifest(path, aligned=arg != "raw")
    return derive_va(fs) if derive else fs
