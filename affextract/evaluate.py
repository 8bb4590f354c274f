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

from affextract.schema import AU, AU_NAMES, EXPR, EXPRESSIONS, VA


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
    # The same scores per source of the data (FaceSet.groups), e.g. {"jaffe": {...}, "kdef": {...}}.
    per_group: dict[str, EvalReport] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self) | {"expressions": list(EXPRESSIONS)}
        d["per_group"] = {g: r.to_json() for g, r in self.per_group.items()}
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
    annotated = np.isfinite(au).any(0)
    if annotated.any():
        f1s = {}
        for j in np.flatnonzero(annotated):
            mj = np.isfinite(au[:, j])
            f1s[AU_NAMES[j]] = binary_f1(au[mj, j] > 0.5, features[mj, AU.start + j] >= 0.5)
        r.n_au = int(np.isfinite(au).any(1).sum())
        r.f1_au, r.f1_per_au = float(np.mean(list(f1s.values()))), f1s
    return r


@torch.no_grad()
def predict_inputs(model, inputs: torch.Tensor, batch_size: int = 512, device: str | torch.device = "cpu") -> np.ndarray:
    """uint8 (N, C, S, S) network inputs -> (N, 26) activated features, with the model's inference-time
    settings (test-time flip, prior correction) as `forward` applies them."""
    from affextract.model import activate

    model.eval().to(device)
    out = []
    for s in range(0, len(inputs), batch_size):
        z = inputs[s : s + batch_size].to(device).float() / 127.5 - 1.0
        out.append(activate(model.infer(z)).float().cpu())
    return torch.cat(out).numpy()


def evaluate(model, fs, batch_size: int = 512, device: str | torch.device = "cpu") -> EvalReport:
    """Scores of `model` on FaceSet `fs`, its images preprocessed exactly as at inference."""
    from affextract.datasets import prepare_inputs

    model.to(device)
    feats = predict_inputs(model, prepare_inputs(fs, model), batch_size, device)
    return score_groups(feats, fs)


def score_groups(features: np.ndarray, fs) -> EvalReport:
    """`score` over all of FaceSet `fs`, plus one report per source when it has several (fs.groups)."""
    report = score(features, fs.va, fs.expr, fs.au, fs.name)
    groups = np.asarray(fs.groups) if fs.groups else None
    if groups is not None and len(set(fs.groups)) > 1:
        for g in sorted(set(fs.groups)):
            m = groups == g
            report.per_group[g] = score(features[m], fs.va[m], fs.expr[m], fs.au[m], f"{fs.name}/{g}")
    return report
