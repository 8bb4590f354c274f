"""`affextract run`: decode → detect and track the primary face → align → MMA (+ measured movement) → HDF5,
resumable and crash-safe.

Decoding, face detection, tracking and alignment run in worker processes (`affextract.workers`), each on its own
videos; they send the aligned crops, the face mesh's crops and the face geometry, and the main process runs the MMA
and the movement stage (`affextract.movement`: MediaPipe face mesh, blendshapes, head pose, gaze) on the same device,
batched per chunk, and writes. The stages overlap, and a decoder crash on a malformed file costs that file only.
Nothing heavy happens before it is needed: a rerun with nothing left to do reads the output file's index and returns,
without loading torch, the model or a worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from affextract.fusion import au_source
from affextract.pixels import to_unit
from affextract.runtime import RankGroup
from affextract.schema import DEFAULT_WEIGHTS, WEIGHTS_DIR
from affextract.format import MOVEMENT_DATASETS, MOVEMENT_OFF, Provenance, dumps
from affextract.store import FeatureStore, ShardWriter, StoredVideo
from affextract.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Source, VideoInfo, find_sources
from affextract.weights import file_sha256, weights_path
from affextract.workers import Broken, FaceChunk, Failed, Finished, Opened, WorkerSpec, analyse

# The alignment and the mesh crop in the files' provenance. affextract.faces.align computes the alignment without insightface
# (the same transform, to float64 rounding) and now holds roi_from_points too; the texts are left as files made before
# say them, so that those can still be continued.
ALIGNMENT = "arcface-5pt similarity (insightface.utils.face_align.estimate_norm) to 112x112 RGB in [-1, 1]"
MESH_CROP = ("MediaPipe's face crop placed from the tracked face's 5 points (movement.roi_from_points: eyes level, "
             "POINTS_TEMPLATE fitted by least squares), 192x192 RGB, bilinear, black beyond the frame")


@dataclass(frozen=True)
class ExtractOptions:
    weights: Path | None = None  # MMA weights (.safetensors); None = the weights shipped with the package
    detector: str = "mtcnn"  # face detector name (see affextract.faces.detectors.DETECTORS)
    detector_model: Path | None = None  # local model file for detectors that need one (scrfd's .onnx)
    # Seconds of video between full face detections; the frames in between only re-fit the tracked face (one O-Net
    # pass) and a face lost there is detected again at once. In time, so --fps does not stretch the gaps. 0.4 s is
    # every 10th frame of 25 fps video: about 2.5 px of landmark error (faces 150-250 px wide) for twice the speed of
    # detecting every frame (docs/performance.md). 0 = detect on every frame.
    detect_interval: float = 0.4
    device: str = "auto"  # "cpu", "cuda", "cuda:N" or "auto" (cuda when available; cuda:LOCAL_RANK under torchrun)
    batch_size: int = 64  # frames decoded, detected and run through the model together
    workers: int = 0  # processes that decode, detect and align, each on its own videos; 0 = half the cores, at most 8
    fps: float | None = None  # analyse frames at this rate (by timestamp); None = every frame
    commit_every: float = 60.0  # seconds between merges of finished videos into the output file
    movement: bool = True  # measure movement: MediaPipe blendshapes, head pose, gaze, face presence per frame
    mesh: bool = False  # also store the 478 face mesh points per frame (float16; needs movement)
    # With movement: AU rows fused with the frame's blendshapes (affextract.fusion); False keeps the CNN's rows.
    au_fusion: bool = True
    fusion_weights: Path | None = None  # AU fusion parameters (.safetensors); None = the shipped au_fusion
    # Extract again a stored video whose name now holds a file with other contents (a clash, refused without it).
    replace: bool = False
    # Write the output as a folder: one shard file per video and a manifest read as one file (docs/format.md).
    shards: bool = False

    def __post_init__(self):
        for name, low in (("detect_interval", 0), ("batch_size", 1), ("workers", 0), ("commit_every", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"ExtractOptions.{name} must be >= {low}, got {getattr(self, name)}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"ExtractOptions.fps must be > 0 (or None for every frame), got {self.fps}")
        if self.mesh and not self.movement:
            raise ValueError("the mesh is part of the movement stage: --mesh cannot go with --no-movement")
        if self.fusion_weights is not None and not (self.movement and self.au_fusion):
            raise ValueError("--fusion-weights fuses the AU rows with the movement: it cannot go with --no-movement "
                             "or --cnn-aus")


@dataclass
class ExtractReport:
    output: Path
    written: list[str] = field(default_factory=list)  # keys extracted in this run (complete or partial)
    skipped: list[str] = field(default_factory=list)  # keys already stored and unchanged (or an identical copy)
    replaced: list[str] = field(default_factory=list)  # keys stored from a file with other contents, redone (replace)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, error)
    partial: list[tuple[str, str]] = field(default_factory=list)  # (key, why): stream broke, decoded frames kept
    ignored: list[Path] = field(default_factory=list)  # files in input folders that are neither video nor image
    frames: int = 0  # frames analysed in this run
    seconds: float = 0.0
    stored: int | None = None  # videos with features the output file holds after an interruption (None otherwise)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped `extract`. Videos finished before it were merged into the output file first, so they
    are safe; `report` says what this run did and `report.stored` how many videos the file now holds. Calling
    `extract` again with the same arguments continues: finished videos are skipped, the interrupted ones redone."""

    def __init__(self, report: "ExtractReport"):
        super().__init__(f"interrupted; {report.output} holds {report.stored} finished video(s)")
        self.report = report


