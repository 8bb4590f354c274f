"""Sweeps: configurations × seeds, in parallel processes (round-robin over devices), resumable, ranked.

Each (configuration, seed) trains into OUT/runs/<name>-<hash>/seed<N>/; a run whose metrics.json exists with the
same options is not rerun. Results: OUT/results.csv (one row per run) and OUT/ranked.csv (one row per
configuration: mean and std over seeds of the validation mean Pearson, best first).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields, replace
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from affextract.runtime import resolve_device

from .train import Prepared, TrainOptions, _options_json, prepare, train

if TYPE_CHECKING:
    from .cluster import RaySweep


@dataclass(frozen=True)
class Variant:
    name: str  # row label in the tables
    changes: tuple[tuple[str, object], ...]  # TrainOptions fields replaced in the base options


@dataclass(frozen=True)
class SweepOptions:
    base: TrainOptions  # data, split and defaults shared by every run (its `out` and `seed` are replaced)
    out: Path  # sweep directory
    variants: tuple[Variant, ...]  # configurations to run
    seeds: tuple[int, ...] = (0,)  # each configuration runs once per seed
    workers: int = 1  # parallel processes (1 = in this process)
    devices: tuple[str, ...] = ()  # devices dealt to runs round-robin, e.g. ("cuda:0", "cuda:1"); () = base.device
    ray: RaySweep | None = None  # run each configuration as a task on a Ray cluster (seqhead.cluster); None = here


@dataclass(frozen=True)
class SweepResult:
    runs: pd.DataFrame  # one row per (configuration, seed)
    ranked: pd.DataFrame  # one row per configuration, best mean validation Pearson first
    n_run: int  # runs trained now
    n_reused: int  # runs found finished and not rerun


# The paper's head and encoder with the training setting of the earlier default (batch 16, random batches): the
# rows of the Table-4 preset change one thing each from it.
_MRNN = (("head", "mrnn"), ("rnn", "gru"), ("hidden", 128), ("batch_size", 16), ("bucket", False))


def _paper(*changes: tuple[str, object]) -> tuple[tuple[str, object], ...]:
    return tuple(c for c in _MRNN if c[0] not in {k for k, _ in changes}) + changes


# Ablations like the paper's Table 4 (its ResNet50 row needs another frame CNN), all on the paper's head
# (GRU(128) → concat → Mask → FC(32) → FC, routing).
PRESETS: dict[str, tuple[Variant, ...]] = {
    "table4": (
        Variant("MRNN (paper): GRU(128) + FC(32)", _paper()),
        Variant("GRU + FC(64)", _paper(("fc", 64))),
        Variant("GRU + FC(16)", _paper(("fc", 16))),
        Variant("GRU + FC(8)", _paper(("fc", 8))),
        Variant("2 × GRU + FC(32)", _paper(("layers", 2))),
        Variant("LSTM + FC(32)", _paper(("rnn", "lstm"))),
        Variant("GRU(256) + FC(32)", _paper(("hidden", 256))),
        Variant("GRU(64) + FC(32)", _paper(("hidden", 64))),
        Variant("MRNN w/o Mask & Routing", _paper(("mask", False))),
        Variant("MRNN with MSE", _paper(("loss", "mse"))),
    ),
    # The paper's Table 3: feature groups, then the measured movement alone and added to the 26 values.
    "table3": tuple(Variant(" & ".join(g.upper() for g in combo), (("features", ",".join(combo)),))
                    for combo in [c for k in (1, 2, 3) for c in itertools.combinations(("va", "expr", "au"), k)]
                    + [("bs",), ("pose", "gaze"), ("bs", "pose", "gaze"), ("va", "expr", "au", "bs", "pose", "gaze")]),
    # Every head and both baselines (the paper's head and the MuSe style on their own GRU encoders).
    "heads": (
        Variant("mrnn (paper head, GRU(128))", _paper()),
        Variant("mean (masked mean pooling)", (("head", "mean"),)),
        Variant("attn (masked attention pooling)", (("head", "attn"),)),
        Variant("attn on GRU(128), batch 16 (earlier default)", (("rnn", "gru"), ("hidden", 128),
                                                                 ("batch_size", 16), ("bucket", False))),
        Variant("MuSe 2022 style: last state, MSE", (("head", "last"), ("loss", "mse"), ("skip_padding", "pack"),
                                                      ("rnn", "gru"), ("hidden", 128))),
        Variant("ridge on mean/max/std", (("head", "ridge"),)),
    ),
}


def _convert(name: str, text: str) -> object:
    """A TrainOptions field's value from text, by the type of the field."""
    ftype = {f.name: str(f.type) for f in fields(TrainOptions)}.get(name)
    if ftype is None or name in ("h5", "out", "labels"):
        raise ValueError(f"sweep axis {name!r} is not a training option")
    if text.lower() in ("none", "null") and "None" in ftype:
        return None
    if ftype.startswith("bool"):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(f"sweep axis {name}: {text!r} is not a boolean")
        return text.lower() in ("true", "1", "yes", "on")
    if ftype.startswith("int"):
        return int(text)
    if ftype.startswith("float"):
        return float(text)
    if ftype.startswith("tuple"):
        return tuple(text.split("+"))
    return text


