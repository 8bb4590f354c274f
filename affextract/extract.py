"""`affextract run`: decode → detect and track the primary face → align → MMA → HDF5, resumable and crash-safe.

Decoding, face detection, tracking and alignment run in worker processes, each on its own videos; they send only the
aligned 112x112 crops and the face geometry (about 40 KB a frame instead of a raw frame), and the main process runs the
MMA and writes. The stages overlap, and a decoder crash on a malformed file costs that file only: the worker is
restarted on the next one.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from affextract.store import FeatureStore, Provenance, ShardWriter, dumps
from affextract.video import DecodeError, Source, StreamBroken, VideoInfo, find_sources, open_video

ALIGNMENT = "arcface-5pt similarity (insightface.utils.face_align.estimate_norm) to 112x112 RGB in [-1, 1]"


@dataclass(frozen=True)
class ExtractOptions:
    weights: Path | None = None  # MMA weights (.safetensors); None = the weights shipped with the package
    detector: str = "mtcnn"  # face detector name (see affextract.faces.DETECTORS)
    detector_model: Path | None = None  # local model file for detectors that need one (scrfd's .onnx)
    # Full face detection on every k-th frame; the frames between only re-fit the tracked face (one O-Net pass). 10
    # costs about 2.5 px of landmark error (faces 150-250 px wide) and no face rate, for twice the speed (README).
    detect_every: int = 10
    device: str = "auto"  # "cpu", "cuda", "cuda:N" or "auto" (cuda when available; cuda:LOCAL_RANK under torchrun)
    batch_size: int = 64  # frames decoded, detected and run through the model together
    workers: int = 0  # processes that decode, detect and align, each on its own videos; 0 = half the cores, at most 8
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


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for, but this PyTorch build sees no CUDA GPU; use --device cpu")
    return d


class _Dist:
    """The process group when started by torchrun (WORLD_SIZE > 1): videos are sharded by rank; rank 0 merges."""

    def __init__(self):
        import os

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1:
            import datetime

            import torch.distributed as dist

            # gloo: only barriers and small objects cross ranks. Ranks finish their shares at different times, so the
            # timeout is long.
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def extract(inputs: Path | str | list[Path | str], output: Path | str,
            options: ExtractOptions = ExtractOptions()) -> ExtractReport:
    """Extract per-frame features of every video/image under `inputs` into the HDF5 file `output`.

    Under torchrun each rank takes every WORLD_SIZE-th video still to do and writes its own shard files; rank 0 merges
    them into `output`, so the result (and resuming it) is the same as a single-process run.
    """
    from affextract.faces import get_detector
    from affextract.model import load_weights

    t0 = time.perf_counter()
    dist = _Dist()
    report = ExtractReport(output=Path(output))
    try:
        sources, report.ignored = find_sources([inputs] if isinstance(inputs, (str, Path)) else list(inputs))
        device = resolve_device(options.device, dist.local_rank)
        model, winfo = load_weights(options.weights, device=device)
        det_opts = {"model_path": str(options.detector_model)} if options.detector_model else {}
        # Built here, on the CPU, only to fail early on a bad name or a missing model and to record its settings; the
        # workers build their own on `device`.
        detector = get_detector(options.detector, device="cpu", **det_opts)
        provenance = Provenance(
            model=winfo.name, model_sha256=winfo.sha256,
            detector=dumps(detector.settings() | {"detect_every": options.detect_every}),
            alignment=ALIGNMENT, sampling=dumps({"fps": None if options.fps is None else float(options.fps)}),
        )
        store = FeatureStore(output, provenance, merge=dist.rank == 0)
        opened: Exception | None = None
        if dist.rank == 0:
            try:
                store.__enter__()  # lock, check the file, merge what a crashed run left
            except Exception as e:
                opened = e
        # Every rank learns whether rank 0 could open the file, so none waits for a run that will not happen.
        refusal = dist.broadcast(None if opened is None else str(opened))
        if opened is not None:
            raise opened
        if refusal is not None:
            raise RuntimeError(f"rank 0 could not open {output}: {refusal}")
        writers: dict[int, ShardWriter] = {}  # video index -> shard of each video in flight
        workers = options.workers or default_workers()
        threads_before = torch.get_num_threads()
        torch.set_num_threads(_cpu_threads(workers))
        try:
            stored = store.stored()
            todo = []
            for s in sources:
                if stored.get(s.key) == (s.size_bytes, s.mtime):
                    report.skipped.append(s.key)
                else:
                    todo.append(s)
            mine = todo[dist.rank::dist.world]
            features = _Features(model, device)
            spec = _WorkerSpec(options.fps, options.batch_size, options.detector, det_opts, options.detect_every,
                               str(device), _cpu_threads(workers))
            ui = _Progress(options.progress and dist.rank == 0, len(mine))
            last_commit = time.monotonic()
            with ui:
                for i, event in _analyse(mine, spec, workers):
                    src = mine[i]
                    if isinstance(event, VideoInfo):
                        writers[i] = store.begin_video(src.key, _video_attrs(src, event))
                        ui.start_video(src.key, event.frames_analysed)
                        continue
                    if isinstance(event, Faces):
                        writers[i].append(features(event), event.face, event.frame, event.time, event.boxes,
                                          event.landmarks, np.where(event.face, event.scores, np.nan))
                        report.frames += len(event.frame)
                        ui.advance_frames(len(event.frame))
                        continue
                    writer = writers.pop(i, None)
                    if event is None:  # end of a complete video
                        writer.finish("complete")
                        report.written.append(src.key)
                    elif isinstance(event, StreamBroken):
                        writer.finish("partial", str(event))
                        ui.shrink_frames(src.key, writer.k)
                        report.written.append(src.key)
                        report.partial.append((src.key, str(event)))
                    else:  # an error before any frame was decoded, or a crash of the worker
                        if writer is not None:  # the worker crashed part-way through this video
                            writer.abort()
                        store.record_failure(src.key, _source_attrs(src), str(event))
                        report.failed.append((src.key, str(event)))
                    ui.end_video()
                    if dist.rank == 0 and time.monotonic() - last_commit > max(options.commit_every,
                                                                               20 * store.last_commit_s):
                        store.commit()
                        last_commit = time.monotonic()
        finally:
            torch.set_num_threads(threads_before)
            for writer in writers.values():  # interrupted videos: their shards are dropped, the videos redone
                writer.abort()
            dist.barrier()
            if dist.rank == 0:
                store.__exit__(None, None, None)  # final merge of every rank's shards, unlock
        reports = dist.gather(report)
    finally:
        dist.close()
    for other in reports[1:] if dist.rank == 0 else ():
        report.written += other.written
        report.failed += other.failed
        report.partial += other.partial
        report.frames += other.frames
    if dist.rank != 0:  # every rank ends with the same verdict, so torchrun's exit status is the run's
        report.failed = [f for r in reports for f in r.failed]
    report.seconds = time.perf_counter() - t0
    return report


class _Features:
    """The MMA on a chunk's aligned faces: (n, 26) rows, NaN where there is no face."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        # Half precision on GPUs: the model's outputs are probabilities and tanh values, far above bf16 error.
        self.dtype = torch.bfloat16 if device.type == "cuda" else None

    @torch.inference_mode()
    def __call__(self, faces: "Faces") -> np.ndarray:
        out = np.full((len(faces.face), 26), np.nan, np.float32)
        if len(faces.crops):
            x = torch.from_numpy(faces.crops).to(self.device, non_blocking=True).float() / 127.5 - 1.0
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                out[faces.face] = self.model.features(x).float().cpu().numpy()
        return out


