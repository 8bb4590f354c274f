"""Teacher AUs from measured facial movement: MediaPipe blendshape coefficients -> the 17 AUs (AUS order).

The correspondence is ARKit's FACS reading (DESIGN.md, "Measured facial movement"); left/right pairs take the
larger side. AU25 (lips part) is jawOpen less mouthClose: a jaw drop with the lips pressed shut is not AU25.
AU11 and AU23 have no counterpart and stay NaN, so training keeps the Table-1 prior (L_DM) for them.

A coefficient is not a probability: how one becomes the other is `TeacherOptions.calibration`, one logistic
(centre, slope) per AU, to be measured on faces where the AU is known; without it the coefficient itself is used.
The result goes into FaceSet.teacher_au, which `train` fits with L_teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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


@dataclass(frozen=True)
class TeacherOptions:
    """How blendshape coefficients become teacher AU probabilities."""

    # AU -> (centre, slope): p = sigmoid(slope * (coefficient - centre)), measured per AU; an AU not listed
    # uses its coefficient as the probability.
    calibration: dict[int, tuple[float, float]] = field(default_factory=dict)
    # AUs whose teacher is not trusted (it failed the check on faces where the AU is obvious): left NaN, so
    # they keep the prior like AU11/AU23.
    distrust: tuple[int, ...] = ()


def teacher_aus(blendshapes: np.ndarray, names: tuple[str, ...], opts: TeacherOptions = TeacherOptions()) -> np.ndarray:
    """(N, 52) blendshape coefficients in [0, 1], named by `names` -> (N, 17) teacher AU probabilities, NaN where
    there is no (trusted) teacher; a row of NaN coefficients (no face) gives a NaN row."""
    b = np.asarray(blendshapes, np.float32)
    if b.ndim != 2 or b.shape[1] != len(names):
        raise ValueError(f"blendshapes have shape {b.shape}; expected (N, {len(names)}) for the {len(names)} names given")
    col = {n: i for i, n in enumerate(names)}
    missing = sorted(({n for ns in BLENDSHAPE_AU.values() for n in ns} | {"mouthClose"}) - set(col))
    if missing:
        raise ValueError(f"blendshape names lack {missing}; expected MediaPipe's 52 (ARKit) names")
    raw = {au: b[:, [col[n] for n in ns]].max(1) for au, ns in BLENDSHAPE_AU.items()}
    raw[25] = np.clip(b[:, col["jawOpen"]] - b[:, col["mouthClose"]], 0.0, 1.0)
    out = np.full((len(b), len(AUS)), np.nan, np.float32)
    for au, v in raw.items():
        if au in opts.distrust:
            continue
        if au in opts.calibration:
            centre, slope = opts.calibration[au]
            v = 1.0 / (1.0 + np.exp(-slope * (v - centre)))
        out[:, AUS.index(au)] = np.clip(v, 0.0, 1.0)
    return out


def with_teacher(fs, teacher: np.ndarray):
    """FaceSet `fs` with teacher AUs (N, 17) attached (checked by FaceSet)."""
    return replace(fs, teacher_au=np.asarray(teacher, np.float32))