def parse_grid(axes: list[str]) -> tuple[Variant, ...]:
    """Variants from axes like 'head=mrnn,mean' 'hidden=64,128' (their Cartesian product).

    A value list uses ',' (within one value, '+' joins tuple items, e.g. features=va+expr uses 'va,expr'
    as the feature string).
    """
    parsed = []
    for a in axes:
        if "=" not in a:
            raise ValueError(f"sweep axis {a!r}: write NAME=V1,V2,… (e.g. head=mrnn,mean)")
        k, vs = a.split("=", 1)
        k = k.strip().replace("-", "_")
        vals = [v.strip() for v in vs.split(",") if v.strip()]
        if k == "features":  # feature strings contain commas themselves: '+' separates groups here
            parsed.append((k, [v.replace("+", ",") for v in vals]))
        else:
            parsed.append((k, [_convert(k, v) for v in vals]))
    out = []
    for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in parsed]):
        out.append(Variant(" ".join(f"{k}={v}" for k, v in combo), tuple(combo)))
    return tuple(out)


# Options that change where and how fast a run trains, not what it trains: left out of a run's identity (its folder
# hash and the check that a finished run matches), so changing them reuses finished runs. `quiet` was an option of
# earlier versions (progress is a callback now).
EXECUTION_OPTIONS = ("out", "device", "threads", "quiet", "overwrite")
# Options added after sweeps existed: at these values they are left out of the identity, so earlier sweeps resume.
LATER_DEFAULTS = {"members": 1, "ema": 0.0}


