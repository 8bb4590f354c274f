"""Evaluation of a predictions CSV against a label CSV: Pearson per target and their mean (the challenge metric)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .data import DataError, SPLIT_NAMES, _examples, id_forms, match_ids, normalize_id, read_labels
from .metrics import pearson


@dataclass(frozen=True)
class EvaluateOptions:
    predictions: Path  # CSV from `seqhead predict` (id column + target columns)
    labels: Path  # label CSV
    id_column: str | None = None  # label id column (None = auto, as in train)
    split: str | None = None  # evaluate only rows of this split (train | val | test; needs a split column)
    split_column: str | None = None  # None = auto


@dataclass(frozen=True)
class EvaluateResult:
    pearson: dict[str, float]  # per target
    mean_pearson: float
    n: int  # videos evaluated
    n_unmatched: int  # labelled rows (after the split filter) with no prediction


def evaluate(opts: EvaluateOptions) -> EvaluateResult:
    """Pearson per target over the videos present in both files; targets are the label columns predicted."""
    pred_path = Path(opts.predictions)
    if not pred_path.exists():
        raise DataError(f"{pred_path}: no such predictions file")
    pred = pd.read_csv(pred_path, dtype={0: str}, keep_default_na=False)
    pid = pred.columns[0]
    labels = read_labels(opts.labels, opts.id_column, split_column=opts.split_column)
    targets = [t for t in labels.targets if t in pred.columns]
    if not targets:
        raise DataError(f"{pred_path}: none of the label targets {list(labels.targets)} is a column "
                        f"(columns: {list(pred.columns)})")
    rows = np.arange(len(labels.ids))
    if opts.split:
        want = SPLIT_NAMES.get(opts.split.lower())
        if labels.split is None or want is None:
            raise DataError(f"{labels.path}: cannot select split {opts.split!r} (split column: "
                            f"{'none' if labels.split is None else 'found'}; use train, val or test)")
        rows = np.array([i for i in rows if labels.split[i] == want], dtype=int)
    pred_ids = [normalize_id(v) for v in pred[pid]]
    if len(set(pred_ids)) < len(pred_ids):
        raise DataError(f"{pred_path}: duplicate ids in column {pid!r}")
    # Predictions may name videos by relative path while labels use stems, file names or numbers (or the reverse):
    # each labelled row is matched on its own, as in training.
    found, _ = match_ids([labels.ids[r] for r in rows], [id_forms(i, i) for i in pred_ids])
    hit = [rows[k] for k in sorted(found)]
    if not hit:
        raise DataError(f"{pred_path}: no id matches a labelled row of {labels.path} (prediction ids like "
                        f"{_examples(pred_ids[:3])}; label ids like {_examples(labels.ids[:3])})")
    index = {rows[k]: found[k][0] for k in found}
    p = np.stack([pd.to_numeric(pred[t]).to_numpy(np.float64) for t in targets], 1)[
        [index[r] for r in hit]]
    cols = [labels.targets.index(t) for t in targets]
    y = labels.y[np.asarray(hit)][:, cols].astype(np.float64)
    if np.isnan(y).any():
        raise DataError(f"{labels.path}: the evaluated rows have missing targets (a test split without labels?)")
    r = pearson(p, y)
    return EvaluateResult(dict(zip(targets, map(float, r))), float(r.mean()), len(hit), len(rows) - len(hit))
