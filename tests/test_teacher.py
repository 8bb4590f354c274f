"""Blendshape coefficients -> teacher AUs: the mapping, AU25, calibration, distrust and NaN rows."""

import numpy as np
import pytest

from affextract.schema import AUS, BLENDSHAPE_NAMES as NAMES
from affextract.training.teacher import BLENDSHAPE_AU, NO_TEACHER, TeacherOptions, teacher_aus, with_teacher

A = AUS.index
RAW = TeacherOptions(calibration={}, distrust=())  # coefficients as they are, every AU with a counterpart


def test_mapping_takes_the_larger_side_and_lips_part_from_jaw_and_close():
    b = np.zeros((3, 52), np.float32)
    b[0, NAMES.index("mouthSmileLeft")], b[0, NAMES.index("mouthSmileRight")] = 0.2, 0.9
    b[1, NAMES.index("jawOpen")], b[1, NAMES.index("mouthClose")] = 0.6, 0.1
    b[2] = np.nan  # no face
    t = teacher_aus(b, NAMES, RAW)
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


def test_default_calibration_separates_neutral_from_obvious_faces_and_distrusts_the_failed_aus():
    """The shipped calibration puts the median coefficients measured on FER+ valid neutral faces below 0.5 and those
    of faces where the AU is obvious above it (README, "AU teacher"); AU4/9/10 failed the check and stay NaN."""
    b = np.zeros((2, 52), np.float32)
    for name, neutral, obvious in (("browInnerUp", 0.036, 0.510), ("jawOpen", 0.009, 0.289),
                                   ("mouthSmileLeft", 0.0, 0.712), ("eyeWideLeft", 0.014, 0.096)):
        b[:, NAMES.index(name)] = [neutral, obvious]
    t = teacher_aus(b, NAMES)
    for au in (1, 26, 12, 5):
        assert t[0, A(au)] < 0.5 < t[1, A(au)], au
    for au in (4, 9, 10, 11, 23):
        assert np.isnan(t[:, A(au)]).all()


def test_with_teacher_attaches_checked_targets():
    from affextract.training.datasets import FaceSet

    nan = np.full((4, 17), np.nan, np.float32)
    fs = FaceSet("toy", "native", np.zeros((4, 24, 24), np.uint8), np.full((4, 2), np.nan, np.float32),
                 np.eye(7, dtype=np.float32)[[0, 4, 5, 6]], nan)
    t = teacher_aus(np.zeros((4, 52), np.float32), NAMES)
    assert with_teacher(fs, t).teacher_au.shape == (4, 17)
    with pytest.raises(ValueError, match="teacher_au has shape"):
        with_teacher(fs, t[:2])


def test_load_cached_maps_ferplus_rows_and_drops_faces_the_mesh_misses(tmp_path):
    import h5py

    from affextract.training.datasets import DatasetError, load_ferplus
    from affextract.training.teacher import load_cached

    votes = np.zeros((4, 10), np.float32)
    votes[:, 0], votes[1, 9] = 10, 10  # row 1: all votes "not a face", so load_ferplus skips it
    votes[1, 0] = 0
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["images"] = np.zeros((4, 48, 48), np.uint8)
        f["votes"] = votes
        f["split"] = np.array([b"train"] * 4)
    blend = np.zeros((4, 52), np.float32)
    blend[:, NAMES.index("jawOpen")] = [0.1, 0.2, 0.3, 0.4]
    np.savez(tmp_path / "c.npz", blendshapes=blend, presence=np.array([0.9, 0.9, 0.2, 0.9], np.float32),
             names=np.array(NAMES))
    fs = load_cached(load_ferplus(tmp_path / "f.h5", "train"), tmp_path / "c.npz", RAW)
    assert len(fs) == 3  # rows 0, 2, 3
    np.testing.assert_allclose(fs.teacher_au[:, A(26)], [0.1, np.nan, 0.4])  # row 2: presence below 0.5
    toy = with_teacher(fs, fs.teacher_au)
    toy.origin[0] = "clip.mp4:frame0"
    with pytest.raises(DatasetError, match="not a FER\\+ row"):
        load_cached(toy, tmp_path / "c.npz")
    with pytest.raises(DatasetError, match="does not exist"):
        load_cached(fs, tmp_path / "missing.npz")


def test_measure_native_reads_a_smile_on_a_48px_ferplus_framed_face():
    """skimage's astronaut (smiling) warped to FER+'s framing at 48x48 grey: the mesh finds the face from the fixed
    FER+ points, and the smile outweighs the jaw drop."""
    import cv2
    from skimage import data

    from affextract.faces.detectors import get_detector
    from affextract.training.teacher import FERPLUS_POINTS, measure_native

    image = data.astronaut()
    pts = get_detector("mtcnn").detect(image[None])[0].landmarks[0]
    m = cv2.estimateAffinePartial2D(pts.astype(np.float32), FERPLUS_POINTS.astype(np.float32))[0]
    face = cv2.cvtColor(cv2.warpAffine(image, m, (48, 48), flags=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
    out = measure_native(face[None])
    b = dict(zip(NAMES, out.blendshapes[0]))
    assert out.presence[0] > 0.5
    assert max(b["mouthSmileLeft"], b["mouthSmileRight"]) > 0.3 > b["jawOpen"], b
    assert np.isfinite(out.lip_gap[0]) and out.lip_gap[0] >= 0