def _source_attrs(src: Source) -> dict:
    return {"source": src.key, "size_bytes": src.size_bytes, "mtime": src.mtime}


def _video_attrs(src: Source, info: VideoInfo) -> dict:
    return _source_attrs(src) | {"fps": info.fps, "frames_total": info.frames_total,
                                 "width": info.width, "height": info.height}


# -- decoding in a worker process -----------------------------------------------------------------------------------
# -- decode, detect, track and align in worker processes ----------------------------------------------------------------
@dataclass(frozen=True)
class Faces:
    """A chunk after the face stage: what the worker sends (aligned crops, not frames, so little crosses processes)."""

    frame: np.ndarray  # (n,) int32 frame index in the stream
    time: np.ndarray  # (n,) float64 seconds
    face: np.ndarray  # (n,) bool
    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,) float32
    landmarks: np.ndarray  # (n, 5, 2) float32
    crops: np.ndarray  # (m, 3, 112, 112) uint8 RGB, m = face.sum(): aligned faces (uint8 as insightface's norm_crop)


@dataclass(frozen=True)
class _WorkerSpec:
    fps: float | None  # frame sampling
    batch_size: int  # frames per chunk
    detector: str  # detector name
    detector_options: dict  # its options
    detect_every: int  # key-frame interval
    device: str  # where detection and alignment run
    threads: int  # torch threads of each worker


