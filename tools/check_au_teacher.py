"""Checks of an AU head taught by blendshape teachers, against other weights (e.g. the prior-only version 2).

    python tools/check_au_teacher.py --ferplus ferplus.h5 --cache scratch/ferplus_blendshapes.npz \
        --posed posed_faces/ --clip single_face.mp4 --clip carphone_pristine.mp4 WEIGHTS.safetensors...

(a) obvious faces: on FER+ valid (majority label) and posed photos (full pipeline), the share of surprise faces
    with AU1/2/5/26 >= 0.5 and of happy faces with AU6/12 >= 0.5, and the mean probability;
(b) agreement with the teacher on FER+ test (faces the mesh finds): Pearson r and F1 at 0.5 per AU; for the AUs
    whose teacher is distrusted (TeacherOptions.distrust), Pearson r with the raw blendshape coefficient;
(c) clips: per frame, the AU25/AU26 rows against the mesh's inner-lip gap (affextract.training.teacher.lip_gap): Pearson r,
    and partial r once the 7 expression probabilities are regressed out (movement the expression does not
    explain); and how constant the expression head is (share of frames with the most common top expression).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from affextract.training.datasets import load_ferplus, load_spec, prepare_inputs  # noqa: E402
from affextract.training.evaluate import partial_correlation, predict_inputs  # noqa: E402
from affextract.model import load_mma  # noqa: E402
from affextract.pixels import to_unit  # noqa: E402
from affextract.schema import AU, AUS, EXPR, EXPRESSIONS  # noqa: E402
from affextract.training.teacher import TeacherOptions, load_cached  # noqa: E402

OBVIOUS = {"surprise": (1, 2, 5, 26), "happiness": (6, 12)}


def clip_measures(path: Path):
    """Frames of `path` with a face -> (aligned uint8 crops (n, 112, 112, 3), lip gap (n,))."""
    from affextract.faces.align import warp_faces
    from affextract.faces.detectors import get_detector
    from affextract.faces.align import crop_faces, invert_affine, roi_from_points
    from affextract.movement import Movement
    from affextract.training.teacher import lip_gap

    frames = _frames(path)
    det = get_detector("mtcnn")
    pts = np.full((len(frames), 5, 2), np.nan, np.float32)
    for i, f in enumerate(det.detect(frames)):
        if len(f):
            pts[i] = f.landmarks[int(np.argmax(f.areas))]
    ok = np.isfinite(pts).all((1, 2))
    frames, pts = frames[ok], pts[ok]
    m = roi_from_points(pts)
    out = Movement("cpu")(crop_faces(frames, m), invert_affine(m))
    keep = out.presence >= 0.5
    return warp_faces(frames[keep], pts[keep]).permute(0, 2, 3, 1).numpy(), lip_gap(out.mesh[keep])


def _frames(path: Path) -> np.ndarray:
    from affextract.video import import_decord

    vr = import_decord().VideoReader(str(path))
    return vr.get_batch(list(range(len(vr)))).asnumpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", nargs="+", type=Path)
    ap.add_argument("--ferplus", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--posed", type=Path)
    ap.add_argument("--clip", type=Path, action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = {w.stem if w.parent.name != "weights" else w.name: load_mma(w)[0] for w in args.weights}
    names = list(models)

    print("## (a) obvious faces: share with p >= 0.5 (mean p)")
    valid = load_ferplus(args.ferplus, "valid")
    sets = {"FER+ valid": (valid, np.where(valid.expr.max(1) > 0.5, valid.expr.argmax(1), -1))}
    if args.posed:
        posed = load_spec(f"folder:{args.posed}")
        sets["posed"] = (posed, np.nanargmax(posed.expr, 1))
    for set_name, (fs, label) in sets.items():
        feats = {k: predict_inputs(m, prepare_inputs(fs, m)) for k, m in models.items()}
        for expr, aus in OBVIOUS.items():
            sel = label == EXPRESSIONS.index(expr)
            for au in aus:
                j = AU.start + AUS.index(au)
                cells = [f"{(feats[k][sel, j] >= 0.5).mean():.3f} ({feats[k][sel, j].mean():.3f})" for k in names]
                print(f"| {set_name} | {expr} (n={sel.sum()}) | AU{au} | " + " | ".join(cells) + " |")

    print("\n## (b) agreement with the teacher on FER+ test: Pearson r / F1 at 0.5")
    distrusted = TeacherOptions().distrust
    test = load_cached(load_ferplus(args.ferplus, "test"), args.cache, TeacherOptions(distrust=()))
    feats = {k: predict_inputs(m, prepare_inputs(test, m)) for k, m in models.items()}
    for j, au in enumerate(AUS):
        t = test.teacher_au[:, j]
        has = np.isfinite(t)
        if not has.any():
            print(f"| AU{au} | no teacher | " + " | ".join("-" for _ in names) + " |")
            continue
        cells = []
        for k in names:
            p = feats[k][has, AU.start + j]
            tp = ((p >= 0.5) & (t[has] >= 0.5)).sum()
            f1 = 2 * tp / max(1, (p >= 0.5).sum() + (t[has] >= 0.5).sum())
            r = np.corrcoef(p, t[has])[0, 1]
            cells.append(f"{r:.3f} (raw coefficient)" if au in distrusted else f"{r:.3f} / {f1:.3f}")
        share = "distrusted" if au in distrusted else f"{(t[has] >= 0.5).mean():.3f} teacher >= 0.5"
        print(f"| AU{au} | {has.sum()} faces, {share} | " + " | ".join(cells) + " |")

    print("\n## (c) clips: r(AU, lip gap), partial r given the expressions; expression constancy")
    for clip in args.clip:
        crops, gap = clip_measures(clip)
        x = to_unit(torch.from_numpy(crops).permute(0, 3, 1, 2))
        for k, m in models.items():
            with torch.no_grad():
                f = m.features(x).numpy()
            ex = f[:, EXPR]
            top = ex.argmax(1)
            mode = np.bincount(top, minlength=7).argmax()
            cells = []
            for au in (25, 26):
                a = f[:, AU.start + AUS.index(au)]
                cells.append(f"AU{au} r {np.corrcoef(a, gap)[0, 1]:.3f}, partial {partial_correlation(a, gap, ex):.3f}, "
                             f"range {a.min():.2f}-{a.max():.2f}")
            print(f"| {clip.name} ({len(gap)} frames, lip gap {gap.min():.3f}-{gap.max():.3f}) | {k} | "
                  + " | ".join(cells) + f" | top {EXPRESSIONS[mode]} on {(top == mode).mean():.3f}, "
                  f"p {ex[:, mode].mean():.3f} ± {ex[:, mode].std():.3f} |")


if __name__ == "__main__":
    main()
