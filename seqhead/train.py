"""Training: options, data preparation, the ridge baseline, ensembles and the run directory (a network's torch side
is in .fit, loaded once the inputs have been read and checked).

A run directory describes itself: model.safetensors (weights), config.json (every option, the model
configuration, the feature schema and standardisation, t, label names, id column/forms, calibration, the features
file's provenance, the weights' SHA-256), metrics.json (per-target and mean Pearson on validation, sizes, how the
epoch was chosen, status), history.csv and learning_curve.png. An ensemble's directory holds one such run per
member (seed<N>/) and a config.json naming them.

The best epoch so far is on disk while training runs (weights, config and metrics replaced atomically after every
epoch that improves validation), so Ctrl-C or a kill leaves a run directory that `predict` accepts.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from affextract.schema import FEATURE_NAMES, FORMAT_VERSION
from affextract.weights import file_sha256, replace_file as _replace_file
from affextract.version import __version__

from .config import HEADS, ModelConfig, Progress
from .data import (DataError, Labels, Video, find_labels, match, read_features, read_labels, read_provenance,
                   split_indices)
from .infer import cpu_threads, pooled_stats, standardize
from .metrics import pearson

ALL_HEADS = HEADS + ("ridge",)  # ridge: per-video mean/max/std pooling + ridge regression (scikit-learn)
LOSSES = ("pearson", "mse")
# Below this many validation videos a Pearson r is too noisy to pick an epoch by (2 videos always give ±1): such a
# run trains its full --epochs without early stopping and keeps the last epoch.
MIN_VAL_VIDEOS = 10
# What a run directory holds; `--overwrite` removes these (and member runs) before training, nothing else.
RUN_FILES = ("model.safetensors", "config.json", "metrics.json", "history.csv", "learning_curve.png")


@dataclass(frozen=True)
class TrainOptions:
    h5: Path  # features file (affextract format v1)
    out: Path  # run directory to write (created; a non-empty one is refused unless `overwrite`)
    labels: Path | None = None  # label CSV; None = labels.csv beside h5
    id_column: str | None = None  # None = auto (File_ID, id, video, file, path, … else the first column)
    targets: tuple[str, ...] | None = None  # None = the 7 Hume columns, else every numeric column
    split_column: str | None = None  # None = auto (split/set/partition); "" = none, use val_fraction
    group_column: str | None = None  # keep a subject's videos on one side of a random split
    val_fraction: float = 0.2  # validation share when the labels have no split column
    allow_unmatched: bool = False  # train on the matched ids when some ids exist on one side only
    features: str = "va,expr,au"  # feature groups, any combination of va, expr, au (paper Table 3)
    no_face: str = "drop"  # frames without a face: drop (l = frames kept) | fill (repeat last face)
    stride: int = 1  # keep every stride-th kept frame (2 halves the encoder's work; predict does the same)
    t: int | None = None  # padded length; None = longest training video (kept frames after the stride); longer
    # ones are cut
    head: str = "attn"  # attn (best on the simulator's validation) | mean | mrnn (paper) | last | ridge
    mask: bool = True  # Mask (+ routing for mrnn); False = the paper's "w/o Mask & Routing"
    rnn: str = "conv"  # encoder: conv (dilated convolutions, parallel in time; best on validation of both
    # simulator settings and 4–6× faster on a CPU) | gru (the paper's) | lstm
    layers: int = 1  # recurrent layers
    conv_blocks: int = 4  # conv encoder: residual blocks (receptive field 1 + 2·(2^blocks − 1) frames)
    hidden: int = 64  # encoder width d' (recurrent units or conv channels; the paper: a GRU of 128)
    fc: int = 32  # units of the first FC
    dropout: float = 0.0  # dropout before each FC
    loss: str = "pearson"  # pearson (1 − mean Pearson, Eq. 4) | mse
    batch_size: int = 32  # videos per step (the paper: 4)
    lr: float = 3e-3  # Adam learning rate (the paper: 1e-4)
    weight_decay: float = 0.0  # L2 added to the gradient (as torch Adam), routed columns only for mrnn
    clip: float = 1.0  # maximum gradient norm per step (0 = no clipping); recurrent nets spike without it
    epochs: int = 30  # upper bound on epochs
    patience: int = 6  # stop after this many epochs without a better validation mean Pearson
    seed: int = 0  # weights, batch order and the random validation split
    skip_padding: str = "truncate"  # encoder work on padding: truncate (batch's longest l) | pack | none
    bucket: bool = True  # length-sorted batches (less padding per batch: ~2× faster, same validation)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 1  # torch CPU threads while training (0 = torch's default: all cores, which collapses when
    # another process is busy — OpenMP threads spin against each other; 1 thread costs ≤ 2× on a busy 2-core CPU)
    max_batches: int | None = None  # stop each epoch after this many batches (benchmarks, smoke tests)
    members: int = 3  # ensemble: seeds seed … seed+members−1 on one split, predictions averaged (1 = one run; 3
    # ranked first on every simulator family, docs/seqhead.md; ridge always fits once)
    ema: float = 0.0  # per-step decay of an exponential moving average of the weights (0 = off; e.g. 0.99)
    overwrite: bool = False  # replace the run already in `out` (otherwise a non-empty `out` is an error)

    def __post_init__(self):
        if self.head not in ALL_HEADS:
            raise ValueError(f"head {self.head!r}: use one of {ALL_HEADS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r}: use one of {LOSSES}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be ≥ 2 (the Pearson loss is computed over the batch)")
        if self.stride < 1:
            raise ValueError(f"stride {self.stride}: keep every n-th frame with n ≥ 1")
        if self.members < 1:
            raise ValueError(f"members {self.members}: an ensemble needs ≥ 1 member")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema {self.ema}: a decay in [0, 1) (0 = off)")


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    targets: tuple[str, ...]
    val_pearson: dict[str, float]  # per target, calibrated predictions on the validation videos
    val_mean_pearson: float
    best_epoch: int  # 0 for ridge
    epochs_run: int
    n_train: int
    n_val: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_mean_pearson, seconds
    id_forms: dict[str, int] = field(default_factory=dict)  # how the label ids named the videos: form → rows
    interrupted: bool = False  # Ctrl-C ended training; the run directory holds the best epoch before it
    warnings: tuple[str, ...] = ()  # things the user should know (a validation set too small to stop on, …)
    members: tuple[Path, ...] = ()  # an ensemble's member run directories (empty for a single run)
    val_predictions: np.ndarray | None = field(default=None, repr=False)  # (n_val, n_targets), calibrated


@dataclass
class Prepared:
    """Matched, split training data (internal to a run and to sweeps, which reuse it across configurations)."""

    labels: Labels
    videos: list[Video]
    id_forms: dict[str, int]  # id form → label rows matched by it (most rows first)
    train_seqs: list[np.ndarray]  # (l, F) each, raw (not standardised)
    val_seqs: list[np.ndarray]
    y_train: np.ndarray  # (N_train, n_targets)
    y_val: np.ndarray
    feature_names: tuple[str, ...]
    provenance: dict = field(default_factory=dict)  # what made the features file (see data.read_provenance)

    @property
    def id_form(self) -> str:
        """The form most label rows used: `predict` names videos this way."""
        return next(iter(self.id_forms))


def prepare(opts: TrainOptions) -> Prepared:
    """Read features and labels, match them and split into training and validation videos."""
    labels_path = find_labels(opts.h5, opts.labels)
    split_col = None if opts.split_column is None else opts.split_column
    labels = read_labels(labels_path, opts.id_column, opts.targets,
                         split_column=split_col if split_col != "" else None, group_column=opts.group_column)
    if opts.split_column == "":
        labels = replace(labels, split=None)
    videos, feat_names = read_features(opts.h5, opts.features, opts.no_face)
    rows, vids, forms = match(labels, videos, opts.allow_unmatched)
    tr, va = split_indices(labels, rows, opts.val_fraction, opts.seed, opts.group_column is not None)
    counts = {f: forms.count(f) for f in sorted(set(forms), key=lambda f: -forms.count(f))}

    def take(pos):
        return [videos[vids[p]].frames for p in pos], labels.y[[rows[p] for p in pos]]

    trs, ytr = take(tr)
    vas, yva = take(va)
    return Prepared(labels, videos, counts, trs, vas, ytr, yva, feat_names, read_provenance(opts.h5))


def _learning_curve(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], label="train loss")
    ax.plot(ep, [h["val_mean_pearson"] for h in history], label="val mean Pearson")
    ax.set_xlabel("epoch")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _options_json(opts: TrainOptions) -> dict:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(opts).items()}


# --------------------------------------------------------------------------------------------------- run directory


class _RunWriter:
    """Writes a run directory: weights first, then config.json naming their SHA-256, then metrics.json, each
    replaced atomically, so the files on disk always belong to one epoch (`predict` checks the hash)."""

    def __init__(self, out: Path, opts: TrainOptions, data: Prepared, t: int, mean: np.ndarray, std: np.ndarray):
        self.out, self.opts, self.data = out, opts, data
        self.base = {
            "seqhead_version": __version__,
            "options": _options_json(opts),
            "t": t,
            "features": {"groups": opts.features, "names": list(data.feature_names), "no_face": opts.no_face,
                         "stride": opts.stride, "mean": mean.tolist(), "std": std.tolist(), "format_version": FORMAT_VERSION,
                         "all_names": list(FEATURE_NAMES)},
            "targets": list(data.labels.targets),
            "id_column": data.labels.id_column,
            "id_form": data.id_form,
            "id_forms": data.id_forms,
            # What made the features: `predict` refuses a file made otherwise (other model, sampling, detector, …).
            "provenance": data.provenance,
        }
        # Sizes and how the kept epoch was chosen, in every metrics.json.
        self.selection = {"n_train": len(data.train_seqs), "n_val": len(data.val_seqs),
                          "selection": "best validation epoch" if early_stopping(data) else
                          f"last epoch (validation has {len(data.val_seqs)} videos < {MIN_VAL_VIDEOS}: "
                          "no early stopping)"}

    def write(self, save_weights: Callable[[Path], None], model: dict, slope: np.ndarray, intercept: np.ndarray,
              pred_val: np.ndarray, status: str, best_epoch: int, epochs_run: int, seconds: float,
              extra: dict | None = None) -> np.ndarray:
        """Write weights, config and metrics; returns the validation Pearson per target (calibrated predictions)."""
        weights = self.out / "model.safetensors"
        _replace_file(weights, save_weights)
        config = {**self.base, "model": model, "weights_sha256": file_sha256(weights),
                  "calibration": {"slope": slope.tolist(), "intercept": intercept.tolist()}}
        _replace_file(self.out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
        r = pearson(pred_val, self.data.y_val)
        targets = self.data.labels.targets
        metrics = {
            "val": {"pearson": dict(zip(targets, map(float, r))), "mean_pearson": float(r.mean())},
            # training: written while training ran (a killed run keeps it); interrupted: Ctrl-C; complete: done.
            "status": status, "best_epoch": best_epoch, "epochs_run": epochs_run, **self.selection,
            "seconds": seconds, **(extra or {}),
        }
        _replace_file(self.out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
        return r

    def history(self, history: list[dict], best_epoch: int, curve: bool) -> None:
        def write(p: Path) -> None:
            with open(p, "w") as f:
                f.write("epoch,train_loss,val_mean_pearson,seconds\n")
                for h in history:
                    f.write(f"{h['epoch']},{h['train_loss']:.6f},{h['val_mean_pearson']:.6f},{h['seconds']:.3f}\n")

        _replace_file(self.out / "history.csv", write)
        if curve:
            _learning_curve(history, self.out / "learning_curve.png",
                            f"{self.opts.head} ({self.opts.features}), best epoch {best_epoch}")


# --------------------------------------------------------------------------------------------------- train


def early_stopping(data: Prepared) -> bool:
    """Whether validation is large enough to choose an epoch by (see MIN_VAL_VIDEOS)."""
    return len(data.val_seqs) >= MIN_VAL_VIDEOS


def _claim_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty run directory unless `overwrite`; with it, remove the run that is there (its files and
    member runs), nothing else."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a run directory: choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise DataError(f"{out} already exists and is not empty: pass --overwrite to replace the run in it, or "
                        "choose another --out")
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for member in out.glob("seed*"):
        if (member / "config.json").exists():
            shutil.rmtree(member)


def train(opts: TrainOptions, prepared: Prepared | None = None,
          progress: Callable[[Progress], None] | None = None) -> TrainResult:
    """Train one head (or, with `members` > 1, an ensemble of seeds) and write its run directory. `prepared` lets a
    sweep reuse the data it already read; `progress` is called after every step and at the end of every epoch.

    A non-empty `out` is refused unless `overwrite`. Labels and features are read and checked before torch loads.
    Ctrl-C (KeyboardInterrupt) after the first epoch ends training early: the run directory keeps the best epoch
    so far and the result says `interrupted`. Before the first epoch ends, the interrupt propagates and the
    (then empty) run directory is removed.
    """
    from affextract.runtime import resolve_device

    _claim_out(Path(opts.out), opts.overwrite)
    if opts.device not in ("auto", "cpu"):
        resolve_device(opts.device)  # a missing GPU is a one-line error before anything is read
    data = prepared or prepare(opts)
    device = resolve_device(opts.device)
    with cpu_threads(opts.threads):
        if opts.members > 1 and opts.head != "ridge":  # ridge does not depend on the seed
            return _ensemble(opts, data, progress, device)
        return _train(opts, data, progress, device)


def _ensemble(opts: TrainOptions, data: Prepared, progress: Callable[[Progress], None] | None,
              device) -> TrainResult:
    """Members seed, seed+1, … trained on the same split into OUT/seed<N>/; OUT/config.json names them and
    OUT/metrics.json scores their averaged (calibrated) validation predictions. Ctrl-C keeps the members done."""
    t0 = time.time()
    out = Path(opts.out)
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    results: list[TrainResult] = []
    interrupted = False
    try:
        for k in range(opts.members):
            seed = opts.seed + k
            member = replace(opts, seed=seed, out=out / f"seed{seed}", members=1, overwrite=True)
            report = None if progress is None else (lambda p, k=k: progress(replace(p, member=k + 1,
                                                                                    members=opts.members)))
            results.append(_train(member, data, report, device))
            if results[-1].interrupted:
                interrupted = True
                break
    except KeyboardInterrupt:
        if not results:
            if not existed and not any(out.iterdir()):
                out.rmdir()
            raise
        interrupted = True
    pred_val = np.mean([r.val_predictions for r in results], axis=0)
    r = pearson(pred_val, data.y_val)
    targets = data.labels.targets
    first = json.loads((results[0].run_dir / "config.json").read_text())
    config = {k: v for k, v in first.items() if k not in ("model", "weights_sha256", "calibration")}
    config["options"] = _options_json(opts)
    config["members"] = [res.run_dir.name for res in results]
    _replace_file(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    metrics = {
        "val": {"pearson": dict(zip(targets, map(float, r))), "mean_pearson": float(r.mean())},
        "status": "interrupted" if interrupted else "complete",
        "n_train": len(data.train_seqs), "n_val": len(data.val_seqs), "seconds": time.time() - t0,
        "members": {res.run_dir.name: {"val_mean_pearson": res.val_mean_pearson, "best_epoch": res.best_epoch,
                                       "epochs_run": res.epochs_run} for res in results},
    }
    _replace_file(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
    return TrainResult(out, targets, dict(zip(targets, map(float, r))), float(r.mean()), results[0].best_epoch,
                       sum(res.epochs_run for res in results), len(data.train_seqs), len(data.val_seqs),
                       time.time() - t0, results[0].history, data.id_forms, interrupted, results[0].warnings,
                       tuple(res.run_dir for res in results), pred_val)


def _train(opts: TrainOptions, data: Prepared, progress: Callable[[Progress], None] | None, device) -> TrainResult:
    """One run (no ensemble): the ridge baseline or a network, its run directory written as it trains."""
    t0 = time.time()
    out = Path(opts.out)
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    train_seqs, val_seqs, t, mean, std = _standardised(opts, data)
    writer = _RunWriter(out, opts, data, t, mean, std)
    warnings = () if early_stopping(data) or opts.head == "ridge" else (
        f"validation has only {len(data.val_seqs)} videos (< {MIN_VAL_VIDEOS}): its Pearson r is noise, so "
        f"training ran all {opts.epochs} epochs without early stopping and kept the last; label more videos "
        "for validation",)
    if opts.head == "ridge":
        fitted = _fit_ridge(data, writer, train_seqs, val_seqs, t0)
    else:
        try:
            fitted = _fit_network(opts, data, writer, t, train_seqs, val_seqs, device, progress, t0)
        except KeyboardInterrupt:  # before the first epoch ended: nothing to keep
            if not existed and not any(out.iterdir()):
                out.rmdir()
            raise
    r_val, best_epoch, epochs_run, history, interrupted, pred_val = fitted
    targets = data.labels.targets
    return TrainResult(out, targets, dict(zip(targets, map(float, r_val))), float(r_val.mean()), best_epoch,
                       epochs_run, len(train_seqs), len(val_seqs), time.time() - t0, history, data.id_forms,
                       interrupted, warnings, (), pred_val)


def _standardised(opts: TrainOptions, data: Prepared) -> tuple[list[np.ndarray], list[np.ndarray], int, np.ndarray,
                                                                   np.ndarray]:
    """Training and validation videos after the stride, standardised with the training frames' mean and std and cut
    to t: (train, val, t, mean (F,), std (F,))."""
    raw_train = [s[::opts.stride] for s in data.train_seqs]
    longest = max(max(len(s) for s in raw_train), 1)
    t = int(opts.t or longest)
    all_train = np.concatenate([s for s in raw_train if len(s)])
    mean = all_train.mean(0).astype(np.float32)
    std = np.maximum(all_train.std(0), 1e-6).astype(np.float32)
    # Training and validation videos longer than t keep their first t frames (predict has its own policy).
    train_seqs = [s[:t] for s in standardize(raw_train, mean, std)]
    val_seqs = [s[:t] for s in standardize([s[::opts.stride] for s in data.val_seqs], mean, std)]
    return train_seqs, val_seqs, t, mean, std


def _fit_ridge(data: Prepared, writer: _RunWriter, train_seqs: list[np.ndarray], val_seqs: list[np.ndarray],
               t0: float) -> tuple:
    """The ridge baseline on per-video mean/max/std, written once; returns what `fit.fit_network` returns (no
    epochs, no history, no calibration: slope 1, intercept 0)."""
    from safetensors.numpy import save_file as save_numpy
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    n_targets = len(data.labels.targets)
    xs = pooled_stats(train_seqs)
    scaler = StandardScaler().fit(xs)
    ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(scaler.transform(xs), data.y_train)
    # sklearn drops the target axis when there is one target: (N,) predictions, (F,) coefficients.
    pred_val = ridge.predict(scaler.transform(pooled_stats(val_seqs))).astype(np.float32).reshape(len(val_seqs), -1)
    arrays = {"scaler_mean": scaler.mean_, "scaler_scale": scaler.scale_, "coef": np.atleast_2d(ridge.coef_),
              "intercept": np.atleast_1d(ridge.intercept_)}
    extra = {"ridge_alpha": float(ridge.alpha_)}
    # safetensors writes the raw buffer: sklearn's coef_ can be Fortran-ordered, so make every array C-ordered.
    r_val = writer.write(
        lambda p: save_numpy({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, str(p)),
        {"head": "ridge", **extra}, np.ones(n_targets, np.float32), np.zeros(n_targets, np.float32),
        pred_val, "complete", 0, 0, time.time() - t0, extra)
    return r_val, 0, 0, [], False, pred_val


def _fit_network(opts: TrainOptions, data: Prepared, writer: _RunWriter, t: int, train_seqs: list[np.ndarray],
                 val_seqs: list[np.ndarray], device, progress: Callable[[Progress], None] | None, t0: float) -> tuple:
    """A network head for `opts` (torch loads here); returns what `fit.fit_network` returns."""
    from .fit import fit_network

    model_cfg = ModelConfig(n_features=len(data.feature_names), n_targets=len(data.labels.targets), t=t,
                            head=opts.head, mask=opts.mask, rnn=opts.rnn, layers=opts.layers,
                            conv_blocks=opts.conv_blocks, hidden=opts.hidden, fc=opts.fc, dropout=opts.dropout,
                            skip_padding=opts.skip_padding)
    return fit_network(opts, data, writer, model_cfg, train_seqs, val_seqs, device, np.random.default_rng(opts.seed),
                       early_stopping(data), progress, t0)
