"""Command line: each command parses its options, calls one library function and renders the result."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from affextract.console import CliConsole, plural
from affextract.runtime import ranks

app = typer.Typer(
    help="Per-frame facial-affect features (valence/arousal, 7 expressions, 17 AUs) from video.",
    no_args_is_help=True,
    add_completion=False,
)
console = CliConsole(stderr=True)


def _version(value: bool) -> None:
    if value:
        from affextract.version import __version__

        print(f"affextract {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


@app.command(epilog="""Examples:

  affextract run videos/ out.h5                      every video and image under videos/, all frames

  affextract run a.mp4 b.mov out.h5 --fps 5          two files, 5 analysed frames per second

  affextract run videos/ out.h5 2> run.log           progress lines every 30 s in run.log

  affextract run videos/ out.h5 --device cuda:1 --batch-size 256

  affextract run list.txt out/ --shards --ray         a manifest of paths, on Ray, into a folder of shards

Rerunning the same command skips finished, unchanged videos and retries failed ones.""")
def run(
    inputs: list[Path] = typer.Argument(..., metavar="INPUTS", help="Video/image files or folders (searched recursively), or manifests: list.txt (a path a line) or list.csv (a `path` column), relative paths read from the manifest's folder."),
    output: Path = typer.Argument(..., metavar="OUTPUT", help="The output .h5 file (created, or continued when it exists)."),
    weights: Optional[Path] = typer.Option(None, help="MMA weights (.safetensors). Default: the weights shipped with affextract."),
    detector: str = typer.Option("mtcnn", help="Face detector: mtcnn (offline, default) or scrfd."),
    detector_model: Optional[Path] = typer.Option(None, help="Local model file for the detector (scrfd: a .onnx)."),
    detect_interval: float = typer.Option(0.4, min=0, help="Seconds of video between full face detections; frames in between re-fit the tracked face, and a face lost there is detected again at once. 0 = detect on every frame."),
    detect_every: Optional[int] = typer.Option(None, hidden=True, help="Replaced by --detect-interval."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto (cuda when available)."),
    batch_size: int = typer.Option(64, min=1, help="Frames decoded, detected and run through the model together."),
    workers: int = typer.Option(0, min=0, help="Processes that decode, detect and align, each on its own videos. 0 = half the cores, at most 8."),
    fps: Optional[float] = typer.Option(None, min=0.001, help="Analyse frames at this rate (by timestamp). Default: every frame."),
    commit_every: float = typer.Option(60.0, min=0, help="Seconds between merges of finished videos into the output file."),
    progress_every: float = typer.Option(30.0, min=0, help="Seconds between progress lines when stderr is not a terminal (a log file)."),
    movement: bool = typer.Option(True, "--movement/--no-movement", help="Measure facial movement per frame (MediaPipe face mesh: 52 blendshapes, head pose, gaze). --no-movement stores the 26 values only."),
    mesh: bool = typer.Option(False, "--mesh", help="Also store the 478 face mesh points per frame (float16, about 2.9 KB a frame)."),
    au_fusion: bool = typer.Option(True, "--au-fusion/--cnn-aus", help="With movement, fuse the AU rows with the frame's blendshapes (default); --cnn-aus keeps the CNN's AU rows, as --no-movement does."),
    fusion_weights: Optional[Path] = typer.Option(None, help="AU fusion parameters (.safetensors, from `affextract train --fusion`). Default: the shipped au_fusion."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    replace: bool = typer.Option(False, "--replace", help="Replace a stored video whose name now holds a file with other contents (refused without it; identical copies are skipped either way)."),
    shards: bool = typer.Option(False, "--shards", help="Write OUTPUT as a folder: one shard file per video and manifest.h5, read as one file by info, export and seqhead (no merge copies the data)."),
    ray: bool = typer.Option(False, "--ray", help="Run on a Ray cluster (the ray extra): --ray-address, else RAY_ADDRESS, else a local cluster started for the run."),
    ray_address: Optional[str] = typer.Option(None, help="With --ray: the cluster's address, HOST:6379 or ray://HOST:10001."),
    ray_actors: int = typer.Option(1, min=1, help="With --ray: actors running the model and movement (one GPU each where the cluster has GPUs)."),
) -> None:
    """Extract per-frame affect features (26 values per frame) and measured facial movement of videos into an HDF5 file."""
    from affextract.extract import ExtractOptions, Interrupted, extract
    from affextract.progress import RunProgress

    if detect_every is not None:
        raise typer.BadParameter("--detect-every was replaced by --detect-interval SECONDS: key frames are spaced in "
                                 "time, so --fps does not stretch them (--detect-every 10 at 25 fps is "
                                 "--detect-interval 0.4)")
    if output.suffix.lower() not in (".h5", ".hdf5") and not shards:
        raise typer.BadParameter(f"the last path is the output file and must end in .h5 (got {output})")
    try:
        from affextract.cluster import RayOptions, extract_on_ray

        cluster = RayOptions(address=ray_address, actors=ray_actors) if ray else None
        opts = ExtractOptions(weights=weights, detector=detector, detector_model=detector_model,
                              detect_interval=detect_interval, device=device, batch_size=batch_size, workers=workers,
                              fps=fps, commit_every=commit_every, movement=movement, mesh=mesh, au_fusion=au_fusion,
                              fusion_weights=fusion_weights, replace=replace, shards=shards)
        progress = None if quiet or ranks().rank != 0 else RunProgress(progress_every)  # rank 0 speaks for the job
        with progress or nullcontext():
            if cluster is None:
                report = extract(inputs, output, opts, on_event=progress)
            else:
                report = extract_on_ray(inputs, output, opts, cluster, on_event=progress)
    except (OSError, ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2)
    except Interrupted as stop:
        if ranks().rank == 0:
            r = stop.report
            console.print(f"interrupted: {plural(r.stored, 'video')} safe in {output} "
                          f"({len(r.written)} finished in this run); the video(s) in progress are redone. "
                          "Rerun the same command to continue: finished videos are skipped.",
                          soft_wrap=True, highlight=False, markup=False)
        raise typer.Exit(130)
    if ranks().rank == 0:
        _render_report(report)
    if report.failed:
        raise typer.Exit(1)


def _render_report(report) -> None:
    from rich.table import Table

    console.print(
        f"[bold]{escape(str(report.output))}[/bold]: {len(report.written)} extracted, {len(report.skipped)} already "
        f"done (skipped), {len(report.partial)} partial, {len(report.failed)} failed; {plural(report.frames, 'frame')} "
        f"in {report.seconds:.1f} s"
        + (f" ({report.frames / report.seconds:,.1f} frames/s)" if report.frames else "")
    )
    if report.failed or report.partial:
        t = Table(title="Problems", title_justify="left")
        t.add_column("video")
        t.add_column("status")
        t.add_column("what happened", overflow="fold")
        for key, err in report.partial:
            t.add_row(key, "[yellow]partial[/yellow]", err + " (frames before the break are stored)")
        for key, err in report.failed:
            t.add_row(key, "[red]failed[/red]", err + " (retried on the next run)")
        console.print(t)
    if report.replaced:
        console.print(f"replaced (--replace: other contents under a stored name): {escape(', '.join(report.replaced))}",
                      soft_wrap=True, highlight=False)
    if report.ignored:
        n = len(report.ignored)
        console.print(f"[dim]{plural(n, 'file')} in the input folders {'is' if n == 1 else 'are'} neither video nor "
                      "image: ignored.[/dim]")


INFO_FIRST = 20  # videos `affextract info` lists without --all


@app.command(epilog="""Examples:

  affextract info out.h5              counts per status, frames, face rate, the first 20 videos, provenance

  affextract info out.h5 --all        every video

  affextract info out.h5 --json > info.json      everything, machine-readable""")
def info(
    path: Path = typer.Argument(..., help="An affextract .h5 file (or a --shards folder)."),
    all_videos: bool = typer.Option(False, "--all", help=f"List every video (default: the first {INFO_FIRST})."),
    as_json: bool = typer.Option(False, "--json", help="Print the provenance, totals and every video as JSON on stdout."),
) -> None:
    """Show the videos in a feature file (frames, face rate, status) and how the file was made."""
    import json as _json
    from dataclasses import asdict

    from rich.table import Table

    from affextract.features import open_features
    from affextract.format import FormatError, index_file, parts_folder

    try:
        with open_features(path) as ff:
            attrs, rows, pending = ff.attrs, ff.summary(), ff.pending
    except (FormatError, OSError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2)
    frames = sum(r.frames for r in rows)
    faces = round(sum(r.frames * r.face_rate for r in rows))
    counts = {s: sum(r.status == s for r in rows) for s in ("complete", "partial", "failed")}
    if as_json:
        print(_json.dumps({"path": str(path), "videos": len(rows), "statuses": counts, "pending": pending,
                           "frames": frames,
                           "frames_with_face": faces, "attrs": attrs, "per_video": [asdict(r) for r in rows]},
                          indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
        return
    out = CliConsole(highlight=False)
    shown = rows if all_videos else rows[:INFO_FIRST]
    t = Table(title=str(path), title_justify="left")
    for col, just in (("video", "left"), ("frames", "right"), ("face rate", "right"), ("status", "left")):
        t.add_column(col, justify=just)
    colour = {"complete": "green", "partial": "yellow", "failed": "red"}
    for r in shown:
        status = f"[{colour.get(r.status, 'white')}]{r.status}[/]" + (f" ({escape(r.error)})" if r.error else "")
        rate = "-" if r.status == "failed" else f"{r.face_rate:.1%}" if r.frames else "no frames"
        t.add_row(escape(r.key), f"{r.frames:,}", rate, status)
    out.print(t)
    if len(shown) < len(rows):
        out.print(f"... and {plural(len(rows) - len(shown), 'more video')}: --all lists every one, --json gives "
                  "them as JSON")
    face = f"face found on {faces / frames:.1%}" if frames else "no frames analysed"
    out.print(f"{plural(len(rows), 'video')} ({', '.join(f'{n:,} {s}' for s, n in counts.items() if n) or 'none'}), "
              f"{plural(frames, 'frame')}, {face}")
    if pending:
        out.print(f"[yellow]{plural(pending, 'finished video')} {'waits' if pending == 1 else 'wait'} in "
                  f"{escape(str(parts_folder(index_file(path))))}/ to be merged: by the run writing the file, or, if it stopped, "
                  f"by `affextract merge {escape(str(path))}` (or by rerunning it)[/yellow]")
    for k in ("format", "format_version", "affextract_version", "model", "model_sha256", "detector", "alignment",
              "sampling", "movement", "au_source", "created", "updated"):
        if k in attrs:  # one plain line each: nothing is cut or wrapped, whatever the width
            out.print(f"[bold]{k:<18}[/bold] {escape(str(attrs[k]))}", soft_wrap=True)
    _print_what_rows_are(out, str(attrs.get("au_source", "cnn")))


def _print_what_rows_are(out: CliConsole, au_source: str) -> None:
    from affextract.fusion import describe_features

    out.print("[bold]What the 26 values are[/bold]")
    for line in describe_features(au_source):
        out.print(f"  {escape(line)}", highlight=False, soft_wrap=True)


def _train_fusion(data: list[str], cache: Path, out: Path, init: Optional[Path], rule: str) -> None:
    from affextract.training.datasets import DatasetError, load_spec
    from affextract.training.fusion import FusionOptions, train_fusion

    try:
        fusion, sha = train_fusion([load_spec(s) for s in data],
                                   FusionOptions(cache=cache, out=out / "au_fusion.safetensors", weights=init, rule=rule))
    except (DatasetError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2)
    console.print(f"wrote {out / 'au_fusion.safetensors'} (sha256 {sha}); fused "
                  + " ".join(f"AU{a}" for a in fusion.fused))

@app.command()
def merge(path: Path = typer.Argument(..., help="The output .h5 file (or --shards folder) of a stopped `affextract run`.")
          ) -> None:
    """Merge the finished videos a stopped run left in OUTPUT.parts/ into OUTPUT (creating it if needed), as
    rerunning the run would, without extracting anything."""
    from affextract.format import FormatError, index_file, parts_folder
    from affextract.store import IncompatibleError, LockedError, merge_parts

    try:
        n = merge_parts(path)
    except (FormatError, IncompatibleError, LockedError, OSError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2)
    if n == 0:
        console.print(f"nothing to merge: {escape(str(parts_folder(index_file(path))))}/ holds no finished video", soft_wrap=True)
    else:
        console.print(f"merged {plural(n, 'finished video')} into {escape(str(path))}; `affextract info "
                      f"{escape(str(path))}` lists them", soft_wrap=True)


@app.command(epilog="""Datasets are named kind:path[:arg]:

  ferplus:ferplus.h5:train   affectnet:training.csv[:IMAGE_ROOT]   affwild2:ROOT[:Train_Set]

  emotionet:aus.csv[:IMAGE_ROOT]   manifest:list.csv[:raw]

