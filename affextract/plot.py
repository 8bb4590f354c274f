"""`affextract plot`: one video's features over time as a PNG, optionally with a contact sheet of its aligned faces.

Panels share one time axis in seconds: valence and arousal (lines), the 7 expression probabilities (stacked area),
the 17 AU probabilities (heat map) and, with measured movement, head yaw, pitch and roll (lines, degrees) and the 51
MediaPipe blendshapes (heat map; `_neutral` left out). Spans without a face are shaded grey on every panel. The
contact sheet re-decodes frames sampled evenly along the whole video, with or without a face, and shows each frame
with the tracked box and landmarks above the aligned 112×112 crop the model saw (the stored landmarks through the same
alignment `affextract run` uses); a frame where no face was found is shown and marked so, which is how missed faces
are found. Dotted lines on the first panel mark the sampled times (red: no face).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from affextract.features import VideoFeatures, open_features
from affextract.schema import AU_NAMES, BLENDSHAPE_NAMES, EXPRESSIONS, POSE_NAMES

# Colours chosen to read as the expression (happiness warm, sadness blue, ...); neutral grey.
EXPRESSION_COLOURS = {"neutral": "#b0b0b0", "anger": "#d62728", "disgust": "#8c564b", "fear": "#9467bd",
                      "happiness": "#ffbf00", "sadness": "#1f77b4", "surprise": "#17becf"}
NO_FACE_COLOUR = "#7f7f7f"
MISSED_COLOUR = "#d62728"  # a sampled frame without a face: its marker on the timeline and its caption
POSE_COLOURS = {"yaw": "#1f77b4", "pitch": "#d62728", "roll": "#2ca02c"}


@dataclass(frozen=True)
class PlotOptions:
    crops: int = 0  # faces in the contact sheet (0 = no contact sheet; needs the source video)
    video_path: Path | None = None  # the source video for crops; None = look for it (see find_source)
    root: Path | None = None  # folder the video's relative path (`source` attribute) is resolved against
    width: float = 13.0  # figure width, inches
    dpi: int = 110  # resolution of the PNG


class SourceNotFound(FileNotFoundError):
    """The video a contact sheet needs cannot be found."""


def find_source(video: VideoFeatures, h5: Path, video_path: Path | None = None, root: Path | None = None) -> Path:
    """The source file of a stored video: `video_path` if given; else its relative path (`source` attribute) under
    `root` if given; else the path it was extracted from (`path` attribute; a relative one is taken from the h5
    file's folder, then the current one) when it still has the stored size, then the relative path under the current
    directory and the h5 file's folder. Raises SourceNotFound naming every place tried."""
    if video_path is not None:
        if Path(video_path).is_file():
            return Path(video_path)
        raise SourceNotFound(f"--video-path {video_path} does not exist")
    rel = Path(video.source)
    here = Path(h5).resolve().parent
    if root is not None:
        tried = [Path(root).absolute() / rel]
    else:
        stored = Path(str(video.attrs.get("path", "") or ""))
        tried = [here / stored, Path.cwd() / stored] if str(stored) not in ("", ".") else []
        tried += [Path.cwd() / rel, here / rel]
    tried = list(dict.fromkeys(p.absolute() for p in tried))
    size = video.attrs.get("size_bytes")
    for p in tried:
        if p.is_file() and (root is not None or size is None or p.stat().st_size == int(size)):
            return p
    raise SourceNotFound(
        f"cannot find the source of {video.key!r} for the crops; tried {', '.join(str(p) for p in tried)}. "
        "The feature file stores paths relative to the folder given to `affextract run`: pass that folder with "
        "--root, or the file itself with --video-path"
    )


def read_frames(path: Path, indices: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB frames at the given decoded-stream indices (decord, as `affextract run` decodes)."""
    from affextract.video import IMAGE_EXTENSIONS, import_decord

    if path.suffix.lower() in IMAGE_EXTENSIONS:
        import cv2

        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{path}: cannot read the image")
        return np.repeat(np.ascontiguousarray(bgr[:, :, ::-1])[None], len(indices), axis=0)
    decord = import_decord()
    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        return vr.get_batch([int(i) for i in indices]).asnumpy()
    except Exception as e:
        raise ValueError(f"{path}: cannot re-decode frames {list(indices)[:5]}...: {e}") from None


def sample_crops(video: VideoFeatures, n: int) -> np.ndarray:
    """Positions (rows of `video`) of up to n analysed frames spread evenly over the whole video, first and last
    included, whether a face was found there or not (the misses are what a contact sheet is looked at for)."""
    if len(video) == 0 or n <= 0:
        return np.zeros(0, int)
    return np.unique(np.round(np.linspace(0, len(video) - 1, min(n, len(video)))).astype(int))


def _edges(t: np.ndarray, fps: float) -> np.ndarray:
    """(K+1,) time edges of the K analysed frames: midpoints between samples, half a step beyond the ends."""
    if len(t) == 0:
        return np.array([0.0, 1.0])
    step = float(np.median(np.diff(t))) if len(t) > 1 else (1.0 / fps if fps and fps > 0 else 1.0)
    mid = (t[1:] + t[:-1]) / 2
    return np.concatenate([[t[0] - step / 2], mid, [t[-1] + step / 2]])


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every run of True."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def _spans(mask: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step outlines covering exactly the time spans of the runs of True, for one fill_between(step="post") call:
    x (M,) time edges with NaN between runs, and row (M,) the frame whose value each step takes (-1 between runs).

    One call per band instead of one per run keeps long videos with flickering detections fast to draw.
    """
    xs, rows = [], []
    for a, b in _runs(mask):
        xs += [edges[a:b + 1], [np.nan]]
        rows += [np.r_[a:b, b - 1], [-1]]  # the last frame's value is repeated to close its step
    if not xs:
        return np.zeros(0), np.zeros(0, int)
    return np.concatenate(xs), np.concatenate(rows).astype(int)


def _fill(ax, x: np.ndarray, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, **kw) -> None:
    """fill_between over the spans of `_spans`: lo/hi are per-frame values (scalars for a full-height band)."""
    if len(x) == 0:
        return
    gap = rows < 0
    pick = np.where(gap, 0, rows)
    lo = np.ma.masked_where(gap, np.broadcast_to(lo, (len(gap),)) if np.ndim(lo) == 0 else lo[pick])
    hi = np.ma.masked_where(gap, np.broadcast_to(hi, (len(gap),)) if np.ndim(hi) == 0 else hi[pick])
    ax.fill_between(np.ma.masked_invalid(x), lo, hi, step="post", **kw)


def plot_timeline(h5: str | Path, video: str, output: str | Path, options: PlotOptions = PlotOptions()) -> Path:
    """Draw the timeline of one stored video (key, relative path or unique file name) to a PNG; returns its path."""
    fig = timeline_figure(h5, video, options)  # (selects the Agg backend before pyplot is imported)
    import matplotlib.pyplot as plt

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=options.dpi)
    plt.close(fig)
    return output


def timeline_figure(h5: str | Path, video: str, options: PlotOptions = PlotOptions()) -> "Figure":  # noqa: F821
    """The matplotlib Figure `plot_timeline` saves (for embedding, or for looking at what is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.patches import Patch

    h5 = Path(h5)
    with open_features(h5) as ff:
        v = ff[ff.find(video)]
        model = ff.attrs.get("model", "?")
    crops = None
    if options.crops > 0:  # fail before drawing anything if the source is missing
        src = find_source(v, h5, options.video_path, options.root)
        rows = sample_crops(v, options.crops)
        crops = (rows, _crops(src, v, rows))

    edges = _edges(v.time, float(v.attrs.get("fps", 0) or 0))
    gaps = _spans(~v.face, edges)
    movement = v.blendshapes is not None and v.pose is not None
    fig, gs, height = _grid(options, movement, crops)
    ax_va = fig.add_subplot(gs[0, 0])
    panels = [ax_va, fig.add_subplot(gs[1, 0], sharex=ax_va), fig.add_subplot(gs[2, 0], sharex=ax_va)]
    heat_maps = [panels[2]]
    shade = [Patch(facecolor=NO_FACE_COLOUR, alpha=0.35, label="no face")] if len(gaps[0]) else []
    dots = {"marker": "o", "ms": 3} if len(v) <= 50 else {}  # a few frames (or a still image) would not show as lines
    _draw_valence_arousal(ax_va, v, dots)
    _legend(fig.add_subplot(gs[0, 1]), ax_va.get_legend_handles_labels()[0] + shade + _sample_keys(v, crops))
    _draw_expressions(panels[1], v, edges)
    _legend(fig.add_subplot(gs[1, 1]), [Patch(facecolor=EXPRESSION_COLOURS[e], label=e)
                                        for e in reversed(EXPRESSIONS)] + shade)  # top band first
    _draw_aus(fig, panels[2], gs[2, 1], v, edges)
    if movement:
        panels += _draw_movement(fig, gs, ax_va, v, edges, dots, shade)
        heat_maps.append(panels[-1])
    _shade_gaps(panels, heat_maps, gaps, edges)
    if crops is not None:
        _mark_samples(ax_va, v, crops[0])
    _title(fig, v, model, height)
    if crops is not None:
        _contact_sheet(fig, gs[-1, :], v, *crops)
    return fig


def _grid(options: PlotOptions, movement: bool, crops) -> tuple:
    """(figure, its (rows, 2) grid spec, its height in inches less the title's): panels on the left, their legends
    on the right, then the contact sheet's rows where there is one."""
    import matplotlib.pyplot as plt

    heights = [2.0, 2.2, 3.6] + ([2.0, 7.0] if movement else [])
    if crops is not None:  # frame row + crop row, each as tall as its images are at the column width
        n_crops = len(crops[0])
        col = options.width * 0.9 / max(n_crops, 6)
        aspect = crops[1][0].shape[1] / crops[1][0].shape[2] if n_crops else 0.5
        # a thin spacer row keeps "time (s)" clear of the frame captions
        heights += [0.2, col * (aspect + 1) + 0.5 if n_crops else 0.8]
    fig = plt.figure(figsize=(options.width, sum(heights) + 1.0), dpi=options.dpi)
    # (the blendshapes' names need a wider left margin)
    gs = fig.add_gridspec(len(heights), 2, height_ratios=heights, width_ratios=[1, 0.13], hspace=0.28, wspace=0.02,
                          left=0.1 if movement else 0.07, right=0.97, top=1 - 0.55 / (sum(heights) + 1),
                          bottom=0.5 / (sum(heights) + 1))
    return fig, gs, sum(heights)


def _draw_valence_arousal(ax, v: VideoFeatures, dots: dict) -> None:
    ax.axhline(0, color="black", lw=0.6, alpha=0.5)
    ax.plot(v.time, v["valence"], color="#2ca02c", lw=1.4, label="valence", **dots)
    ax.plot(v.time, v["arousal"], color="#d62728", lw=1.4, label="arousal", **dots)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("valence / arousal")


def _sample_keys(v: VideoFeatures, crops) -> list:
    """Legend entries for the dotted lines that mark the contact sheet's frames (none without a sheet)."""
    from matplotlib.lines import Line2D

    if crops is None:
        return []
    keys = [Line2D([], [], color="black", lw=0.8, ls=":", label="frames shown below")]
    if not v.face[crops[0]].all():
        keys.append(Line2D([], [], color=MISSED_COLOUR, lw=1.0, ls=":", label="shown, no face found"))
    return keys


def _draw_expressions(ax, v: VideoFeatures, edges: np.ndarray) -> None:
    """Stacked probabilities, drawn on frames with a face only (the gaps are shaded instead)."""
    top = np.cumsum(np.nan_to_num(v.expressions, nan=0.0), axis=1)  # (K, 7) upper edge of each band
    bottom = np.concatenate([np.zeros((len(v), 1)), top[:, :-1]], axis=1)
    faces = _spans(v.face, edges)
    for i, e in enumerate(EXPRESSIONS):
        _fill(ax, *faces, bottom[:, i], top[:, i], color=EXPRESSION_COLOURS[e], lw=0)
    ax.set_ylim(0, 1)
    ax.set_ylabel("expression\nprobability")


def _draw_aus(fig, ax, cell, v: VideoFeatures, edges: np.ndarray) -> None:
    """Heat map, one row per AU, columns span each frame's time; its colour bar goes in `cell`."""
    mesh = ax.pcolormesh(edges, np.arange(len(AU_NAMES) + 1), np.ma.masked_invalid(v.aus.T), cmap="viridis",
                         vmin=0, vmax=1, shading="flat")
    ax.set_yticks(np.arange(len(AU_NAMES)) + 0.5, AU_NAMES, fontsize=7.5)
    ax.set_ylim(len(AU_NAMES), 0)  # AU1 at the top
    ax.set_ylabel("action unit")
    cax = fig.add_subplot(cell)
    cax.set_position(_colorbar_box(cax.get_position()))
    fig.colorbar(mesh, cax=cax, label="AU probability")


def _draw_movement(fig, gs, ax_va, v: VideoFeatures, edges: np.ndarray, dots: dict, shade: list) -> list:
    """Head pose and blendshape panels in grid rows 3 and 4; returns the two axes."""
    # head pose: yaw, pitch, roll in degrees (schema.POSE_NAMES for the signs)
    ax_pose = fig.add_subplot(gs[3, 0], sharex=ax_va)
    ax_pose.axhline(0, color="black", lw=0.6, alpha=0.5)
    for i, name in enumerate(POSE_NAMES):
        ax_pose.plot(v.time, v.pose[:, i], color=POSE_COLOURS[name], lw=1.4, label=name, **dots)
    ax_pose.set_ylabel("head pose (°)")
    _legend(fig.add_subplot(gs[3, 1]), ax_pose.get_legend_handles_labels()[0] + shade)
    # blendshapes: heat map like the AUs; `_neutral` (index 0) carries no movement
    ax_bs = fig.add_subplot(gs[4, 0], sharex=ax_va)
    bs = ax_bs.pcolormesh(edges, np.arange(len(BLENDSHAPE_NAMES)), np.ma.masked_invalid(v.blendshapes[:, 1:].T),
                          cmap="magma", vmin=0, vmax=1, shading="flat")
    ax_bs.set_yticks(np.arange(len(BLENDSHAPE_NAMES) - 1) + 0.5, BLENDSHAPE_NAMES[1:], fontsize=6.5)
    ax_bs.set_ylim(len(BLENDSHAPE_NAMES) - 1, 0)
    cax = fig.add_subplot(gs[4, 1])
    cax.set_position(_colorbar_box(cax.get_position()))
    fig.colorbar(bs, cax=cax, label="MediaPipe blendshape")  # (the names leave no room for a y label)
    return [ax_pose, ax_bs]


def _shade_gaps(panels: list, heat_maps: list, gaps: tuple[np.ndarray, np.ndarray], edges: np.ndarray) -> None:
    """The shared time axis: spans without a face shaded on every panel (over the heat maps, under the lines),
    one x label at the bottom."""
    panels[-1].set_xlabel("time (s)")
    for ax in panels:
        _fill(ax, *gaps, 0.0, 1.0, transform=ax.get_xaxis_transform(), facecolor=NO_FACE_COLOUR, alpha=0.35, lw=0,
              zorder=3 if ax in heat_maps else 0)
        ax.set_xlim(edges[0], edges[-1])
        ax.grid(axis="x", alpha=0.25)
    for ax in panels[:-1]:
        ax.tick_params(labelbottom=False)


def _mark_samples(ax, v: VideoFeatures, rows: np.ndarray) -> None:
    """Dotted lines where the contact sheet's frames sit on the time axis (red: no face)."""
    for r in rows:
        face = bool(v.face[r])
        ax.axvline(v.time[r], color="black" if face else MISSED_COLOUR, lw=0.8 if face else 1.0, ls=":",
                   alpha=0.6 if face else 0.9, gid="sampled-face" if face else "sampled-no-face")


def _title(fig, v: VideoFeatures, model: str, height: float) -> None:
    face_rate = float(v.face.mean()) if len(v) else 0.0
    status = "" if v.status == "complete" else f", {v.status}: {v.attrs.get('error', '')}"
    frames = f"{len(v):,} frame{'s' if len(v) != 1 else ''}"
    fig.suptitle(f"{v.key}  —  {frames} analysed, face on {face_rate:.0%}, model {model}{status}",
                 fontsize=11, y=1 - 0.18 / (height + 1), va="top")


def _legend(ax, handles) -> None:
    ax.axis("off")
    ax.legend(handles=handles, loc="center left", frameon=False, fontsize=8.5, borderaxespad=0, handlelength=1.4)


def _colorbar_box(box):
    """A thin bar at the left of the legend column, so its label does not run off the figure."""
    from matplotlib.transforms import Bbox

    return Bbox.from_bounds(box.x0 + 0.004, box.y0, box.width * 0.16, box.height)


def _crops(src: Path, v: VideoFeatures, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frames (n, H, W, 3), aligned faces (n, 112, 112, 3)) uint8 of the sampled rows."""
    from affextract.faces.align import align_faces
    from affextract.pixels import to_pixels

    if len(rows) == 0:
        return np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0, 112, 112, 3), np.uint8)
    frames = read_frames(src, v.frame[rows])
    w, h = int(v.attrs.get("width", frames.shape[2])), int(v.attrs.get("height", frames.shape[1]))
    if frames.shape[1:3] != (h, w):
        raise ValueError(f"{src} decodes to {frames.shape[2]}x{frames.shape[1]} frames but the features were made from "
                         f"{w}x{h} ones: is this the same video?")
    aligned = align_faces(frames, v.landmarks[rows])  # (n, 3, 112, 112) in [-1, 1]; black where no face
    faces = to_pixels(aligned).permute(0, 2, 3, 1).numpy().clip(0, 255).astype(np.uint8)
    return frames, faces


def _contact_sheet(fig, cell, v: VideoFeatures, rows: np.ndarray, images: tuple[np.ndarray, np.ndarray]) -> None:
    frames, faces = images
    if len(rows) == 0:
        ax = fig.add_subplot(cell)
        ax.axis("off")
        ax.text(0.5, 0.5, "no frame was analysed in this video: nothing to show", ha="center", va="center",
                fontsize=11)
        return
    n = len(rows)
    aspect = frames.shape[1] / frames.shape[2]
    sub = cell.subgridspec(2, max(n, 6), hspace=0.15, wspace=0.06, height_ratios=[aspect, 1])
    for i, r in enumerate(rows):
        top, bottom = fig.add_subplot(sub[0, i]), fig.add_subplot(sub[1, i])
        top.imshow(frames[i])
        caption = f"{v.time[r]:.1f} s (frame {v.frame[r]})"
        if v.face[r]:
            x1, y1, x2, y2 = v.box[r]
            top.add_patch(_rect(x1, y1, x2 - x1, y2 - y1))
            top.scatter(v.landmarks[r, :, 0], v.landmarks[r, :, 1], s=4, c="#00ff66", lw=0)
            top.set_title(caption, fontsize=7.5)
            bottom.imshow(faces[i])
        else:  # shown so that a missed face can be seen
            top.set_title(caption + "\nno face found", fontsize=7.5, color=MISSED_COLOUR)
            bottom.imshow(np.full((112, 112, 3), 235, np.uint8))
            bottom.text(0.5, 0.5, "no face", ha="center", va="center", fontsize=8, color=MISSED_COLOUR,
                        transform=bottom.transAxes)
            for side in bottom.spines.values():
                side.set_edgecolor(MISSED_COLOUR)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
        if i == 0:
            top.set_ylabel("frame, tracked face", fontsize=8)
            bottom.set_ylabel("aligned 112×112", fontsize=8)


def _rect(x, y, w, h):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor="#ff3030", lw=1.2)
