"""Teacher AUs from measured facial movement: MediaPipe blendshape coefficients -> the 17 AUs (AUS order).

The correspondence is ARKit's FACS reading (model card affextract/weights/mma_ferplus_small.md, "AU teacher");
left/right pairs take the larger side. AU25 (lips part) is jawOpen less mouthClose: a jaw drop with the lips pressed
shut is not AU25.
AU11 and AU23 have no counterpart and stay NaN, so training keeps the Table-1 prior (L_DM) for them.

A coefficient is not a probability: how one becomes the other is `TeacherOptions.calibration`, one logistic
(centre, slope) per AU, measured on faces where the AU is obvious against neutral faces; without it the coefficient
itself is used.
The result goes into FaceSet.teacher_au, which `train` fits with L_teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from affextract.schema import AUS

# AU -> the blendshapes whose maximum measures it (left/right pairs of the subject).
BLENDSHAPE_AU: dict[int, tuple[str, ...]] = {
    1: ("browInnerUp",),
    2: ("browOuterUpLeft", "browOuterUpRight"),
    4: ("browDownLeft", "browDownRight"),
    5: ("eyeWideLeft", "eyeWideRight"),
    6: ("cheekSquintLeft", "cheekSquintRight"),
    7: ("eyeSquintLeft", "eyeSquintRight"),
    9: ("noseSneerLeft", "noseSneerRight"),
    10: ("mouthUpperUpLeft", "mouthUpperUpRight"),
    12: ("mouthSmileLeft", "mouthSmileRight"),
    15: ("mouthFrownLeft", "mouthFrownRight"),
    17: ("mouthShrugLower",),
    20: ("mouthStretchLeft", "mouthStretchRight"),
    24: ("mouthPressLeft", "mouthPressRight"),
    26: ("jawOpen",),
}
NO_TEACHER = (11, 23)  # AUs without a blendshape counterpart: the Table-1 prior stays their only signal
# Measured by tools/fit_teacher_calibration.py on FER+ train faces measured with measure_native (x4, FER+ points).
FERPLUS_CALIBRATION: dict[int, tuple[float, float]] = {
    1: (0.312, 4.207), 2: (0.3425, 3.797), 5: (0.05779, 22.99), 6: (1.649e-06, 661800.0), 12: (0.1769, 11.88),
    20: (0.03654, 7.869), 25: (0.09316, 16.52), 26: (0.1024, 15.11),
}


@dataclass(frozen=True)
class TeacherOptions:
    """How blendshape coefficients become teacher AU probabilities."""

    # AU -> (centre, slope): p = sigmoid(slope * (coefficient - centre)); an AU not listed uses its coefficient as
    # the probability. Default: fitted on FER+ train, faces where the AU is obvious against neutral faces
    # (tools/fit_teacher_calibration.py; model card, "AU teacher").
    calibration: dict[int, tuple[float, float]] = field(default_factory=lambda: dict(FERPLUS_CALIBRATION))
    # AUs whose teacher is not trusted (AUROC below 0.70 on FER+ valid, obvious against neutral faces): left NaN,
    # so they keep the prior like AU11/AU23.
    distrust: tuple[int, ...] = (4, 7, 9, 10, 15, 17, 24)


def au_evidence(blendshapes: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """(N, 52) blendshape coefficients in [0, 1], named by `names` -> (N, 17) raw evidence of each AU (AUS order):
    the coefficient of its blendshape (BLENDSHAPE_AU, pairs by maximum; AU25 jawOpen less mouthClose, clipped to
    [0, 1]); NaN for AU11 and AU23 (no counterpart) and on rows of NaN coefficients (no face)."""
    b = np.asarray(blendshapes, np.float32)
    if b.ndim != 2 or b.shape[1] != len(names):
        raise ValueError(f"blendshapes have shape {b.shape}; expected (N, {len(names)}) for the {len(names)} names given")
    col = {n: i for i, n in enumerate(names)}
    missing = sorted(({n for ns in BLENDSHAPE_AU.values() for n in ns} | {"mouthClose"}) - set(col))
    if missing:
        raise ValueError(f"blendshape names lack {missing}; expected MediaPipe's 52 (ARKit) names")
    out = np.full((len(b), len(AUS)), np.nan, np.float32)
    for au, ns in BLENDSHAPE_AU.items():
        out[:, AUS.index(au)] = b[:, [col[n] for n in ns]].max(1)
    out[:, AUS.index(25)] = np.clip(b[:, col["jawOpen"]] - b[:, col["mouthClose"]], 0.0, 1.0)
    return out


def teacher_aus(blendshapes: np.ndarray, names: tuple[str, ...], opts: TeacherOptions = TeacherOptions()) -> np.ndarray:
    """(N, 52) blendshape coefficients in [0, 1], named by `names` -> (N, 17) teacher AU probabilities, NaN where
    there is no (trusted) teacher; a row of NaN coefficients (no face) gives a NaN row."""
    raw = au_evidence(blendshapes, names)
    out = np.full_like(raw, np.nan)
    for j, au in enumerate(AUS):
        if au in NO_TEACHER or au in opts.distrust:
            continue
        v = raw[:, j]
        if au in opts.calibration:
            centre, slope = opts.calibration[au]
            v = 1.0 / (1.0 + np.exp(-slope * (v - centre)))
        out[:, j] = np.clip(v, 0.0, 1.0)
    return out


def with_teacher(fs, teacher: np.ndarray):
    """FaceSet `fs` with teacher AUs (N, 17) attached (checked by FaceSet)."""
    return replace(fs, teacher_au=np.asarray(teacher, np.float32))


# ------------------------------------------------------------------------------------ measuring small native faces

# Where MTCNN's 5 points sit on FER+ faces (median over 341 FER+ valid faces, in FER+ pixels; model card
# affextract/weights/mma_ferplus_small.md, "Crop"): FER+ faces are framed alike, so one fixed set of points places
# the mesh crop of every image.
FERPLUS_POINTS = np.array([[15.1, 18.7], [32.9, 18.4], [23.9, 28.6], [16.5, 37.6], [31.8, 37.2]])
INNER_LIPS = (13, 14)  # mesh points of the upper and lower inner lip, on the midline
EYE_CORNERS = (33, 263)  # mesh points of the outer eye corners


def lip_gap(mesh: np.ndarray) -> np.ndarray:
    """(N, 478, >=2) mesh points -> (N,) inner-lip gap over the outer-eye-corner distance: the mouth opening,
    independent of the face's size in the image."""
    m = np.asarray(mesh, np.float64)[:, :, :2]
    gap = np.linalg.norm(m[:, INNER_LIPS[0]] - m[:, INNER_LIPS[1]], axis=1)
    return (gap / np.linalg.norm(m[:, EYE_CORNERS[0]] - m[:, EYE_CORNERS[1]], axis=1)).astype(np.float32)