Example (the shipped default weights, see their model card, affextract/weights/mma_ferplus_small.md):

  affextract train --data ferplus:ferplus.h5:train --val ferplus:ferplus.h5:valid --derive-va --select acc_expr

Several GPUs/nodes: torchrun --nproc-per-node 4 -m affextract.cli train ...""")
def train(
    data: list[str] = typer.Option(..., "--data", help="Training dataset kind:path[:arg]; repeat to mix datasets."),
    val: list[str] = typer.Option([], "--val", help="Validation dataset(s) for model selection, same form."),
    out: Path = typer.Option(Path("runs/mma"), help="Folder for checkpoint.pt, best/last .safetensors, metrics.jsonl."),
    variant: str = typer.Option("small", help="Architecture: small (CPU-friendly default) or large."),
    epochs: int = typer.Option(30, min=1, help="Epochs (upper bound when --time-budget is set)."),
    time_budget: Optional[float] = typer.Option(None, min=1, help="Seconds to fit the whole run into (schedule included)."),
    batch_size: int = typer.Option(256, min=2, help="Samples per step per process."),
    lr: float = typer.Option(1e-4, help="Adam learning rate (the paper's 1e-4)."),
    weight_decay: float = typer.Option(0.0, help="Decoupled weight decay (AdamW); 0 = plain Adam."),
    warmup: float = typer.Option(1.0, min=0, help="Warm-up epochs."),
    schedule: str = typer.Option("cosine", help="cosine or constant learning rate after warm-up."),
    dm_form: str = typer.Option("full", help="L_DM: full soft-target BCE, or printed (Eq. 2's positive term only)."),
    derive_va: bool = typer.Option(False, help="Fill missing valence/arousal from the expression labels (per-expression centroids)."),
    init: Optional[Path] = typer.Option(None, help="Start from these weights (.safetensors) and fine-tune them."),
    heads: str = typer.Option("va,expr,au", help="Heads to train, comma-separated; a subset freezes the rest of --init (trunk, embedding, other heads) and fits the named heads on its embeddings."),
    teacher: Optional[Path] = typer.Option(None, help="FER+ blendshape cache (tools/ferplus_teacher.py): teacher AUs for every FER+ --data/--val set, trained by L_teacher."),
    logit_adjust: float = typer.Option(0.0, help="tau of the logit-adjusted expression loss (1 = balanced: the network does not learn the training class prior); 0 = plain cross-entropy."),
    augment: str = typer.Option("default", help="Augmentation preset: default or strong (wider geometry, lighting curves, blur, noise)."),
    calibrate: bool = typer.Option(False, "--calibrate", help="After training, choose the prior correction (tau) and test-time flip on --val and store them in best.safetensors."),
    min_majority: float = typer.Option(0.85, help="--calibrate keeps only settings whose validation majority-vote accuracy is at least this."),
    select: str = typer.Option("score", help="Validation metric picking best.safetensors: score, acc_expr, f1_expr, ccc_va, f1_au, teacher (lowest L_teacher on --val)."),
    seed: int = typer.Option(0, help="Random seed (initialisation, data order, augmentation)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt."),
    no_amp: bool = typer.Option(False, "--no-amp", help="Train in fp32 on CUDA (default: bf16 autocast)."),
    fusion: Optional[Path] = typer.Option(None, help="Instead of training the MMA: refit the AU fusion of the --init weights (default: shipped) on the FER+ --data sets from this blendshape cache (tools/ferplus_teacher.py); writes OUT/au_fusion.safetensors for `run --fusion-weights`."),
    fusion_rule: str = typer.Option("mixed", help="With --fusion: the fitting rule (mixed, teacher, labels, evidence; see the AU fusion card)."),
) -> None:
    """Train the MMA on labelled face datasets with the paper's loss L_CCC + L_CCE + L_BCE + L_DM."""
    if fusion is not None:
        _train_fusion(data, fusion, out, init, fusion_rule)
        return
    import json
    import sys

    from affextract.training.datasets import DatasetError
    from affextract.training.augment import AUGMENT_PRESETS
    from affextract.training.calibrate import CalibrateOptions
    from affextract.training.sources import Sources, TeacherCache, train_from_sources
    from affextract.training.train import TrainOptions

    if augment not in AUGMENT_PRESETS:
        console.print(f"[red]error:[/red] --augment {augment!r} is not one of {sorted(AUGMENT_PRESETS)}")
        raise typer.Exit(2)
    sources = Sources(tuple(data), tuple(val), derive_va, None if teacher is None else TeacherCache(teacher))
    opts = TrainOptions(out_dir=out, variant=variant, epochs=epochs, time_budget_s=time_budget, batch_size=batch_size,
                        lr=lr, weight_decay=weight_decay, warmup_epochs=warmup, schedule=schedule, dm_form=dm_form,
                        select=select, seed=seed, device=device, init=init,
                        heads=tuple(h.strip() for h in heads.split(",") if h.strip()), logit_adjust=logit_adjust,
                        augment=AUGMENT_PRESETS[augment],
                        calibrate=CalibrateOptions(min_majority=min_majority) if calibrate else None,
                        amp=not no_amp, resume=resume,
                        metadata={"command": "affextract train " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else ""})
    show = ranks().rank == 0
    on_event, stop_display = _training_display(show)
    try:
        result = train_from_sources(sources, opts, on_event)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        stop_display()  # the error goes below the last progress line
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    finally:
        stop_display()
    if show:
        console.print(f"best epoch {result.best_epoch + 1}: {result.best_path}")
        console.print(json.dumps(result.best_metrics, indent=1))


