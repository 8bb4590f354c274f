"""Check each blendshape AU teacher on FER+ faces where the AU is obvious, and fit its calibration.

    python tools/fit_teacher_calibration.py ferplus.h5 scratch/ferplus_blendshapes.npz

The rule, fixed before any figure was seen:
- positives: faces whose FER+ majority label (> 50 % of the votes) is an expression where the AU is obvious
  (affextract.training.fusion.OBVIOUS: surprise for the brow raise, eye widening and mouth opening, happiness for
  the smile and cheek raise, disgust for the nose wrinkle and upper-lip raise, and Table 1's expressions for the
  others); negatives: neutral faces (majority label neutral). Faces whose mesh presence is below 0.5 are left out.
- check (FER+ valid): AUROC of the raw coefficient, positives against negatives. An AU with AUROC < 0.70 is
  distrusted: it gets no teacher and keeps the Table-1 prior.
- calibration (FER+ train): p = sigmoid(slope * (coefficient - centre)) from a class-balanced, unregularised
  logistic regression of positive vs negative on the coefficient: an obvious face and a neutral one are equally
  likely at the centre (p = 0.5), and the slope says how sharply the coefficient separates them.
Prints the table and the TeacherOptions to paste into affextract/training/teacher.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from affextract.training.datasets import load_ferplus  # noqa: E402
from affextract.training.fusion import OBVIOUS  # noqa: E402
from affextract.schema import AUS, EXPRESSIONS  # noqa: E402
from affextract.training.teacher import NO_TEACHER, au_evidence  # noqa: E402

MIN_AUC = 0.70


def labelled(h5: Path, cache, split: str):
    fs = load_ferplus(h5, split)
    rows = np.array([int(o.rpartition(":")[2]) for o in fs.origin])
    # The raw coefficients: the calibration is fitted on them (and the AUROC check must see the distrusted AUs too).
    raw = au_evidence(cache["blendshapes"][rows], tuple(str(n) for n in cache["names"]))
    major = np.where(fs.expr.max(1) > 0.5, fs.expr.argmax(1), -1)
    ok = cache["presence"][rows] >= 0.5
    return raw[ok], major[ok]


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ferplus", type=Path)
    ap.add_argument("cache", type=Path)
    args = ap.parse_args()
    cache = dict(np.load(args.cache))
    tr, tr_y = labelled(args.ferplus, cache, "train")
    va, va_y = labelled(args.ferplus, cache, "valid")
    neutral = EXPRESSIONS.index("neutral")
    calibration, distrust = {}, []
    print("| AU | obvious on | n train (obvious/neutral) | valid: median obvious vs neutral | valid AUROC | centre | slope | kept |")
    print("|---|---|---|---|---|---|---|---|")
    for au in AUS:
        if au in NO_TEACHER:
            continue
        pos = [EXPRESSIONS.index(e) for e in OBVIOUS[au]]
        j = AUS.index(au)
        sel_tr = np.isin(tr_y, pos) | (tr_y == neutral)
        sel_va = np.isin(va_y, pos) | (va_y == neutral)
        y_tr, y_va = np.isin(tr_y[sel_tr], pos), np.isin(va_y[sel_va], pos)
        x_tr, x_va = tr[sel_tr, j], va[sel_va, j]
        auc = roc_auc_score(y_va, x_va)
        # Fitted on the standardised coefficient (some, such as cheekSquint, live within 1e-3 of 0), then mapped back.
        mu, sd = x_tr.mean(), x_tr.std()
        lr = LogisticRegression(C=1e6, class_weight="balanced", max_iter=1000).fit((x_tr[:, None] - mu) / sd, y_tr)
        slope = float(lr.coef_[0, 0] / sd)
        centre = float(mu - lr.intercept_[0] / lr.coef_[0, 0] * sd)
        kept = auc >= MIN_AUC and slope > 0
        if kept:
            calibration[au] = (float(f"{centre:.4g}"), float(f"{slope:.4g}"))
        else:
            distrust.append(au)
        print(f"| AU{au} | {', '.join(OBVIOUS[au])} | {y_tr.sum()}/{(~y_tr).sum()} | "
              f"{np.median(x_va[y_va]):.3f} vs {np.median(x_va[~y_va]):.3f} | {auc:.3f} | {centre:.4g} | {slope:.4g} | "
              f"{'yes' if kept else 'no (prior)'} |")
    print(f"\nTeacherOptions(calibration={calibration}, distrust={tuple(distrust)})")


if __name__ == "__main__":
    main()