@dataclass(frozen=True)
class NativeMeasure:
    """MediaPipe measurements of small, uniformly framed face images (such as FER+'s 48x48), one row per image."""

    blendshapes: np.ndarray  # (N, 52) float32, BLENDSHAPE_NAMES order
    presence: np.ndarray  # (N,) float32 face-presence probability of the mesh (MediaPipe keeps faces above 0.5)
    lip_gap: np.ndarray  # (N,) float32 inner-lip gap over eye-corner distance (see lip_gap)


def measure_native(images: np.ndarray, points: np.ndarray = FERPLUS_POINTS, upscale: int = 4, movement=None,
                   chunk: int = 256, on_chunk=None) -> NativeMeasure:
    """(N, H, W) uint8 grey (or (N, H, W, 3) RGB) face images framed alike -> their blendshapes and mesh measures.

    Each image is upscaled `upscale` times (bicubic; MediaPipe's mesh wants a crop of 192 pixels) and the mesh crop
    is placed from the fixed 5 `points` (H x W pixels) with align.roi_from_points. `on_chunk(done, total)` is
    called after each chunk of `chunk` images."""
    import cv2
    import torch

    from affextract.faces.align import crop_faces, invert_affine, roi_from_points
    from affextract.movement import Movement

    mv = movement or Movement("cpu")
    imgs = np.asarray(images)
    if imgs.ndim not in (3, 4) or imgs.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W) or (N, H, W, 3), got {imgs.dtype} {imgs.shape}")
    # Pixel centres: source pixel x covers [x, x + 1), so its centre (x + 0.5) lands at (x + 0.5) * k - 0.5.
    pts = (np.asarray(points, np.float64) + 0.5) * upscale - 0.5
    blend, presence, gap = [], [], []
    for s in range(0, len(imgs), chunk):
        part = imgs[s:s + chunk]
        big = np.stack([cv2.resize(im, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_CUBIC) for im in part])
        if big.ndim == 3:
            big = np.repeat(big[..., None], 3, -1)
        m = roi_from_points(np.repeat(pts[None], len(part), 0))
        out = mv(crop_faces(torch.from_numpy(big), m), invert_affine(m))
        blend.append(out.blendshapes)
        presence.append(out.presence)
        gap.append(lip_gap(out.mesh))
        if on_chunk:
            on_chunk(min(s + chunk, len(imgs)), len(imgs))
    return NativeMeasure(np.concatenate(blend), np.concatenate(presence), np.concatenate(gap))


