"""`affextract run --ray` on a local Ray cluster against the plain run (worker processes), on the same clips.

    python benchmarks/bench_ray.py CLIP_OR_FOLDER... [--copies 2 --rounds 2 --no-movement --json FILE]

Starts one local cluster with every core (`ray.init(num_cpus=os.cpu_count())`, timed apart: a cluster job pays it once,
not per run), then runs the plain extraction and the Ray one in alternating pairs, each into a new file, and prints
the seconds of each, the ratio Ray / plain per pair and its median (the goal: at most 1.15), and whether the files are
equal. The plain run has the default worker count (half the cores, at most 8); the Ray run one actor (the MMA and
movement, on the GPU when there is one) and as many decode-detect-align tasks as the remaining CPUs hold. Both runs
include their own start-up (worker processes, actor, model loading).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from affextract.cluster import RayOptions, extract_on_ray
from affextract.extract import ExtractOptions, extract
from affextract.video import find_sources


def same_file(a: Path, b: Path) -> str:
    """"bit-identical", or the largest absolute difference of the datasets that differ (timestamps left out)."""
    worst, names = 0.0, []
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        if sorted(fa["videos"]) != sorted(fb["videos"]):
            return "different videos"
        for v in fa["videos"]:
            for d in fa["videos"][v]:
                x, y = fa["videos"][v][d][()], fb["videos"][v][d][()]
                if not np.array_equal(x, y, equal_nan=True):
                    names.append(f"{v}/{d}")
                    worst = max(worst, float(np.nanmax(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return "bit-identical" if not names else f"max |difference| {worst:.3g} in {len(names)} dataset(s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--copies", type=int, default=1, help="link each clip this many times (more videos in flight)")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of runs (plain, then Ray)")
    ap.add_argument("--no-movement", action="store_true")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    clips = work / "clips"
    clips.mkdir()
    for s in find_sources(a.inputs)[0]:
        for c in range(a.copies):
            os.symlink(s.path, clips / f"{c:03d}_{Path(s.key).name}")
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False,
             logging_level="ERROR")
    start = time.perf_counter() - t
    print(f"{len(list(clips.iterdir()))} videos, {os.cpu_count()} CPUs; local cluster started in {start:.1f} s")
    base = dict(movement=not a.no_movement)
    res: dict = {"cpus": os.cpu_count(), "videos": len(list(clips.iterdir())), "movement": not a.no_movement,
                 "cluster_start_s": start, "pairs": []}
    for r in range(a.rounds):
        times = {}
        for name in ("plain", "ray"):
            out = work / f"{name}{r}.h5"
            t = time.perf_counter()
            if name == "plain":
                report = extract(clips, out, ExtractOptions(**base))
            else:
                report = extract_on_ray(clips, out, ExtractOptions(**base), RayOptions(actors=a.actors))
            times[name] = time.perf_counter() - t
            times[f"{name}_frames"] = report.frames
        times["ratio"] = times["ray"] / times["plain"]
        times["equal"] = same_file(work / f"plain{r}.h5", work / f"ray{r}.h5")
        res["pairs"].append(times)
        print(f"pair {r + 1}: plain {times['plain']:.1f} s, ray {times['ray']:.1f} s ({times['ray_frames']} frames), "
              f"ray / plain {times['ratio']:.3f}; files {times['equal']}", flush=True)
    res["median_ratio"] = statistics.median(p["ratio"] for p in res["pairs"])
    print(f"median ray / plain: {res['median_ratio']:.3f} (goal <= 1.15); load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    res["loadavg_end"] = os.getloadavg()
    ray.shutdown()
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
