"""Validation during training: the metrics of each validation set, their merge, and the number that picks the best
epoch."""

from __future__ import annotations

import math

import numpy as np
import torch

from affextract.model import MMA, activate
from affextract.schema import AU

SELECT_METRICS = ("score", "acc_expr", "acc_expr_majority", "f1_expr", "ccc_va", "f1_au", "teacher")


def validate(model: MMA, vals: list, frozen: bool, device: torch.device) -> dict[str, dict]:
    """Set name -> its Table-5 metrics (without the confusion matrix) and its teacher BCE.

    `vals` pairs each FaceSet with its prepared inputs: uint8 (N, C, S, S) images, or, when only the heads train,
    (embeddings, embeddings of the mirror images or None).
    """
    from affextract.training.evaluate import predict_inputs, score

    model.eval()
    metrics = {}
    for s, xv in vals:
        if frozen:
            with torch.no_grad():
                mirrored = None if xv[1] is None else model.heads(xv[1])
                feats = activate(model.settle(model.heads(xv[0]), mirrored)).float().cpu().numpy()
        else:
            feats = predict_inputs(model, xv, 1024, device)
        r = score(feats, s.va, s.expr, s.au, s.name)
        metrics[s.name] = {k: v for k, v in r.to_json().items() if k not in ("confusion", "expressions")}
        metrics[s.name] |= teacher_metrics(feats[:, AU], s.teacher_au)
    return metrics


def select_value(metrics: dict, select: str) -> float:
    """The number (higher is better) that `select` (one of SELECT_METRICS) reads from merged metrics."""
    if select == "score":
        vals = [metrics[k] for k in ("ccc_va", "f1_expr", "f1_au") if metrics.get(k) is not None]
        return float(np.mean(vals)) if vals else -math.inf
    if select == "teacher":
        v = metrics.get("bce_teacher")
        return -math.inf if v is None else -float(v)
    v = metrics.get(select)
    return -math.inf if v is None else float(v)


def teacher_metrics(au: np.ndarray, teacher: np.ndarray | None) -> dict:
    """(N, 17) AU probabilities against (N, 17) teacher AUs (NaN = none) -> their mean BCE over the pairs that
    have a teacher ({} when there is none)."""
    if teacher is None or not np.isfinite(teacher).any():
        return {}
    m = np.isfinite(teacher)
    p = np.clip(au[m].astype(np.float64), 1e-6, 1 - 1e-6)
    t = teacher[m]
    return {"bce_teacher": float(-(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()), "n_teacher": int(m.sum())}


def merge_metrics(reports: list[dict]) -> dict:
    """Sample-weighted mean of each metric over the validation sets that have it."""
    out = {}
    for key, n_key in (("ccc_va", "n_va"), ("f1_expr", "n_expr"), ("acc_expr", "n_expr"),
                       ("acc_expr_majority", "n_expr_majority"), ("f1_au", "n_au"), ("bce_teacher", "n_teacher")):
        have = [(r[key], r[n_key]) for r in reports if r.get(key) is not None]
        if have:
            w = sum(n for _, n in have)
            out[key] = sum(v * n for v, n in have) / max(w, 1)
    return out
