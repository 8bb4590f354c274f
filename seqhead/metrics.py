"""Pearson's r (the challenge metric), its loss (Eq. 4) and the per-target affine calibration of predictions.

Importable without torch: `pearson_loss` works on whatever tensors it is given and needs no torch name itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def pearson(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r per column (n,); 0 where either side is constant."""
    pm, ym = pred - pred.mean(0), y - y.mean(0)
    den = np.sqrt((pm ** 2).sum(0) * (ym ** 2).sum(0))
    return np.where(den > 0, (pm * ym).sum(0) / np.where(den > 0, den, 1), 0.0)


def pearson_loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 4: 1 − mean over targets of Pearson's r over the batch. pred, y (B, n)."""
    pm, ym = pred - pred.mean(0), y - y.mean(0)
    # ε inside the square root: a batch of identical predictions (every ReLU of a small FC off) has a zero
    # variance, where the root's gradient is infinite and would turn every weight into NaN.
    r = (pm * ym).sum(0) / (pm.pow(2).sum(0) * ym.pow(2).sum(0) + 1e-12).sqrt()
    return 1 - r.mean()


def fit_calibration(pred: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-target affine map pred → labels' scale, least squares on the training videos: (slope, intercept)."""
    pm = pred.mean(0)
    var = ((pred - pm) ** 2).mean(0)
    cov = ((pred - pm) * (y - y.mean(0))).mean(0)
    slope = np.where(var > 1e-12, cov / np.where(var > 1e-12, var, 1), 0.0)
    return slope.astype(np.float32), (y.mean(0) - slope * pm).astype(np.float32)


def calibrate(raw: np.ndarray, slope, intercept) -> np.ndarray:
    """Raw predictions (N, n_targets) on the labels' scale; slope and intercept (n_targets,) as arrays or the lists
    a run's config.json holds."""
    return raw * np.asarray(slope) + np.asarray(intercept)
