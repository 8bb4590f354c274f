"""Prediction from a run directory: rebuild the head from config.json + model.safetensors, one row per video.

Videos longer than t (kept frames): `long_videos="windows"` (default) cuts them into windows of t frames — the
last window ends at the video's end, so every frame is seen — predicts each window and averages the windows'
raw outputs before calibration; `"truncate"` keeps the first t frames. Either way no video is refused.

An ensemble run (`train --seeds N`) is read as one: every member predicts and their calibrated predictions are
averaged. A features file made otherwise than the run's training file (another model, detector, alignment, frame
sampling, or movement stage for heads that read it) is refused unless `check_provenance=False`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from affextract.weights import file_sha256

from .config import ModelConfig
from .data import DataError, provenance_mismatch, read_features, read_provenance, video_id
from .train import pooled_stats, standardize

LONG_VIDEO_POLICIES = ("windows", "truncate")


@dataclass(frozen=True)
class PredictOptions:
    run_dir: Path  # a directory written by `train`
    h5: Path  # features file (affextract format v1) with the videos to predict
    out: Path | None = None  # CSV to write (None: return the table only)
    long_videos: str = "windows"  # videos longer than t: windows (average over t-frame windows) | truncate
    batch_size: int = 64  # videos per forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 1  # torch CPU threads (0 = torch's default; see TrainOptions.threads)
    check_provenance: bool = True  # refuse a features file made otherwise than the training file (False: warn)


@dataclass(frozen=True)
class PredictResult:
    table: pd.DataFrame  # id column + one column per target, one row per video
    out: Path | None
    n_long: int  # videos longer than t, handled by the long-video policy
    warnings: tuple[str, ...] = ()  # provenance differences let through by check_provenance=False, …
    members: int = 1  # runs averaged (an ensemble's members)


def windows(seq: np.ndarray, t: int) -> list[np.ndarray]:
    """Consecutive t-frame windows covering seq (l, F); the last one ends at the end (it may overlap)."""
    if len(seq) <= t:
        return [seq]
    starts = list(range(0, len(seq) - t + 1, t))
    if starts[-1] + t < len(seq):
        starts.append(len(seq) - t)
    return [seq[s:s + t] for s in starts]


@dataclass(frozen=True)
class Run:
    """A trained head rebuilt from its run directory."""

    config: dict
    model: "SeqHead | None"  # None for the ridge baseline
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
            from .fit import predict_raw

            raw = predict_raw(self.model, pieces, device or "cpu", batch_size)
        owner = np.asarray(owner)
        sums = np.zeros((len(seqs), raw.shape[1]), dtype=np.float64)
        np.add.at(sums, owner, raw)
        mean = sums / np.bincount(owner, minlength=len(seqs))[:, None]
        cal = self.config["calibration"]
        return (mean * np.asarray(cal["slope"]) + np.asarray(cal["intercept"])).astype(np.float32)


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
        raise DataError(f"{run_dir}: not a seqhead run directory (needs config.json and model.safetensors; "
                        "make one with `seqhead train`)")
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


def predict(opts: PredictOptions) -> PredictResult:
    """Predict every video of a features file; the run directory and the file are checked before torch loads."""
    from affextract.runtime import resolve_device

    run_dir = Path(opts.run_dir)
    if not (run_dir / "config.json").exists():
        raise DataError(f"{run_dir}: not a seqhead run directory (needs config.json and model.safetensors; "
                        "make one with `seqhead train`)")
    config = json.loads((run_dir / "config.json").read_text())
    warnings = _check_provenance(config, opts)
    device = resolve_device(opts.device)
    from .fit import cpu_threads

    with cpu_threads(opts.threads):
        return _predict(opts, device, warnings)


def _check_provenance(config: dict, opts: PredictOptions) -> tuple[str, ...]:
    """Refuse (or, with check_provenance=False, report) a features file made otherwise than the training file."""
    trained = config.get("provenance")
    if trained is None:
        return (f"{opts.run_dir} records no provenance (written by an earlier seqhead): the features file was not "
                "checked against the training file",)
    diff = provenance_mismatch(trained, read_provenance(opts.h5), config["features"]["groups"])
    if not diff:
        return ()
    message = (f"{opts.h5} was made otherwise than the file {opts.run_dir} was trained on ({'; '.join(diff)})")
    if opts.check_provenance:
        raise DataError(message + ": re-extract it the same way, or pass --ignore-provenance to predict anyway")
    return (message + "; predicting anyway (--ignore-provenance)",)


def _predict(opts: PredictOptions, device, warnings: tuple[str, ...] = ()) -> PredictResult:
    run = load_run(opts.run_dir, device)
    f = run.config["features"]
    videos, names = read_features(opts.h5, f["groups"], f["no_face"])
    if list(names) != list(f["names"]):
        raise DataError(f"{opts.h5}: features {list(names)} differ from the run's {f['names']}")
    seqs = [v.frames for v in videos]
    pred = run.predict_seqs(seqs, opts.long_videos, device, opts.batch_size)
    ids = [video_id(v, run.config["id_form"]) for v in videos]
    if len(set(ids)) < len(ids):  # stems can clash in a file the run was not trained on
        ids = [v.source for v in videos]
    table = pd.DataFrame(pred, columns=run.config["targets"])
    table.insert(0, run.config["id_column"], ids)
    if opts.out is not None:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(opts.out, index=False, float_format="%.6f")
    n_long = sum(len(s[::run.stride]) > int(run.config["t"]) for s in seqs)
    return PredictResult(table, opts.out, n_long, warnings, len(run.members) if isinstance(run, Ensemble) else 1)