class KeyClashError(ValueError):
    """An input would replace a different video stored under the same key."""


# -- events: this process's progress, for `extract`'s on_event ----------------------------------------------------
@dataclass(frozen=True)
class RunStarted:
    """The process starts on its videos (none when every video is already stored: then no event comes at all)."""

    sizes: tuple[int, ...]  # bytes of each of its videos, in the order the other events' `index` counts them


@dataclass(frozen=True)
class VideoOpened:
    """A video was opened. Sent again when decoding starts over with another decoder: its frames come again."""

    index: int  # position in RunStarted.sizes
    frames: int  # frames it will bring (a broken stream brings fewer)


@dataclass(frozen=True)
class FramesAnalysed:
    index: int  # position in RunStarted.sizes
    frames: int  # frames of this video analysed and written since its last event


@dataclass(frozen=True)
class VideoEnded:
    """A video is done: complete, partial or failed (ExtractReport says which)."""

    index: int  # position in RunStarted.sizes
    failed: bool = False  # it could not be analysed (recorded as failed; the next run retries it)


@dataclass(frozen=True)
class RunEnded:
    """The last event, after RunStarted, however the run ends."""

    complete: bool  # every video ended; False when an error or Ctrl-C stopped the run


ExtractEvent = RunStarted | VideoOpened | FramesAnalysed | VideoEnded | RunEnded


def _ignore(event: ExtractEvent) -> None:
    pass


def extract(inputs: Path | str | list[Path | str], output: Path | str,
            options: ExtractOptions = ExtractOptions(),
            on_event: Callable[[ExtractEvent], None] | None = None, runner=None) -> ExtractReport:
    """Extract per-frame features of every video/image under `inputs` into the HDF5 file `output`.

    `on_event` receives this process's progress as it happens (`ExtractEvent`s), e.g. to draw it (the command line's
    affextract.progress); nothing is printed here.

    `runner` analyses the videos left to do once the plan is made, with `_run`'s arguments: this machine's worker
    processes by default; `affextract.cluster.extract_on_ray` passes its Ray driver, so the plan, the store and the
    resume rules stay these.

    Under torchrun each rank takes every WORLD_SIZE-th video still to do and writes its own shard files; rank 0 merges
    them into `output`, so the result (and resuming it) is the same as a single-process run.
    """
    from affextract.faces.detectors import describe_detector

    t0 = time.perf_counter()
    interrupted = False
    dist = RankGroup()
    report = ExtractReport(output=Path(output))
    try:
        roots = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
        sources, report.ignored = find_sources(roots)
        if not sources:
            raise ValueError(
                f"no video or image file in {', '.join(map(str, roots))}"
                + (f" ({len(report.ignored)} other file(s) ignored)" if report.ignored else "")
                + f"; videos end in {' '.join(sorted(VIDEO_EXTENSIONS))}, "
                f"images in {' '.join(sorted(IMAGE_EXTENSIONS))}"
            )
        name, sha256 = _weights_identity(options.weights)
        provenance = Provenance(
            model=name, model_sha256=sha256,
            detector=dumps(describe_detector(options.detector, **_detector_options(options))
                           | {"detect_interval": float(options.detect_interval)}),
            alignment=ALIGNMENT, sampling=dumps({"fps": None if options.fps is None else float(options.fps)}),
            movement=_movement_identity(options),
            au_source=au_source(options.movement and options.au_fusion, options.fusion_weights),
        )
        store = FeatureStore(output, provenance, merge=dist.rank == 0, datasets=movement_datasets(options),
                             links=options.shards)
        opened: Exception | None = None
        if dist.rank == 0:
            try:
                store.open()  # lock, check the file, merge what a crashed run left
            except Exception as e:
                opened = e
        # Every rank learns whether rank 0 could open the file, so none waits for a run that will not happen.
        refusal = dist.broadcast(None if opened is None else str(opened))
        if opened is not None:
            raise opened
        if refusal is not None:
            raise RuntimeError(f"rank 0 could not open {output}: {refusal}")
        try:
            todo = _plan(sources, store.stored(), report, options.replace)
            mine = todo[dist.rank::dist.world]
            if mine:
                with _ctrl_c_latch() as hit:
                    (runner or _run)(mine, store, provenance, options, dist.rank == 0, report,
                                     _checking(on_event or _ignore, hit))
        except KeyboardInterrupt:
            interrupted = True  # the finished videos are merged below, before the interrupt goes on
        finally:
            if not interrupted:
                dist.barrier()
            if dist.rank == 0:
                store.close()  # final merge of every rank's shards, unlock
        if interrupted:
            report.stored = len(store.stored()) if dist.rank == 0 else None
            report.seconds = time.perf_counter() - t0
            raise Interrupted(report)
        reports = dist.gather(report)
    finally:
        dist.close()
    _combine(report, reports, dist.rank)
    report.seconds = time.perf_counter() - t0
    return report


