"""The GPU branches of device-dependent code, run on the CPU through runtime.gpu_paths (AFFEXTRACT_GPU_PATHS=1), give
the CPU branches' results within stated tolerances, on real faces. Only the GPU device itself stays untested here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from affextract.faces import align as al
from affextract import movement as mv
from affextract.faces.align import warp_faces
from affextract.faces.detectors import get_detector
from affextract.runtime import GPU_PATHS_ENV, gpu_paths
from conftest import group_frames, write_video

INSIGHTFACE_IMAGES = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images"


@pytest.fixture(scope="module")
def detector():
    torch.set_num_threads(2)
    return get_detector("mtcnn")


@pytest.fixture(scope="module")
def faces(detector) -> tuple[np.ndarray, np.ndarray]:
    """Seven real faces (the astronaut, six people of insightface's t1.jpg), one per frame: frames (7, H, W, 3) uint8,
    MTCNN points (7, 5, 2)."""
    from skimage import data

    t1 = cv2.cvtColor(cv2.imread(str(INSIGHTFACE_IMAGES / "t1.jpg")), cv2.COLOR_BGR2RGB)
    frames, points = [], []
    for image, keep in ((data.astronaut(), 1), (t1, 6)):
        found = detector.detect(image[None])[0]
        for j in np.argsort(-found.areas)[:keep]:
            frames.append(image)
            points.append(found.landmarks[j])
    h, w = max(f.shape[0] for f in frames), max(f.shape[1] for f in frames)
    padded = np.zeros((len(frames), h, w, 3), np.uint8)
    for i, f in enumerate(frames):
        padded[i, :f.shape[0], :f.shape[1]] = f
    return padded, np.stack(points)


def test_switch(monkeypatch):
    assert not gpu_paths("cpu") and gpu_paths(torch.device("cuda:0"))
    monkeypatch.setenv(GPU_PATHS_ENV, "1")
    assert gpu_paths("cpu")
    monkeypatch.setenv(GPU_PATHS_ENV, "0")
    assert not gpu_paths(torch.device("cpu"))


def test_batched_warp_matches_cv2_on_real_faces(faces, monkeypatch):
    """The batched grid warp (the GPU's) against one cv2.warpAffine per face: within one grey level, for the MMA's
    112x112 faces and the face mesh's 192x192 crops. Measured: at most 1, on 0.01% of the pixels."""
    frames, points = faces
    roi = al.roi_from_points(points)
    cpu = warp_faces(frames, points).int(), al.crop_faces(frames, roi).int()
    monkeypatch.setenv(GPU_PATHS_ENV, "1")
    gpu = warp_faces(frames, points).int(), al.crop_faces(frames, roi).int()
    assert torch.equal(gpu[0], warp_faces(frames, points, method="grid").int())  # "auto" took the GPU branch
    for a, b in zip(cpu, gpu):
        diff = (a - b).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.001, (diff.max(), (diff > 0).float().mean())


def test_whole_batch_mesh_matches_chunked_mesh_at_batch_256(faces, monkeypatch):
    """Movement at batch 256 (the GPU's batch) on 256 crops, the seven real faces repeated, in one pass of the whole
    batch (the GPU branch) against the CPU branch's cache-sized chunks on the seven faces. Measured: identical on
    this CPU; stated tolerance 0.01 px of mesh and 1e-4 of the other outputs (kernels may sum in another order)."""
    frames, points = faces
    roi = al.roi_from_points(points)
    crops, to_image = al.crop_faces(frames, roi), al.invert_affine(roi)
    stage = mv.Movement("cpu", mv.MovementOptions(batch_size=256))
    calls = []
    stage.mesh.stem.register_forward_hook(lambda *_: calls.append(1))
    cpu = stage(crops, to_image)
    assert len(calls) == 2  # chunks of FaceMesh.cache_faces faces on the CPU branch
    monkeypatch.setenv(GPU_PATHS_ENV, "1")
    gpu = stage(crops.repeat(37, 1, 1, 1)[:256], np.tile(to_image, (37, 1, 1))[:256])
    assert len(calls) == 3  # then one pass of all 256
    for name in ("mesh", "blendshapes", "pose", "gaze", "presence"):
        ref = np.tile(getattr(cpu, name), (37,) + (1,) * (getattr(cpu, name).ndim - 1))[:256]
        assert np.abs(getattr(gpu, name) - ref).max() < (0.01 if name == "mesh" else 1e-4), name
    assert (cpu.presence > 0.5).all()  # real faces: the comparison is of meaningful outputs


def test_mtcnn_float_pyramid_finds_the_same_faces(detector, monkeypatch):
    """The pyramid resized in float (the GPU branch: antialiased bilinear needs float there) against the CPU's resize
    straight on uint8 frames: the same faces; boxes and points within 6% of the box's side, most within 1%; scores
    within 0.03. Measured on these 16 faces: 13 within 0.7%, two of t1.jpg's off by 4-5% (NMS kept a neighbouring
    proposal), scores within 0.013."""
    from skimage import data

    t1 = cv2.cvtColor(cv2.imread(str(INSIGHTFACE_IMAGES / "t1.jpg")), cv2.COLOR_BGR2RGB)
    batches = [data.astronaut()[None], t1[None], group_frames(3)]
    cpu = [f for b in batches for f in detector.detect(b)]
    monkeypatch.setenv(GPU_PATHS_ENV, "1")
    gpu = [f for b in batches for f in detector.detect(b)]
    assert [len(f) for f in gpu] == [len(f) for f in cpu] == [1, 6, 3, 3, 3]
    box_err, point_err, score_err = [], [], []
    for a, b in zip(cpu, gpu):
        centre = lambda f: (f.boxes[:, :2] + f.boxes[:, 2:]) / 2  # noqa: E731
        j = np.linalg.norm(centre(a)[:, None] - centre(b)[None], axis=-1).argmin(1)  # b's face nearest each of a's
        side = (a.boxes[:, 2:] - a.boxes[:, :2]).max(1)
        box_err += list(np.abs(a.boxes - b.boxes[j]).max(1) / side)
        point_err += list(np.abs(a.landmarks - b.landmarks[j]).max((1, 2)) / side)
        score_err += list(np.abs(a.scores - b.scores[j]))
    assert max(box_err) < 0.06 and max(point_err) < 0.06 and max(score_err) < 0.03, (box_err, point_err, score_err)
    assert np.median(box_err) < 0.01 and np.median(point_err) < 0.01
    assert max(box_err) > 0  # the float pyramid did run


def test_bfloat16_features_match_float32(faces, monkeypatch):
    """The MMA under bfloat16 autocast (the extraction's GPU branch, `extract._Features`) against float32, with the
    shipped weights on real aligned faces: every feature within 0.03 (probabilities, tanh values). Measured: 0.0095."""
    from affextract.extract import _Features
    from affextract.model import load_mma
    from affextract.workers import FaceChunk

    frames, points = faces
    crops = warp_faces(frames, points).numpy()
    n = len(crops)
    chunk = FaceChunk(index=0, frame=np.arange(n), time=np.zeros(n), face=np.ones(n, bool), boxes=np.zeros((n, 4)),
                      scores=np.ones(n), landmarks=points, crops=crops)
    model = load_mma(None)[0]
    cpu = _Features(model, torch.device("cpu"))
    monkeypatch.setenv(GPU_PATHS_ENV, "1")
    gpu = _Features(model, torch.device("cpu"))
    assert cpu.dtype is None and gpu.dtype == torch.bfloat16
    a, b = cpu(chunk), gpu(chunk)
    assert 0 < np.abs(a - b).max() < 0.03, np.abs(a - b).max()  # > 0: bfloat16 did run


def test_extract_with_gpu_branches_matches_cpu_branches(carphone, tmp_path, monkeypatch):
    """`extract` on a real talking-face clip (carphone's first 40 frames, written here), movement included, with
    every GPU branch on (workers included: float pyramid, batched warps; main process: bfloat16 MMA, the mesh at
    batch 256 in one pass) against the CPU branches: the same face frames, features within 0.06, landmarks within
    1 px, blendshapes within 0.05, pose within 1 degree. Measured: 0.030, 0.28 px, 0.019, 0.24 degrees."""
    import decord

    from affextract.extract import ExtractOptions, extract
    from affextract.features import open_features

    frames = decord.VideoReader(str(carphone)).get_batch(list(range(40))).asnumpy()
    clip = write_video(tmp_path / "carphone.avi", frames)
    opts = ExtractOptions(device="cpu", workers=1)
    out = {}
    for on in ("0", "1"):
        monkeypatch.setenv(GPU_PATHS_ENV, on)
        report = extract(clip, tmp_path / f"gpu{on}.h5", opts)
        assert report.frames == 40 and not report.failed
        with open_features(tmp_path / f"gpu{on}.h5") as f:
            v = f[f.find("carphone")]
            out[on] = {k: np.asarray(getattr(v, k)) for k in ("face", "features", "landmarks", "blendshapes", "pose")}
    cpu, gpu = out["0"], out["1"]
    assert cpu["face"].all() and np.array_equal(cpu["face"], gpu["face"])
    err = {k: float(np.abs(cpu[k] - gpu[k]).max()) for k in ("features", "landmarks", "blendshapes", "pose")}
    assert 0 < err["features"] < 0.06 and err["landmarks"] < 1, err
    assert err["blendshapes"] < 0.05 and err["pose"] < 1, err
