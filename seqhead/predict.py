"""Prediction from a run directory: every video of a features file, one row per video (the run itself is rebuilt
and applied by .infer, which also says how videos longer than t are handled and how an ensemble is averaged).

A features file made otherwise than the run's training file (another model, detector, alignment, frame sampling,
or movement stage for heads that read it) is refused unless `check_provenance=False`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .data import DataError, provenance_mismatch, read_features, read_provenance, video_id
from .infer import Ensemble, cpu_threads, load_run, not_a_run


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


def predict(opts: PredictOptions) -> PredictResult:
    """Predict every video of a features file; the run directory and the file are checked before torch loads."""
    from affextract.runtime import resolve_device

    run_dir = Path(opts.run_dir)
    if not (run_dir / "config.json").exists():
        raise not_a_run(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    warnings = _check_provenance(config, opts)
    device = resolve_device(opts.device)
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
