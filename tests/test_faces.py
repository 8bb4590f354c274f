"""Face stage on real faces from installed packages: detection, refinement, tracking, alignment, errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from affextract.faces.mtcnn import pyramid_scales
from affextract.faces.align import align_faces, alignment_matrices, warp_faces
from affextract.faces.detectors import DETECTORS, Faces, get_detector
from affextract.faces.tracking import PrimaryFaceStream, PrimaryFaceTracker, box_iou
from conftest import group_frames

INSIGHTFACE_IMAGES = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images"


def _read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, f"cannot read {path}"
    return np.ascontiguousarray(image[:, :, ::-1])


def _template(size: int = 112) -> np.ndarray:
    from insightface.utils.face_align import arcface_dst

    return arcface_dst * (size / 112.0)


@pytest.fixture(scope="module")
def detector():
    return get_detector("mtcnn")


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()  # (512, 512, 3), one face (Eileen Collins)


@pytest.fixture(scope="module")
def astronaut_face(detector, astronaut) -> Faces:
    return detector.detect(astronaut[None])[0]


def _assert_plausible_face(faces: Faces, index: int = 0):
    box = faces.boxes[index]
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = faces.landmarks[index]
    assert faces.scores[index] > 0.9
    assert lx < nx < rx and mlx < mrx, "eyes and mouth corners on either side of the nose"
    assert max(ly, ry) < ny < min(mly, mry), "eyes above nose above mouth"
    inside = (faces.landmarks[index] >= box[:2]) & (faces.landmarks[index] <= box[2:])
    assert inside.all(), "landmarks inside the box"


def test_astronaut_has_one_plausible_face(astronaut_face):
    assert len(astronaut_face) == 1
    _assert_plausible_face(astronaut_face)
    # The face (hairline to chin, ear to ear) lies around x 175..270, y 55..175 in the 512x512 picture.
    assert box_iou(astronaut_face.boxes, [[175, 55, 270, 175]])[0, 0] > 0.6


def test_tom_hanks_face(detector):
    image = _read_rgb(INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png")  # an aligned 112x112 ArcFace crop
    faces = detector.detect(image[None])[0]
    assert len(faces) == 1
    _assert_plausible_face(faces)
    # The crop is aligned on the ArcFace template, so detected eyes must sit near the template's eyes.
    assert np.abs(faces.landmarks[0, :2] - _template()[:2]).max() < 5


def test_group_photo_finds_every_face(detector):
    image = _read_rgb(INSIGHTFACE_IMAGES / "t1.jpg")  # six people side by side
    faces = detector.detect(image[None])[0]
    assert len(faces) == 6
    for i in range(len(faces)):
        _assert_plausible_face(faces, i)
    assert (np.diff(faces.scores) <= 0).all(), "best score first"


@pytest.mark.parametrize("ratio", [0.1, 0.0])
def test_no_face_in_face_free_images(ratio):
    detector = get_detector("mtcnn", min_face_ratio=ratio)
    coffee = data.coffee()
    ramp = np.linspace(0, 255, 480 * 640 * 3).reshape(480, 640, 3).astype(np.uint8)
    assert len(detector.detect(coffee[None])[0]) == 0
    assert len(detector.detect(ramp[None])[0]) == 0


def test_min_face_size_sets_the_pyramid():
    assert get_detector("mtcnn", min_face_ratio=0.0).options.min_face_for(360, 640) == 20
    assert get_detector("mtcnn").options.min_face_for(360, 640) == pytest.approx(36)
    scales = pyramid_scales(360, 640, 36, 0.709)
    # First level maps a 36 px face onto P-Net's 12 px window; the last still leaves a short side of >= 12 px.
    assert scales[0] == pytest.approx(12 / 36)
    assert 360 * scales[-1] >= 12 > 360 * scales[-1] * 0.709
    assert pyramid_scales(360, 640, 400, 0.709) == []  # minimum larger than the frame: nothing to search


def test_area_pyramid_finds_the_same_face(astronaut, astronaut_face):
    faces = get_detector("mtcnn", pyramid_resize="area").detect(astronaut[None])[0]
    assert len(faces) == 1
    assert np.abs(faces.boxes - astronaut_face.boxes).max() < 3
    assert np.abs(faces.landmarks - astronaut_face.landmarks).max() < 3


def test_refine_follows_a_shifted_box(detector, astronaut, astronaut_face):
    box = astronaut_face.boxes[0]
    shifted = box + np.array([6, -5, 6, -5], np.float32)
    refined = detector.refine(astronaut[None], shifted[None])
    assert len(refined) == 1 and refined.scores[0] > 0.9
    assert box_iou(refined.boxes, astronaut_face.boxes)[0, 0] > 0.8
    assert np.abs(refined.landmarks[0] - astronaut_face.landmarks[0]).max() < 4
    # On a face-free patch the score collapses, and a NaN box gives a NaN row.
    nothing = detector.refine(astronaut[None].repeat(2, 0), np.array([[400, 400, 480, 480], [np.nan] * 4]))
    assert nothing.scores[0] < 0.5
    assert np.isnan(nothing.boxes[1]).all() and nothing.scores[1] == 0


# ---------------------------------------------------------------------------------------------------- tracking


def _faces(*boxes) -> Faces:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return Faces(boxes, np.ones(len(boxes), np.float32), np.zeros((len(boxes), 5, 2), np.float32))


def test_tracker_starts_on_the_largest_face():
    tracker = PrimaryFaceTracker()
    assert tracker.update(_faces([0, 0, 20, 20], [100, 100, 180, 180]), 0.0) == 1


def test_tracker_does_not_jump_to_a_larger_bystander():
    tracker = PrimaryFaceTracker()
    subject = np.array([100, 100, 160, 160], np.float32)
    assert tracker.update(_faces(subject), 0.0) == 0
    for step in range(10):
        moved = subject + step * 2
        bystander = [300, 50, 500, 250]  # much larger, appears later
        assert tracker.update(_faces(bystander, moved), 0.04 * step) == 1
    # The subject disappears: no primary face, even though the bystander is there (for max_lost = 1 s).
    for step in range(5):
        assert tracker.update(_faces([300, 50, 500, 250]), 0.4 + 0.1 * step) is None


def test_tracker_reacquires_the_largest_after_loss():
    tracker = PrimaryFaceTracker(max_lost=0.1)
    assert tracker.update(_faces([100, 100, 160, 160]), 0.0) == 0
    for t in (0.04, 0.08):
        assert tracker.update(Faces.empty(), t) is None
    assert tracker.update(_faces([0, 0, 10, 10], [300, 50, 500, 250]), 0.12) == 1
    assert tracker.update(_faces([305, 55, 505, 255]), 0.16) == 0  # and follows the new face from there


def test_tracker_gives_up_a_lost_track_after_max_lost_seconds_whatever_the_frame_rate():
    tracker = PrimaryFaceTracker(max_lost=1.0)
    assert tracker.update(_faces([10, 10, 40, 40]), 0.0) == 0  # e.g. a false positive early in the video
    elsewhere = _faces([300, 100, 500, 300])  # the real subject appears somewhere else
    answers = [tracker.update(elsewhere, k / 5) for k in range(1, 9)]  # 5 frames per second
    assert answers == [None] * 4 + [0] * 4  # taken after 1 s, then followed


def test_tracker_follows_the_refitted_box():
    """A box re-fitted between detections moves the track, so a face that moved far is still the subject."""
    tracker = PrimaryFaceTracker()
    assert tracker.update(_faces([100, 100, 160, 160]), 0.0) == 0
    for k in range(1, 6):
        tracker.follow(np.array([100 + 12 * k, 100, 160 + 12 * k, 160]), 0.04 * k)
    bystander, subject = [0, 0, 200, 200], [172, 100, 232, 160]  # 72 px right of where it was first seen
    assert tracker.update(_faces(bystander, subject), 0.24) == 1


# --------------------------------------------------------------------------------------------------- alignment


def test_alignment_maps_landmarks_onto_the_template(astronaut_face):
    matrix = alignment_matrices(astronaut_face.landmarks)[0]
    mapped = astronaut_face.landmarks[0] @ matrix[:, :2].T + matrix[:, 2]
    # A similarity transform fits 5 points only approximately: eyes land closer than the (expression-dependent)
    # mouth corners.
    assert np.abs(mapped[:2] - _template()[:2]).max() < 4
    assert np.abs(mapped - _template()).max() < 7


def test_detector_finds_the_template_eyes_on_the_aligned_crop(detector, astronaut, astronaut_face):
    crop = align_faces(astronaut[None], astronaut_face.landmarks)
    assert crop.shape == (1, 3, 112, 112) and crop.dtype == torch.float32
    assert crop.min() >= -1 and crop.max() <= 1
    pixels = ((crop[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    large = cv2.resize(pixels, (448, 448), interpolation=cv2.INTER_CUBIC)
    faces = get_detector("mtcnn", min_face_ratio=0.0).detect(large[None])[0]
    assert len(faces) == 1
    found = faces.landmarks[0] / 4
    assert np.abs(found[:2] - _template()[:2]).max() < 6
    # Tighter: what the detector sees in the crop is where the transform sent the original landmarks.
    matrix = alignment_matrices(astronaut_face.landmarks)[0]
    mapped = astronaut_face.landmarks[0] @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(found - mapped).max() < 2.5


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # skimage 0.26 via insightface
@pytest.mark.parametrize("method", ["cv2", "grid"])  # grid is the GPU path, checked here on the CPU
def test_warp_matches_insightface_norm_crop(astronaut, astronaut_face, method):
    from insightface.utils.face_align import norm_crop

    marks = astronaut_face.landmarks[0]
    centre = marks.mean(0)
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    variants = np.stack([marks, (marks - centre) @ rotation.T * 1.3 + centre, marks + [[150, 200]]])  # (3, 5, 2)
    frames = np.repeat(astronaut[None], 3, axis=0)
    crops = warp_faces(torch.from_numpy(frames), variants, method=method)
    assert crops.dtype == torch.uint8 and crops.shape == (3, 3, 112, 112)
    ours = crops.permute(0, 2, 3, 1).numpy().astype(np.float64)
    for i in range(3):
        reference = norm_crop(astronaut, variants[i]).astype(np.float64)
        difference = np.abs(ours[i] - reference)
        assert difference.max() <= (0 if method == "cv2" else 2.0), f"variant {i}: {difference.max()} grey levels"
        assert difference.mean() < 0.5
    with pytest.raises(ValueError, match="unknown warp method"):
        warp_faces(frames, variants, method="nearest")


@pytest.mark.parametrize("method", ["cv2", "grid"])
def test_alignment_of_a_frame_without_face_is_black(astronaut, astronaut_face, method):
    marks = np.stack([astronaut_face.landmarks[0], np.full((5, 2), np.nan)])
    crops = warp_faces(np.repeat(astronaut[None], 2, axis=0), marks, method=method).float() / 127.5 - 1
    assert (crops[1] == -1).all() and crops[0].std() > 0.1
    with pytest.raises(ValueError, match="one landmark set per frame"):
        align_faces(astronaut[None], marks)


# ----------------------------------------------------------------------------------------------------- errors


def test_unknown_detector_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        get_detector("yolo")
    assert str(error.value) == f"unknown detector 'yolo'; known: {', '.join(DETECTORS)}"
    assert "mtcnn" in DETECTORS and "scrfd" in DETECTORS


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown option.*min_face_size"):
        get_detector("mtcnn", min_face=40)


def test_bad_frames_are_refused(detector):
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        detector.detect(np.zeros((2, 64, 64, 3), np.float32))


def test_scrfd_missing_model_path_says_what_to_do(tmp_path):
    missing = tmp_path / "det_10g.onnx"
    with pytest.raises(FileNotFoundError) as error:
        get_detector("scrfd", model_path=str(missing))
    message = str(error.value)
    assert str(missing) in message
    assert "buffalo_l.zip" in message and message.count("https://") == 1
    assert "model_path" in message


def test_scrfd_without_download_names_file_url_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        get_detector("scrfd", root=str(tmp_path), download=False)
    message = str(error.value)
    assert str(tmp_path / "models" / "buffalo_l" / "det_10g.onnx") in message
    assert "https://github.com/deepinsight/insightface/releases/download/" in message
    assert "model_path" in message


# ------------------------------------------------------------------------------------------- per-video stream


def test_stream_detects_key_frames_and_refines_between(detector, astronaut, astronaut_face):
    # A 7-frame "video": the astronaut drifting right 3 px a frame, with frame 4 blanked (face gone).
    video = np.stack([np.roll(astronaut, 3 * t, axis=1) for t in range(7)])
    video[4] = 128
    times = np.arange(7) / 25.0
    stream = PrimaryFaceStream(detector, detect_interval=0.12)  # every 3rd frame of 25 fps
    first = stream(video[:5], times[:5])  # batches need not align with key frames
    second = stream(video[5:], times[5:])
    face = np.concatenate([first.face, second.face])
    detected = np.concatenate([first.detected, second.detected])
    boxes = np.concatenate([first.boxes, second.boxes])
    # Frame 4 loses the face: it gets a full detection at once; frame 5 finds it again where it was.
    np.testing.assert_array_equal(detected, [True, False, False, True, True, False, True])
    np.testing.assert_array_equal(face, [True, True, True, True, False, True, True])
    expected = astronaut_face.boxes[0] + 3 * np.arange(7)[:, None] * np.array([1, 0, 1, 0])
    for t in np.flatnonzero(face):
        assert box_iou(boxes[t], expected[t])[0, 0] > 0.8, f"frame {t}"
    assert np.isnan(boxes[4]).all()


@pytest.mark.parametrize("fps", [5.0, 25.0])
def test_stream_reports_the_front_face_of_a_group_wherever_the_detector_finds_it(detector, fps):
    """Three people, a hand-held camera: on every frame where a full detection finds the front (largest) face, the
    stream reports that face, at 5 analysed frames per second as at the full 25."""
    seconds = 4.0 if fps == 5.0 else 1.2
    step = int(25 / fps)
    video = group_frames(int(25 * seconds), size=(480, 352))[::step]
    times = np.arange(len(video)) * step / 25.0
    stream = PrimaryFaceStream(detector, detect_interval=0.4)
    parts = [stream(video[s:s + 8], times[s:s + 8]) for s in range(0, len(video), 8)]
    face = np.concatenate([p.face for p in parts])
    boxes = np.concatenate([p.boxes for p in parts])
    assert not np.concatenate([p.detected for p in parts]).all()  # key frames only, plus re-detections
    whole = PrimaryFaceStream(detector, detect_interval=0.4)(video, times)
    # The same however the video is cut into batches (to float rounding: batched convolutions sum in another order).
    np.testing.assert_array_equal(whole.face, face)
    np.testing.assert_allclose(whole.boxes, boxes, atol=1e-3)
    for t, found in enumerate(detector.detect(video)):
        assert len(found) >= 3
        front = found.boxes[np.argmax(found.areas)]
        assert face[t], f"frame {t} ({times[t]:.2f} s): no face reported, the detector finds {len(found)}"
        assert box_iou(boxes[t], front)[0, 0] > 0.5, f"frame {t}: not the front face"