def _training_display(show: bool):
    """The `on_event` callback of training that renders a progress bar (rank 0 only: `show`), and the function that
    stops the bar. The bar starts with training, so an error in the data or the options is printed alone."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[losses]}"), TimeRemainingColumn(), console=console, disable=not show)
    task = None

    def on_event(e: dict) -> None:
        nonlocal task
        if e["event"] == "start":
            console.print(f"training on {e['n_train']:,} samples, {e['steps_per_epoch']} steps/epoch, "
                          f"device {e['device']} x {e['world_size']}")
            progress.start()
        elif e["event"] == "step":
            losses = " ".join(f"{k} {e[k]:.3f}" for k in ("loss", "ccc", "cce", "bce", "dm", "teacher")) + f" lr {e['lr']:.1e}"
            if task is None:
                task = progress.add_task("train", total=e["steps"], epoch=e["epoch"], losses=losses)
            progress.update(task, completed=e["step"], total=e["steps"], epoch=e["epoch"], losses=losses)
        elif e["event"] == "calibrated" and show:
            progress.console.print(f"calibrated on validation: prior_tau {e['prior_tau']}, flip_tta {e['flip_tta']}; "
                                   + " ".join(f"{k} {x:.4f}" for k, x in e["val"].items() if isinstance(x, float)))
        elif e["event"] == "epoch" and show:
            v = e.get("val", {})
            vals = " ".join(f"{k} {x:.4f}" for k, x in v.items())
            star = " [green]*best*[/green]" if e["best_epoch"] == e["epoch"] else ""
            progress.console.print(f"epoch {e['epoch'] + 1}/{e['epochs']} ({e['seconds']:.1f} s) "
                                   f"loss {e['train']['loss']:.3f} | val {vals or '-'}{star}")

    def stop() -> None:
        if progress.live.is_started:  # Progress.stop also prints a blank line in a pipe, started or not
            progress.stop()

    return on_event, stop


@app.command(epilog="""Examples:

  affextract evaluate ferplus:ferplus.h5:test --json > scores.json

  affextract evaluate folder:posed_faces/      class folders (DIR/<expression>/ or DIR/<source>/<expression>/),
                                               detected and aligned as `run` does; scores per source""")
def evaluate(
    data: str = typer.Argument(..., help="Dataset kind:path[:arg], as for `train`, or folder:DIR of class folders."),
    weights: Optional[Path] = typer.Option(None, help="MMA weights (.safetensors). Default: the shipped weights."),
    derive_va: bool = typer.Option(False, help="Score valence/arousal against targets derived from expressions."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto (cuda when available)."),
    batch_size: int = typer.Option(512, min=1, help="Faces run through the model together."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON on stdout."),
    au_fusion: bool = typer.Option(True, "--au-fusion/--cnn-aus", help="Also score the AU rows fused with each face's measured movement (as `run` writes them); --cnn-aus scores the CNN's rows only."),
    fusion_weights: Optional[Path] = typer.Option(None, help="AU fusion parameters (.safetensors). Default: the shipped au_fusion."),
) -> None:
    """Score MMA weights on a labelled dataset: CCC-VA, macro F1 (expressions, AUs), accuracy, confusion matrix,
    F1 per expression, AU rows against neutral faces, and the same per source when the data has several; the AU
    scores for both the CNN's rows and the rows fused with the measured movement."""
    import json as _json

    from affextract.training.datasets import DatasetError, load_spec
    from affextract.training.evaluate import evaluate as run_evaluation
    from affextract.fusion import load_fusion
    from affextract.model import load_mma
    from affextract.runtime import resolve_device

    try:
        where = resolve_device(device)
        fs = load_spec(data, derive_va)
        model, info = load_mma(weights, where)
        fusion = load_fusion(fusion_weights) if au_fusion else None
        report = run_evaluation(model, fs, batch_size, where, fusion)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    if as_json:
        print(_json.dumps(report.to_json() | {"weights": info.name, "weights_sha256": info.sha256}, indent=1))
        return
    out = CliConsole()
    _render_scores(out, report, f"{info.name} on {report.dataset} ({report.n:,} samples)")
    for group, r in report.per_group.items():
        _render_scores(out, r, f"source {group} ({r.n:,} samples)")
    if report.fused is not None:
        out.print(f"[bold]AU rows fused with the measured movement[/bold] ({report.fused.au_source}):")
        for group, r in {"all": report.fused, **report.fused.per_group}.items():
            cnn = report if group == "all" else report.per_group[group]
            for label, a, b in (("F1-AU", r.f1_au, cnn.f1_au),
                                ("AUROC Table-1 AUs vs neutral", r.auroc_prototype_mean, cnn.auroc_prototype_mean)):
                if a is not None:
                    out.print(f"  {group}: {label} {a:.4f} (CNN rows {b:.4f})")