@contextlib.contextmanager
def _ctrl_c_latch() -> Iterator[list[int]]:
    """Ctrl-C that cannot be lost. Python raises KeyboardInterrupt wherever the main thread is when the signal is
    handled; inside a weakref callback or a __del__ the exception is printed and dropped, and the run would go on.
    This handler also latches the signal (the list it yields), which the run checks at every event."""
    hit: list[int] = []
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield hit  # not ours to change (a host application's handler, or not the main thread)
        return

    def handler(sig: int, frame) -> None:
        hit.append(sig)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _checking(on_event: Callable[[ExtractEvent], None], hit: list[int]) -> Callable[[ExtractEvent], None]:
    """`on_event` that raises KeyboardInterrupt after any event but the last once Ctrl-C is latched in `hit`."""
    def emit(event: ExtractEvent) -> None:
        on_event(event)
        if hit and not isinstance(event, RunEnded):
            raise KeyboardInterrupt
    return emit


def _combine(report: ExtractReport, reports: list[ExtractReport], rank: int) -> None:
    """Every rank's report (`reports`, in rank order) into this rank's: rank 0 reports the whole job; every other rank
    takes the job's failures, so that all end with the same verdict and torchrun's exit status is the run's."""
    for other in reports[1:] if rank == 0 else ():
        report.written += other.written
        report.failed += other.failed
        report.partial += other.partial
        report.frames += other.frames
    if rank != 0:
        report.failed = [f for r in reports for f in r.failed]


def _plan(sources: list[Source], stored: dict[str, StoredVideo], report: ExtractReport,
          replace: bool = False) -> list[Source]:
    """The sources to extract; the unchanged ones go to report.skipped.

    A source whose key holds another file (another path, size or time) is compared by size, then by content
    (SHA-256): an identical copy is skipped; other contents are refused, unless `replace` (report.replaced), so that
    no stored video is ever replaced by another one unasked. The same path with other contents is extracted again.
    """
    todo, clashes = [], []
    for s in sources:
        old, digest = stored.get(s.key), None
        if old is None:
            todo.append(s)
        elif (old.size_bytes, old.mtime) == (s.size_bytes, s.mtime):  # the same file, even if its folder moved
            report.skipped.append(s.key)
        elif old.size_bytes == s.size_bytes and (digest := _stored_sha256(old)) == file_sha256(s.path):
            report.skipped.append(s.key)  # a copy (new times, another folder)
        elif old.path in ("", str(s.path)):  # the same file, changed since: extracted again
            todo.append(s)
        elif replace:
            todo.append(s)
            report.replaced.append(s.key)
        else:
            known = old.size_bytes != s.size_bytes or digest is not None
            clashes.append(f"'{s.key}' (stored from {old.path}, {old.size_bytes:,} bytes; this run has {s.path}, "
                           f"{s.size_bytes:,} bytes, " + ("other contents)" if known else
                                                          "contents not comparable: the stored source is gone)"))
    if clashes:
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        raise KeyClashError(
            f"{report.output} already holds a different video under the same name: {'; '.join(clashes[:3])}{more}. "
            "Write to another output file, give the folders' common parent as the input so that the names differ, "
            "or pass --replace to replace the stored video(s)."
        )
    return todo


