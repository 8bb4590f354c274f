"""Command line: each command parses its options, calls one library function and renders the result with rich."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from affextract.console import CliConsole, plural

from .data import DataError, UnmatchedError

app = typer.Typer(help="Sequence heads (paper's masked GRU + routing, pooling heads, baselines) on cached "
                       "affextract features.", no_args_is_help=True, add_completion=False)
console = CliConsole(stderr=True)
out_console = CliConsole()


def _version(value: bool) -> None:
    if value:
        from affextract.version import __version__

        print(f"seqhead {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass

# Options shared by `train` and `sweep` (the sweep's base configuration).
Labels = Annotated[Optional[Path], typer.Option(help="Label CSV (default: labels.csv beside the features file).")]
IdColumn = Annotated[Optional[str], typer.Option(help="Label id column (default: File_ID, id, video, … or the "
                                                      "first).")]
Targets = Annotated[Optional[str], typer.Option(help="Comma-separated target columns (default: the 7 Hume columns, "
                                                     "else every numeric column).")]
SplitColumn = Annotated[Optional[str], typer.Option(help="Split column with Train/Val/Test (default: auto; '' = "
                                                         "none, split by --val-fraction).")]
GroupColumn = Annotated[Optional[str], typer.Option(help="Subject column: a random split keeps subjects apart.")]
ValFraction = Annotated[float, typer.Option(help="Validation share when there is no split column.")]
AllowUnmatched = Annotated[bool, typer.Option(help="Use the matched ids when some exist on one side only.")]
Features = Annotated[str, typer.Option(help="Feature groups: any of va,expr,au (the 26 values) and bs,pose,gaze (measured movement).")]
NoFace = Annotated[str, typer.Option(help="Frames without a face: drop (l = frames kept) | fill (repeat last face).")]
T = Annotated[Optional[int], typer.Option("--t", help="Padded length t (default: longest training video; paper: 480).")]
Epochs = Annotated[int, typer.Option(help="Maximum epochs (early stopping on validation mean Pearson).")]
Patience = Annotated[int, typer.Option(help="Epochs without improvement before stopping.")]
BatchSize = Annotated[int, typer.Option(help="Videos per step (paper: 4).")]
Lr = Annotated[float, typer.Option(help="Adam learning rate (paper: 1e-4).")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")]
Threads = Annotated[int, typer.Option(help="Torch CPU threads per process (0 = torch's default, all cores: much "
                                           "slower when another process is busy).")]
MaxBatches = Annotated[Optional[int], typer.Option(help="Cap on batches per epoch (smoke runs, benchmarks).")]


def _fail(e: Exception) -> None:
    text = e.naming("--allow-unmatched") if isinstance(e, UnmatchedError) else str(e)
    console.print(f"[red]error:[/red] {escape(text)}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


class _TrainProgress:
    """Renders `train`'s progress on stderr: a live step bar on a terminal; elsewhere (a pipe, a log file) plain
    lines, one per quarter of an epoch and one per epoch, without control characters."""

    def __init__(self):
        self.bar = None
        self.quarter = 1

    def _line(self, text: str) -> None:
        console.print(text, soft_wrap=True, highlight=False, markup=False)

    def __call__(self, p) -> None:
        if p.member and p.step == 1 and p.epoch == 1 and p.val_mean_pearson is None:
            self._line(f"ensemble member {p.member}/{p.members}")
        if p.val_mean_pearson is not None:  # the epoch ended
            if self.bar is not None:
                self.bar.stop()
                self.bar = None
            self.quarter = 1
            best = "best so far, saved" if p.best_epoch == p.epoch else f"best: epoch {p.best_epoch}"
            self._line(f"epoch {p.epoch}/{p.epochs}: {plural(p.steps, 'step')} in {p.seconds:.1f}s "
                       f"({1000 * p.seconds / max(p.steps, 1):.0f} ms/step), train loss {p.train_loss:.4f}, "
                       f"val mean Pearson {p.val_mean_pearson:.4f} ({best})")
        elif console.is_terminal:
            if self.bar is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self.bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                                    console=console, transient=True)
                self.task = self.bar.add_task("", total=p.steps, epoch=f"{p.epoch}/{p.epochs}", loss=p.train_loss)
                self.bar.start()
            self.bar.update(self.task, completed=p.step, loss=p.train_loss)
        elif p.step < p.steps and 4 * p.step >= self.quarter * p.steps:
            self.quarter = 4 * p.step // p.steps + 1
            self._line(f"epoch {p.epoch}/{p.epochs}: step {p.step}/{p.steps} ({100 * p.step // p.steps}%), "
                       f"{p.seconds:.1f}s, train loss {p.train_loss:.4f}")


def _pearson_table(title: str, per_target: dict[str, float], mean: float) -> Table:
    table = Table(title=title)
    table.add_column("target")
    table.add_column("Pearson", justify="right")
    for k, v in per_target.items():
        table.add_row(k, f"{v:.4f}")
    table.add_row("[bold]mean[/bold]", f"[bold]{mean:.4f}[/bold]")
    return table


@app.command()
def train(
    h5: Annotated[Path, typer.Argument(help="Features file (affextract HDF5, format v1).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")] = Path("runs/seqhead"),
    labels: Labels = None,
    id_column: IdColumn = None,
    targets: Targets = None,
    split_column: SplitColumn = None,
    group_column: GroupColumn = None,
    val_fraction: ValFraction = 0.2,
    allow_unmatched: AllowUnmatched = False,
    features: Features = "va,expr,au",
    no_face: NoFace = "drop",
    t: T = None,
    head: Annotated[str, typer.Option(help="attn | mean | mrnn (paper) | last | ridge.")] = "attn",
    mask: Annotated[bool, typer.Option(help="Mask (and routing for mrnn); --no-mask = paper's w/o Mask & "
                                            "Routing.")] = True,
    rnn: Annotated[str, typer.Option(help="Encoder: conv (dilated convolutions, parallel in time) | gru (paper) | "
                                          "lstm.")] = "conv",
    layers: Annotated[int, typer.Option(help="Recurrent layers.")] = 1,
    conv_blocks: Annotated[int, typer.Option(help="conv encoder: residual blocks (receptive field 1 + "
                                                  "2·(2^blocks − 1) frames).")] = 4,
    stride: Annotated[int, typer.Option(help="Keep every n-th kept frame (predict does the same).")] = 1,
    hidden: Annotated[int, typer.Option(help="Encoder width (recurrent units or conv channels; paper: GRU 128).")]
    = 64,
    fc: Annotated[int, typer.Option(help="Units of the first FC.")] = 32,
    dropout: Annotated[float, typer.Option(help="Dropout before each FC.")] = 0.0,
    loss: Annotated[str, typer.Option(help="pearson (Eq. 4) | mse.")] = "pearson",
    batch_size: BatchSize = 32,
    lr: Lr = 3e-3,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 0.0,
    clip: Annotated[float, typer.Option(help="Maximum gradient norm (0 = none).")] = 1.0,
    epochs: Epochs = 30,
    patience: Patience = 6,
    seed: Annotated[int, typer.Option(help="Seed for weights, batches and a random split.")] = 0,
    skip_padding: Annotated[str, typer.Option(help="truncate | pack | none.")] = "truncate",
    bucket: Annotated[bool, typer.Option(help="Length-sorted batches (less padding).")] = True,
    device: Device = "auto",
    threads: Threads = 1,
    max_batches: MaxBatches = None,
    paper: Annotated[bool, typer.Option(help="The paper's setting: --head mrnn --rnn gru --hidden 128 --batch-size 4 "
                                             "--lr 1e-4 --t 480 --no-bucket, one run.")] = False,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="Ensemble: train seeds seed … seed+N−1 on one "
                                                                 "split into OUT/seed<N>/; predict averages them "
                                                                 "(default 3; 1 = one run; --paper: 1).")] = None,
    ema: Annotated[float, typer.Option(help="Keep an exponential moving average of the weights with this per-step "
                                            "decay, e.g. 0.99 (0 = off).")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace the run already in --out (otherwise a non-empty --out is "
                                                 "refused).")] = False,
):
    """Train a head on cached features and write a run directory (weights, config, metrics, learning curve)."""
    from .train import TrainOptions, train as run_train

    if paper:
        head, rnn, hidden, batch_size, lr, t, bucket = "mrnn", "gru", 128, 4, 1e-4, t or 480, False
    if seeds is None:
        seeds = 1 if paper else TrainOptions.members
    try:
        opts = TrainOptions(h5=h5, out=out, labels=labels, id_column=id_column,
                            targets=tuple(targets.split(",")) if targets else None, split_column=split_column,
                            group_column=group_column, val_fraction=val_fraction, allow_unmatched=allow_unmatched,
                            features=features, no_face=no_face, stride=stride, t=t, head=head, mask=mask, rnn=rnn,
                            layers=layers, conv_blocks=conv_blocks, hidden=hidden, fc=fc, dropout=dropout, loss=loss,
                            batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, clip=clip, epochs=epochs, patience=patience, seed=seed,
                            skip_padding=skip_padding, bucket=bucket, device=device, threads=threads,
                            max_batches=max_batches, members=seeds, ema=ema, overwrite=overwrite)
        res = run_train(opts, progress=_TrainProgress())
    except (DataError, ValueError) as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print(f"interrupted before the first epoch ended: nothing kept in {out}", soft_wrap=True)
        raise typer.Exit(130)
    _show_trained(res, head)


def _show_trained(res, head: str) -> None:
    """How the ids matched, warnings, the validation table and where the run is; exit 130 when Ctrl-C ended it."""
    console.print("ids matched by " + ", ".join(f"{f} ({n} rows)" for f, n in res.id_forms.items()), soft_wrap=True,
                  highlight=False)
    for w in res.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", soft_wrap=True, highlight=False)
    what = f"{head}, ensemble of {len(res.members)}" if res.members else head
    out_console.print(_pearson_table(f"{what}: validation ({plural(res.n_val, 'video')}, {res.n_train} for training)",
                                     res.val_pearson, res.val_mean_pearson))
    if res.interrupted and res.members:
        console.print(f"interrupted: {res.run_dir} holds an ensemble of the {len(res.members)} member(s) trained so "
                      f"far; `seqhead predict {res.run_dir} FEATURES.h5` uses it", soft_wrap=True, highlight=False)
        raise typer.Exit(130)
    if res.interrupted:
        console.print(f"interrupted after epoch {res.epochs_run}: {res.run_dir} holds the best epoch so far "
                      f"({res.best_epoch}); `seqhead predict {res.run_dir} FEATURES.h5` uses it", soft_wrap=True,
                      highlight=False)
        raise typer.Exit(130)
    if res.members:
        console.print(f"{len(res.members)} members ({', '.join(m.name for m in res.members)}), {res.seconds:.1f}s "
                      f"→ {res.run_dir}")
    else:
        console.print(f"best epoch {res.best_epoch} of {res.epochs_run}, {res.seconds:.1f}s → {res.run_dir}")


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `seqhead train`.")],
    h5: Annotated[Path, typer.Argument(help="Features file with the videos to predict.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Predictions CSV (id + one column per target).")]
    = Path("predictions.csv"),
    long_videos: Annotated[str, typer.Option(help="Videos longer than t: windows (average over t-frame windows) | "
                                                  "truncate (first t frames).")] = "windows",
    batch_size: Annotated[int, typer.Option(help="Videos per forward pass.")] = 64,
    device: Device = "auto",
    threads: Threads = 1,
    ignore_provenance: Annotated[bool, typer.Option(help="Predict even when the features file was made otherwise "
                                                         "(model, detector, alignment, sampling, movement) than the "
                                                         "run's training file.")] = False,
):
    """Predict every video of a features file with a trained run (or ensemble); one row per video."""
    from .predict import PredictOptions, predict as run_predict

    try:
        res = run_predict(PredictOptions(run_dir, h5, out, long_videos, batch_size, device, threads,
                                         check_provenance=not ignore_provenance))
    except (DataError, ValueError) as e:
        _fail(e)
    for w in res.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", soft_wrap=True, highlight=False)
    console.print(f"{plural(len(res.table), 'video')} → {res.out}" +
                  (f" ({res.n_long} longer than t, policy {long_videos})" if res.n_long else "") +
                  (f" (mean of {res.members} members)" if res.members > 1 else ""))


@app.command()
def evaluate(
    predictions: Annotated[Path, typer.Argument(help="Predictions CSV from `seqhead predict`.")],
    labels: Annotated[Path, typer.Option(help="Label CSV.")],
    id_column: IdColumn = None,
    split: Annotated[Optional[str], typer.Option(help="Only rows of this split (train | val | test).")] = None,
    split_column: Annotated[Optional[str], typer.Option(help="Split column of the labels for --split (default: "
                                                            "auto: split, set, partition, …).")] = None,
):
    """Pearson per target and the mean, over the videos present in both files."""
    from .evaluate import EvaluateOptions, evaluate as run_evaluate

    try:
        res = run_evaluate(EvaluateOptions(predictions, labels, id_column, split, split_column))
    except (DataError, ValueError) as e:
        _fail(e)
    out_console.print(_pearson_table(plural(res.n, "video") + (f" ({split})" if split else ""), res.pearson,
                                     res.mean_pearson))
    if res.n_unmatched:
        console.print(f"[yellow]{plural(res.n_unmatched, 'labelled video')} "
                      f"{'has' if res.n_unmatched == 1 else 'have'} no prediction[/yellow]")


@app.command()
def sweep(
    h5: Annotated[Path, typer.Argument(help="Features file (affextract HDF5, format v1).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep directory (resumable).")] = Path("sweeps/s1"),
    preset: Annotated[Optional[str], typer.Option(help="table4 (paper's Table 4 ablations) | table3 (feature "
                                                       "groups) | heads (all heads and baselines).")] = None,
    grid: Annotated[Optional[list[str]], typer.Option(help="Axis NAME=V1,V2 (repeatable; Cartesian product), e.g. "
                                                           "head=mrnn,mean; features use '+': va+expr,au.")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    workers: Annotated[int, typer.Option(help="Parallel processes.")] = 1,
    devices: Annotated[Optional[str], typer.Option(help="Devices dealt round-robin, e.g. cuda:0,cuda:1.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run each configuration as a task on a Ray cluster (the ray extra): "
                                                    "--ray-address, else RAY_ADDRESS, else a local cluster.")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="With --ray: the cluster's address.")] = None,
    gpus_per_run: Annotated[Optional[float], typer.Option(help="With --ray: GPU share of each run (default 0.25 on a "
                                                               "cluster with GPUs).")] = None,
    labels: Labels = None,
    id_column: IdColumn = None,
    split_column: SplitColumn = None,
    group_column: GroupColumn = None,
    val_fraction: ValFraction = 0.2,
    allow_unmatched: AllowUnmatched = False,
    features: Features = "va,expr,au",
    no_face: NoFace = "drop",
    t: T = None,
    head: Annotated[str, typer.Option(help="Base head (presets and axes override it).")] = "attn",
    epochs: Epochs = 30,
    patience: Patience = 6,
    batch_size: BatchSize = 32,
    lr: Lr = 3e-3,
    device: Device = "auto",
    threads: Threads = 1,
    max_batches: MaxBatches = None,
):
    """Train a grid or preset of configurations × seeds; rank them by mean validation Pearson."""
    from .sweep import PRESETS, SweepOptions, parse_grid, sweep as run_sweep
    from affextract.cluster import RayMissing
    from .train import TrainOptions

    try:
        if preset and preset not in PRESETS:
            raise ValueError(f"preset {preset!r}: use one of {list(PRESETS)}")
        variants = (PRESETS[preset] if preset else ()) + (parse_grid(grid) if grid else ())
        if not variants:
            raise ValueError("nothing to sweep: give --preset and/or --grid NAME=V1,V2")
        base = TrainOptions(h5=h5, out=out, labels=labels, id_column=id_column, split_column=split_column,
                            group_column=group_column, val_fraction=val_fraction, allow_unmatched=allow_unmatched,
                            features=features, no_face=no_face, t=t, head=head, epochs=epochs, patience=patience,
                            batch_size=batch_size, lr=lr, device=device, threads=threads, max_batches=max_batches,
                            members=1)  # seeds are the sweep's own axis: each run is one seed
        from .cluster import RaySweep

        opts = SweepOptions(base, out, variants, tuple(int(s) for s in seeds.split(",")), workers,
                            tuple(devices.split(",")) if devices else (),
                            RaySweep(ray_address, gpus_per_run) if ray else None)
        res = run_sweep(opts, progress=lambda name, seed, row: console.print(
            f"{name} seed {seed}: val mean Pearson {row['val_mean_pearson']:.4f} ({row['seconds']:.0f}s)"))
    except (DataError, ValueError, RayMissing) as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print(f"interrupted: finished runs are kept in {out}; the same command resumes", soft_wrap=True)
        raise typer.Exit(130)
    table = Table(title=f"{out}: {plural(len(res.ranked), 'configuration')} ({plural(res.n_run, 'run')} now, {res.n_reused} reused)")
    # Numbers never wrap; long configuration names do (the table must fit a narrow terminal).
    for c in ("rank", "configuration", "val mean r", "± std", "seeds", "best epoch", "s/run"):
        table.add_column(c, justify="left" if c == "configuration" else "right", no_wrap=c != "configuration")
    for r in res.ranked.itertuples():
        table.add_row(str(r.rank), r.config, f"{r.val_mean_pearson:.4f}", f"{r.std:.4f}", str(r.seeds),
                      f"{r.best_epoch:.1f}", f"{r.seconds:.0f}")
    out_console.print(table)
    console.print(f"→ {out / 'ranked.csv'}, {out / 'results.csv'}")


@app.command()
def simulate(
    out: Annotated[Path, typer.Argument(help="HDF5 file to write (affextract format v1).")],
    labels: Annotated[Optional[Path], typer.Option(help="Labels CSV (default: labels.csv beside OUT).")] = None,
    scale: Annotated[float, typer.Option(help="Fraction of Hume-Reaction's 15,806 / 4,657 / 4,604 videos (0.02 ≈ "
                                              "80 MB; 1 ≈ 4 GB).")] = 0.02,
    max_len: Annotated[int, typer.Option(help="Longest video (frames).")] = 480,
    signal: Annotated[float, typer.Option(help="Strength of the labelled episode (0 = no signal).")] = 1.0,
    nuisance: Annotated[float, typer.Option(help="Scale of subject/video baselines and drift.")] = 0.4,
    frame_noise: Annotated[float, typer.Option(help="Frame-to-frame noise (logit units).")] = 1.2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    setting: Annotated[str, typer.Option(help="How labels arise: episode (one labelled bump) | peak (labels = the "
                                              "peak of 2–3 bumps) | late (a late bump; an early one is a decoy) | "
                                              "subject (subject offsets, gaps, 2 s–5 min) | groups (each target in "
                                              "its own feature group).")]
    = "episode",
    label_noise: Annotated[float, typer.Option(help="Standard deviation of noise added to the written labels.")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT and its labels file if they exist (otherwise an "
                                                 "existing one is refused).")] = False,
):
    """Write a Hume-Reaction-shaped simulated features file and labels CSV."""
    from .simulate import SimulateOptions, simulate as run_simulate

    def plan(p) -> None:
        console.print(f"writing {sum(p.n_videos)} videos (train/val/test {'/'.join(map(str, p.n_videos))}), "
                      f"{p.n_frames} frames: about {p.bytes / 1e6:,.0f} MB → {out}", soft_wrap=True, highlight=False)

    try:
        res = run_simulate(SimulateOptions(out, labels, scale=scale, max_len=max_len, signal=signal,
                                           nuisance=nuisance, frame_noise=frame_noise, seed=seed, setting=setting,
                                           label_noise=label_noise, overwrite=overwrite), plan=plan)
    except ValueError as e:
        _fail(e)
    console.print(f"{plural(sum(res.n_videos), 'video')} (train/val/test {'/'.join(map(str, res.n_videos))}), "
                  f"{plural(res.n_frames, 'frame')} → {res.h5}, {res.labels}")


if __name__ == "__main__":
    app()
