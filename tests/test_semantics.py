"""What each output means, checked on real faces against the design, not against the code's own constants: the
26-row order, valence apart from arousal, and the sign of the gaze pitch."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from affextract import model as model_mod
from affextract.schema import BLENDSHAPE_NAMES, EXPRESSIONS, FEATURE_NAMES

# DESIGN.md, "The 26 per-frame values": valence, arousal, the 7 expressions in Aff-Wild2 order, the 17 AUs in
# ascending order.
DESIGN_ROWS = [
    "valence", "arousal",
    "neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise",
    "AU1", "AU2", "AU4", "AU5", "AU6", "AU7", "AU9", "AU10", "AU11", "AU12", "AU15", "AU17", "AU20", "AU23", "AU24",
    "AU25", "AU26",
]

shipped = pytest.mark.skipif(not model_mod.DEFAULT_WEIGHTS.exists(), reason="no shipped default weights")


def test_the_26_rows_are_in_the_designs_order_everywhere(tmp_path):
    from test_features_api import synthetic_video, write_features

    assert list(FEATURE_NAMES) == DESIGN_ROWS
    h5 = write_features(tmp_path / "f.h5", {"a.mp4": synthetic_video(4, 0)})
    with h5py.File(h5) as f:
        assert [n.decode() if isinstance(n, bytes) else n for n in f.attrs["feature_names"]] == DESIGN_ROWS
    if model_mod.DEFAULT_WEIGHTS.exists():
        doc = json.loads(model_mod.DEFAULT_WEIGHTS.with_suffix(".json").read_text())
        assert doc["metadata"]["feature_names"] == DESIGN_ROWS


def real_faces() -> np.ndarray:
    """(N, 3, 112, 112) aligned crops of every face MTCNN finds in skimage's astronaut and insightface's bundled
    photos (t1.jpg: a group; Tom Hanks): smiling and neutral faces."""
    import insightface
    from skimage.data import astronaut

    from affextract.faces.align import align_faces
    from affextract.faces.detectors import get_detector

    folder = Path(insightface.__file__).parent / "data" / "images"
    group = cv2.imread(str(folder / "t1.jpg"))  # (886, 1280): half the size still leaves its faces 80+ pixels wide
    images = [astronaut(), cv2.resize(group, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)[:, :, ::-1].copy(),
              cv2.imread(str(folder / "Tom_Hanks_54745.png"))[:, :, ::-1].copy()]
    det = get_detector("mtcnn")
    crops = []
    for img in images:
        marks = det.detect(img[None])[0].landmarks
        crops.append(align_faces(np.repeat(img[None], len(marks), 0), marks))
    return torch.cat(crops)


@shipped
def test_valence_row_is_valence_and_arousal_row_is_arousal_on_real_faces():
    """The shipped VA was learnt from expression centroids (datasets.VA_CENTROIDS; happiness (0.81, 0.51)): each
    row must follow its own coordinate of the centroid that the face's expression probabilities give, and a smile
    must raise valence clearly above arousal."""
    from affextract.training.datasets import VA_CENTROIDS

    m, _ = model_mod.load_mma()
    with torch.no_grad():
        f = m.features(real_faces()).numpy()
    assert len(f) >= 6
    p = f[:, 2:9]
    centroid = p @ np.array([VA_CENTROIDS[e] for e in EXPRESSIONS])  # (N, 2)
    happy = p.argmax(1) == EXPRESSIONS.index("happiness")
    assert happy.sum() >= 3 and (~happy).sum() >= 2, p.round(2)
    np.testing.assert_allclose(f[:, 0], centroid[:, 0], atol=0.15, err_msg="valence row")
    np.testing.assert_allclose(f[:, 1], centroid[:, 1], atol=0.15, err_msg="arousal row")
    assert (f[happy, 0] > f[happy, 1] + 0.15).all(), f[happy, :2]  # smiles: valence well above arousal
    assert (f[happy, 0] > 0.5).all() and (np.abs(f[~happy, :2]) < 0.3).all(), f[:, :2]


def _iris_moved(img: np.ndarray, mesh: np.ndarray, d: float) -> np.ndarray:
    """`img` with both irises moved up by d iris radii (down for d < 0): a smooth local warp around each iris
    centre of the face mesh, leaving the eye corners and lids where they are."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy = np.zeros_like(xx)
    for centre, ring in ((468, [469, 470, 471, 472]), (473, [474, 475, 476, 477])):
        cx, cy = mesh[centre, :2]
        r = np.linalg.norm(mesh[ring, :2] - mesh[centre, :2], axis=1).mean()
        dy += d * r * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (1.2 * r) ** 2))
    return cv2.remap(img, xx, yy + dy, cv2.INTER_CUBIC)  # output(x, y) = input(x, y + dy): content moves up


def test_gaze_pitch_is_positive_upwards_on_a_real_face():
    """schema.GAZE_NAMES: pitch > 0 upwards. The astronaut's irises, moved up and then down in the photo, move the
    measured gaze pitch the same way, and MediaPipe's eyeLookUp/eyeLookDown blendshapes agree."""
    from skimage.data import astronaut

    from affextract.faces.detectors import get_detector
    from affextract.faces.align import crop_faces, invert_affine, roi_from_points
    from affextract.movement import Movement

    img = cv2.resize(astronaut()[0:250, 100:320], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    det, mv = get_detector("mtcnn"), Movement("cpu")

    roi = roi_from_points(det.detect(img[None])[0].landmarks[:1])  # one crop for all three: only the irises move

    def measure(im):
        return mv(crop_faces(im[None], roi), invert_affine(roi))

    mesh = measure(img).mesh[0]
    up, down = measure(_iris_moved(img, mesh, 0.8)), measure(_iris_moved(img, mesh, -0.8))
    assert up.gaze[0, 1] > down.gaze[0, 1] + 2, (up.gaze, down.gaze)
    look = {k: [BLENDSHAPE_NAMES.index(f"eyeLook{k}{s}") for s in ("Left", "Right")] for k in ("Up", "Down")}
    assert (up.blendshapes[0, look["Up"]] > down.blendshapes[0, look["Up"]]).all()
    assert (down.blendshapes[0, look["Down"]] > up.blendshapes[0, look["Down"]]).all()
    assert abs(up.gaze[0, 0] - down.gaze[0, 0]) < 2  # a vertical move, not a sideways one