def _stored_sha256(old: StoredVideo) -> str | None:
    """The contents' SHA-256 of a stored video: recorded, or (files written before it was) hashed from its source
    if that is still there, unchanged; None when it cannot be known."""
    if old.sha256:
        return old.sha256
    path = Path(old.path) if old.path else None
    if path is not None and path.is_file():
        st = path.stat()
        if (st.st_size, st.st_mtime) == (old.size_bytes, old.mtime):
            return file_sha256(path)
    return None


def _weights_identity(weights: Path | str | None) -> tuple[str, str]:
    """Name and SHA-256 of the MMA weights for the file's provenance, found without importing torch, so a rerun with
    nothing to do does not load the model. load_mma checks the file again (against its recorded checksum)."""
    path = weights_path(weights if weights is not None else DEFAULT_WEIGHTS, "MMA weights")
    return path.stem, file_sha256(path)


def movement_datasets(options: ExtractOptions) -> tuple[str, ...]:
    """The per-frame movement datasets a run with these options stores (format.MOVEMENT_DATASETS)."""
    if not options.movement:
        return ()
    return tuple(d for d in MOVEMENT_DATASETS if d != "mesh" or options.mesh)


def _movement_identity(options: ExtractOptions) -> str:
    """The file's `movement` provenance: on/off, mesh stored, the MediaPipe weights' SHA-256s and the crop rule. The
    checksums are those recorded beside the shipped weights (the loader refuses a file that does not match its
    record), read without importing torch."""
    if not options.movement:
        return MOVEMENT_OFF
    weights = {p.stem: json.loads(p.read_text())["sha256"]
               for p in sorted(WEIGHTS_DIR.glob("mediapipe_*.json"))}
    return dumps({"enabled": True, "mesh": options.mesh, "weights_sha256": weights, "crop": MESH_CROP})


def _run(sources: list[Source], store: FeatureStore, provenance: Provenance, options: ExtractOptions, merges: bool,
         report: ExtractReport, emit: Callable[[ExtractEvent], None]) -> None:
    """Extract `sources` into `store` (this rank's share)."""
    import torch

    from affextract.runtime import resolve_device

    device = resolve_device(options.device)
    model = _model(options, provenance, device)
    workers = options.workers or default_workers()
    spec = WorkerSpec(options.fps, options.batch_size, options.detector, _detector_options(options),
                      float(options.detect_interval), str(device), _cpu_threads(workers), options.movement)
    features = _Features(model, device)
    movement = _Movement(device, movement_datasets(options)) if options.movement else None
    fusion = _fusion(provenance.au_source, options.fusion_weights)
    writers: dict[int, ShardWriter] = {}  # video index -> shard of each video in flight
    threads_before = torch.get_num_threads()
    torch.set_num_threads(_cpu_threads(workers))
    last_commit = time.monotonic()
    emit(RunStarted(tuple(s.size_bytes for s in sources)))
    complete = False
    try:
        for event in analyse(sources, spec, workers):
            src = sources[event.index]
            match event:
                case Opened(info=info, sha256=sha256):
                    if event.index in writers:  # decoding starts over (video.read_video): drop what came
                        writers.pop(event.index).abort()
                    attrs = _video_attrs(src, info) | {"sha256": sha256}
                    writers[event.index] = store.begin_video(src.key, attrs, info.frames_analysed)
                    emit(VideoOpened(event.index, info.frames_analysed))
                case FaceChunk():
                    rows, moved = analyse_chunk(event, features, movement, fusion)
                    writers[event.index].append(rows, event.face, event.frame, event.time,
                                                event.boxes, event.landmarks,
                                                np.where(event.face, event.scores, np.nan), **moved)
                    report.frames += len(event.frame)
                    emit(FramesAnalysed(event.index, len(event.frame)))
                case Finished():
                    writers.pop(event.index).finish("complete")
                    report.written.append(src.key)
                case Broken(error=error):
                    writers.pop(event.index).finish("partial", error)
                    report.written.append(src.key)
                    report.partial.append((src.key, error))
                case Failed(error=error):
                    writer = writers.pop(event.index, None)
                    if writer is not None:  # the worker crashed part-way through this video
                        writer.abort()
                    store.record_failure(src.key, _source_attrs(src), error)
                    report.failed.append((src.key, error))
            if event.ends:
                emit(VideoEnded(event.index, isinstance(event, Failed)))
                if merges and time.monotonic() - last_commit > max(options.commit_every, 20 * store.last_commit_s):
                    store.commit()
                    last_commit = time.monotonic()
        complete = True
    finally:
        torch.set_num_threads(threads_before)
        for writer in writers.values():  # interrupted videos: their shards are dropped, the videos redone
            writer.abort()
        emit(RunEnded(complete))


