"""Dataset adapters on small fixtures written in each dataset's real layout."""

import csv
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from skimage.data import astronaut

from affextract.training.datasets import (
    VA_CENTROIDS, DatasetError, derive_va, five_from_68, load_affectnet, load_affwild2, load_emotionet,
    load_ferplus, load_manifest, load_spec, prepare_inputs,
)
from affextract.model import MMA, MMAConfig
from affextract.schema import AUS, EXPRESSIONS

E = EXPRESSIONS.index


def write_ferplus(path: Path) -> np.ndarray:
    votes = np.array([
        # neutral happiness surprise sadness anger disgust fear contempt unknown NF
        [0, 10, 0, 0, 0, 0, 0, 0, 0, 0],   # all happiness
        [2, 0, 6, 0, 0, 0, 2, 0, 0, 0],    # mixed: surprise 0.6, neutral 0.2, fear 0.2
        [0, 0, 0, 1, 0, 0, 0, 4, 5, 0],    # 1 usable vote: skipped
        [0, 0, 0, 6, 1, 0, 0, 3, 0, 0],    # 7 usable after dropping contempt
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 10],   # not a face: skipped
        [5, 5, 0, 0, 0, 0, 0, 0, 0, 0],    # test split
    ], np.uint8)
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["images"] = rng.integers(0, 256, (len(votes), 48, 48), dtype=np.uint8)
        f["votes"] = votes
        f["split"] = np.array([b"train"] * 5 + [b"test"])
        f["name"] = np.array([f"fer{i:07d}.png".encode() for i in range(len(votes))])
        f.attrs["vote_names"] = np.array(["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                                          "contempt", "unknown", "NF"], dtype=object)
    return votes


def test_ferplus_votes_map_to_our_order_and_skip_rule(tmp_path):
    path = tmp_path / "ferplus.h5"
    write_ferplus(path)
    fs = load_ferplus(path, "train")
    assert len(fs) == 3 and fs.framing == "native" and fs.images.shape == (3, 48, 48)
    assert fs.origin == [f"{path}:0", f"{path}:1", f"{path}:3"]
    expected = np.zeros((3, 7), np.float32)
    expected[0, E("happiness")] = 1
    expected[1, [E("surprise"), E("neutral"), E("fear")]] = [0.6, 0.2, 0.2]
    expected[2, [E("sadness"), E("anger")]] = [6 / 7, 1 / 7]
    np.testing.assert_allclose(fs.expr, expected, rtol=1e-6)
    assert np.isnan(fs.va).all() and np.isnan(fs.au).all() and fs.tasks == ["expr"]
    assert len(load_ferplus(path, "test")) == 1
    with pytest.raises(DatasetError, match="no split 'valid'"):
        load_ferplus(path, "valid")
    with pytest.raises(DatasetError, match="does not exist"):
        load_ferplus(tmp_path / "nope.h5", "train")


def test_derived_va_is_the_vote_weighted_centroid(tmp_path):
    path = tmp_path / "ferplus.h5"
    write_ferplus(path)
    fs = derive_va(load_ferplus(path, "train"))
    np.testing.assert_allclose(fs.va[0], VA_CENTROIDS["happiness"], rtol=1e-6)
    mix = 0.6 * np.array(VA_CENTROIDS["surprise"]) + 0.2 * np.array(VA_CENTROIDS["fear"])  # neutral is (0, 0)
    np.testing.assert_allclose(fs.va[1], mix, rtol=1e-5)
    assert fs.tasks == ["va", "expr"]


def _face_jpg(path: Path, size: int | None = None) -> np.ndarray:
    img = astronaut()
    if size:
        img = cv2.resize(img[30:230, 130:330], (size, size))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return img


# 68 iBUG points placed so the derived 5 points sit on the astronaut's eyes, nose and mouth corners.
ASTRONAUT_5 = np.array([[204.1, 98.6], [247.8, 102.0], [223.5, 127.0], [199.9, 137.1], [244.8, 140.3]])


def _landmarks_68() -> str:
    pts = np.zeros((68, 2))
    pts[36:42] = ASTRONAUT_5[0]
    pts[42:48] = ASTRONAUT_5[1]
    pts[30] = ASTRONAUT_5[2]
    pts[48] = ASTRONAUT_5[3]
    pts[54] = ASTRONAUT_5[4]
    return ";".join(f"{v:.2f}" for v in pts.reshape(-1))


AFFECTNET_HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
                    "expression", "valence", "arousal"]


def _affectnet_csv(tmp_path: Path, rows: list[list]) -> Path:
    _face_jpg(tmp_path / "images" / "1" / "a.jpg")
    path = tmp_path / "training.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(AFFECTNET_HEADER)
        for r in rows:
            w.writerow(["1/a.jpg", 130, 30, 200, 200, _landmarks_68(), *r])
    return path


def test_affectnet_codes_skips_and_landmark_alignment(tmp_path):
    path = _affectnet_csv(tmp_path, [[1, 0.7, 0.2], [6, -0.5, 0.6], [7, -0.3, 0.4], [8, -2, -2], [9, 0.1, 0.1],
                                     [10, -2, -2], [0, 0.0, -0.1]])
    fs = load_affectnet(path, tmp_path / "images")
    assert len(fs) == 3 and fs.framing == "raw"
    assert [EXPRESSIONS[i] for i in fs.expr.argmax(1)] == ["happiness", "anger", "neutral"]
    np.testing.assert_allclose(fs.va, [[0.7, 0.2], [-0.5, 0.6], [0.0, -0.1]])
    assert fs.origin == [f"{path}:2", f"{path}:3", f"{path}:8"]
    np.testing.assert_allclose(fs.landmarks[0], ASTRONAUT_5)
    # The dataset's landmarks drive the same ArcFace alignment as `run`: no detector needed.
    x = prepare_inputs(fs.subset(np.array([0])), MMA())
    assert x.shape == (1, 1, 48, 48) and x.dtype == torch.uint8 and x.float().std() > 10


@pytest.mark.parametrize(
    "row, message",
    [([12, 0.1, 0.1], "unknown AffectNet expression code 12"), ([1, 1.5, 0.1], "valence 1.5 is outside"),
     (["x", 0.1, 0.1], "expression 'x' is not an integer code")],
)
def test_affectnet_bad_rows_name_file_and_row(tmp_path, row, message):
    path = _affectnet_csv(tmp_path, [[1, 0.5, 0.5], row])
    with pytest.raises(DatasetError, match=f"training.csv:3: {message}"):
        load_affectnet(path, tmp_path / "images")


def test_affectnet_missing_image_and_wrong_columns(tmp_path):
    path = _affectnet_csv(tmp_path, [[1, 0.5, 0.5]])
    text = path.read_text().replace("1/a.jpg", "1/missing.jpg")
    path.write_text(text)
    with pytest.raises(DatasetError, match=r"training.csv:2: image file .*missing.jpg does not exist"):
        load_affectnet(path, tmp_path / "images")
    path.write_text("file,label\nx.jpg,1\n")
    with pytest.raises(DatasetError, match="missing AffectNet columns"):
        load_affectnet(path)


def test_five_points_from_68():
    pts = np.arange(136, dtype=np.float32).reshape(68, 2)
    five = five_from_68(pts)
    np.testing.assert_allclose(five[0], pts[36:42].mean(0))
    np.testing.assert_allclose(five[3], pts[48])


def _abaw(root: Path) -> None:
    for video, n in (("v1", 4), ("v2", 3)):
        for k in range(1, n + 1):
            if (video, k) != ("v1", 3):  # frame 3 of v1 has no face crop
                _face_jpg(root / "cropped_aligned" / video / f"{k:05d}.jpg", 112)
    (root / "VA_Estimation_Challenge" / "Train_Set").mkdir(parents=True)
    (root / "VA_Estimation_Challenge" / "Train_Set" / "v1.txt").write_text(
        "valence,arousal\n0.5,0.1\n-5,-5\n0.2,0.2\n-0.3,0.4\n")
    (root / "EXPR_Recognition_Challenge" / "Train_Set").mkdir(parents=True)
    (root / "EXPR_Recognition_Challenge" / "Train_Set" / "v1.txt").write_text(
        "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n4\n-1\n2\n7\n")
    (root / "EXPR_Recognition_Challenge" / "Train_Set" / "v2.txt").write_text(
        "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n0\n1\n-1\n")
    (root / "AU_Detection_Challenge" / "Train_Set").mkdir(parents=True)
    (root / "AU_Detection_Challenge" / "Train_Set" / "v2.txt").write_text(
        "AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26\n"
        "1,0,1,0,0,0,0,0,0,0,0,1\n-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1\n0,0,0,0,0,0,1,0,0,0,1,0\n")


def test_affwild2_abaw_layout_joins_tasks_and_honours_invalid_markers(tmp_path):
    _abaw(tmp_path)
    fs = load_affwild2(tmp_path, "Train_Set")
    assert fs.framing == "aligned"
    # v1:2 has only invalid markers (VA -5, EXPR -1) and v1:3 has no face crop: both skipped.
    assert fs.origin == ["v1:1", "v1:4", "v2:1", "v2:2", "v2:3"]
    np.testing.assert_allclose(fs.va[:2], [[0.5, 0.1], [-0.3, 0.4]])
    assert fs.expr[0].argmax() == E("happiness")
    assert np.isnan(fs.expr[1]).all()  # 7 = Other, not one of our 7
    assert fs.expr[2].argmax() == E("neutral") and fs.expr[3].argmax() == E("anger") and np.isnan(fs.expr[4]).all()
    assert np.isnan(fs.va[2:]).all()  # no VA file for v2
    au = fs.au[2]
    assert au[AUS.index(1)] == 1 and au[AUS.index(4)] == 1 and au[AUS.index(26)] == 1 and au[AUS.index(2)] == 0
    assert np.isnan(au[AUS.index(5)]) and np.isnan(au[AUS.index(9)])  # not annotated in Aff-Wild2
    assert np.isnan(fs.au[3]).all()  # -1 marker
    assert fs.au[4, AUS.index(12)] == 1 and np.isnan(fs.au[:2]).all()
    x = prepare_inputs(fs, MMA())
    assert x.shape == (5, 1, 48, 48)


def test_affwild2_bad_files(tmp_path):
    _abaw(tmp_path)
    bad = tmp_path / "EXPR_Recognition_Challenge" / "Train_Set" / "v2.txt"
    bad.write_text("Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n0\n9\n")
    with pytest.raises(DatasetError, match=r"v2.txt:3: unknown ABAW expression code 9"):
        load_affwild2(tmp_path)
    bad.write_text("valence,arousal\n0,0\n")
    with pytest.raises(DatasetError, match=r"v2.txt:1: header"):
        load_affwild2(tmp_path)
    with pytest.raises(DatasetError, match="cropped_aligned"):
        load_affwild2(tmp_path / "nothing")


def test_emotionet_au_table_and_detector_path(tmp_path):
    _face_jpg(tmp_path / "img" / "a.jpg")
    path = tmp_path / "emotionet.csv"
    path.write_text("URL,AU1,AU2,AU4,AU5,AU6,AU9,AU12,AU17,AU20,AU25,AU26\n"
                    "img/a.jpg,0,0,0,0,1,0,1,0,0,1,999\n")
    fs = load_emotionet(path)
    assert fs.framing == "raw" and fs.tasks == ["au"]
    assert fs.au[0, AUS.index(12)] == 1 and fs.au[0, AUS.index(1)] == 0 and np.isnan(fs.au[0, AUS.index(26)])
    assert np.isnan(fs.au[0, AUS.index(7)])  # not a column: not annotated
    # No landmarks in EmotioNet: the MTCNN detector of `run` finds the face, then the same alignment.
    x = prepare_inputs(fs, MMA())
    assert x.shape == (1, 1, 48, 48) and x.float().std() > 10
    path.write_text("URL,AU1\nimg/a.jpg,2\n")
    with pytest.raises(DatasetError, match=r"emotionet.csv:2: AU1 = '2'"):
        load_emotionet(path)
    path.write_text("URL,AU3\nimg/a.jpg,1\n")
    with pytest.raises(DatasetError, match="AU3 is not one of the 17 AUs"):
        load_emotionet(path)


def test_manifest_missing_cells_names_and_errors(tmp_path):
    aligned = _face_jpg(tmp_path / "faces" / "a.jpg", 112)
    assert aligned.shape == (112, 112, 3)
    path = tmp_path / "m.csv"
    path.write_text("path,valence,arousal,expression,AU12,AU4\n"
                    "faces/a.jpg,0.5,0.2,happiness,1,\n"
                    "faces/a.jpg,,,3,,0\n"
                    f"{tmp_path / 'faces' / 'a.jpg'},-0.1,0.9,,,\n")
    fs = load_manifest(path)
    assert len(fs) == 3 and fs.framing == "aligned"
    np.testing.assert_allclose(fs.va[[0, 2]], [[0.5, 0.2], [-0.1, 0.9]], rtol=1e-6)
    assert np.isnan(fs.va[1]).all()
    assert fs.expr[0].argmax() == E("happiness") and fs.expr[1].argmax() == 3 and np.isnan(fs.expr[2]).all()
    assert fs.au[0, AUS.index(12)] == 1 and np.isnan(fs.au[0, AUS.index(4)]) and fs.au[1, AUS.index(4)] == 0
    assert prepare_inputs(fs, MMA()).shape == (3, 1, 48, 48)
    cases = [
        ("path,valence,arousal\nfaces/a.jpg,0.1,-1.2\n", "m.csv:2: arousal -1.2 is outside"),
        ("path,expression\nfaces/a.jpg,contempt\n", "m.csv:2: unknown expression 'contempt'"),
        ("path,expression\nfaces/a.jpg,7\n", "m.csv:2: unknown expression '7'"),
        ("path,expression\nfaces/a.jpg,happiness\nfaces/b.jpg,neutral\n", r"m.csv:3: image file .*b.jpg does not exist"),
        ("file,label\na.jpg,1\n", "needs a 'path' column"),
        ("path,valence\nfaces/a.jpg,0.1\n", "valence and arousal columns come together"),
        ("path,expression\n", "empty"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(DatasetError, match=message):
            load_manifest(path)


def test_specs_and_rgb_models(tmp_path):
    path = tmp_path / "ferplus.h5"
    write_ferplus(path)
    assert len(load_spec(f"ferplus:{path}:train")) == 3
    assert np.isfinite(load_spec(f"ferplus:{path}:train", derive=True).va).all()
    with pytest.raises(DatasetError, match="expected one of"):
        load_spec(f"kaggle:{path}")
    # A colour model gets 3 channels from grayscale FER+ images.
    rgb = MMA(MMAConfig(grayscale=False))
    assert prepare_inputs(load_ferplus(path, "train"), rgb).shape == (3, 3, 48, 48)
