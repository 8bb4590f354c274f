"""Throughput of `affextract run` against decode-only and a naive per-frame loop, in one process, on the same clips.

    python benchmarks/bench_extract.py CLIP_OR_FOLDER... [--device cuda --copies 40 --workers 8 --batch-size 256]

Prints frames/s of: decoding alone; a naive loop (decode one frame -> detect -> align -> MMA at batch 1); the full
pipeline with --detect-interval 0 / 0.2 / 0.4 s, and at the default interval with and without measured movement
(--no-movement), and with movement with and without the AU fusion (--cnn-aus) in alternating pairs; per-stage cost on one batch (decode, detection + tracking, alignment, the face mesh's crop, MMA, face
mesh, blendshapes + pose + gaze, AU fusion) and the AU fusion's share of a frame's time; the landmark error and face rate that key-frame detection costs against detecting
every frame; and peak memory of a short and a 5x longer video (the long-video check: memory must not grow with
length). With --json FILE the figures are also written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from affextract.faces.align import align_faces
from affextract.faces.detectors import get_detector
from affextract.extract import ExtractOptions, _cpu_threads, _Features, extract
from affextract.features import open_features
from affextract.fusion import load_fusion
from affextract.model import load_mma
from affextract.movement import Movement, MovementOptions
from affextract.runtime import gpu_paths, resolve_device
from affextract.faces.tracking import PrimaryFaceStream
from affextract.video import find_sources, import_decord, open_video
from affextract.workers import face_chunk


def decode_only(sources) -> tuple[int, float]:
    t0, n = time.perf_counter(), 0
    for s in sources:
        _, chunks = open_video(s, None, 64)
        for c in chunks:
            n += len(c.frame)
    return n, time.perf_counter() - t0


@torch.inference_mode()
def naive_loop(sources, model, detector, device, max_frames: int) -> tuple[int, float]:
    """One frame at a time through every stage, the way a simple script would do it."""
    decord = import_decord()
    t0, n = time.perf_counter(), 0
    for s in sources:
        vr = decord.VideoReader(str(s.path))
        for i in range(len(vr)):
            frame = vr[i].asnumpy()[None]
            faces = detector.detect(frame)[0]
            if len(faces):
                j = int(np.argmax(faces.areas))
                crop = align_faces(frame, faces.landmarks[j:j + 1], device=device)
                model.features(crop).cpu()
            n += 1
            if n >= max_frames:
                return n, time.perf_counter() - t0
    return n, time.perf_counter() - t0


@torch.inference_mode()
def stage_costs(source, model, detector, movement, device, interval: float, batch: int, threads: int
                ) -> dict[str, float]:
    """Milliseconds per frame of each stage on one batch of real frames (after a warm-up batch), with the torch
    threads each process of the pipeline gets (one on a 2-core machine with one worker)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _stage_costs(source, model, detector, movement, device, interval, batch)
    finally:
        torch.set_num_threads(before)