def _cpu_threads(workers: int) -> int:
    """Torch threads for each worker and for the main process. The processes share the cores: oversubscribed OpenMP
    threads spin against each other (on 2 cores, 2 threads in each of 2 processes ran 4x slower than 1 in each)."""
    import os

    return max(1, (os.cpu_count() or 1) // (workers + 1))


def default_workers() -> int:
    """Half the cores, at most 8: detection dominates and scales better over processes than over threads."""
    import os

    return max(1, min(8, (os.cpu_count() or 1) // 2))


def _worker(sources: list[Source], indices: list[int], spec: _WorkerSpec, q) -> None:
    import os

    from affextract.faces import PrimaryFaceStream, get_detector, warp_faces

    # FFmpeg and decord print their complaints about broken files straight to the C-level stderr, through the
    # progress display; every failure reaches the run's summary through the queue instead.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    torch.set_num_threads(spec.threads)
    detector = get_detector(spec.detector, device=spec.device, **spec.detector_options)
    for i in indices:
        try:
            info, chunks = open_video(sources[i], spec.fps, spec.batch_size)
        except DecodeError as e:
            q.put((i, str(e)))
            continue
        except Exception as e:  # anything else the decoder throws is still this file's failure, not the batch's
            q.put((i, f"cannot decode: {type(e).__name__}: {e}"))
            continue
        q.put((i, info))
        stream = PrimaryFaceStream(detector, detect_every=spec.detect_every)
        try:
            for chunk in chunks:
                p = stream(chunk.frames)
                with torch.inference_mode():
                    crops = warp_faces(chunk.frames[p.face], p.landmarks[p.face], device=spec.device).cpu().numpy()
                q.put((i, Faces(chunk.frame, chunk.time, p.face, p.boxes, p.scores, p.landmarks, crops)))
            q.put((i, None))
        except StreamBroken as e:
            q.put((i, e))
        except Exception as e:
            q.put((i, StreamBroken(f"decoding stopped: {type(e).__name__}: {e}")))


def _analyse(sources: list[Source], spec: _WorkerSpec, workers: int = 1):
    """Yield (index, event) per video: VideoInfo, Faces..., then None (complete), StreamBroken (partial) or str (failed).

    Each worker process takes every `workers`-th video, so events of different videos interleave; the events of one
    video keep their order. If a worker dies (a segfault in the decoder on a malformed file), its current file is
    reported as failed and a new worker resumes with its next one.
    """
    ctx = mp.get_context("spawn")
    # Bounded: a few chunks per worker in flight, so memory does not grow with video length.
    q = ctx.Queue(maxsize=4 * max(workers, 1))
    todo = {w: list(range(w, len(sources), workers)) for w in range(min(workers, len(sources)))}
    procs: dict[int, mp.Process] = {}

    def start(w: int) -> None:
        procs[w] = ctx.Process(target=_worker, args=(sources, todo[w], spec, q), daemon=True)
        procs[w].start()

    for w in todo:
        start(w)
    try:
        while any(todo.values()):
            try:
                i, event = q.get(timeout=1.0)
            except queue.Empty:
                for w, p in procs.items():
                    if todo[w] and not p.is_alive():
                        crashed = todo[w].pop(0)
                        yield crashed, f"the worker crashed on this file (exit code {p.exitcode})"
                        if todo[w]:
                            start(w)
                continue
            yield i, event
            if not isinstance(event, (VideoInfo, Faces)):
                todo[i % workers].remove(i)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join()


# -- progress display -------------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, enabled: bool, n_videos: int):
        self.enabled = enabled
        self.announced: dict[str, int] = {}  # frames each video in flight said it would bring
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        class _FPS(TextColumn):
            def render(self, task):
                speed = task.finished_speed or task.speed
                text = f"{speed:,.0f} frames/s" if task.fields.get("rate") and speed else ""
                return super().render(task) if not text else text

        self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          _FPS(""), TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
        self.videos = self.p.add_task("videos", total=n_videos)
        self.frames = self.p.add_task("frames", total=0, rate=True)

    def __enter__(self):
        if self.enabled:
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)

    def start_video(self, key: str, frames_total: int) -> None:
        if self.enabled:
            self.announced[key] = frames_total
            t = self.p.tasks[self.frames].total or 0
            self.p.update(self.frames, total=t + frames_total)
            self.p.update(self.videos, description=f"videos ({key[-40:]})")

    def shrink_frames(self, key: str, analysed: int) -> None:
        """A video stopped early: it will not bring the frames it announced."""
        if self.enabled:
            t = self.p.tasks[self.frames]
            self.p.update(self.frames, total=t.total - (self.announced.pop(key) - analysed))

    def advance_frames(self, n: int) -> None:
        if self.enabled:
            self.p.advance(self.frames, n)

    def end_video(self) -> None:
        if self.enabled:
            self.p.advance(self.videos)
