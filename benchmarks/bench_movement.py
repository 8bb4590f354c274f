"""Cost per face of the movement stage's models against LiteRT (XNNPACK) in the same process.

    python benchmarks/bench_movement.py [--threads 1] [--repeats 3] [--tflite ../shared/models/mediapipe]
        [--device auto|cpu|cuda|cuda:N]

Prints ms per face of the face mesh and the blendshapes model at batch 1, 16 and 64: torch (channels-first and
channels-last) and LiteRT (one face per call: the .tflite has a fixed batch of 1), with the torch/LiteRT ratio;
then the whole ``Movement`` call on 64 faces (mesh, blendshapes, pose, gaze; against LiteRT's mesh plus
blendshapes) and the crop warp. Real faces (the astronaut) are used so the numbers include nothing a blank input
would skip. Every ratio is a median over ``--repeats`` rounds, each torch case timed right after LiteRT.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from affextract.faces import align as al
from affextract import movement as mv
from affextract.runtime import resolve_device


def per_face_ms(fn, n_faces: int, min_seconds: float = 1.0) -> float:
    fn()  # warm-up (oneDNN primitives, allocations)
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - t0) / calls / n_faces * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (auto: the GPU when there is one)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all cases; medians are printed")
    ap.add_argument("--tflite", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "models" / "mediapipe")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from skimage import data

    from affextract.faces.detectors import get_detector

    image = data.astronaut()
    points = get_detector("mtcnn").detect(image[None])[0].landmarks[:1]
    m = al.roi_from_points(points)
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {device}")
    cases, x1, pts1 = _torch_cases(al.crop_faces(image[None], m), m, device)
    cases |= _litert_cases(args.tflite, args.threads, x1, pts1)
    frames, ms = np.repeat(image[None], 64, 0), np.repeat(m, 64, 0)
    crops, inv = al.crop_faces(frames, ms, device), al.invert_affine(ms)
    for size in (16, 64):
        stage = mv.Movement(device, mv.MovementOptions(batch_size=size))
        cases[("Movement", f"torch, batch_size {size}", 64)] = (lambda stage=stage: stage(crops, inv), 64)
    _print_against_litert(cases, args.repeats)
    warp = per_face_ms(lambda: al.crop_faces(frames, ms, device), 64)
    print(f"\ncrop_faces (512x512 frames), 64 faces: {warp:.3f} ms/face")


def _torch_cases(crop: torch.Tensor, m: np.ndarray, device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(model, runtime, batch) -> (function, faces per call) of the mesh (channels-first and -last) and the
    blendshapes at batch 1, 16 and 64; and the one face's inputs: the mesh's (1, 3, 192, 192) and the blendshapes'
    (1, 146, 2)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mesh_cf = mv.load_face_mesh().to(device)
    mesh_cl = mv.load_face_mesh().to(device).to(memory_format=torch.channels_last)
    blend = mv.load_blendshapes().to(device)
    cases = {}
    with torch.inference_mode():
        x1 = crop.float().div(255).to(device)
        lm, _ = mesh_cf(x1)
        image_mesh = al.mesh_to_image(lm, torch.from_numpy(al.invert_affine(m)).float().to(device))
        pts1 = image_mesh[:, list(mv.BLENDSHAPE_LANDMARKS), :2]
    for batch in (1, 16, 64):
        x = x1.repeat(batch, 1, 1, 1)
        xl = x.contiguous(memory_format=torch.channels_last)
        p = pts1.repeat(batch, 1, 1)
        cases[("mesh", "torch NCHW", batch)] = (lambda x=x: (mesh_cf(x), sync()), batch)
        cases[("mesh", "torch channels-last", batch)] = (lambda x=xl: (mesh_cl(x), sync()), batch)
        cases[("blendshapes", "torch", batch)] = (lambda p=p: (blend(p), sync()), batch)
    return cases, x1, pts1


def _litert_cases(tflite: Path, threads: int, x1: torch.Tensor, pts1: torch.Tensor) -> dict:
    """The same models in LiteRT at batch 1 (the .tflite files' fixed batch), when it is installed."""
    cases = {}
    try:
        from ai_edge_litert.interpreter import Interpreter

        for name, key, inp in (("face_landmarks_detector.tflite", "mesh", x1.permute(0, 2, 3, 1).cpu().numpy()),
                               ("face_blendshapes.tflite", "blendshapes", pts1.cpu().numpy())):
            it = Interpreter(model_path=str(tflite / name), num_threads=threads)
            it.allocate_tensors()
            index = it.get_input_details()[0]["index"]

            def run(it=it, index=index, inp=np.ascontiguousarray(inp)):
                it.set_tensor(index, inp)
                it.invoke()

            cases[(key, "LiteRT", 1)] = (run, 1)
    except (ImportError, ValueError) as e:
        print(f"LiteRT not measured: {e}")
    return cases


def _print_against_litert(cases: dict, repeats: int) -> None:
    """Medians over `repeats` rounds of ms per face and of the ratio to LiteRT's cost of the same work (the whole
    stage against LiteRT's mesh plus blendshapes)."""
    references = {"mesh": ["mesh"], "blendshapes": ["blendshapes"], "Movement": ["mesh", "blendshapes"]}
    # Each torch case is timed right after its model's LiteRT run, so that a load change on a shared machine hits
    # both alike; ratios are taken within such a pair, and medians over the rounds are printed.
    times: dict[tuple, list[float]] = {k: [] for k in cases}
    ratios: dict[tuple, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        for _ in range(repeats):
            for key, (fn, n) in cases.items():
                refs = [cases.get((model, "LiteRT", 1)) for model in references[key[0]]]
                ref_ms = sum(per_face_ms(r[0], 1, 0.5) for r in refs) if all(refs) else float("nan")
                times[key].append(per_face_ms(fn, n, 0.5))
                ratios[key].append(times[key][-1] / ref_ms)
    print(f"\nmedians of {repeats} rounds\n"
          f"{'model':12s} {'runtime':22s} {'batch':>5s} {'ms/face':>8s} {'vs LiteRT':>9s}")
    for (model, runtime, batch), t in times.items():
        ratio = np.median(ratios[(model, runtime, batch)])
        shown = "" if np.isnan(ratio) else f"{ratio:8.2f}x"
        print(f"{model:12s} {runtime:22s} {batch:5d} {np.median(t):8.3f} {shown:>9s}")


if __name__ == "__main__":
    main()
