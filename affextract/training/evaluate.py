"""MMA metrics (paper Table 5) and the evaluation of a model on a FaceSet.

CCC-VA = mean concordance correlation of valence and arousal; F1-Expr = macro F1 over the 7 expressions;
F1-AU = macro F1 over the AUs annotated in the evaluated data (threshold 0.5). Accuracy and the confusion
matrix are reported beside them; for soft (vote-distribution) labels the true class is the most voted
one, and `acc_expr_majority` restricts accuracy to samples where that class has more than half the votes
(the FER+ "majority vote" protocol).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from affextract.pixels import to_unit
from affextract.schema import AU, AU_NAMES, AU_PRIOR, EXPR, EXPRESSIONS, VA


def ccc(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Concordance correlation coefficient over dim 0: (N, ...) x (N, ...) -> (...)."""
    mx, my = x.mean(0), y.mean(0)
    vx, vy = x.var(0, unbiased=False), y.var(0, unbiased=False)
    cov = ((x - mx) * (y - my)).mean(0)
    return 2 * cov / (vx + vy + (mx - my) ** 2 + 1e-8)


def macro_f1(true: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[float, np.ndarray]:
    """Macro F1 of integer labels over the classes that occur in `true` or `pred` (as scikit-learn
    does without explicit labels); also the (n, n) confusion matrix (rows = true)."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (true, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)
    present = denom > 0
    return float((2 * tp[present] / denom[present]).mean()) if present.any() else 0.0, cm


def binary_f1(true: np.ndarray, pred: np.ndarray) -> float:
    tp = float((true & pred).sum())
    denom = float(true.sum() + pred.sum())
    return 2 * tp / denom if denom else 0.0


@dataclass
class EvalReport:
    """Scores of one model on one labelled set; None where the set has no labels for that task."""

    dataset: str
    n: int
    n_va: int = 0
    ccc_valence: float | None = None
    ccc_arousal: float | None = None
    ccc_va: float | None = None
    n_expr: int = 0
    f1_expr: float | None = None
    acc_expr: float | None = None
    n_expr_majority: int = 0
    acc_expr_majority: float | None = None
    confusion: list[list[int]] | None = None  # (7, 7), rows = true, columns = predicted, EXPRESSIONS order
    f1_per_expr: dict[str, float] = field(default_factory=dict)  # F1 of each expression that occurs (true or predicted)
    n_au: int = 0
    f1_au: float | None = None
    f1_per_au: dict[str, float] = field(default_factory=dict)
    # AUROC of each AU row, faces of each expression where Table 1 lists the AU against neutral faces (majority
    # labels), averaged over those expressions: how far the AU rows tell expressive faces from neutral ones.
    auroc_prototype: dict[str, float] = field(default_factory=dict)
    auroc_prototype_mean: float | None = None
    # The same scores per source of the data (FaceSet.groups), e.g. {"jaffe": {...}, "kdef": {...}}.
    per_group: dict[str, EvalReport] = field(default_factory=dict)
    # The same scores with the AU rows fused with the faces' measured movement (affextract.fusion), and its source.
    fused: EvalReport | None = None
    au_source: str = "cnn"

    def to_json(self) -> dict:
        d = asdict(self) | {"expressions": list(EXPRESSIONS)}
        d["per_group"] = {g: r.to_json() for g, r in self.per_group.items()}
        d["fused"] = None if self.fused is None else self.fused.to_json()
        return d


def score(features: np.ndarray, va: np.ndarray, expr: np.ndarray, au: np.ndarray, dataset: str = "") -> EvalReport:
    """(N, 26) activated predictions against (N, 2) / (N, 7) / (N, 17) labels with NaN = not annotated."""
    r = EvalReport(dataset=dataset, n=len(features))
    m = np.isfinite(va).all(1)
    if m.sum() >= 2:
        c = ccc(torch.from_numpy(features[m, VA]).double(), torch.from_numpy(va[m]).double()).numpy()
        r.n_va, r.ccc_valence, r.ccc_arousal, r.ccc_va = int(m.sum()), float(c[0]), float(c[1]), float(c.mean())
    m = np.isfinite(expr).all(1)
    if m.any():
        true, pred = expr[m].argmax(1), features[m, EXPR].argmax(1)
        r.n_expr = int(m.sum())
        r.f1_expr, cm = macro_f1(true, pred, len(EXPRESSIONS))
        r.acc_expr = float((true == pred).mean())
        r.confusion = cm.tolist()
        denom = cm.sum(0) + cm.sum(1)
        r.f1_per_expr = {e: float(2 * cm[i, i] / denom[i]) for i, e in enumerate(EXPRESSIONS) if denom[i]}
        maj = expr[m].max(1) > 0.5
        r.n_expr_majority = int(maj.sum())
        r.acc_expr_majority = float((true[maj] == pred[maj]).mean()) if maj.any() else None
        r.auroc_prototype = prototype_auroc(features[m][maj], true[maj])
        r.auroc_prototype_mean = float(np.mean(list(r.auroc_prototype.values()))) if r.auroc_prototype else None
    annotated = np.isfinite(au).any(0)
    if annotated.any():
        f1s = {}
        for j in np.flatnonzero(annotated):
            mj = np.isfinite(au[:, j])
            f1s[AU_NAMES[j]] = binary_f1(au[mj, j] > 0.5, features[mj, AU.start + j] >= 0.5)
        r.n_au = int(np.isfinite(au).any(1).sum())
        r.f1_au, r.f1_per_au = float(np.mean(list(f1s.values()))), f1s
    return r


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of scores `pos` (positives) against `neg` (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def prototype_auroc(features: np.ndarray, label: np.ndarray, min_faces: int = 2) -> dict[str, float]:
    """AU name -> AUROC of its row (features (N, 26)), faces of each expression where Table 1 lists the AU against
    neutral faces (label (N,) expression indices), averaged over those expressions with >= `min_faces` faces."""
    neutral = label == EXPRESSIONS.index("neutral")
    out = {}
    if neutral.sum() < min_faces:
        return out
    for j, name in enumerate(AU_NAMES):
        col = features[:, AU.start + j]
        v = [auroc(col[label == e], col[neutral]) for e in np.flatnonzero(AU_PRIOR[:, j])
             if (label == e).sum() >= min_faces]
        if v:
            out[name] = float(np.mean(v))
    return out


def partial_correlation(y: np.ndarray, x: np.ndarray, covariates: np.ndarray) -> float:
    """Pearson r of (N,) y and x once both are regressed (least squares, with intercept) on (N, k) covariates: how
    far y follows x beyond what the covariates explain (e.g. an AU row against the mouth opening, given the 7
    expression probabilities)."""
    c = np.column_stack([np.ones(len(y)), covariates]).astype(np.float64)
    ry = y - c @ np.linalg.lstsq(c, y, rcond=None)[0]
    rx = x - c @ np.linalg.lstsq(c, x, rcond=None)[0]
    return float(np.corrcoef(ry, rx)[0, 1])


@torch.no_grad()
def predict_inputs(model, inputs: torch.Tensor, batch_size: int = 512, device: str | torch.device = "cpu") -> np.ndarray:
    """uint8 (N, C, S, S) network inputs -> (N, 26) activated features, with the model's inference-time
    settings (test-time flip, prior correction) as `forward` applies them."""
    from affextract.model import activate

    model.eval().to(device)
    out = []
    for s in range(0, len(inputs), batch_size):
        z = to_unit(inputs[s : s + batch_size].to(device))
        out.append(activate(model.infer(z)).float().cpu())
    return torch.cat(out).numpy()


def evaluate(model, fs, batch_size: int = 512, device: str | torch.device = "cpu", fusion=None) -> EvalReport:
    """Scores of `model` on FaceSet `fs`, its images preprocessed exactly as at inference; with an AU `fusion`
    (affextract.fusion.AUFusion) also the scores with the AU rows fused with each face's measured movement
    (report.fused)."""
    from affextract.training.datasets import prepare_inputs

    model.to(device)
    feats = predict_inputs(model, prepare_inputs(fs, model), batch_size, device)
    report = score_groups(feats, fs)
    if fusion is not None:
        from affextract.training.teacher import measure_set

        report.fused = score_groups(fusion(feats, *measure_set(fs)), fs)
        report.fused.au_source = fusion.source
    return report


def score_groups(features: np.ndarray, fs) -> EvalReport:
    """`score` over all of FaceSet `fs`, plus one report per source when it has several (fs.groups)."""
    report = score(features, fs.va, fs.expr, fs.au, fs.name)
    groups = np.asarray(fs.groups) if fs.groups else None
    if groups is not None and len(set(fs.groups)) > 1:
        for g in sorted(set(fs.groups)):
            m = groups == g
            report.per_group[g] = score(features[m], fs.va[m], fs.expr[m], fs.au[m], f"{fs.name}/{g}")
    return report