class _Laps:
    """face_chunk's `lap`: seconds since the previous lap, per stage (the GPU's queued work counted in)."""

    def __init__(self, sync):
        self.sync, self.seconds, self.t = sync, {}, time.perf_counter()

    def __call__(self, stage: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.seconds[stage], self.t = now - self.t, now


def _stage_costs(source, model, detector, movement, device, interval: float, batch: int) -> dict[str, float]:
    _, chunks = open_video(source, None, batch)
    t = time.perf_counter()
    chunk = next(chunks)
    decode = time.perf_counter() - t
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # The workers' face stage (detect + track, align, the face mesh's crop), after a warm-up pass.
    face_chunk(0, chunk, PrimaryFaceStream(detector, detect_interval=interval), device, True)
    laps = _Laps(sync)
    faces = face_chunk(0, chunk, PrimaryFaceStream(detector, detect_interval=interval), device, True, laps)
    # The main process's: the MMA, then the mesh alone and the whole movement stage (mesh, blendshapes, pose, gaze),
    # so that the rest is their difference, then the AU fusion, each after a warm-up pass.
    features = _Features(model, device)
    mma, rows = _timed(lambda: features(faces), sync)
    mesh_crops = torch.from_numpy(faces.mesh_crops)
    size = movement.options.batch_size

    def mesh_alone():
        for s in range(0, len(mesh_crops), size):
            x = mesh_crops[s:s + size].to(device).float().div_(255).contiguous(memory_format=torch.channels_last)
            movement.mesh(x)

    mesh, _ = _timed(mesh_alone, sync)
    whole, measured = _timed(lambda: movement(mesh_crops, faces.mesh_to_image), sync)
    blend = np.full((len(rows), measured.blendshapes.shape[1]), np.nan, np.float32)
    presence = np.full(len(rows), np.nan, np.float32)
    blend[faces.face], presence[faces.face] = measured.blendshapes, measured.presence
    fusion = load_fusion()
    fuse, _ = _timed(lambda: fusion(rows, blend, presence), sync)
    n = len(chunk.frame)
    return {k: 1000 * v / n for k, v in (("decode", decode), *laps.seconds.items(), ("mma", mma),
                                          ("face mesh", mesh), ("blendshapes+pose+gaze", whole - mesh),
                                          ("au fusion", fuse))}


def _timed(fn, sync):
    """(seconds, result) of `fn` after a warm-up call."""
    fn()
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) used so far by this process and by its ended child processes (the workers of
    finished runs). Per frame, they say where the time goes even when other programs load the machine: each process
    of the pipeline runs on one core, so on an otherwise idle machine the busier one sets the frames/s."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def landmark_cost(h5_every: Path, h5_ref: Path) -> dict[str, float]:
    """Landmark error (px) and face rates of a --detect-interval run against detecting on every frame."""
    errs, rate, rate_ref = [], [], []
    with open_features(h5_every) as every, open_features(h5_ref) as ref:
        for v in every:
            r = ref[v.key]
            both = v.face & r.face
            errs.append(np.linalg.norm(v.landmarks[both] - r.landmarks[both], axis=-1).mean(-1))
            rate.append(v.face.mean())
            rate_ref.append(r.face.mean())
    e = np.concatenate(errs)
    return {"landmark_err_px_mean": float(e.mean()), "landmark_err_px_p95": float(np.percentile(e, 95)),
            "face_rate": float(np.mean(rate)), "face_rate_every_frame": float(np.mean(rate_ref))}


def peak_rss_of_run(args: list[str]) -> float:
    """Peak resident memory (MiB) of a separate `affextract run` process and its decode workers."""
    code = ("import resource, sys, runpy; sys.argv = ['affextract'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('affextract', run_name='__main__')\nexcept SystemExit: pass\n"
            "print('PEAK', max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
            " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    return int(out.split("PEAK")[-1]) / 1024


def make_long_video(src: Path, dst: Path, repeat: int) -> Path:
    import cv2

    decord = import_decord()
    vr = decord.VideoReader(str(src))
    frames = vr.get_batch(list(range(len(vr)))).asnumpy()
    h, w = frames.shape[1:3]
    out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), vr.get_avg_fps(), (w, h))
    for _ in range(repeat):
        for f in frames:
            out.write(np.ascontiguousarray(f[:, :, ::-1]))
    out.release()
    return dst


class GpuSampler:
    """Mean GPU utilisation while a block runs (NVML through torch)."""

    def __init__(self, device):
        self.device, self.samples, self.stop = device, [], threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            self.t = threading.Thread(target=self._run, daemon=True)
            self.t.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:
                return
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.stop.set()

    @property
    def mean(self):
        return float(np.mean(self.samples)) if self.samples else None