def _render_scores(out: CliConsole, report, title: str) -> None:
    from rich.table import Table

    from affextract.schema import EXPRESSIONS

    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("samples", justify="right")
    for name, key, n in (("CCC-VA", "ccc_va", report.n_va), ("CCC valence", "ccc_valence", report.n_va),
                         ("CCC arousal", "ccc_arousal", report.n_va), ("F1-Expr (macro, 7)", "f1_expr", report.n_expr),
                         ("accuracy (most voted)", "acc_expr", report.n_expr),
                         ("accuracy (majority > 50%)", "acc_expr_majority", report.n_expr_majority),
                         ("F1-AU (macro, annotated AUs)", "f1_au", report.n_au)):
        v = getattr(report, key)
        if v is not None:
            t.add_row(name, f"{v:.4f}", f"{n:,}")
    out.print(t)
    if report.confusion:
        c = Table(title="confusion (rows: true, columns: predicted)", title_justify="left")
        c.add_column("")
        for e in EXPRESSIONS:
            c.add_column(e[:5], justify="right")
        c.add_column("F1", justify="right")
        for e, row in zip(EXPRESSIONS, report.confusion):
            f1 = report.f1_per_expr.get(e)
            c.add_row(e, *(str(x) for x in row), "-" if f1 is None else f"{f1:.3f}")
        out.print(c)
    if report.f1_per_au:
        out.print("F1 per AU: " + ", ".join(f"{k} {v:.3f}" for k, v in report.f1_per_au.items()))
    if report.auroc_prototype:
        out.print(f"AU rows, AUROC of Table-1 expressions against neutral: mean {report.auroc_prototype_mean:.3f}; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in report.auroc_prototype.items()))


@app.command(epilog="""Examples:

  affextract plot out.h5 clip.mp4 -o timeline.png

  affextract plot out.h5 sub/clip.mp4 -o timeline.png --crops --root videos/""")
def plot(
    path: Path = typer.Argument(..., exists=True, help="An affextract .h5 file (or a --shards folder)."),
    video: str = typer.Argument(..., help="The video: its key (path relative to the input root, see `affextract info`) or a unique file name."),
    output: Path = typer.Option(..., "--output", "-o", help="PNG file to write."),
    crops: bool = typer.Option(False, "--crops", help="Add a contact sheet of the tracked and aligned faces (re-decodes the source video)."),
    n_crops: int = typer.Option(8, "--n-crops", min=1, max=24, help="Faces in the contact sheet."),
    root: Optional[Path] = typer.Option(None, help="Folder given to `affextract run` (the stored paths are relative to it). Default: the current folder, then the .h5's folder."),
    video_path: Optional[Path] = typer.Option(None, help="The source video file itself (for --crops)."),
) -> None:
    """Plot one video's features over time: valence/arousal, expressions, AU heat map and, with measured movement,
    head pose (yaw, pitch, roll) and the 51 MediaPipe blendshapes as a heat map; spans without a face are shaded.
    --crops adds frames sampled along the whole video, each with its tracked face and aligned crop (or marked as
    having no face)."""
    from affextract.plot import PlotOptions, plot_timeline
    from affextract.format import FormatError

    opts = PlotOptions(crops=n_crops if crops else 0, video_path=video_path, root=root)
    try:
        written = plot_timeline(path, video, output, opts)
    except (KeyError, FileNotFoundError, FormatError, ValueError) as e:
        console.print(f"[red]error:[/red] {e.args[0] if isinstance(e, KeyError) else e}")
        raise typer.Exit(2)
    console.print(f"wrote {written}")


@app.command(epilog="""Examples:

  affextract export out.h5 --format csv                 writes out.csv

  affextract export out.h5 --format parquet -o frames.parquet --geometry""")
def export(
    path: Path = typer.Argument(..., exists=True, help="An affextract .h5 file (or a --shards folder)."),
    format: str = typer.Option("csv", "--format", "-f", help="csv or parquet (parquet needs pyarrow: pip install pyarrow, or from a clone: pip install -e \".\\[parquet]\")."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="File to write. Default: the .h5 path with .csv/.parquet."),
    video: Optional[list[str]] = typer.Option(None, "--video", help="Export only this video (repeatable). Default: all."),
    geometry: bool = typer.Option(False, "--geometry", help="Add the face box and 5 landmark columns."),
) -> None:
    """Export one row per frame (video, frame, timestamp, success, confidence, 26 features), OpenFace-style."""
    from affextract.export import ExportOptions, export as export_table
    from affextract.format import FormatError

    try:
        opts = ExportOptions(format=format.lower(), videos=tuple(video) if video else None, geometry=geometry)
        report = export_table(path, output, opts)
    except (KeyError, FileNotFoundError, FormatError, ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {e.args[0] if isinstance(e, KeyError) else e}")
        raise typer.Exit(2)
    console.print(f"wrote {escape(str(report.output))}: {plural(report.rows, 'row')} ({plural(report.videos, 'video')}), "
                  f"{len(report.columns)} columns", soft_wrap=True)
    _print_what_rows_are(console, report.au_source)


if __name__ == "__main__":
    app()
