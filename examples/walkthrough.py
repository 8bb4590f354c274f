"""End to end on your own clips: extract → info → plot → export → simulate labels → seqhead train → predict → evaluate.

    python examples/walkthrough.py VIDEOS/ --workdir /tmp/wt

Every step runs the same command a user types (printed before it runs), so the output reads as a tutorial.

The labels are SIMULATED, because a folder of clips has none: the clips are cut into short segments, and each segment
gets two scores computed from its own extracted features plus noise (`smile_score` from happiness, AU6 and AU12;
`tension_score` from AU4, AU7 and arousal). A head that learns them shows the pipeline works end to end; the numbers
say nothing about real affect. With real labels you skip step 5 and pass your CSV to `seqhead train --labels`.
Segments of one clip are alike, and the random train/val split puts segments of the same clip on both sides, so the
validation score is optimistic; with real data, keep subjects apart (`seqhead train --group-column`).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def command(name: str, *args) -> None:
    """Print and run `name args...` (affextract or seqhead), stopping the walkthrough if it fails."""
    args = [str(a) for a in args]
    print(f"\n$ {name} {' '.join(shlex.quote(a) for a in args)}", flush=True)
    exe = Path(sys.executable).with_name(name)  # the entry point installed beside this Python
    if exe.exists():
        argv = [str(exe), *args]
    else:
        argv = [sys.executable, "-c", f"from {name}.cli import app; app()", *args]
    done = subprocess.run(argv)
    if done.returncode not in (0, 1):  # affextract run exits 1 when some files failed: the rest is still usable
        sys.exit(f"`{name} {args[0]}` failed (exit code {done.returncode}); see its message above")


def segment(features: Path, out: Path, seconds: float) -> list[str]:
    """Cut every stored video into consecutive segments of `seconds`, written as videos of a new feature file.

    A segment keeps its frames' original indices, times and source path, so `affextract plot` works on it too.
    Segments without any face frame are left out (nothing to learn from). Returns the segment keys.
    """
    from dataclasses import replace

    from affextract import open_features
    from affextract.store import FeatureWriter

    keys = []
    with open_features(features) as ff, FeatureWriter(out, ff.provenance, overwrite=True) as writer:
        for v in ff:  # the segments come from the same model and detector: the provenance carries on
            if len(v) < 2:
                continue  # a still image has no time to cut
            bins = np.floor((v.time - v.time[0]) / seconds).astype(int)
            for b in np.unique(bins):
                rows = np.flatnonzero(bins == b)
                if not v.face[rows].any() or v.time[rows[-1]] - v.time[rows[0]] < seconds / 2:
                    continue  # no face, or a stub at the end of the clip
                key = f"{v.key.replace('/', '__')}_seg{b:03d}"
                writer.add(replace(v.take(rows), key=key))
                keys.append(key)
    return keys


def simulate_labels(segments: Path, out: Path, seed: int = 0, val_fraction: float = 0.25) -> pd.DataFrame:
    """Two scores per segment computed from its features (plus 20 % noise) and a random Train/Val split."""
    from affextract import open_features

    rng = np.random.default_rng(seed)
    rows = []
    with open_features(segments) as ff:
        for v in ff:
            face = v.face
            smile = np.mean(v["happiness"][face] + 0.5 * v["AU6"][face] + 0.5 * v["AU12"][face])
            tension = np.mean(v["AU4"][face] + v["AU7"][face] + 0.5 * (v["arousal"][face] + 1))
            rows.append({"video": v.key, "smile_score": smile, "tension_score": tension})
    df = pd.DataFrame(rows)
    for col in ("smile_score", "tension_score"):
        df[col] += rng.normal(0, 0.2 * (df[col].std() or 1e-3), len(df))
    n_val = max(2, round(val_fraction * len(df)))
    split = np.array(["Train"] * len(df), dtype=object)
    split[rng.permutation(len(df))[:n_val]] = "Val"
    df["split"] = split
    df.to_csv(out, index=False)
    return df


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("videos", nargs="+", type=Path, help="video files or folders")
    p.add_argument("--workdir", type=Path, default=Path("walkthrough"), help="where every output goes")
    p.add_argument("--weights", type=Path, help="MMA weights (default: the weights shipped with affextract)")
    p.add_argument("--fps", type=float, default=10.0, help="frames analysed per second (0 = every frame)")
    p.add_argument("--segment", type=float, default=1.0, help="segment length in seconds for the simulated labels")
    p.add_argument("--head", default="mean", help="seqhead head: mean | attn | mrnn | last | ridge")
    p.add_argument("--epochs", type=int, default=20, help="seqhead training epochs (upper bound)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    a = p.parse_args(argv)

    wd = a.workdir
    wd.mkdir(parents=True, exist_ok=True)
    features, segments, labels = wd / "features.h5", wd / "segments.h5", wd / "labels.csv"
    run_dir, predictions = wd / "run", wd / "predictions.csv"

    print("== 1. extract per-frame features (resumable: rerunning skips finished videos)")
    extra = (["--weights", a.weights] if a.weights else []) + (["--fps", a.fps] if a.fps else [])
    command("affextract", "run", *a.videos, features, "--device", a.device, "--quiet", *extra)

    print("\n== 2. what was extracted")
    command("affextract", "info", features)

    print("\n== 3. plot the clip with the most face frames, with a contact sheet of its aligned faces")
    from affextract import open_features

    with open_features(features) as ff:
        if not ff.keys:
            sys.exit(f"no video of {', '.join(map(str, a.videos))} could be decoded; see the errors above")
        best = max(ff, key=lambda v: int(v.face.sum()))
    root = a.videos[0] if len(a.videos) == 1 and a.videos[0].is_dir() else None
    where = ["--root", root] if root else ["--video-path", next(v for v in a.videos if v.name == Path(best.key).name)]
    command("affextract", "plot", features, best.key, "-o", wd / "timeline.png", "--crops", *where)

    print("\n== 4. export one row per frame (OpenFace-style columns) for other tools")
    command("affextract", "export", features, "--format", "csv", "-o", wd / "frames.csv")

    print(f"\n== 5. SIMULATED labels: {a.segment:g}-second segments scored from their own features plus noise")
    keys = segment(features, segments, a.segment)
    if len(keys) < 8:
        sys.exit(f"only {len(keys)} segments with a face: give longer clips, more clips or a shorter --segment")
    df = simulate_labels(segments, labels)
    print(f"{len(keys)} segments → {segments}; labels → {labels} "
          f"({(df.split == 'Train').sum()} train, {(df.split == 'Val').sum()} val)")
    print(df.head().to_string(index=False))

    print("\n== 6. train a sequence head on the segments (split from the labels' `split` column)")
    command("seqhead", "train", segments, "--labels", labels, "--out", run_dir, "--head", a.head,
            "--epochs", a.epochs, "--batch-size", 8, "--device", a.device, "--overwrite")

    print("\n== 7. predict every segment with the trained run")
    command("seqhead", "predict", run_dir, segments, "-o", predictions, "--device", a.device)

    print("\n== 8. evaluate the predictions on the validation segments (Pearson per target, then the mean)")
    command("seqhead", "evaluate", predictions, "--labels", labels, "--split", "val")

    print(f"\nDone. Everything is in {wd}: features.h5, timeline.png, frames.csv, segments.h5, labels.csv, "
          f"run/ (weights, config, metrics, learning curve), predictions.csv")
    if shutil.which("affextract") is None:
        print("(the `affextract` and `seqhead` commands live in this Python's bin folder; activate its environment)")


if __name__ == "__main__":
    main()
