"""The Python API in one page: extract features, read them as arrays and a DataFrame, plot, export, train a head.

    python examples/api_example.py VIDEOS/ --workdir /tmp/api [--weights mma.safetensors]

The last part trains a seqhead on labels made up from the features themselves (mean happiness per video plus noise),
only to show the calls; with real data, point `labels` at your CSV (an id column + numeric targets).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import affextract
import seqhead


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="affextract + seqhead Python API example")
    p.add_argument("videos", type=Path, help="a folder of videos")
    p.add_argument("--workdir", type=Path, default=Path("api_example"))
    p.add_argument("--weights", type=Path, help="MMA weights (default: the shipped ones)")
    p.add_argument("--epochs", type=int, default=10)
    a = p.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    h5 = a.workdir / "features.h5"

    # 1. Extraction: the same as `affextract run VIDEOS/ features.h5 --fps 10`.
    report = affextract.extract([a.videos], h5, affextract.ExtractOptions(weights=a.weights, fps=10.0))
    n = len(report.written)
    print(f"{n} video{'' if n == 1 else 's'} extracted, {len(report.failed)} failed, {report.frames} frames "
          f"in {report.seconds:.1f} s")

    # 2. Reading: per-video arrays, named features, one DataFrame for everything.
    with affextract.open_features(h5) as ff:
        print(ff)
        for video in ff:  # one video in memory at a time
            happy = video["happiness"][video.face]  # (frames with a face,)
            print(f"  {video.key}: {len(video)} frames, face on {video.face.mean():.0%}, "
                  f"mean happiness {np.mean(happy) if len(happy) else float('nan'):.3f}")
        df = ff.dataframe()  # columns: video, frame, time, face, valence, arousal, neutral, ..., AU26
    per_video = df[df.face].groupby("video")[["valence", "arousal", "happiness", "AU12"]].mean()
    print(per_video.round(3).to_string())

    # 3. A timeline plot and an OpenFace-style table.
    most_faces = df.groupby("video").face.sum().idxmax()
    affextract.plot_timeline(h5, most_faces, a.workdir / "timeline.png",
                             affextract.PlotOptions(crops=6, root=a.videos))
    table = affextract.export(h5, a.workdir / "frames.parquet", affextract.ExportOptions(format="parquet"))
    print(f"plot → {a.workdir / 'timeline.png'}; {table.rows} rows → {table.output}")

    # 4. A sequence head on made-up labels (see the docstring): train, predict, evaluate. The made-up label is a mean
    # over face frames, so a video without any face gets none; allow_unmatched=True trains on the labelled videos.
    # (With real labels every video has a row, and one without a face is kept: the head sees it as one zero frame.)
    rng = np.random.default_rng(0)
    labels = per_video[["happiness"]].rename(columns={"happiness": "made_up_score"}).reset_index()
    labels["made_up_score"] += rng.normal(0, 0.2 * (labels.made_up_score.std() or 1e-3), len(labels))
    labels.to_csv(a.workdir / "labels.csv", index=False)
    if len(labels) < 4:
        print("fewer than 4 videos with a face: not enough to train and validate a head")
        return
    result = seqhead.train(seqhead.TrainOptions(h5=h5, out=a.workdir / "run", labels=a.workdir / "labels.csv",
                                                val_fraction=0.5, batch_size=2, epochs=a.epochs,
                                                overwrite=True, allow_unmatched=True))
    print(f"validation mean Pearson {result.val_mean_pearson:.3f} ({result.n_train} train / {result.n_val} val)")
    pred = seqhead.predict(seqhead.PredictOptions(run_dir=result.run_dir, h5=h5, out=a.workdir / "predictions.csv"))
    print(pred.table.head().to_string(index=False))
    score = seqhead.evaluate(seqhead.EvaluateOptions(predictions=a.workdir / "predictions.csv",
                                                     labels=a.workdir / "labels.csv"))
    print(f"Pearson on the {score.n} labelled videos (training ones included): {score.mean_pearson:.3f}")


if __name__ == "__main__":
    main()
