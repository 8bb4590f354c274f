"""Worker processes of `affextract run`: decode, detect and track the subject's face, align it.

Each worker takes its own videos and sends the main process only the aligned 112x112 crops, the face mesh's 192x192
crops (with measured movement) and the face geometry (about 40 KB a frame, 150 KB with the mesh crop, instead of a raw
frame), as typed events; the main process runs the MMA and the movement stage and writes.

Workers are plain subprocesses running `serve` (`python -c`), not multiprocessing children: a multiprocessing
"spawn" child re-runs the parent's main script, so `affextract.extract` called from a script without an
`if __name__ == "__main__":` guard would run again inside every worker. Each worker has pipes of its own, so one that
dies (a decoder crash on a malformed file) costs its current file only and cannot garble what the others send. A
worker ends when the main process ends, even by kill -9: Linux delivers a parent-death signal, and on every system the
worker's job pipe reaches end-of-file.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator

import numpy as np

from affextract.video import Chunk, DecodeError, Source, StreamBroken, VideoInfo, read_video
from affextract.weights import file_sha256

if TYPE_CHECKING:
    import torch

    from affextract.faces.tracking import PrimaryFaceStream


@dataclass(frozen=True)
class WorkerSpec:
    """How every worker works (the same for all)."""

    fps: float | None  # frame sampling (None = every frame)
    batch_size: int  # frames per chunk
    detector: str  # detector name
    detector_options: dict  # its options
    detect_interval: float  # seconds between full detections
    device: str  # where detection and alignment run
    threads: int  # torch threads of each worker
    movement: bool = False  # also cut the face mesh's crops (MediaPipe's, from the tracked face's 5 points)


# -- events: worker -> main process -------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoEvent:
    index: int  # the video's position in the list the workers were given
    ends: ClassVar[bool] = False  # the video's last event


@dataclass(frozen=True)
class Opened(VideoEvent):
    """The video was opened; its frames follow. Sent again when decoding starts over with another decoder
    (video.read_video): the frames sent before are void."""

    info: VideoInfo
    sha256: str  # of the file's contents: tells a copy from another video under the same name on a later run


@dataclass(frozen=True)
class FaceChunk(VideoEvent):
    """Consecutive analysed frames after the face stage."""

    frame: np.ndarray  # (n,) int32 frame index in the stream
    time: np.ndarray  # (n,) float64 seconds
    face: np.ndarray  # (n,) bool
    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,) float32
    landmarks: np.ndarray  # (n, 5, 2) float32
    crops: np.ndarray  # (m, 3, 112, 112) uint8 RGB, m = face.sum(): aligned faces (uint8 as insightface's norm_crop)
    # With movement: (m, 3, 192, 192) uint8 RGB face mesh crops (uint8 keeps the pipe small) and their (m, 2, 3)
    # float32 crop -> image affines; None without.
    mesh_crops: np.ndarray | None = None
    mesh_to_image: np.ndarray | None = None


@dataclass(frozen=True)
class Finished(VideoEvent):
    """Every frame was analysed."""

    ends: ClassVar[bool] = True


@dataclass(frozen=True)
class Broken(VideoEvent):
    """The stream broke part-way; the frames sent before are good."""

    error: str
    ends: ClassVar[bool] = True


@dataclass(frozen=True)
class Failed(VideoEvent):
    """Not one frame could be decoded, or the worker died on this video."""

    error: str
    ends: ClassVar[bool] = True


@dataclass(frozen=True)
class _Ready:
    """The worker has set itself up (torch, detector) and starts on its videos."""


@dataclass(frozen=True)
class _SetupFailed:
    error: str


class WorkerSetupError(RuntimeError):
    """A worker could not set itself up (detector model, device, weights): no video can be analysed."""


def face_chunk(index: int, chunk: Chunk, stream: PrimaryFaceStream, device: str | torch.device, movement: bool,
               lap: Callable[[str], None] = lambda stage: None) -> FaceChunk:
    """The face stage on one decoded chunk of video `index`, as the workers run it: the primary face detected and
    tracked (`stream`, kept across the video's chunks), warped onto the ArcFace template for the MMA and, with
    `movement`, cut as MediaPipe's face crop for the mesh. `lap(stage)` is called as each stage ends ("detect+track",
    "align", "mesh crop"), so that a benchmark can time them."""
    import torch

    from affextract.faces.align import crop_faces, invert_affine, roi_from_points, warp_faces

    p = stream(chunk.frames, chunk.time)
    lap("detect+track")
    frames, marks = chunk.frames[p.face], p.landmarks[p.face]
    mesh_crops = mesh_to_image = None
    with torch.inference_mode():
        crops = warp_faces(frames, marks, device=device).cpu().numpy()
        lap("align")
        if movement:
            roi = roi_from_points(marks)
            mesh_crops = crop_faces(frames, roi, device=device).cpu().numpy()
            mesh_to_image = invert_affine(roi).astype(np.float32)
            lap("mesh crop")
    return FaceChunk(index, chunk.frame, chunk.time, p.face, p.boxes, p.scores, p.landmarks, crops, mesh_crops,
                     mesh_to_image)


# -- the main process's side -----------------------------------------------------------------------------------------
class _Worker:
    def __init__(self, sources: list[Source], indices: list[int], spec: WorkerSpec):
        events_r, events_w = os.pipe()
        job_r, job_w = os.pipe()
        # The worker sees the main process's import path, as a multiprocessing child would.
        code = f"import sys; sys.path[:] = {sys.path!r}; from affextract.workers import serve; serve({events_w})"
        try:
            # stdout is dropped: some detector back-ends print notices there, which belongs to the user's program.
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=job_r, stdout=subprocess.DEVNULL,
                                         pass_fds=(events_w,))
        finally:
            os.close(job_r)
            os.close(events_w)
        self.events = Connection(events_r, writable=False)
        # Kept open while the worker lives: its end-of-file tells the worker that this process is gone.
        self.job = job_w
        self.ready = False
        payload = pickle.dumps(({i: sources[i] for i in indices}, indices, spec, os.getpid()))
        # Written from a thread: a long job fills the pipe before the worker has started to read it.
        self.sender = threading.Thread(target=_write_all, args=(job_w, struct.pack("!Q", len(payload)) + payload),
                                       daemon=True)
        self.sender.start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.sender.join()  # done, or failed on the closed pipe: the job's descriptor is no longer in use
        os.close(self.job)
        self.events.close()


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:  # the worker died before it read its job; the main loop reports that
        pass


def analyse(sources: list[Source], spec: WorkerSpec, workers: int = 1) -> Iterator[VideoEvent]:
    """Events of every video, from `workers` processes, each taking every `workers`-th video.

    Events of different videos interleave; those of one video keep their order and end with Finished, Broken or
    Failed. A worker that dies takes only its current video with it (Failed), and a new one resumes with its next.
    A worker that cannot set itself up raises WorkerSetupError: nothing would work.
    """
    todo = {w: list(range(w, len(sources), workers)) for w in range(min(workers, len(sources)))}
    running: dict[int, _Worker] = {}
    try:
        for w in todo:
            running[w] = _Worker(sources, todo[w], spec)
        while any(todo.values()):
            by_conn = {r.events: w for w, r in running.items()}
            for conn in wait(list(by_conn)):
                w = by_conn[conn]
                worker = running[w]
                try:
                    event = conn.recv()
                except (EOFError, OSError):  # the worker is gone
                    code = worker.proc.wait()
                    worker.stop()
                    del running[w]
                    if not worker.ready:
                        raise WorkerSetupError(f"a worker process exited with code {code} while it was setting up "
                                               "(see the messages above)") from None
                    if todo[w]:
                        crashed = todo[w].pop(0)
                        yield Failed(crashed, f"the worker crashed on this file (exit code {code})")
                    if todo[w]:
                        running[w] = _Worker(sources, todo[w], spec)
                    continue
                if isinstance(event, _SetupFailed):
                    raise WorkerSetupError(event.error)
                if isinstance(event, _Ready):
                    worker.ready = True
                    continue
                yield event
                if event.ends:
                    todo[w].remove(event.index)
    finally:
        for worker in running.values():
            worker.stop()


# -- the worker's side -----------------------------------------------------------------------------------------------
def serve(events_fd: int) -> None:
    """A worker's life: read the job from stdin, set up, send the events of each of its videos."""
    size = struct.unpack("!Q", _read_exact(0, 8))[0]
    sources, indices, spec, parent = pickle.loads(_read_exact(0, size))
    _end_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it stops the workers
    out = Connection(events_fd, readable=False)
    try:
        detector = setup(spec)
    except Exception as e:
        out.send(_SetupFailed(f"the face detector could not be set up in a worker process: "
                              f"{type(e).__name__}: {' '.join(str(e).split())}"))
        return
    out.send(_Ready())
    # FFmpeg and decord print their complaints about broken files straight to the C-level stderr, through the
    # progress display; every failure reaches the run's summary as an event instead. Set-up messages came before.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    for i in indices:
        for event in video_events(i, sources[i], spec, detector):
            out.send(event)


