"""`affextract evaluate folder:DIR` on class folders the test writes from real photos (skimage's astronaut)."""

import json

import cv2
import numpy as np
import pytest
from skimage.data import astronaut, coffee
from typer.testing import CliRunner

from affextract import model as model_mod
from affextract.cli import app
from affextract.training.datasets import DatasetError, load_folder, load_spec
from affextract.schema import EXPRESSIONS

H = EXPRESSIONS.index("happiness")
S = EXPRESSIONS.index("sadness")


def _write(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))


def _two_sources(root):
    """alpha: the smiling astronaut (and her mirror image) labelled happiness; beta: the same smile
    deliberately labelled sadness, so every figure of beta is known in advance."""
    img = astronaut()
    _write(root / "alpha" / "happiness" / "a.png", img)
    _write(root / "alpha" / "happiness" / "b.jpg", img[:, ::-1])
    _write(root / "beta" / "sadness" / "c.png", img)
    (root / "alpha" / "happiness" / "notes.txt").write_text("not an image: ignored")
    return root


def test_folder_layouts_labels_and_sources(tmp_path):
    fs = load_folder(_two_sources(tmp_path / "set"))
    assert len(fs) == 3 and fs.framing == "raw" and fs.groups == ["alpha", "alpha", "beta"]
    assert fs.expr.argmax(1).tolist() == [H, H, S] and np.isnan(fs.va).all() and np.isnan(fs.au).all()
    # One level only: DIR/<expression>/ is a single source.
    single = load_spec(f"folder:{tmp_path / 'set' / 'alpha'}")
    assert len(single) == 2 and single.groups == []
    _write(tmp_path / "bad" / "joy" / "x.png", astronaut())
    with pytest.raises(DatasetError, match="no class folders"):
        load_folder(tmp_path / "bad")
    _write(tmp_path / "bad2" / "happiness" / "x.png", astronaut())
    _write(tmp_path / "bad2" / "joy" / "y.png", astronaut())
    with pytest.raises(DatasetError, match="joy: folder name is not one of the expressions"):
        load_folder(tmp_path / "bad2")


@pytest.mark.skipif(not model_mod.DEFAULT_WEIGHTS.exists(), reason="no shipped default weights in this checkout")
def test_evaluate_folder_through_detection_and_alignment(tmp_path):
    root = _two_sources(tmp_path / "set")
    res = CliRunner().invoke(app, ["evaluate", f"folder:{root}", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["n"] == 3 and sorted(r["per_group"]) == ["alpha", "beta"]
    alpha, beta = r["per_group"]["alpha"], r["per_group"]["beta"]
    # The smile is happiness in both sources: right in alpha, wrong (by construction) in beta.
    assert alpha["confusion"][H][H] == 2 and alpha["f1_per_expr"] == {"happiness": 1.0} and alpha["acc_expr"] == 1.0
    assert beta["confusion"][S][H] == 1 and beta["f1_per_expr"] == {"happiness": 0.0, "sadness": 0.0}
    assert r["confusion"][H][H] == 2 and r["confusion"][S][H] == 1
    assert r["f1_per_expr"]["happiness"] == pytest.approx(0.8) and r["f1_per_expr"]["sadness"] == 0.0
    assert r["f1_expr"] == pytest.approx(0.4)
    # Both AU sources: the CNN's rows and the rows fused with each photo's measured movement (expressions unchanged).
    assert r["au_source"] == "cnn" and r["fused"]["au_source"].startswith("fused:1:")
    assert r["fused"]["confusion"] == r["confusion"] and sorted(r["fused"]["per_group"]) == ["alpha", "beta"]
    # The table view names each source.
    res = CliRunner().invoke(app, ["evaluate", f"folder:{root}"])
    assert res.exit_code == 0 and "source alpha" in res.stdout and "source beta" in res.stdout


@pytest.mark.skipif(not model_mod.DEFAULT_WEIGHTS.exists(), reason="no shipped default weights in this checkout")
def test_evaluate_folder_photo_without_face_names_the_file(tmp_path):
    root = tmp_path / "set"
    _write(root / "happiness" / "a.png", astronaut())
    _write(root / "neutral" / "cup.png", coffee())
    res = CliRunner().invoke(app, ["evaluate", f"folder:{root}"])
    out = res.output.replace("\n", "")  # rich wraps long paths
    assert res.exit_code == 2 and "cup.png: no face found" in out