def main() -> None:
    a = _parse_args()
    device = resolve_device(a.device)
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    clips = _link_clips(a.inputs, work / "clips", a.copies)
    sources = find_sources([clips])[0]
    model, winfo = load_mma(a.weights, device=device)
    detector = get_detector("mtcnn", device=str(device))
    movement = Movement(device, MovementOptions(batch_size=256 if gpu_paths(device) else 16))
    res: dict = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                 "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "weights": winfo.name,
                 "videos": len(sources), "batch_size": a.batch_size, "workers": a.workers}
    print(f"{len(sources)} videos on {device} ({res['gpu'] or f'{os.cpu_count()} CPUs'}), weights {winfo.name}")
    if not a.skip_baselines:
        _baselines(res, sources, model, detector, device, a.naive_frames)
    _movement_runs(res, a, clips, work, device)
    intervals = _interval_runs(res, a, clips, work, device)
    if not a.skip_baselines:
        _stage_runs(res, a, sources, model, detector, movement, device, intervals)
    if not a.skip_memory:
        _memory(res, a, sources[0], work, device)
    res["max_rss_mib_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--copies", type=int, default=1, help="link each clip this many times (many videos in flight)")
    ap.add_argument("--naive-frames", type=int, default=200, help="frames timed in the naive loop")
    ap.add_argument("--intervals", default="0,0.2,0.4", help="--detect-interval values (seconds) to compare")
    ap.add_argument("--movement", default="off,on,cnn,on,cnn", help="the pipeline at the default interval with measured "
                    "movement off, on (AU rows fused) or cnn (on, --cnn-aus: the CNN's AU rows); the interval runs "
                    "are without")
    ap.add_argument("--fps", type=float, default=None, help="analysed frames per second (default: every frame)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-baselines", action="store_true", help="only the pipeline runs (no decode-only/naive/stages)")
    ap.add_argument("--json", type=Path)
    return ap.parse_args()


def _link_clips(inputs: list[Path], clips: Path, copies: int) -> Path:
    """A folder of `copies` links to each video under `inputs` (many videos in flight without copying them)."""
    clips.mkdir()
    for s in find_sources(inputs)[0]:
        if s.is_image:
            continue
        for c in range(copies):
            os.symlink(s.path, clips / f"{c:03d}_{Path(s.key).name}")
    return clips


def _baselines(res: dict, sources, model, detector, device, naive_frames: int) -> None:
    n, t = decode_only(sources)
    res["decode_only_fps"] = n / t
    print(f"decode only          {n / t:8.1f} frames/s  ({n} frames)")
    n, t = naive_loop(sources, model, detector, device, naive_frames)
    res["naive_fps"] = n / t
    print(f"naive per-frame loop {n / t:8.1f} frames/s  ({n} frames)")


def _movement_runs(res: dict, a: argparse.Namespace, clips: Path, work: Path, device) -> None:
    """The pipeline at the default interval with movement off, on and with the CNN's AU rows, as --movement lists."""
    default_interval = ExtractOptions().detect_interval
    for i, m in enumerate(a.movement.split(",")):  # repeat them (off,on,off,on) to see the machine's noise
        out = work / f"movement_{m}_{i}.h5"
        opts = ExtractOptions(weights=a.weights, device=str(device), batch_size=a.batch_size, workers=a.workers,
                              fps=a.fps, movement=m != "off", au_fusion=m == "on")
        before = cpu_seconds()
        with GpuSampler(device) as gpu:
            rep = extract([clips], out, opts)
        main_cpu, worker_cpu = (1000 * (after - was) / rep.frames for was, after in zip(before, cpu_seconds()))
        fps = rep.frames / rep.seconds
        res.setdefault(f"pipeline_movement_{m}_runs_fps", []).append(fps)
        res[f"pipeline_movement_{m}_fps"] = fps
        res[f"pipeline_movement_{m}_gpu_util"] = gpu.mean
        res[f"pipeline_movement_{m}_cpu_ms_per_frame"] = {"main": main_cpu, "workers": worker_cpu}
        util = f", GPU busy {gpu.mean:.0f}%" if gpu.mean is not None else ""
        print(f"pipeline, interval {default_interval:g} s, movement {m:<3} {fps:8.1f} frames/s ({rep.frames} frames, "
              f"{rep.seconds:.1f} s{util}); CPU ms/frame: main process {main_cpu:.2f}, workers {worker_cpu:.2f}")
    if "pipeline_movement_on_fps" in res and "pipeline_movement_off_fps" in res:
        ratio = res["pipeline_movement_on_fps"] / res["pipeline_movement_off_fps"]
        res["movement_on_vs_off"] = ratio
        print(f"movement on / off: {ratio:.2f}x the frames/s")
    if "pipeline_movement_cnn_fps" in res and "pipeline_movement_on_fps" in res:
        # Paired: each fused run against the CNN-rows run that follows it (the machine's load drifts between pairs).
        pairs = list(zip(res["pipeline_movement_on_runs_fps"], res["pipeline_movement_cnn_runs_fps"]))
        res["au_fusion_on_vs_cnn_pairs"] = [on / cnn for on, cnn in pairs]
        print("AU fusion: frames/s with / without, per pair: "
              + ", ".join(f"{on / cnn:.3f}" for on, cnn in pairs))