def setup(spec: WorkerSpec):
    """The face detector a worker (or a Ray task, affextract.cluster) analyses its videos with."""
    import torch

    from affextract.faces.detectors import get_detector

    torch.set_num_threads(spec.threads)
    return get_detector(spec.detector, device=spec.device, **spec.detector_options)


def video_events(i: int, source: Source, spec: WorkerSpec, detector) -> Iterator[VideoEvent]:
    """The events of video `i`: Opened, FaceChunks, then Finished, Broken or Failed (never an exception of the file's)."""
    from affextract.faces.tracking import PrimaryFaceStream

    opened = False
    try:
        digest = file_sha256(source.path)
        for item in read_video(source, spec.fps, spec.batch_size):
            if isinstance(item, VideoInfo):
                yield Opened(i, item, digest)
                opened = True
                stream = PrimaryFaceStream(detector, detect_interval=spec.detect_interval)
                continue
            yield face_chunk(i, item, stream, spec.device, spec.movement)
        yield Finished(i)
    except DecodeError as e:
        yield Failed(i, str(e))
    except StreamBroken as e:
        yield Broken(i, str(e))
    except Exception as e:  # anything else the decoder throws is still this file's failure, not the batch's
        yield (Broken(i, f"decoding stopped: {type(e).__name__}: {e}") if opened
               else Failed(i, f"cannot decode: {type(e).__name__}: {e}"))


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = os.read(fd, n - len(buf))
        if not part:
            os._exit(1)  # the main process went away before sending the whole job
        buf += part
    return bytes(buf)


def _end_with_parent(parent: int) -> None:
    """Exit as soon as the main process ends, however it ends."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)

    def watch() -> None:
        # Nothing more is written to the job pipe; it ends when the main process closes it or dies.
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
