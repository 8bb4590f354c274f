"""Which training default holds across simulator families: a single run, an ensemble of seeds, or an EMA of weights.

Every setting (simulator family) is simulated once; on it each candidate trains several times and is scored on the
set's held-out test split (`predict` on the run directory, Pearson per target, then the mean):
  single    the default head and training (`seqhead train`), 9 seeds (the members of the three ensembles below)
  ensemble  `seqhead train --seeds 3`, three ensembles (seeds 0–2, 3–5, 6–8)
  ema       `seqhead train --ema 0.95`, 3 seeds

The rule that picks the default, fixed before any score was seen: rank the candidates within each setting by their
mean test score over repeats (1 = best); the default is the candidate with the lowest mean rank over all settings;
a tie goes to the better worst rank, then to the cheaper candidate.

    nice python benchmarks/seqhead_defaults.py --workdir scratch/defaults --workers 2   # --scale 0.02 --max-len 240
                                                                    # --epochs 20 --patience 5 (the defaults)
    python benchmarks/seqhead_defaults.py --workdir scratch/defaults --table   # the tables from results.json
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

# name → SimulateOptions changes
SETTINGS = {
    "episode": dict(setting="episode"),
    "peak": dict(setting="peak"),
    "late": dict(setting="late"),
    "subject": dict(setting="subject"),
    "groups": dict(setting="groups"),
    "episode, label noise 0.2": dict(setting="episode", label_noise=0.2),
}
# name → (TrainOptions changes, seeds each repeat starts at); the order is the tie-break by cost (cheapest first)
CANDIDATES = {
    "single": None,  # read from the ensembles' members
    "ema": (dict(ema=0.95), (0, 1, 2)),
    "ensemble": (dict(members=3), (0, 3, 6)),
}


def _h5(workdir: Path, setting: str) -> Path:
    return workdir / "data" / (setting.replace(", ", "-").replace(" ", "_") + ".h5")


def _test_score(run_dir: Path, h5: Path) -> float:
    """Mean test Pearson of a run directory (single or ensemble) on the file's Test split."""
    from seqhead.data import match, read_features, read_labels
    from seqhead.infer import load_run
    from seqhead.metrics import pearson

    labels = read_labels(h5.with_name(h5.stem + ".csv"))
    videos, _ = read_features(h5)
    rows, vids, _ = match(labels, videos)
    test = [k for k, r in enumerate(rows) if labels.split[r] == "test"]
    run = load_run(run_dir)
    pred = run.predict_seqs([videos[vids[k]].frames for k in test], "windows")
    return float(pearson(pred, labels.y[[rows[k] for k in test]]).mean())


def _job(args: tuple) -> list[dict]:
    """Train one candidate repeat; score it (and, for an ensemble, each member as a single run) on test."""
    from seqhead.train import TrainOptions, train

    workdir, setting, cand, seed, epochs, patience = args
    h5 = _h5(workdir, setting)
    changes, _ = CANDIDATES[cand]
    out = workdir / "runs" / h5.stem / f"{cand}-{seed}"
    opts = replace(TrainOptions(h5=h5, out=out, labels=h5.with_name(h5.stem + ".csv"), seed=seed, epochs=epochs,
                                patience=patience, overwrite=True), **changes)
    t0 = time.time()
    res = train(opts)
    rows = [dict(setting=setting, candidate=cand, seed=seed, val=res.val_mean_pearson, test=_test_score(out, h5),
                 seconds=time.time() - t0, n_train=res.n_train, n_val=res.n_val)]
    for m in res.members:
        met = json.loads((m / "metrics.json").read_text())
        rows.append(dict(setting=setting, candidate="single", seed=int(m.name[4:]), val=met["val"]["mean_pearson"],
                         test=_test_score(m, h5), seconds=met["seconds"], n_train=res.n_train, n_val=res.n_val,
                         best_epoch=met["best_epoch"]))
    return rows


def _simulate(workdir: Path, setting: str, scale: float, max_len: int) -> None:
    from seqhead.simulate import SimulateOptions, simulate

    h5 = _h5(workdir, setting)
    if not h5.exists():
        simulate(SimulateOptions(h5, h5.with_name(h5.stem + ".csv"), scale=scale, max_len=max_len, seed=1,
                                 **SETTINGS[setting]))


def tables(results: list[dict]) -> str:
    """Markdown: per setting and candidate the test mean ± std over repeats (and validation), the ranks, the rule."""
    import pandas as pd

    df = pd.DataFrame(results)
    order = list(CANDIDATES)
    g = df.groupby(["setting", "candidate"])
    stats = g.agg(test=("test", "mean"), sd=("test", "std"), val=("val", "mean"), n=("test", "size"),
                  s=("seconds", "mean")).reset_index()
    settings = [s for s in SETTINGS if s in set(df.setting)]
    lines = ["| setting | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
    ranks = {c: [] for c in order}
    for s in settings:
        row = stats[stats.setting == s].set_index("candidate")
        r = row["test"].rank(ascending=False, method="min")
        cells = []
        for c in order:
            if c not in row.index:
                cells.append("–")
                continue
            ranks[c].append(int(r[c]))
            cells.append(f"{row.test[c]:.3f} ± {row.sd[c]:.3f} (val {row.val[c]:.3f}, n={row.n[c]}, "
                         f"rank {int(r[c])})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    summary = sorted(order, key=lambda c: (np.mean(ranks[c]), max(ranks[c]), order.index(c)))
    lines += ["", "| candidate | mean rank | worst rank | mean s per repeat |", "|---|---|---|---|"]
    for c in summary:
        lines.append(f"| {c} | {np.mean(ranks[c]):.2f} | {max(ranks[c])} | "
                     f"{stats[stats.candidate == c].s.mean():.0f} |")
    lines += ["", f"By the rule: **{summary[0]}**."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("scratch/defaults"))
    ap.add_argument("--scale", type=float, default=0.02, help="simulated size (0.02: 316 / 93 / 92 videos)")
    ap.add_argument("--max-len", type=int, default=240, help="longest video (frames; the subject setting has its own)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--settings", default=";".join(SETTINGS), help="';'-separated names from SETTINGS")
    ap.add_argument("--table", action="store_true", help="only print the tables of results.json")
    args = ap.parse_args()
    results_path = args.workdir / "results.json"
    if args.table:
        print(tables(json.loads(results_path.read_text())))
        return
    settings = args.settings.split(";")
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["setting"], r["candidate"], r["seed"]) for r in results}
    for s in settings:
        _simulate(args.workdir, s, args.scale, args.max_len)
    jobs = [(args.workdir, s, c, seed, args.epochs, args.patience)
            for c, spec in CANDIDATES.items() if spec for seed in spec[1] for s in settings
            if (s, c, seed) not in done]
    # Setting by setting (a stopped run leaves whole settings), the long ones first within each.
    jobs.sort(key=lambda j: (settings.index(j[1]), j[2] != "ensemble"))
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        for rows in pool.map(_job, jobs):
            results += rows
            results_path.write_text(json.dumps(results, indent=1))
            r = rows[0]
            print(f"{r['setting']:26s} {r['candidate']:9s} seed {r['seed']}: val {r['val']:.3f} test {r['test']:.3f} "
                  f"({r['seconds']:.0f}s)", flush=True)
    print(tables(results))


if __name__ == "__main__":
    main()
