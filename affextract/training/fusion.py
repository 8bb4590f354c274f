"""Fitting the AU fusion (affextract.fusion): the candidate rules of the model card ("AU fusion"), the per-AU
logistic and `affextract train --fusion`, which refits the shipped rule on FER+ train from the cached blendshapes.
The fitted parameters are written by fusion.save_fusion and applied at run time by fusion.AUFusion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from affextract.fusion import (CNN_EPS, EVIDENCE_EPS, FUSION_WEIGHTS, INPUTS, MIN_PRESENCE, AUFusion, load_fusion,
                               logit, save_fusion)
from affextract.schema import AU, AU_PRIOR, AUS, EXPRESSIONS

# Candidate rules of the model card ("AU fusion"): what the per-AU logistic is fitted to, and on which inputs.
RULES = {"teacher": "soft-target BCE to the teacher AUs, inputs logit(p_cnn) and logit(evidence)",
         "labels": "class-balanced BCE, obvious-expression faces against neutral ones, same inputs",
         "evidence": "soft-target BCE to the teacher AUs, logit(evidence) only",
         "mixed": "soft-target BCE to (teacher AU + Table-1 pseudo-AU of the FER+ votes) / 2, inputs logit(p_cnn) and "
                  "logit(evidence)"}
# AU -> FER+ majority labels where the AU is obvious (positives of the "labels" rule and of the teacher's check).
OBVIOUS = {1: ("surprise",), 2: ("surprise",), 5: ("surprise",), 25: ("surprise",), 26: ("surprise",),
           6: ("happiness",), 12: ("happiness",), 9: ("disgust",), 10: ("disgust",),
           4: ("anger", "disgust", "fear"), 7: ("anger",), 15: ("sadness",), 17: ("anger", "disgust", "sadness"),
           20: ("fear",), 24: ("anger", "disgust")}


def fit_logistic(x: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None, l2: float = 1e-4,
                 steps: int = 100) -> np.ndarray:
    """Logistic regression of soft targets (N,) in [0, 1] on (N, k) inputs plus a bias, by Newton's method on the
    weighted mean BCE with a small L2 penalty on the inputs' weights (not the bias) -> (k + 1,) weights, bias last."""
    x = np.column_stack([np.asarray(x, np.float64), np.ones(len(x))])
    t = np.asarray(target, np.float64)
    w = np.ones(len(x)) if weight is None else np.asarray(weight, np.float64)
    w = w / w.sum()
    reg = np.full(x.shape[1], l2)
    reg[-1] = 0.0
    theta = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-x @ theta))
        grad = x.T @ (w * (p - t)) + reg * theta
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + np.diag(reg) + 1e-12 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-9:
            break
    return theta


def fit_fusion(cnn_au: np.ndarray, evidence: np.ndarray, teacher: np.ndarray, expr: np.ndarray,
               fused: tuple[int, ...], rule: str = "mixed") -> AUFusion:
    """Fit the fusion of `fused` AUs by `rule` (RULES) on faces the mesh found: (N, 17) CNN AU probabilities,
    (N, 17) raw evidence, (N, 17) teacher AUs (teacher_aus with nothing distrusted) and (N, 7) expression votes
    (for the "labels" rule's majority labels)."""
    if rule not in RULES:
        raise ValueError(f"unknown fusion rule {rule!r}; one of {sorted(RULES)}")
    coef = np.zeros((len(AUS), len(INPUTS)))
    major = np.where(expr.max(1) > 0.5, expr.argmax(1), -1)
    for au in fused:
        j = AUS.index(au)
        zc, ze = logit(cnn_au[:, j], CNN_EPS), logit(evidence[:, j], EVIDENCE_EPS)
        if rule == "labels":
            pos = np.isin(major, [EXPRESSIONS.index(e) for e in OBVIOUS[au]])
            sel = pos | (major == EXPRESSIONS.index("neutral"))
            y = pos[sel].astype(np.float64)
            weight = np.where(y > 0, 0.5 / max(y.sum(), 1), 0.5 / max((1 - y).sum(), 1))
            coef[j] = fit_logistic(np.column_stack([zc[sel], ze[sel]]), y, weight)
        else:
            sel = np.isfinite(teacher[:, j])
            target = teacher[sel, j]
            if rule == "mixed":
                target = 0.5 * (target + expr[sel] @ AU_PRIOR[:, j])
            x = ze[sel, None] if rule == "evidence" else np.column_stack([zc[sel], ze[sel]])
            theta = fit_logistic(x, target)
            coef[j] = (0.0, theta[0], theta[1]) if rule == "evidence" else theta
    return AUFusion(coef=coef.astype(np.float32), fused=tuple(sorted(fused)))


@dataclass(frozen=True)
class FusionOptions:
    """How `affextract train --fusion` refits the AU fusion."""

    cache: Path  # FER+ blendshape cache (tools/ferplus_teacher.py), one row per row of the FER+ .h5
    out: Path  # the .safetensors to write (its .json beside it)
    weights: Path | None = None  # MMA weights whose AU rows are fused; None = the shipped weights
    rule: str = "mixed"  # one of RULES (the card's rule 2 chose "mixed")
    fused: tuple[int, ...] | None = None  # AUs to fuse; None = those of the shipped fusion (chosen on posed faces)


def train_fusion(sets: list, options: FusionOptions) -> tuple[AUFusion, str]:
    """Fit the AU fusion on FER+ FaceSets `sets` (faces whose mesh presence >= MIN_PRESENCE) and write it; return it
    and its SHA-256. The CNN's AU rows of the faces are computed once per weights file and kept beside the output
    (cnn_au_<sha>_<set>.npy), so a refit with other options takes seconds."""
    from affextract.training.datasets import prepare_inputs
    from affextract.training.evaluate import predict_inputs
    from affextract.model import load_mma
    from affextract.training.teacher import TeacherOptions, au_evidence, cached_measures, teacher_aus

    if options.rule not in RULES:
        raise ValueError(f"unknown fusion rule {options.rule!r}; one of {sorted(RULES)}")
    fused = options.fused if options.fused is not None else tuple(
        json.loads(FUSION_WEIGHTS.with_suffix(".json").read_text())["fused"])
    model, info = load_mma(options.weights)
    out = Path(options.out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for fs in sets:
        blend, presence, names = cached_measures(fs, options.cache)
        cached = out.parent / f"cnn_au_{info.sha256[:12]}_{fs.name.replace(':', '_')}_{len(fs)}.npy"
        if cached.is_file():
            cnn = np.load(cached)
        else:
            cnn = predict_inputs(model, prepare_inputs(fs, model))[:, AU]
            np.save(cached, cnn)
        ok = presence >= MIN_PRESENCE
        parts.append((cnn[ok], au_evidence(blend[ok], names),
                      teacher_aus(blend[ok], names, TeacherOptions(distrust=())), fs.expr[ok]))
    fusion = fit_fusion(*(np.concatenate(x) for x in zip(*parts)), fused=tuple(fused), rule=options.rule)
    sha = save_fusion(fusion, out, {
        "rule": options.rule, "rule_text": RULES[options.rule],
        "training_data": ", ".join(f"{fs.name} ({len(fs)} faces)" for fs in sets) + f"; faces whose mesh presence "
                         f">= {MIN_PRESENCE}; blendshapes from {Path(options.cache).name}",
        "mma_weights": {"name": info.name, "sha256": info.sha256},
        "teacher": {"calibration": {str(k): v for k, v in TeacherOptions().calibration.items()}}})
    return load_fusion(out), sha
