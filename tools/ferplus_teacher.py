"""Measure MediaPipe blendshapes on every FER+ image once and cache them for teacher AUs (`affextract train --teacher`).

    python tools/ferplus_teacher.py ferplus.h5 scratch/ferplus_blendshapes.npz

Each 48x48 image is upscaled x4 and its mesh crop placed from FER+'s median 5 points
(affextract.training.teacher.measure_native). The .npz holds, per row of the .h5 (all splits): blendshapes (N, 52),
presence (N,), lip_gap (N,), split (N,), plus the blendshape names and the source file's size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from affextract.movement import BLENDSHAPE_NAMES  # noqa: E402
from affextract.training.teacher import measure_native  # noqa: E402


def main() -> None:
    import h5py

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ferplus", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with h5py.File(args.ferplus, "r") as f:
        images = f["images"][:]
        split = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in f["split"][:]])
    t = time.perf_counter()
    m = measure_native(images, on_chunk=lambda d, n: print(f"{d}/{n} {time.perf_counter() - t:.0f} s", flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, blendshapes=m.blendshapes, presence=m.presence, lip_gap=m.lip_gap, split=split,
                        names=np.array(BLENDSHAPE_NAMES), source_size=args.ferplus.stat().st_size)
    print(f"{len(images)} faces in {time.perf_counter() - t:.0f} s; presence > 0.5: "
          + ", ".join(f"{s} {(m.presence[split == s] > 0.5).mean():.3f}" for s in sorted(set(split))))


if __name__ == "__main__":
    main()
