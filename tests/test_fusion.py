"""The AU fusion's parameters file, its fit and which rows it touches (affextract.fusion)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from affextract.fusion import CNN_SOURCE, FUSION_WEIGHTS, au_source, load_fusion, save_fusion
from affextract.schema import AU, AUS, BLENDSHAPE_NAMES
from affextract.training.fusion import fit_logistic


def test_shipped_fusion_loads_and_a_changed_file_is_refused(tmp_path):
    fusion = load_fusion()
    doc = json.loads(FUSION_WEIGHTS.with_suffix(".json").read_text())
    assert fusion.source == au_source(True) == f"fused:{doc['version']}:{doc['sha256']}"
    assert au_source(False) == CNN_SOURCE
    assert 11 not in fusion.fused and 23 not in fusion.fused and fusion.version >= 1
    copy = tmp_path / "f.safetensors"
    save_fusion(fusion, copy, {"training_data": "a copy"})
    assert np.array_equal(load_fusion(copy).coef, fusion.coef)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_fusion(copy)
    shutil.copy(FUSION_WEIGHTS.with_suffix(".json"), tmp_path / "g.json")
    with pytest.raises(FileNotFoundError, match="g.safetensors: no such weights file"):
        load_fusion(tmp_path / "g.safetensors")


def test_only_fused_rows_of_frames_the_mesh_found_change():
    """Frames whose mesh presence is below 0.5 or NaN (no face) keep every CNN row; VA, expressions and the AUs not
    fused are never touched."""
    fusion = load_fusion()
    rng = np.random.default_rng(0)
    features = rng.uniform(0.05, 0.95, (4, 26)).astype(np.float32)
    features[3] = np.nan  # no face
    blend = rng.uniform(0, 1, (4, len(BLENDSHAPE_NAMES))).astype(np.float32)
    blend[3] = np.nan
    out = fusion(features, blend, np.array([0.9, 0.6, 0.4, np.nan], np.float32))
    assert np.array_equal(out[2:], features[2:], equal_nan=True)
    assert np.array_equal(out[:2, :AU.start], features[:2, :AU.start])
    kept = [AU.start + AUS.index(a) for a in AUS if a not in fusion.fused]
    changed = [AU.start + AUS.index(a) for a in fusion.fused]
    assert np.array_equal(out[:2, kept], features[:2, kept])
    assert (np.abs(out[:2, changed] - features[:2, changed]) > 1e-4).any(1).all()


def test_fit_logistic_recovers_soft_target_weights():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 2))
    target = 1 / (1 + np.exp(-(x @ np.array([1.5, -0.5]) + 0.3)))
    np.testing.assert_allclose(fit_logistic(x, target, l2=0.0), [1.5, -0.5, 0.3], atol=1e-4)