def cached_measures(fs, path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Blendshapes (N, 52), mesh presence (N,) and blendshape names of the FER+ rows of FaceSet `fs` (origin
    "file.h5:row") from the cache `path` written by tools/ferplus_teacher.py (one row per row of the .h5)."""
    from affextract.training.datasets import DatasetError

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: teacher cache does not exist; make it with tools/ferplus_teacher.py")
    with np.load(path) as z:
        blend, presence, names = z["blendshapes"], z["presence"], tuple(str(n) for n in z["names"])
    rows = []
    for o in fs.origin:
        head, _, row = o.rpartition(":")
        if not row.isdigit() or not head.endswith(".h5"):
            raise DatasetError(f"{fs.name}: sample {o!r} is not a FER+ row (file.h5:row); {path} covers FER+ only")
        rows.append(int(row))
    rows = np.asarray(rows)
    if not len(rows) or rows.max() >= len(blend):
        raise DatasetError(f"{path}: holds {len(blend)} rows but {fs.name} needs row {rows.max()}; "
                           "rebuild it from the same ferplus.h5")
    return blend[rows], presence[rows], names


def measure_set(fs, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(N, 52) blendshapes and (N,) mesh presence of every face of FaceSet `fs`, measured as `affextract run` does:
    the mesh crop placed from the face's 5 points (raw photos: the dataset's points or MTCNN's, as for the MMA;
    aligned crops: the ArcFace template's; FER+-framed images: upscaled x4 with FER+'s points, measure_native). What
    evaluate scores the fused AU rows with (affextract.fusion)."""
    import torch

    from affextract.faces.align import crop_faces, invert_affine, roi_from_points
    from affextract.training.datasets import raw_points, read_image
    from affextract.movement import Movement

    if fs.framing == "native":
        m = measure_native(np.stack([read_image(fs, i) for i in range(len(fs))]))
        return m.blendshapes, m.presence
    from insightface.utils.face_align import arcface_dst

    mv, detector = Movement("cpu"), None
    blend, presence, crops, maps = [], [], [], []
    for i in range(len(fs)):
        img = read_image(fs, i)
        img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img
        if fs.framing == "raw":
            pts, detector = raw_points(fs, i, img, detector)
        else:
            pts = np.asarray(arcface_dst, np.float32)
        m = roi_from_points(pts[None])
        crops.append(crop_faces(np.ascontiguousarray(img)[None], m))
        maps.append(invert_affine(m))
        if len(crops) == batch_size or i == len(fs) - 1:
            out = mv(torch.cat(crops), np.concatenate(maps))
            blend.append(out.blendshapes)
            presence.append(out.presence)
            crops, maps = [], []
    return np.concatenate(blend), np.concatenate(presence)


def load_cached(fs, path, opts: TeacherOptions = TeacherOptions(), min_presence: float = 0.5):
    """FaceSet `fs` of FER+ rows with teacher AUs from the blendshape cache `path` (cached_measures). Faces whose mesh
    presence is below `min_presence` (where MediaPipe would report no face) get no teacher, so L_DM covers them."""
    blend, presence, names = cached_measures(fs, path)
    teacher = teacher_aus(blend, names, opts)
    teacher[presence < min_presence] = np.nan
    return with_teacher(fs, teacher)
