"""Command line: each command parses its options, calls one library function and renders the result."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Per-frame facial-affect features (valence/arousal, 7 expressions, 17 AUs) from video.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


@app.command(epilog="""Examples:

  affextract run videos/ out.h5                      every video and image under videos/, all frames

  affextract run a.mp4 b.mov out.h5 --fps 5          two files, 5 analysed frames per second

  affextract run videos/ out.h5 --device cuda:1 --batch-size 256

Rerunning the same command skips finished, unchanged videos and retries failed ones.""")
def run(
    paths: list[Path] = typer.Argument(..., help="Video/image files or folders (searched recursively), then the output .h5 file."),
    weights: Optional[Path] = typer.Option(None, help="MMA weights (.safetensors). Default: the weights shipped with affextract."),
    detector: str = typer.Option("mtcnn", help="Face detector: mtcnn (offline, default) or scrfd."),
    detector_model: Optional[Path] = typer.Option(None, help="Local model file for the detector (scrfd: a .onnx)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto (cuda when available)."),
    batch_size: int = typer.Option(64, min=1, help="Frames decoded, detected and run through the model together."),
    fps: Optional[float] = typer.Option(None, min=0.001, help="Analyse frames at this rate (by timestamp). Default: every frame."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Extract per-frame affect features (26 values per frame) of videos into an HDF5 file."""
    from affextract.extract import ExtractOptions, extract

    if len(paths) < 2:
        raise typer.BadParameter("give at least one input and the output file, e.g. `affextract run videos/ out.h5`")
    *inputs, output = paths
    if output.suffix.lower() not in (".h5", ".hdf5"):
        raise typer.BadParameter(f"the last path is the output file and must end in .h5 (got {output})")
    opts = ExtractOptions(weights=weights, detector=detector, detector_model=detector_model, device=device,
                          batch_size=batch_size, fps=fps, progress=not quiet)
    try:
        report = extract(inputs, output, opts)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    _render_report(report)
    if report.failed:
        raise typer.Exit(1)


def _render_report(report) -> None:
    from rich.table import Table

    console.print(
        f"[bold]{report.output}[/bold]: {len(report.written)} extracted, {len(report.skipped)} already done (skipped), "
        f"{len(report.partial)} partial, {len(report.failed)} failed; {report.frames:,} frames in {report.seconds:.1f} s"
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
    if report.ignored:
        console.print(f"[dim]{len(report.ignored)} files in the input folders are neither video nor image and were ignored.[/dim]")


@app.command()
def info(path: Path = typer.Argument(..., exists=True, dir_okay=False, help="An affextract .h5 file.")) -> None:
    """Show the videos in a feature file (frames, face rate, status) and how the file was made."""
    from rich.table import Table

    from affextract.store import FormatError, summarize

    try:
        attrs, rows = summarize(path)
    except (FormatError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    out = Console()
    t = Table(title=str(path), title_justify="left")
    for col, just in (("video", "left"), ("frames", "right"), ("face rate", "right"), ("status", "left")):
        t.add_column(col, justify=just)
    colour = {"complete": "green", "partial": "yellow", "failed": "red"}
    for r in rows:
        status = f"[{colour.get(r.status, 'white')}]{r.status}[/]" + (f" ({r.error})" if r.error else "")
        t.add_row(r.key, f"{r.frames:,}", f"{r.face_rate:.1%}" if r.status != "failed" else "-", status)
    out.print(t)
    frames = sum(r.frames for r in rows)
    faces = sum(r.frames * r.face_rate for r in rows)
    out.print(f"{len(rows)} videos, {frames:,} frames, face found on {faces / max(frames, 1):.1%}")
    p = Table(show_header=False, box=None)
    for k in ("format", "format_version", "affextract_version", "model", "model_sha256", "detector", "alignment",
              "sampling", "created", "updated"):
        if k in attrs:
            p.add_row(f"[bold]{k}[/bold]", str(attrs[k]))
    out.print(p)


if __name__ == "__main__":
    app()
