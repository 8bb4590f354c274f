"""Seconds per training epoch of the paper's configuration on a Hume-scale simulated set; what skipping padding buys.

The paper's configuration: head mrnn (GRU(128) → concat → Mask → FC(32) → FC(7)), routed Adam, Pearson loss,
batch 4, t = 480. Modes:
  none      the encoder runs over all t = 480 padded steps of every batch (what a fixed-length pipeline does)
  truncate  the encoder stops at the batch's longest video (identical outputs: positions ≥ l are masked)
  pack      packed sequences: each video's padding is skipped
each with random batches and with length-sorted buckets (--bucket). Timing runs `--batches` steps per mode and
extrapolates to a full epoch (ceil(N_train / batch) steps); pass --batches 0 for full epochs.

    python benchmarks/bench_seqhead.py                       # full Hume scale (simulated once, cached in --workdir)
    python benchmarks/bench_seqhead.py --scale 0.05 --batches 50
Runs on CUDA when available (--device to choose).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from seqhead.model import ModelConfig, SeqHead
from seqhead.simulate import SimulateOptions, simulate
from seqhead.train import RoutedAdam, TrainOptions, batches, prepare, resolve_device, standardize, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of Hume-Reaction's size to simulate")
    ap.add_argument("--workdir", type=Path, default=Path("scratch/bench_seqhead"), help="where the simulated set lives")
    ap.add_argument("--batches", type=int, default=40, help="steps timed per mode (0 = a full epoch)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--t", type=int, default=480)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--modes", default="none,truncate,pack,truncate+bucket,pack+bucket")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    h5 = args.workdir / f"hume_sim_{args.scale:g}.h5"
    if not h5.exists():
        t0 = time.time()
        res = simulate(SimulateOptions(h5, scale=args.scale, seed=0))
        print(f"simulated {sum(res.n_videos)} videos, {res.n_frames} frames in {time.time() - t0:.0f}s → {h5}")
    t0 = time.time()
    data = prepare(TrainOptions(h5=h5, out=args.workdir / "unused"))
    print(f"read {len(data.videos)} videos in {time.time() - t0:.0f}s; training set {len(data.train_seqs)} videos, "
          f"mean length {np.mean([len(s) for s in data.train_seqs]):.0f} frames (kept), t = {args.t}")
    frames = np.concatenate(data.train_seqs)
    seqs = [s[:args.t] for s in standardize(data.train_seqs, frames.mean(0), frames.std(0) + 1e-6)]
    y = torch.from_numpy(data.y_train)
    lengths = np.array([max(len(s), 1) for s in seqs])
    steps_per_epoch = math.ceil(len(seqs) / args.batch_size)
    n_steps = args.batches or steps_per_epoch

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads); batch {args.batch_size}; {n_steps} steps timed per mode, "
          f"{steps_per_epoch} steps per epoch")
    rows = []
    for mode in args.modes.split(","):
        skip, _, bucket = mode.partition("+")
        torch.manual_seed(0)
        model = SeqHead(ModelConfig(n_features=seqs[0].shape[1], n_targets=y.shape[1], t=args.t, head="mrnn",
                                    skip_padding=skip)).to(device)
        optim = RoutedAdam(model.parameters(), lr=1e-4)
        plan = batches(lengths, args.batch_size, np.random.default_rng(0), bucket == "bucket")[: n_steps + 3]
        for idx in plan[:3]:  # warm-up
            train_step(model, optim, [seqs[i] for i in idx], y[idx], "pearson", device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for idx in plan[3:]:
            train_step(model, optim, [seqs[i] for i in idx], y[idx], "pearson", device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - t0) / max(1, len(plan) - 3)
        steps_run = sum(int(lengths[idx].clip(max=args.t).max()) if skip != "none" else args.t for idx in plan[3:])
        rows.append((mode, per_step, per_step * steps_per_epoch, steps_run / max(1, len(plan) - 3)))
        print(f"  {mode:16s} {per_step * 1000:8.1f} ms/step   {per_step * steps_per_epoch:9.1f} s/epoch   "
              f"(mean recurrent steps per batch {rows[-1][3]:.0f})", flush=True)
    base = rows[0][1]
    print("\nmode              s/epoch   speed-up vs " + rows[0][0])
    for mode, per_step, per_epoch, _ in rows:
        print(f"{mode:16s} {per_epoch:9.1f}   {base / per_step:5.2f}×")


if __name__ == "__main__":
    main()
