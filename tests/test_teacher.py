"""Blendshape coefficients -> teacher AUs: the mapping, AU25, calibration, distrust and NaN rows."""

import numpy as np
import pytest

from affextract.schema import AUS
from affextract.teacher import BLENDSHAPE_AU, NO_TEACHER, TeacherOptions, teacher_aus, with_teacher

# MediaPipe's 52 outputs in order (ARKit names), as the blendshapes model emits them.
NAMES = (
    "_neutral", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight", "cheekPuff",
    "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft", "eyeLookDownRight",
    "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight",
    "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft", "jawOpen", "jawRight",
    "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight", "mouthFunnel",
    "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight", "mouthPucker",
    "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthSmileLeft",
    "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft", "mouthUpperUpRight",
    "noseSneerLeft", "noseSneerRight",
)
A = AUS.index


def test_mapping_takes_the_larger_side_and_lips_part_from_jaw_and_close():
    b = np.zeros((3, 52), np.float32)
    b[0, NAMES.index("mouthSmileLeft")], b[0, NAMES.index("mouthSmileRight")] = 0.2, 0.9
    b[1, NAMES.index("jawOpen")], b[1, NAMES.index("mouthClose")] = 0.6, 0.1
    b[2] = np.nan  # no face
    t = teacher_aus(b, NAMES)
    assert t[0, A(12)] == pytest.approx(0.9) and t[0, A(26)] == 0.0
    assert t[1, A(26)] == pytest.approx(0.6) and t[1, A(25)] == pytest.approx(0.5)
    assert np.isnan(t[2]).all()
    for au in NO_TEACHER:
        assert np.isnan(t[:, A(au)]).all()
    assert set(BLENDSHAPE_AU) | {25} | set(NO_TEACHER) == set(AUS)


def test_calibration_and_distrust():
    b = np.zeros((2, 52), np.float32)
    b[:, NAMES.index("browInnerUp")] = [0.1, 0.3]
    t = teacher_aus(b, NAMES, TeacherOptions(calibration={1: (0.2, 20.0)}, distrust=(9,)))
    assert t[:, A(1)] == pytest.approx(1 / (1 + np.exp(-20 * (np.array([0.1, 0.3]) - 0.2))))
    assert np.isnan(t[:, A(9)]).all() and not np.isnan(t[:, A(10)]).any()
    with pytest.raises(ValueError, match="lack"):
        teacher_aus(b[:, :40], NAMES[:40])
    with pytest.raises(ValueError, match="expected"):
        teacher_aus(b, NAMES[:40])


def test_with_teacher_attaches_checked_targets():
    from affextract.datasets import FaceSet

    nan = np.full((4, 17), np.nan, np.float32)
    fs = FaceSet("toy", "native", np.zeros((4, 24, 24), np.uint8), np.full((4, 2), np.nan, np.float32),
                 np.eye(7, dtype=np.float32)[[0, 4, 5, 6]], nan)
    t = teacher_aus(np.zeros((4, 52), np.float32), NAMES)
    assert with_teacher(fs, t).teacher_au.shape == (4, 17)
    with pytest.raises(ValueError, match="teacher_au has shape"):
        with_teacher(fs, t[:2])
