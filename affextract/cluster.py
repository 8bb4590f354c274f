"""`affextract run --ray`: the same extraction on a Ray cluster (the `ray` extra), for jobs beyond one machine.

Each video is a CPU task, a streaming generator running the workers' pipeline (`workers.video_events`: decode,
detect and track the face, align). An actor pool runs the MMA, the movement stage and the AU fusion (extract's
`_Features`, `_Movement`, `_fusion`) on a GPU or a CPU, on chunks taken from several videos at once. The driver
(the process that called `extract`) writes what comes back through the run's `FeatureStore`, so the plan, the shards,
the merges and resuming are those of a single-process run. The crops go from the tasks to the actors through Ray's
object store; the driver reads only each chunk's header and the actors' results.

Faults: a task whose process dies (killed, out of memory, its node lost) has its video's shard dropped and the video
started again, up to `RayOptions.attempts` times, then it is recorded as failed; an actor that dies is restarted and
its calls retried. A video reaches the output only through a finished shard, so none is lost or written twice. A
driver that dies leaves the finished shards, which the rerun merges before it continues.

Nothing here imports ray until a run needs it: affextract works without the extra.
"""

from __future__ import annotations

import importlib.util
import time
from collections import deque
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from affextract.extract import ExtractEvent, ExtractOptions, ExtractReport
    from affextract.format import Provenance
    from affextract.store import FeatureStore, ShardWriter
    from affextract.video import Source
    from affextract.workers import FaceChunk, WorkerSpec

INSTALL = 'pip install -e ".[ray]"'


MISSING = f"--ray needs the ray extra, which is not installed: {INSTALL}"


class RayMissing(RuntimeError):
    """--ray was asked for, but the ray extra is not installed."""


def require_ray() -> None:
    """RayMissing naming the extra unless ray is installed (found without importing it)."""
    if importlib.util.find_spec("ray") is None:
        raise RayMissing(MISSING)


