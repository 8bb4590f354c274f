"""Measure ``affextract.faces.align.POINTS_TEMPLATE``: where MTCNN's 5 points fall in MediaPipe's face crop.

    python tools/fit_mediapipe_crop.py CLIP... [--every 6]

On every ``--every``-th frame of the clips, MTCNN finds the largest face; its crop is first placed from the current
template, then moved by MediaPipe's own rule (``roi_from_mesh``: the crop the mesh's points ask for) until it stops
moving. The 5 points are then expressed in that fixed-point crop; their mean over all faces, averaged with its mirror
image, is the template. Prints
the template, the spread, and how far the crop from the new template lands from the fixed point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from affextract.faces import align as al  # noqa: E402
from affextract import movement as mv  # noqa: E402
from affextract.faces.detectors import get_detector  # noqa: E402
from affextract.video import import_decord  # noqa: E402


def fixed_point_rois(frames: np.ndarray, first: np.ndarray, mesh: mv.FaceMesh, steps: int = 4) -> np.ndarray:
    """Iterate crop -> mesh -> roi_from_mesh from ``first`` (N, 2, 3); returns the last affines."""
    m = first
    for _ in range(steps):
        crops = al.crop_faces(frames, m).float() / 255
        with torch.inference_mode():
            lm, _ = mesh(crops)
        img = al.mesh_to_image(lm, torch.as_tensor(al.invert_affine(m), dtype=torch.float32))
        m = al.roi_from_mesh(img.numpy())
    return m


def roi_params(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 2, 3) image -> crop affines -> centres (N, 2), sides (N,), angles (N,) in the image."""
    inv = al.invert_affine(m)
    center = inv[:, :, :2] @ np.full(2, al.MESH_CROP_SIZE / 2) + inv[:, :, 2]
    side = np.sqrt(np.abs(np.linalg.det(inv[:, :, :2]))) * al.MESH_CROP_SIZE
    return center, side, np.arctan2(inv[:, 1, 0], inv[:, 0, 0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clips", nargs="+", type=Path)
    ap.add_argument("--every", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    decord = import_decord()
    detector = get_detector("mtcnn")
    mesh = mv.load_face_mesh()
    points, fixed = [], []
    for clip in args.clips:
        vr = decord.VideoReader(str(clip))
        batch = vr.get_batch(list(range(0, len(vr), args.every))).asnumpy()
        found = [(f, faces.landmarks[int(np.argmax(faces.areas))])
                 for f, faces in zip(batch, detector.detect(batch)) if len(faces)]
        if found:
            frames, marks = np.stack([f for f, _ in found]), np.stack([p for _, p in found]).astype(np.float64)
            points.append(marks)
            fixed.append(fixed_point_rois(frames, al.roi_from_points(marks), mesh))
        print(f"{clip.name}: {len(found)} faces in {len(batch)} frames")
    points, fixed = np.concatenate(points), np.concatenate(fixed)
    in_crop = np.einsum("nij,nkj->nki", fixed[:, :, :2], points) + fixed[:, None, :, 2]
    # Mirror-averaged (image-left and image-right points swapped, x reflected): a mirrored face gets the mirrored crop.
    mirrored = in_crop[:, [1, 0, 2, 4, 3]] * [-1, 1] + [al.MESH_CROP_SIZE, 0]
    template = (in_crop.mean(0) + mirrored.mean(0)) / 2
    print("POINTS_TEMPLATE =", np.array2string(template.round(2), separator=", "))
    print("spread (std, crop px):", np.array2string(in_crop.std(0).round(2), separator=", "))
    old = al.POINTS_TEMPLATE
    al.POINTS_TEMPLATE = template
    c0, s0, a0 = roi_params(fixed)
    c1, s1, a1 = roi_params(al.roi_from_points(points))
    al.POINTS_TEMPLATE = old
    off = np.linalg.norm(c1 - c0, axis=1) / s0
    print(f"crop from 5 points vs fixed point over {len(points)} faces: centre offset median "
          f"{np.median(off):.3f}, 95% {np.quantile(off, 0.95):.3f} of the side; side ratio median "
          f"{np.median(s1 / s0):.3f} (5%-95% {np.quantile(s1 / s0, 0.05):.3f}-{np.quantile(s1 / s0, 0.95):.3f}); "
          f"angle |diff| median {np.degrees(np.median(np.abs(a1 - a0))):.2f} deg")


if __name__ == "__main__":
    main()