def _identity(options: dict) -> dict:
    return {k: v for k, v in options.items()
            if k not in EXECUTION_OPTIONS and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


def _slug(v: Variant, opts: TrainOptions) -> str:
    # Seeds share a configuration directory.
    same = {k: v for k, v in _identity(_options_json(opts)).items() if k != "seed"}
    h = hashlib.sha1(json.dumps(same, sort_keys=True).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9]+", "-", v.name).strip("-")[:40] + "-" + h


_CACHE: dict[tuple, Prepared] = {}


def _data_key(o: TrainOptions) -> tuple:
    return (str(o.h5), str(o.labels), o.id_column, o.targets, o.split_column, o.group_column, o.val_fraction,
            o.allow_unmatched, o.features, o.no_face, o.seed)


def _run(opts: TrainOptions) -> dict:
    """Train one configuration (in a worker process or in-process), reusing data read earlier by this process."""
    key = _data_key(opts)
    if key not in _CACHE:
        _CACHE.clear()  # one data set at a time: they can be large
        _CACHE[key] = prepare(opts)
    res = train(opts, _CACHE[key])
    if res.interrupted:  # Ctrl-C reached this run: stop the sweep (the run keeps its best epoch; reruns later)
        raise KeyboardInterrupt
    return {"val_mean_pearson": res.val_mean_pearson, **{f"val_{k}": v for k, v in res.val_pearson.items()},
            "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "seconds": res.seconds}


def _done(run_dir: Path, opts: TrainOptions) -> dict | None:
    """The results of a finished run with the same identity, or None (missing, other options, or stopped early by
    Ctrl-C or a kill: those train again)."""
    m, c = run_dir / "metrics.json", run_dir / "config.json"
    if not (m.exists() and c.exists()):
        return None
    if _identity(json.loads(c.read_text())["options"]) != _identity(json.loads(json.dumps(_options_json(opts)))):
        return None
    met = json.loads(m.read_text())
    if met.get("status", "complete") != "complete":
        return None
    return {"val_mean_pearson": met["val"]["mean_pearson"],
            **{f"val_{k}": v for k, v in met["val"]["pearson"].items()},
            "best_epoch": met["best_epoch"], "epochs_run": met["epochs_run"], "seconds": met["seconds"]}


def sweep(opts: SweepOptions, progress=None) -> SweepResult:
    """Run every variant × seed not already finished; `progress(name, seed, row)` is called after each run."""
    for d in () if opts.ray else opts.devices or (opts.base.device,):  # on Ray, the devices are the nodes'
        resolve_device(d)  # a missing GPU is a one-line error before anything trains
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, rows, reused = [], [], 0
    for i, v in enumerate(opts.variants):
        for s in opts.seeds:
            o = replace(opts.base, seed=s, **dict(v.changes))
            if opts.devices:
                o = replace(o, device=opts.devices[len(jobs) % len(opts.devices)])
            run_dir = out / "runs" / _slug(v, o) / f"seed{s}"
            o = replace(o, out=run_dir, overwrite=True)  # the sweep owns its run directories: unfinished ones rerun
            row = {"config": v.name, "seed": s, "changes": json.dumps(dict(v.changes)), "run_dir": str(run_dir)}
            done = _done(run_dir, o)
            if done is not None:
                rows.append({**row, **done})
                reused += 1
            else:
                jobs.append((row, o))
    if opts.ray is not None:
        from .cluster import run_on_ray

        finished: dict[int, dict] = {}
        for i, result in run_on_ray(_run, [o for _, o in jobs], opts.ray):
            finished[i] = {**jobs[i][0], **result}
            if progress:
                progress(jobs[i][0]["config"], jobs[i][0]["seed"], finished[i])
        rows += [finished[i] for i in range(len(jobs))]
    elif opts.workers <= 1:
        for row, o in jobs:
            rows.append({**row, **_run(o)})
            if progress:
                progress(row["config"], row["seed"], rows[-1])
    else:
        with ProcessPoolExecutor(opts.workers, mp_context=get_context("spawn")) as pool:
            futures = [(row, pool.submit(_run, o)) for row, o in jobs]
            for row, fut in futures:
                rows.append({**row, **fut.result()})
                if progress:
                    progress(row["config"], row["seed"], rows[-1])
    runs = pd.DataFrame(rows)
    runs.to_csv(out / "results.csv", index=False)
    order = {v.name: i for i, v in enumerate(opts.variants)}
    g = runs.groupby("config", sort=False)
    ranked = pd.DataFrame({
        "config": list(g.groups),
        "val_mean_pearson": g["val_mean_pearson"].mean().to_numpy(),
        "std": g["val_mean_pearson"].std(ddof=0).to_numpy(),
        "seeds": g.size().to_numpy(),
        "best_epoch": g["best_epoch"].mean().to_numpy(),
        "seconds": g["seconds"].mean().to_numpy(),
    })
    ranked["order"] = ranked["config"].map(order)
    ranked = ranked.sort_values(["val_mean_pearson", "order"], ascending=[False, True]).drop(columns="order")
    ranked = ranked.reset_index(drop=True)
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    ranked.to_csv(out / "ranked.csv", index=False, float_format="%.4f")
    return SweepResult(runs, ranked, len(jobs), reused)