@dataclass(frozen=True)
class RayOptions:
    # The cluster to join: "host:port" of its head, "auto" or "ray://host:10001"; None = RAY_ADDRESS when set, else a
    # local cluster on this machine, started for the run and stopped after it.
    address: str | None = None
    actors: int = 1  # actors running the MMA and the movement stage, each batching chunks of several videos
    gpus_per_actor: float | None = None  # GPU share of each actor; None = 1 when the cluster has GPUs, else 0 (CPU)
    cpus_per_task: float = 1.0  # CPUs each video's decode-detect-align task reserves (its torch threads)
    tasks: int = 0  # videos in flight at once; 0 = as many as the cluster's CPUs left by the actors can run
    batch_frames: int = 256  # frames an actor analyses in one call, from the chunks of several videos
    attempts: int = 3  # starts of a video whose task process dies, before it is recorded as failed

    def __post_init__(self):
        require_ray()
        for name, low in (("actors", 1), ("cpus_per_task", 0.01), ("tasks", 0), ("batch_frames", 1),
                          ("attempts", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"RayOptions.{name} must be >= {low}, got {getattr(self, name)}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"RayOptions.gpus_per_actor must be >= 0, got {self.gpus_per_actor}")


# -- on the cluster ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Ahead:
    """A task's header for the FaceChunk it yields next: the driver hands that one to an actor without reading it."""

    index: int  # the video's position in the run's list
    frames: int  # frames in the chunk


_DETECTORS: dict = {}  # per task process: the detector of each WorkerSpec, set up once and reused by later videos


def _faces(index: int, source: Source, spec: WorkerSpec):
    """A video's events (workers.video_events), each FaceChunk preceded by its _Ahead."""
    from affextract.workers import FaceChunk, setup, video_events

    key = (spec.detector, repr(spec.detector_options), spec.device, spec.threads)
    if key not in _DETECTORS:
        _DETECTORS[key] = setup(spec)
    for event in video_events(index, source, spec, _DETECTORS[key]):
        if isinstance(event, FaceChunk):
            yield _Ahead(index, len(event.frame))
        yield event


@dataclass(frozen=True)
class _Analysed:
    """What the writer appends for one chunk (VideoWriter.append's arguments)."""

    rows: np.ndarray  # (n, 26) float32, NaN where no face
    face: np.ndarray  # (n,) bool
    frame: np.ndarray  # (n,) int32
    time: np.ndarray  # (n,) float64
    boxes: np.ndarray  # (n, 4) float32
    landmarks: np.ndarray  # (n, 5, 2) float32
    scores: np.ndarray  # (n,) float32, NaN where no face
    moved: dict = field(default_factory=dict)  # movement dataset -> (n, ...) array


class _Analyser:
    """The MMA, the movement stage and the AU fusion of a run, on the chunks of several videos at once."""

    def __init__(self, options: ExtractOptions, provenance: Provenance, threads: int):
        import torch

        from affextract.extract import _Features, _fusion, _model, _Movement, movement_datasets
        from affextract.runtime import gpu_paths, resolve_device

        torch.set_num_threads(threads)
        device = resolve_device(options.device)
        # On a GPU the chunks of a call go through the models as one batch. The CPU kernels' results depend on the
        # batch's make-up (blendshapes moved by up to 1e-5 when chunks of two videos were merged), so on a CPU each
        # chunk is its own batch, as in a single-process run, and the file stays bit-identical to one.
        self.merge = gpu_paths(device)
        self.features = _Features(_model(options, provenance, device), device)
        self.movement = _Movement(device, movement_datasets(options)) if options.movement else None
        self.fusion = _fusion(provenance.au_source, options.fusion_weights)

    def ready(self) -> bool:
        """Returns once the actor is set up (its constructor's error, if any, reaches the caller)."""
        return True

    def analyse(self, *chunks: FaceChunk):
        """One _Analysed per chunk (a single one for a single chunk, as Ray's num_returns=1 wants)."""
        from affextract.extract import analyse_chunk

        out = []
        for batch in [chunks] if self.merge else [[c] for c in chunks]:
            rows, moved = analyse_chunk(_concat(batch), self.features, self.movement, self.fusion)
            start = 0
            for c in batch:
                s = slice(start, start + len(c.frame))
                start = s.stop
                out.append(_Analysed(rows[s], c.face, c.frame, c.time, c.boxes, c.landmarks,
                                     np.where(c.face, c.scores, np.nan), {d: v[s] for d, v in moved.items()}))
        return out[0] if len(out) == 1 else out


def _concat(chunks) -> FaceChunk:
    """The chunks' frames as one FaceChunk (index -1): the model sees one batch."""
    if len(chunks) == 1:
        return chunks[0]
    from affextract.workers import FaceChunk

    parts = {f.name: [getattr(c, f.name) for c in chunks] for f in fields(FaceChunk) if f.name != "index"}
    return FaceChunk(-1, **{k: None if v[0] is None else np.concatenate(v) for k, v in parts.items()})


def _cause(e: Exception) -> str:
    """The last line of a Ray error's text: the exception raised on the cluster, without Ray's traceback."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


# -- the driver -------------------------------------------------------------------------------------------------------
@dataclass
class _Video:
    """A video in flight at the driver."""

    index: int
    attempt: int = 1
    gen: object = None  # the task's ObjectRefGenerator
    writer: ShardWriter | None = None
    results: deque = field(default_factory=deque)  # refs of the actors' _Analysed, in the video's order
    end: object = None  # the Finished/Broken/Failed event, once the task sent it
    ahead: int | None = None  # frames of the FaceChunk the next ref of `gen` is (handed to an actor unread)


def extract_on_ray(inputs: Path | str | list[Path | str], output: Path | str, options: ExtractOptions,
                   cluster: RayOptions | None = None, on_event: Callable[[ExtractEvent], None] | None = None
                   ) -> ExtractReport:
    """`affextract.extract` with its videos analysed on the Ray cluster of `cluster` (default: RayOptions()): the
    same plan, output, resume rules, progress events (`on_event`, at the driver) and report."""
    from affextract.extract import extract

    return extract(inputs, output, options, on_event, runner=partial(_run_on_ray, cluster or RayOptions()))


def _run_on_ray(cluster: RayOptions, sources: list[Source], store: FeatureStore, provenance: Provenance,
                options: ExtractOptions, merges: bool, report: ExtractReport,
                emit: Callable[[ExtractEvent], None]) -> None:
    """Extract `sources` into `store` on the cluster (extract's `_run`, on Ray)."""
    ray = import_ray()
    started = connect(ray, cluster.address)
    try:
        _Driver(ray, cluster, sources, store, provenance, options, merges, report, emit).run()
    finally:
        if started:
            ray.shutdown()


def import_ray():
    """The ray module, or RayMissing naming the extra."""
    try:
        import ray
    except ImportError:
        raise RayMissing(MISSING) from None
    return ray


def connect(ray, address: str | None) -> bool:
    """Join the cluster at `address`, else RAY_ADDRESS, else start a local one; True when this call connected, so the
    caller disconnects after (ray.shutdown), which also stops a local cluster it started."""
    if ray.is_initialized():  # the caller's own connection (a script, the tests): used as it is
        return False
    import logging
    import os

    quiet = dict(log_to_driver=False, configure_logging=False, logging_level="ERROR")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
    else:
        # Ray warns on its logger as it starts a local cluster (the token authentication it enables by default); the
        # library prints nothing, and errors still raise.
        log = logging.getLogger("ray")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            ray.init(include_dashboard=False, **quiet)
        finally:
            log.setLevel(level)
    return True


class _Driver:
    def __init__(self, ray, cluster: RayOptions, sources, store, provenance, options, merges, report, emit):
        from affextract.extract import _detector_options
        from affextract.workers import WorkerSpec

        self.ray, self.sources, self.store, self.options, self.merges, self.report = (
            ray, sources, store, options, merges, report)
        self.cluster = ro = cluster
        res = ray.cluster_resources()
        gpus = ro.gpus_per_actor if ro.gpus_per_actor is not None else (1.0 if res.get("GPU", 0) >= 1 else 0.0)
        actor_cpus = 1.0
        threads = max(1, int(ro.cpus_per_task))
        # Detection runs on the tasks' CPUs; the actors hold the GPUs.
        self.spec = WorkerSpec(options.fps, options.batch_size, options.detector, _detector_options(options),
                               float(options.detect_interval), "cpu", threads, options.movement)
        spare = res.get("CPU", 0) - actor_cpus * ro.actors
        if spare < ro.cpus_per_task:  # no task could ever be scheduled
            raise ValueError(f"{ro.actors} actor(s) of {actor_cpus:g} CPU each leave no CPU for the decode-detect-align "
                             f"tasks on this Ray cluster ({res.get('CPU', 0):g} CPUs): use fewer actors "
                             "(--ray-actors) or a larger cluster")
        self.limit = ro.tasks or int(spare // ro.cpus_per_task)
        analyser = ray.remote(max_restarts=-1, max_task_retries=2)(_Analyser)
        self.actors = [analyser.options(num_cpus=actor_cpus, num_gpus=gpus).remote(options, provenance,
                                                                                    max(1, int(actor_cpus)))
                       for _ in range(ro.actors)]
        self.ready = [a.ready.remote() for a in self.actors]
        self.busy = {i: 0 for i in range(ro.actors)}  # calls in flight per actor
        self.calls: dict = {}  # last result ref of each call in flight -> its actor
        # Chunks are read from a task only while few wait: a task then stops at its backpressure limit, so memory
        # holds a few batches whatever the speed of tasks against actors.
        self.task = ray.remote(num_returns="streaming", max_retries=0, num_cpus=ro.cpus_per_task,
                               _generator_backpressure_num_objects=8)(_faces)
        self.queue: deque = deque()  # (video, chunk ref, frames) waiting for an actor
        self.queued_frames = 0
        self.todo = deque(range(len(sources)))
        self.live: dict[int, _Video] = {}
        self.emit = emit
        self.last_commit = time.monotonic()

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self) -> None:
        from affextract.extract import RunEnded, RunStarted

        self.emit(RunStarted(tuple(s.size_bytes for s in self.sources)))
        complete = False
        try:
            self._fill()
            self._check_actors()
            while self.todo or self.live:
                self._fill()
                self._step()
            complete = True
        finally:
            for v in self.live.values():  # interrupted: their shards are dropped, the videos redone by a rerun
                self._drop(v)
                self._cancel(v)
            for a in self.actors:
                self.ray.kill(a)
            self.emit(RunEnded(complete))

    def _check_actors(self) -> None:
        """Wait for the actors to be set up (the first tasks run meanwhile): a model that cannot load is the run's
        error, not every video's."""
        try:
            self.ray.get(self.ready)
        except self.ray.exceptions.RayActorError as e:
            raise RuntimeError(f"the Ray actor running the model could not start: {_cause(e)}") from None

    def _fill(self) -> None:
        """Start videos while tasks are fewer than the limit. A task's CPU is free once it has sent its video's last
        event, while the actors may still be on its last chunks: the next video starts then."""
        while self.todo and sum(v.end is None for v in self.live.values()) < self.limit:
            self._start(_Video(self.todo.popleft()))

    def _start(self, v: _Video) -> None:
        src = self.sources[v.index]
        v.gen = self.task.options(name=f"affextract-faces:{src.key}").remote(v.index, src, self.spec)
        self.live[v.index] = v

    def _step(self) -> None:
        """Wait for the next thing to do (a task's next event, an actor's result or a finished call) and do it."""
        reading = self.queued_frames < 4 * self.cluster.batch_frames * len(self.actors)
        gens = [v.gen for v in self.live.values() if v.end is None] if reading else []
        self._flush(force=not gens)  # a part batch only when no task can add to it now
        heads = {v.results[0]: v for v in self.live.values() if v.results}
        refs = list(dict.fromkeys([*heads, *self.calls]))  # a call's last ref can head its video's results too
        ready, _ = self.ray.wait(gens + refs, num_returns=1, fetch_local=False)
        for r in ready:
            task = next((v for v in self.live.values() if v.gen is r), None)
            if task is not None:
                self._read(task)
                continue
            if r in self.calls:  # an actor is free for another call
                self.busy[self.calls.pop(r)] -= 1
            if r in heads:
                self._write(heads[r])

    def _read(self, v: _Video) -> None:
        """The task's next event."""
        from affextract.workers import Broken, Failed, Finished, Opened

        ray = self.ray
        try:
            ref = next(v.gen)
            item = None if v.ahead is not None else ray.get(ref)  # a chunk stays in the object store for the actor
        except StopIteration:  # cannot happen while the task lives: its last event ends the video first
            self._crashed(v, "the task ended without its last event")
            return
        except ray.exceptions.RayTaskError as e:  # our code raised in the task: its set-up (the detector) failed
            from affextract.workers import WorkerSetupError

            raise WorkerSetupError(f"the face detector could not be set up in a Ray task: {e.cause}") from None
        except ray.exceptions.RayError as e:  # the task's process or node died
            self._crashed(v, f"{type(e).__name__}")
            return
        if v.ahead is not None:
            self.queue.append((v, ref, v.ahead))
            self.queued_frames += v.ahead
            v.ahead = None
            return
        match item:
            case _Ahead(frames=frames):
                v.ahead = frames
            case Opened(info=info, sha256=sha256):
                from affextract.extract import VideoOpened, _video_attrs

                self._drop(v)  # decoding starts over (video.read_video): what came before is void
                src = self.sources[v.index]
                v.writer = self.store.begin_video(src.key, _video_attrs(src, info) | {"sha256": sha256},
                                                  info.frames_analysed)
                self.emit(VideoOpened(v.index, info.frames_analysed))
            case Finished() | Broken() | Failed():
                v.end = item
                self._end_if_done(v)

    def _crashed(self, v: _Video, why: str) -> None:
        """The video's task died: start it again, or record the failure after the last attempt."""
        from affextract.workers import Failed

        self._drop(v)
        self._cancel(v)
        if v.attempt < self.cluster.attempts:
            self._start(_Video(v.index, v.attempt + 1))
            return
        v.end = Failed(v.index, f"the Ray task analysing this file died {v.attempt} time(s) ({why})")
        v.results.clear()
        self._end_if_done(v)

    def _drop(self, v: _Video) -> None:
        """Void what came of the video so far (its shard, the results not yet written)."""
        if v.writer is not None:
            v.writer.abort()
            v.writer = None
        v.results.clear()
        self.queued_frames -= sum(n for w, _, n in self.queue if w is v)
        self.queue = deque(q for q in self.queue if q[0] is not v)

    def _cancel(self, v: _Video) -> None:
        try:
            self.ray.cancel(v.gen, force=True)
        except Exception:  # already ended, or its process is gone
            pass

    def _flush(self, force: bool) -> None:
        """Send queued chunks to the least busy actor: a full batch, or whatever waits when that actor is idle (a batch
        grows only while the actors are busy) or when `force`d."""
        while self.queue:
            a = min(self.busy, key=self.busy.get)
            if not (force or self.busy[a] == 0 or self.queued_frames >= self.cluster.batch_frames):
                break
            if self.busy[a] >= 2:
                break
            batch, frames = [], 0
            while self.queue and (not batch or frames + self.queue[0][2] <= self.cluster.batch_frames):
                v, ref, n = self.queue.popleft()
                batch.append((v, ref))
                frames += n
            self.queued_frames -= frames
            refs = self.actors[a].analyse.options(num_returns=len(batch)).remote(*(r for _, r in batch))
            refs = [refs] if len(batch) == 1 else refs
            for (v, _), r in zip(batch, refs):
                v.results.append(r)
            self.busy[a] += 1
            self.calls[refs[-1]] = a  # ready once the whole call is done

    def _write(self, v: _Video) -> None:
        """Append the video's next analysed chunk."""
        from affextract.extract import FramesAnalysed

        ray = self.ray
        ref = v.results.popleft()
        try:
            a: _Analysed = ray.get(ref)
        except ray.exceptions.RayError as e:  # the actor died more often than its calls are retried
            self._crashed(v, f"actor: {type(e).__name__}")
            return
        v.writer.append(a.rows, a.face, a.frame, a.time, a.boxes, a.landmarks, a.scores, **a.moved)
        self.report.frames += len(a.frame)
        self.emit(FramesAnalysed(v.index, len(a.frame)))
        self._end_if_done(v)

    def _end_if_done(self, v: _Video) -> None:
        from affextract.extract import VideoEnded, _source_attrs
        from affextract.workers import Broken, Failed, Finished

        if v.end is None or v.results or any(q[0] is v for q in self.queue):
            return
        src = self.sources[v.index]
        match v.end:
            case Finished():
                v.writer.finish("complete")
                self.report.written.append(src.key)
            case Broken(error=error):
                v.writer.finish("partial", error)
                self.report.written.append(src.key)
                self.report.partial.append((src.key, error))
            case Failed(error=error):
                if v.writer is not None:
                    v.writer.abort()
                self.store.record_failure(src.key, _source_attrs(src), error)
                self.report.failed.append((src.key, error))
        v.writer = None
        del self.live[v.index]
        self.emit(VideoEnded(v.index, isinstance(v.end, Failed)))
        if self.merges and time.monotonic() - self.last_commit > max(self.options.commit_every,
                                                                      20 * self.store.last_commit_s):
            self.store.commit()
            self.last_commit = time.monotonic()
