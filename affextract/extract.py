"""`affextract run`: decode → detect and track the primary face → align → MMA → HDF5, resumable and crash-safe.

Decoding runs in a separate process so that it overlaps with detection and the model, and so that a decoder crash on a
broken file costs that file only: the worker is restarted on the next one.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from affextract.store import FeatureStore, Provenance, dumps
from affextract.video import Chunk, DecodeError, Source, StreamBroken, VideoInfo, find_sources, open_video

ALIGNMENT = "arcface-5pt similarity (insightface.utils.face_align.estimate_norm) to 112x112 RGB in [-1, 1]"


@dataclass(frozen=True)
class ExtractOptions:
    weights: Path | None = None  # MMA weights (.safetensors); None = the weights shipped with the package
    detector: str = "mtcnn"  # face detector name (see affextract.faces.DETECTORS)
    detector_model: Path | None = None  # local model file for detectors that need one (scrfd's .onnx)
    device: str = "auto"  # "cpu", "cuda", "cuda:N" or "auto" (cuda when available)
    batch_size: int = 64  # frames decoded, detected and run through the model together
    fps: float | None = None  # analyse frames at this rate (by timestamp); None = every frame
    commit_every: float = 60.0  # seconds between merges of finished videos into the output file
    progress: bool = True  # show a rich progress display on stderr


@dataclass
class ExtractReport:
    output: Path
    written: list[str] = field(default_factory=list)  # keys extracted in this run (complete or partial)
    skipped: list[str] = field(default_factory=list)  # keys already stored and unchanged
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, error)
    partial: list[tuple[str, str]] = field(default_factory=list)  # (key, why): stream broke, decoded frames kept
    ignored: list[Path] = field(default_factory=list)  # files in input folders that are neither video nor image
    frames: int = 0  # frames analysed in this run
    seconds: float = 0.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for, but this PyTorch build sees no CUDA GPU; use --device cpu")
    return d


def extract(inputs: list[Path], output: Path, options: ExtractOptions = ExtractOptions()) -> ExtractReport:
    """Extract per-frame features of every video/image under `inputs` into the HDF5 file `output`."""
    from affextract.faces import PrimaryFaceTracker, align_faces, get_detector
    from affextract.model import load_weights

    t0 = time.perf_counter()
    report = ExtractReport(output=Path(output))
    sources, report.ignored = find_sources(inputs)
    device = resolve_device(options.device)
    model, winfo = load_weights(options.weights, device=device)
    model.eval()
    det_opts = {"model_path": str(options.detector_model)} if options.detector_model else {}
    detector = get_detector(options.detector, device=str(device), **det_opts)
    provenance = Provenance(
        model=winfo.name, model_sha256=winfo.sha256, detector=dumps(detector.settings()),
        alignment=ALIGNMENT, sampling=dumps({"fps": options.fps}),
    )

    with FeatureStore(output, provenance) as store:
        stored = store.stored()
        todo = []
        for s in sources:
            if stored.get(s.key) == (s.size_bytes, s.mtime):
                report.skipped.append(s.key)
            else:
                todo.append(s)
        ui = _Progress(options.progress, len(todo))
        last_commit = time.monotonic()
        writer = None
        with ui:
            for src, event in _decode(todo, options.fps, options.batch_size):
                if isinstance(event, VideoInfo):
                    info = event
                    tracker = PrimaryFaceTracker()
                    writer = store.begin_video(src.key, _video_attrs(src, info))
                    ui.start_video(src.key, info.frames_analysed)
                elif isinstance(event, Chunk):
                    rows = _analyse(event, detector, tracker, align_faces, model, device)
                    writer.append(*rows)
                    report.frames += len(event.frame)
                    ui.advance_frames(len(event.frame))
                elif event is None:  # end of a complete video
                    writer.finish("complete")
                    report.written.append(src.key)
                    ui.end_video()
                elif isinstance(event, StreamBroken):
                    writer.finish("partial", str(event))
                    report.written.append(src.key)
                    report.partial.append((src.key, str(event)))
                    ui.end_video()
                else:  # an error before any frame was decoded, or a crash of the decoder
                    if writer is not None:  # the decoder crashed part-way through this video
                        writer.abort()
                    store.record_failure(src.key, _source_attrs(src), str(event))
                    report.failed.append((src.key, str(event)))
                    ui.end_video(failed=True)
                if not isinstance(event, (VideoInfo, Chunk)):
                    writer = None
                    if time.monotonic() - last_commit > max(options.commit_every, 20 * store.last_commit_s):
                        store.commit()
                        last_commit = time.monotonic()
    report.seconds = time.perf_counter() - t0
    return report


@torch.inference_mode()
def _analyse(chunk: Chunk, detector, tracker, align_faces, model, device) -> tuple[np.ndarray, ...]:
    """Detect, keep the primary face, align and run the model on one chunk: the row values for the store."""
    n = len(chunk.frame)
    features = np.full((n, 26), np.nan, np.float32)
    face = np.zeros(n, bool)
    box = np.full((n, 4), np.nan, np.float32)
    landmarks = np.full((n, 5, 2), np.nan, np.float32)
    score = np.full(n, np.nan, np.float32)
    for i, faces in enumerate(detector.detect(chunk.frames)):
        j = tracker.update(faces)
        if j is not None:
            face[i] = True
            box[i], landmarks[i], score[i] = faces.boxes[j], faces.landmarks[j], faces.scores[j]
    if face.any():
        crops = align_faces(chunk.frames[face], landmarks[face], device=device)  # (m, 3, 112, 112)
        features[face] = model.features(crops).float().cpu().numpy()
    return features, face, chunk.frame, chunk.time, box, landmarks, score


def _source_attrs(src: Source) -> dict:
    return {"source": src.key, "size_bytes": src.size_bytes, "mtime": src.mtime}


def _video_attrs(src: Source, info: VideoInfo) -> dict:
    return _source_attrs(src) | {"fps": info.fps, "frames_total": info.frames_total,
                                 "width": info.width, "height": info.height}


# -- decoding in a worker process -----------------------------------------------------------------------------------
def _decode_worker(sources: list[Source], fps: float | None, batch_size: int, q) -> None:
    for i, src in enumerate(sources):
        try:
            info, chunks = open_video(src, fps, batch_size)
        except DecodeError as e:
            q.put((i, str(e)))
            continue
        except Exception as e:  # anything else the decoder throws is still this file's failure, not the batch's
            q.put((i, f"cannot decode: {type(e).__name__}: {e}"))
            continue
        q.put((i, info))
        try:
            for chunk in chunks:
                q.put((i, chunk))
            q.put((i, None))
        except StreamBroken as e:
            q.put((i, e))
        except Exception as e:
            q.put((i, StreamBroken(f"decoding stopped: {type(e).__name__}: {e}")))
    q.put((len(sources), "done"))


def _decode(sources: list[Source], fps: float | None, batch_size: int):
    """Yield (source, event) in order: VideoInfo, Chunk..., then None (complete), StreamBroken (partial) or str (failed).

    If the worker process dies (a segfault in the decoder on a malformed file), that file is reported as failed and a
    new worker resumes with the next one.
    """
    ctx = mp.get_context("spawn")
    start = 0
    while start < len(sources):
        q = ctx.Queue(maxsize=4)  # bounded: a few chunks in flight, memory does not grow with video length
        worker = ctx.Process(target=_decode_worker, args=(sources[start:], fps, batch_size, q), daemon=True)
        worker.start()
        current = None  # index (relative to start) of the video whose events are being received
        try:
            while True:
                try:
                    i, event = q.get(timeout=1.0)
                except queue.Empty:
                    if worker.is_alive():
                        continue
                    crashed = start + (current if current is not None else 0)
                    yield sources[crashed], f"the decoder crashed on this file (exit code {worker.exitcode})"
                    start = crashed + 1
                    break
                if event == "done":
                    start = len(sources)
                    break
                current = i
                yield sources[start + i], event
                if not isinstance(event, (VideoInfo, Chunk)):
                    current = i + 1
        finally:
            if worker.is_alive():
                worker.kill()
            worker.join()


# -- progress display -------------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, enabled: bool, n_videos: int):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        class _FPS(TextColumn):
            def render(self, task):
                speed = task.finished_speed or task.speed
                return super().render(task) if speed is None else f"{speed:,.0f} frames/s"

        self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          _FPS(""), TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
        self.videos = self.p.add_task("videos", total=n_videos)
        self.frames = self.p.add_task("frames", total=0)
        self.current = self.p.add_task("", total=None, visible=False)

    def __enter__(self):
        if self.enabled:
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)

    def start_video(self, key: str, frames_total: int) -> None:
        if self.enabled:
            t = self.p.tasks[self.frames].total or 0
            self.p.update(self.frames, total=t + frames_total)
            self.p.update(self.videos, description=f"videos ({key[-40:]})")

    def advance_frames(self, n: int) -> None:
        if self.enabled:
            self.p.advance(self.frames, n)

    def end_video(self, failed: bool = False) -> None:
        if self.enabled:
            self.p.advance(self.videos)
