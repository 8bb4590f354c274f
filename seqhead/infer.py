"""Inference: a run directory rebuilt (`load_run`) and its predictions for raw kept-frame sequences, plus what
training shares with it (standardisation, the ridge baseline's pooled statistics, batched forward passes, torch's
CPU threads). Torch loads on first use, not at import.

Videos longer than t (kept frames): `long_videos="windows"` (default) cuts them into windows of t frames — the
last window ends at the video's end, so every frame is seen — predicts each window and averages the windows'
raw outputs before calibration; `"truncate"` keeps the first t frames. Either way no video is refused.
An ensemble run (`train --seeds N`) is read as one: every member predicts and their calibrated predictions are
averaged.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from affextract.weights import file_sha256

from .config import ModelConfig
from .data import DataError, pad_batch
from .metrics import calibrate

if TYPE_CHECKING:
    import torch

    from .model import SeqHead

LONG_VIDEO_POLICIES = ("windows", "truncate")


def standardize(seqs: list[np.ndarray], mean: np.ndarray, std: np.ndarray) -> list[np.ndarray]:
    return [((s - mean) / std).astype(np.float32) for s in seqs]


def pooled_stats(seqs: list[np.ndarray]) -> np.ndarray:
    """(N, 3F): per-video mean, max and std over the kept frames (zeros for a video without any face)."""
    F = seqs[0].shape[1]
    out = np.zeros((len(seqs), 3 * F), dtype=np.float32)
    for i, s in enumerate(seqs):
        if len(s):
            out[i] = np.concatenate([s.mean(0), s.max(0), s.std(0)])
    return out


def windows(seq: np.ndarray, t: int) -> list[np.ndarray]:
    """Consecutive t-frame windows covering seq (l, F); the last one ends at the end (it may overlap)."""
    if len(seq) <= t:
        return [seq]
    starts = list(range(0, len(seq) - t + 1, t))
    if starts[-1] + t < len(seq):
        starts.append(len(seq) - t)
    return [seq[s:s + t] for s in starts]


@contextlib.contextmanager
def cpu_threads(n: int):
    """Torch intra-op threads for a block (0 = leave torch's default), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def predict_raw(model: SeqHead, seqs: list[np.ndarray], device: torch.device, batch_size: int = 128) -> np.ndarray:
    """Uncalibrated predictions (N, n_targets) for sequences already standardised and cut to ≤ t."""
    import torch

    model.eval()
    cfg = model.cfg
    out = []
    order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths together: less padding
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x, lengths = pad_batch([seqs[j] for j in idx], None if cfg.mask else cfg.t)
            out.append(model(torch.from_numpy(x).to(device), torch.from_numpy(lengths).to(device)).float().cpu())
    pred = torch.cat(out).numpy()
    res = np.empty_like(pred)
    res[order] = pred
    return res


@dataclass(frozen=True)
class Run:
    """A trained head rebuilt from its run directory."""

    config: dict
    model: SeqHead | None  # None for the ridge baseline
    ridge: dict | None  # scaler_mean, scaler_scale, coef, intercept

    @property
    def stride(self) -> int:
        """Every stride-th kept frame is used (runs written before the option existed used them all)."""
        return int(self.config["features"].get("stride", 1))

    def predict_seqs(self, seqs: list[np.ndarray], long_videos: str, device=None,
                     batch_size: int = 64) -> np.ndarray:
        """Calibrated predictions (N, n_targets) for raw (unstandardised) kept-frame sequences."""
        if long_videos not in LONG_VIDEO_POLICIES:
            raise ValueError(f"long-video policy {long_videos!r}: use one of {LONG_VIDEO_POLICIES}")
        f = self.config["features"]
        t = int(self.config["t"])
        seqs = standardize([s[::self.stride] for s in seqs], np.asarray(f["mean"], np.float32),
                           np.asarray(f["std"], np.float32))
        pieces, owner = [], []
        for i, s in enumerate(seqs):
            parts = windows(s, t) if long_videos == "windows" else [s[:t]]
            pieces += parts
            owner += [i] * len(parts)
        if self.model is None:
            r = self.ridge
            x = (pooled_stats(pieces) - r["scaler_mean"]) / r["scaler_scale"]
            raw = x @ r["coef"].T + r["intercept"]
        else:
            raw = predict_raw(self.model, pieces, device or "cpu", batch_size)
        owner = np.asarray(owner)
        sums = np.zeros((len(seqs), raw.shape[1]), dtype=np.float64)
        np.add.at(sums, owner, raw)
        mean = sums / np.bincount(owner, minlength=len(seqs))[:, None]
        cal = self.config["calibration"]
        return calibrate(mean, cal["slope"], cal["intercept"]).astype(np.float32)


@dataclass(frozen=True)
class Ensemble:
    """An ensemble run: its members' calibrated predictions are averaged."""

    config: dict  # the ensemble's config.json (targets, id column and form, features, provenance, members)
    members: tuple[Run, ...]

    @property
    def stride(self) -> int:
        return self.members[0].stride

    def predict_seqs(self, seqs: list[np.ndarray], long_videos: str, device=None,
                     batch_size: int = 64) -> np.ndarray:
        return np.mean([m.predict_seqs(seqs, long_videos, device, batch_size) for m in self.members], axis=0)


def not_a_run(run_dir: Path) -> DataError:
    return DataError(f"{run_dir}: not a seqhead run directory (needs config.json and model.safetensors; "
                     "make one with `seqhead train`)")


def load_run(run_dir: Path, device=None) -> Run | Ensemble:
    """A run directory rebuilt: one head, or an ensemble (config.json naming `members`)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        config = json.loads(cfg_path.read_text())
        if "members" in config:
            return Ensemble(config, tuple(_load_one(run_dir / m, device) for m in config["members"]))
    return _load_one(run_dir, device)


def _load_one(run_dir: Path, device=None) -> Run:
    run_dir = Path(run_dir)
    cfg_path, weights = run_dir / "config.json", run_dir / "model.safetensors"
    if not cfg_path.exists() or not weights.exists():
        raise not_a_run(run_dir)
    config = json.loads(cfg_path.read_text())
    if config.get("weights_sha256") and file_sha256(weights) != config["weights_sha256"]:
        raise DataError(f"{weights}: SHA-256 differs from the one config.json names (the files belong to different "
                        "epochs or were edited); retrain with `seqhead train`")
    if config["model"]["head"] == "ridge":
        from safetensors.numpy import load_file as load_numpy

        return Run(config, None, load_numpy(str(weights)))
    from safetensors.torch import load_file as load_torch

    from .model import SeqHead

    model = SeqHead(ModelConfig(**config["model"]))
    model.load_state_dict(load_torch(str(weights)))
    return Run(config, model.to(device or "cpu").eval(), None)
