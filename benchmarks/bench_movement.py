"""Cost per face of the movement stage's models against LiteRT (XNNPACK) in the same process.

    python benchmarks/bench_movement.py [--threads 1] [--tflite ../shared/models/mediapipe] [--device cuda]

Prints ms per face of the face mesh and the blendshapes model at batch 1, 16 and 64: torch (channels-first and
channels-last) and LiteRT (one face per call: the .tflite has a fixed batch of 1), with the torch/LiteRT ratio;
then the whole ``Movement`` call (mesh, blendshapes, pose, gaze) and the crop warp. Real faces (the astronaut) are
used so the numbers include nothing a blank input would skip.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from affextract import movement as mv


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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tflite", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "models" / "mediapipe")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from skimage import data

    from affextract.detectors import get_detector

    image = data.astronaut()
    points = get_detector("mtcnn").detect(image[None])[0].landmarks[:1]
    m = mv.roi_from_points(points)
    crop = mv.crop_faces(image[None], m)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {device}")

    mesh_cf = mv.load_face_mesh().to(device)
    mesh_cl = mv.load_face_mesh().to(device).to(memory_format=torch.channels_last)
    blend = mv.load_blendshapes().to(device)
    rows = {}
    with torch.inference_mode():
        x1 = crop.float().div(255).to(device)
        lm, _ = mesh_cf(x1)
        image_mesh = mv.mesh_to_image(lm, torch.from_numpy(mv.invert_affine(m)).float().to(device))
        pts1 = image_mesh[:, list(mv.BLENDSHAPE_LANDMARKS), :2]
        for batch in (1, 16, 64):
            x = x1.repeat(batch, 1, 1, 1)
            xl = x.contiguous(memory_format=torch.channels_last)
            p = pts1.repeat(batch, 1, 1)
            rows[("mesh", "torch NCHW", batch)] = per_face_ms(lambda: (mesh_cf(x), sync()), batch)
            rows[("mesh", "torch channels-last", batch)] = per_face_ms(lambda: (mesh_cl(xl), sync()), batch)
            rows[("blendshapes", "torch", batch)] = per_face_ms(lambda: (blend(p), sync()), batch)
    try:
        from ai_edge_litert.interpreter import Interpreter

        for name, key, inp in (("face_landmarks_detector.tflite", "mesh", x1.permute(0, 2, 3, 1).cpu().numpy()),
                               ("face_blendshapes.tflite", "blendshapes", pts1.cpu().numpy())):
            it = Interpreter(model_path=str(args.tflite / name), num_threads=args.threads)
            it.allocate_tensors()
            index = it.get_input_details()[0]["index"]

            def run(it=it, index=index, inp=np.ascontiguousarray(inp)):
                it.set_tensor(index, inp)
                it.invoke()

            rows[(key, "LiteRT", 1)] = per_face_ms(run, 1)
    except (ImportError, ValueError) as e:
        print(f"LiteRT not measured: {e}")
    print(f"\n{'model':12s} {'runtime':22s} {'batch':>5s} {'ms/face':>8s} {'vs LiteRT':>9s}")
    for (model, runtime, batch), ms in rows.items():
        ref = rows.get((model, "LiteRT", 1))
        ratio = f"{ms / ref:8.2f}x" if ref else ""
        print(f"{model:12s} {runtime:22s} {batch:5d} {ms:8.3f} {ratio:>9s}")

    stage = mv.Movement(device)
    frames = np.repeat(image[None], 64, 0)
    ms = np.repeat(m, 64, 0)
    crops = mv.crop_faces(frames, ms, device)
    inv = mv.invert_affine(ms)
    whole = per_face_ms(lambda: stage(crops, inv), 64)
    warp = per_face_ms(lambda: mv.crop_faces(frames, ms, device), 64)
    print(f"\nMovement (mesh + blendshapes + pose + gaze), 64 faces: {whole:.3f} ms/face")
    print(f"crop_faces (512x512 frames), 64 faces: {warp:.3f} ms/face")


if __name__ == "__main__":
    main()