def _interval_runs(res: dict, a: argparse.Namespace, clips: Path, work: Path, device) -> list[float]:
    """The pipeline without movement at each --intervals value, and what key-frame detection costs in landmark
    error against detecting every frame; returns the intervals."""
    runs = {}
    for k in (float(x) for x in a.intervals.split(",")):
        out = work / f"every{k}.h5"
        opts = ExtractOptions(weights=a.weights, device=str(device), batch_size=a.batch_size, detect_interval=k,
                              workers=a.workers, fps=a.fps, movement=False)
        with GpuSampler(device) as gpu:
            rep = extract([clips], out, opts)
        fps = rep.frames / rep.seconds
        runs[k] = out
        res[f"pipeline_interval{k}_fps"] = fps
        res[f"pipeline_interval{k}_gpu_util"] = gpu.mean
        util = f", GPU busy {gpu.mean:.0f}%" if gpu.mean is not None else ""
        ratios = "" if a.skip_baselines else (f" = {fps / res['naive_fps']:.1f}x naive, "
                                              f"{fps / res['decode_only_fps']:.2f}x decode-only")
        print(f"pipeline interval {k:<4g} s {fps:8.1f} frames/s{ratios} ({rep.frames} frames, {rep.seconds:.1f} s{util})")
    for k in runs:
        if k != 0 and 0 in runs:
            c = landmark_cost(runs[k], runs[0])
            res[f"interval{k}_vs_every_frame"] = c
            print(f"detect interval {k:<4g} s vs every frame: landmark error {c['landmark_err_px_mean']:.2f} px mean, "
                  f"{c['landmark_err_px_p95']:.2f} px p95; face rate {c['face_rate']:.3f} vs {c['face_rate_every_frame']:.3f}")
    return list(runs)


def _stage_runs(res: dict, a: argparse.Namespace, sources, model, detector, movement, device,
                intervals: list[float]) -> None:
    for k in intervals:
        st = stage_costs(sources[0], model, detector, movement, device, k, a.batch_size, _cpu_threads(a.workers))
        res[f"stages_interval{k}_ms_per_frame"] = st
        print(f"stages (interval {k:g} s, ms/frame): " + ", ".join(f"{s} {v:.3f}" for s, v in st.items()))
        if "pipeline_movement_on_fps" in res:
            share = st["au fusion"] / (1000 / res["pipeline_movement_on_fps"])
            res[f"au_fusion_share_of_frame_time_interval{k}"] = share
            print(f"AU fusion: {st['au fusion']:.3f} ms/frame = {100 * share:.2f} % of a frame's time in the run with "
                  "movement on")


def _memory(res: dict, a: argparse.Namespace, source, work: Path, device) -> None:
    """Peak memory of a run on a clip and on the same clip five times over (memory must not grow with length)."""
    # The same clip re-encoded once and five times over, so codec and resolution are equal.
    short = make_long_video(source.path, work / "x1.mp4", 1)
    long = make_long_video(source.path, work / "x5.mp4", 5)
    common = ["--weights", str(a.weights)] if a.weights else []
    common += ["--device", str(device), "-q"]
    short_mb = peak_rss_of_run(["run", str(short), str(work / "m1.h5"), *common])
    long_mb = peak_rss_of_run(["run", str(long), str(work / "m5.h5"), *common])
    res["peak_rss_mib_short"], res["peak_rss_mib_5x_long"] = short_mb, long_mb
    print(f"peak memory: {short_mb:.0f} MiB for {source.key}, {long_mb:.0f} MiB for it 5x longer "
          f"(ratio {long_mb / short_mb:.2f})")


if __name__ == "__main__":
    main()
