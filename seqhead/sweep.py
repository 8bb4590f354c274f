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

import numpy as np
import pandas as pd

from .train import Prepared, TrainOptions, _options_json, prepare, train


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


@dataclass(frozen=True)
class SweepResult:
    runs: pd.DataFrame  # one row per (configuration, seed)
    ranked: pd.DataFrame  # one row per configuration, best mean validation Pearson first
    n_run: int  # runs trained now
    n_reused: int  # runs found finished and not rerun


# Ablations like the paper's Table 4 (its ResNet50 row needs another frame CNN), all on the paper's head
# (GRU(128) → concat → Mask → FC(32) → FC, routing).
PRESETS: dict[str, tuple[Variant, ...]] = {
    "table4": (
        Variant("MRNN (paper): GRU(128) + FC(32)", (("head", "mrnn"),)),
        Variant("GRU + FC(64)", (("head", "mrnn"), ("fc", 64))),
        Variant("GRU + FC(16)", (("head", "mrnn"), ("fc", 16))),
        Variant("GRU + FC(8)", (("head", "mrnn"), ("fc", 8))),
        Variant("2 × GRU + FC(32)", (("head", "mrnn"), ("layers", 2))),
        Variant("LSTM + FC(32)", (("head", "mrnn"), ("rnn", "lstm"))),
        Variant("GRU(256) + FC(32)", (("head", "mrnn"), ("hidden", 256))),
        Variant("GRU(64) + FC(32)", (("head", "mrnn"), ("hidden", 64))),
        Variant("MRNN w/o Mask & Routing", (("head", "mrnn"), ("mask", False))),
        Variant("MRNN with MSE", (("head", "mrnn"), ("loss", "mse"))),
    ),
    # The paper's Table 3: feature groups, then the measured movement alone and added to the 26 values.
    "table3": tuple(Variant(" & ".join(g.upper() for g in combo), (("features", ",".join(combo)),))
                    for combo in [c for k in (1, 2, 3) for c in itertools.combinations(("va", "expr", "au"), k)]
                    + [("bs",), ("pose", "gaze"), ("bs", "pose", "gaze"), ("va", "expr", "au", "bs", "pose", "gaze")]),
    # Every head and both baselines.
    "heads": (
        Variant("mrnn (paper head)", (("head", "mrnn"),)),
        Variant("mean (masked mean pooling)", (("head", "mean"),)),
        Variant("attn (masked attention pooling)", (("head", "attn"),)),
        Variant("MuSe 2022 style: last state, MSE", (("head", "last"), ("loss", "mse"), ("skip_padding", "pack"))),
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


def _slug(v: Variant, opts: TrainOptions) -> str:
    # Seeds share a configuration directory; the device does not change what is trained.
    same = {k: v for k, v in _options_json(opts).items() if k not in ("out", "quiet", "seed", "device")}
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
    return {"val_mean_pearson": res.val_mean_pearson, **{f"val_{k}": v for k, v in res.val_pearson.items()},
            "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "seconds": res.seconds}


def _done(run_dir: Path, opts: TrainOptions) -> dict | None:
    m, c = run_dir / "metrics.json", run_dir / "config.json"
    if not (m.exists() and c.exists()):
        return None
    def same(o: dict) -> dict:  # the device a run was dealt does not change what it trained
        return {k: v for k, v in o.items() if k not in ("device", "quiet")}

    if same(json.loads(c.read_text())["options"]) != same(json.loads(json.dumps(_options_json(opts)))):
        return None
    met = json.loads(m.read_text())
    return {"val_mean_pearson": met["val"]["mean_pearson"],
            **{f"val_{k}": v for k, v in met["val"]["pearson"].items()},
            "best_epoch": met["best_epoch"], "epochs_run": met["epochs_run"], "seconds": met["seconds"]}


def sweep(opts: SweepOptions, progress=None) -> SweepResult:
    """Run every variant × seed not already finished; `progress(name, seed, row)` is called after each run."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, rows, reused = [], [], 0
    for i, v in enumerate(opts.variants):
        for s in opts.seeds:
            o = replace(opts.base, seed=s, quiet=True, **dict(v.changes))
            if opts.devices:
                o = replace(o, device=opts.devices[len(jobs) % len(opts.devices)])
            run_dir = out / "runs" / _slug(v, replace(o, device=opts.base.device)) / f"seed{s}"
            o = replace(o, out=run_dir)
            row = {"config": v.name, "seed": s, "changes": json.dumps(dict(v.changes)), "run_dir": str(run_dir)}
            done = _done(run_dir, o)
            if done is not None:
                rows.append({**row, **done})
                reused += 1
            else:
                jobs.append((row, o))
    if opts.workers <= 1:
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