def _model(options: ExtractOptions, provenance: Provenance, device):
    """The run's MMA on `device`, checked against the weights the provenance names."""
    from affextract.model import load_mma

    model, winfo = load_mma(options.weights, device=device)
    if winfo.sha256 != provenance.model_sha256:
        raise RuntimeError(f"the weights file {options.weights} changed while the run started; run again")
    return model


def _fusion(source: str, path: Path | None):
    """The AU fusion the provenance names (None for CNN rows), checked against the file it was read from."""
    from affextract.fusion import CNN_SOURCE, load_fusion

    if source == CNN_SOURCE:
        return None
    fusion = load_fusion(path)
    if fusion.source != source:
        raise RuntimeError(f"the AU fusion file {path or 'au_fusion'} changed while the run started; run again")
    return fusion


def analyse_chunk(chunk: FaceChunk, features: _Features, movement: _Movement | None, fusion
                  ) -> tuple[np.ndarray, dict]:
    """A chunk's (N, 26) rows and movement datasets: the MMA, the movement stage, then the AU rows fused with the
    movement when `fusion` (the run's AUFusion, or None for the CNN's rows)."""
    rows, moved = features(chunk), movement(chunk) if movement else {}
    if fusion is not None:
        rows = fusion(rows, moved["blendshapes"], moved["presence"])
    return rows, moved


class _Features:
    """The MMA on a chunk's aligned faces: (n, 26) rows, NaN where there is no face."""

    def __init__(self, model, device):
        import torch

        from affextract.runtime import gpu_paths

        self.model, self.device = model, device
        # Half precision on GPUs: the model's outputs are probabilities and tanh values, far above bf16 error.
        self.dtype = torch.bfloat16 if gpu_paths(device) else None

    def __call__(self, faces: FaceChunk) -> np.ndarray:
        import torch

        out = np.full((len(faces.face), 26), np.nan, np.float32)
        if len(faces.crops):
            x = to_unit(torch.from_numpy(faces.crops).to(self.device, non_blocking=True))
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                         enabled=self.dtype is not None):
                out[faces.face] = self.model.features(x).float().cpu().numpy()
        return out


class _Movement:
    """The movement stage on a chunk's face mesh crops: per-frame arrays of `datasets`, NaN where there is no face."""

    def __init__(self, device, datasets: tuple[str, ...]):
        from affextract.movement import Movement, MovementOptions
        from affextract.runtime import gpu_paths

        # Batches of 16 fit a CPU's cache; a GPU takes a chunk at once.
        self.stage = Movement(device, MovementOptions(batch_size=256 if gpu_paths(device) else 16))
        self.datasets = datasets

    def __call__(self, faces: FaceChunk) -> dict[str, np.ndarray]:
        import torch

        n = len(faces.face)
        out = {d: np.full((n, *MOVEMENT_DATASETS[d][1]), np.nan, MOVEMENT_DATASETS[d][0]) for d in self.datasets}
        if len(faces.mesh_crops):
            measured = self.stage(torch.from_numpy(faces.mesh_crops), faces.mesh_to_image)
            for d in self.datasets:
                out[d][faces.face] = getattr(measured, d)
        return out


def _detector_options(options: ExtractOptions) -> dict:
    return {"model_path": str(options.detector_model)} if options.detector_model else {}


def _source_attrs(src: Source) -> dict:
    return {"source": src.key, "path": str(src.path), "size_bytes": src.size_bytes, "mtime": src.mtime}


def _video_attrs(src: Source, info: VideoInfo) -> dict:
    return _source_attrs(src) | {"fps": info.fps, "frames_total": info.frames_total,
                                 "width": info.width, "height": info.height, "decoder": info.decoder}


def _cpu_threads(workers: int) -> int:
    """Torch threads for each worker and for the main process. The processes share the cores: oversubscribed OpenMP
    threads spin against each other (on 2 cores, 2 threads in each of 2 processes ran 4x slower than 1 in each)."""
    return max(1, (os.cpu_count() or 1) // (workers + 1))


def default_workers() -> int:
    """Half the cores, at most 8: detection dominates and scales better over processes than over threads."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))
