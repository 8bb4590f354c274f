"""Every registered detector honours the Detector contract the extractor relies on."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from skimage import data

from affextract.faces.detectors import DETECTORS, Detector, Faces, get_detector

# A SCRFD .onnx to test with, when one is on disk (nothing is ever downloaded by the tests).
SCRFD_MODEL_ENV = "AFFEXTRACT_SCRFD_MODEL"


def _offline_options(name: str) -> dict:
    if name == "scrfd":
        path = os.environ.get(SCRFD_MODEL_ENV)
        return {"model_path": path} if path else {"download": False}
    return {}


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def detector(request) -> Detector:
    try:
        return get_detector(request.param, **_offline_options(request.param))
    except FileNotFoundError as error:
        pytest.skip(
            f"detector '{request.param}' has no model file offline (set {SCRFD_MODEL_ENV}=/path/to/model.onnx "
            f"to include it): {str(error).splitlines()[0]}"
        )


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    face = data.astronaut()  # (512, 512, 3)
    rng = np.random.default_rng(0)
    return np.stack(
        [
            face,
            np.ascontiguousarray(face[:, ::-1]),  # mirrored face
            np.full_like(face, 128),  # flat grey
            rng.integers(0, 256, face.shape, dtype=np.uint8),  # noise
        ]
    )


def _check_faces(faces: Faces):
    m = len(faces)
    assert faces.boxes.shape == (m, 4) and faces.boxes.dtype == np.float32
    assert faces.scores.shape == (m,) and faces.scores.dtype == np.float32
    assert faces.landmarks.shape == (m, 5, 2) and faces.landmarks.dtype == np.float32
    for array in (faces.boxes, faces.scores, faces.landmarks):
        assert np.isfinite(array).all()
    assert (faces.boxes[:, 2] > faces.boxes[:, 0]).all() and (faces.boxes[:, 3] > faces.boxes[:, 1]).all()
    assert ((faces.scores >= 0) & (faces.scores <= 1)).all()


def test_settings_are_json_with_the_name(detector):
    settings = detector.settings()
    assert settings["name"] == detector.name
    assert json.loads(json.dumps(settings)) == settings


def test_one_faces_per_frame_with_the_right_shapes(detector, frames):
    result = detector.detect(frames)
    assert isinstance(result, list) and len(result) == len(frames)
    for faces in result:
        assert isinstance(faces, Faces)
        _check_faces(faces)
    assert len(result[0]) >= 1 and len(result[1]) >= 1
    assert len(result[2]) == 0


def test_empty_batch(detector, frames):
    assert detector.detect(frames[:0]) == []


def test_batch_of_one_equals_batch_of_four(detector, frames):
    together = detector.detect(frames)
    alone = [detector.detect(frames[i : i + 1])[0] for i in range(len(frames))]
    for a, b in zip(alone, together):
        assert len(a) == len(b)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=0.05)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=0.05)


def test_refine_when_offered(detector, frames):
    if not hasattr(detector, "refine"):
        pytest.skip(f"detector '{detector.name}' offers no refine()")
    first = detector.detect(frames[:2])
    boxes = np.stack([f.boxes[0] for f in first])
    refined = detector.refine(frames[:2], boxes)
    assert len(refined) == 2
    _check_faces(refined)
    assert (refined.scores > 0.5).all()
