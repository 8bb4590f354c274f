"""seqhead speed: three suites, each printing ratios against a baseline measured in the same run.

--suite levers (default): seconds per epoch (training steps + the validation pass) of the default head and of
each speed lever — batch size, length buckets, frame stride, the conv encoder, fp32 matmul precision,
torch.compile — on a simulated set (scale 0.19 ≈ 3,000 / 885 / 875 videos, ≈ 300 frames each). Timing runs
`--batches` steps per lever and extrapolates to a full epoch; the validation pass is timed in full.

    python benchmarks/bench_seqhead.py --suite levers --scale 0.19 --batches 40

--suite busy: one epoch (capped at `--batches` steps, 0 = a full epoch, plus validation) for each of
`--busy-threads` (default 1 and torch's default threads), each on a quiet machine and beside a second, CPU-bound
torch process of `--hog-threads` threads (default torch's); prints busy/quiet ratios.

--suite padding: what skipping padding buys for the paper's configuration, below.

The paper's configuration: head mrnn (GRU(128) → concat → Mask → FC(32) → FC(7)), routed Adam, Pearson loss,
batch 4, t = 480. Modes:
  none      the encoder runs over all t = 480 padded steps of every batch (what a fixed-length pipeline does)
  truncate  the encoder stops at the batch's longest video (identical outputs: positions ≥ l are masked)
  pack      packed sequences: each video's padding is skipped
each with random batches and with length-sorted buckets (--bucket). Timing runs `--batches` steps per mode and
extrapolates to a full epoch (ceil(N_train / batch) steps); pass --batches 0 for full epochs.

    python benchmarks/bench_seqhead.py --suite padding --scale 1 --batch-size 4   # full Hume scale
    python benchmarks/bench_seqhead.py --suite padding --scale 0.05 --batches 50
Runs on CUDA when available (--device to choose).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from affextract.runtime import resolve_device
from seqhead.model import ModelConfig, SeqHead
from seqhead.simulate import SimulateOptions, simulate
from seqhead.data import batches
from seqhead.fit import RoutedAdam, train_step
from seqhead.infer import cpu_threads, predict_raw, standardize
from seqhead.train import TrainOptions, prepare, train

# name → TrainOptions changes; the first is the baseline every ratio refers to.
LEVERS = {
    "GRU(128), batch 16 (earlier default)": dict(rnn="gru", hidden=128, batch_size=16, bucket=False),
    "bucket": dict(rnn="gru", hidden=128, batch_size=16, bucket=True),
    "batch 32": dict(rnn="gru", hidden=128, batch_size=32, bucket=False),
    "batch 64": dict(rnn="gru", hidden=128, batch_size=64, bucket=False),
    "stride 2": dict(rnn="gru", hidden=128, batch_size=16, bucket=False, stride=2),
    "matmul medium": dict(rnn="gru", hidden=128, batch_size=16, bucket=False),  # set_float32_matmul_precision
    "conv": dict(rnn="conv", hidden=128, batch_size=16, bucket=False),
    "conv + compile": dict(rnn="conv", hidden=128, batch_size=16, bucket=False),
    "gru, batch 32, bucket": dict(rnn="gru", hidden=128, batch_size=32, bucket=True),
    "gru, batch 32, bucket, stride 2": dict(rnn="gru", hidden=128, batch_size=32, bucket=True, stride=2),
    "default (conv(64), batch 32, bucket)": dict(),
}
def levers(args, h5: Path, device: torch.device) -> None:
    base = TrainOptions(h5=h5, out=args.workdir / "unused", threads=args.threads)
    data = prepare(base)
    print(f"{len(data.train_seqs)} training / {len(data.val_seqs)} validation videos, mean length "
          f"{np.mean([len(s) for s in data.train_seqs]):.0f} kept frames; {torch.get_num_threads()} thread(s), "
          f"device {device}; {args.batches} steps timed per lever")
    frames = np.concatenate(data.train_seqs)
    mean, std = frames.mean(0), frames.std(0) + 1e-6
    y = torch.from_numpy(data.y_train)
    rows = []
    for name in args.levers.split(";"):
        o = replace(base, **LEVERS[name])
        seqs = [s[::o.stride] for s in standardize(data.train_seqs, mean, std)]
        val = [s[::o.stride] for s in standardize(data.val_seqs, mean, std)]
        t = max(len(s) for s in seqs)
        torch.manual_seed(0)
        model = SeqHead(ModelConfig(n_features=seqs[0].shape[1], n_targets=y.shape[1], t=t, head=o.head,
                                    rnn=o.rnn, hidden=o.hidden)).to(device)
        if name.endswith("compile"):
            model = torch.compile(model, dynamic=True)
        optim = RoutedAdam(model.parameters(), lr=o.lr)
        lengths = np.array([max(len(s), 1) for s in seqs])
        plan = batches(lengths, o.batch_size, np.random.default_rng(0), o.bucket)
        steps_per_epoch = len(plan)
        torch.set_float32_matmul_precision("medium" if name == "matmul medium" else "highest")
        for idx in plan[:3]:  # warm-up (and compilation)
            train_step(model, optim, [seqs[i] for i in idx], y[idx], "pearson", device, o.clip)
        t0 = time.perf_counter()
        for idx in plan[3:3 + args.batches]:
            train_step(model, optim, [seqs[i] for i in idx], y[idx], "pearson", device, o.clip)
        per_step = (time.perf_counter() - t0) / len(plan[3:3 + args.batches])
        t0 = time.perf_counter()
        predict_raw(model, val, device)
        val_s = time.perf_counter() - t0
        torch.set_float32_matmul_precision("highest")
        epoch = per_step * steps_per_epoch + val_s
        rows.append((name, per_step, steps_per_epoch, val_s, epoch))
        print(f"  {name:34s} {per_step * 1000:7.1f} ms/step × {steps_per_epoch:4d} + validation {val_s:5.1f}s = "
              f"{epoch:6.1f} s/epoch", flush=True)
    base_epoch = rows[0][4]
    print(f"\nlever                               s/epoch   speed-up vs {rows[0][0]} (same run)")
    for name, _, _, _, epoch in rows:
        print(f"{name:34s} {epoch:8.1f}   {base_epoch / epoch:5.2f}×")


# The second process: a CPU-bound torch loop; argv[1] = its threads (0 = torch's default).
HOG = """import sys, torch
if int(sys.argv[1]):
    torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a / 512)
"""


def busy(args, h5: Path) -> None:
    base = TrainOptions(h5=h5, out=args.workdir / "busy", epochs=1, max_batches=args.batches or None, overwrite=True,
                        members=1)  # the target is per ensemble member
    data = prepare(base)
    print(f"one epoch = {args.batches or 'all'} steps of the default head + validation ({len(data.val_seqs)} videos); "
          f"second process: a CPU-bound torch loop with {args.hog_threads or 'torch default'} thread(s)")
    for threads in (int(t) for t in args.busy_threads.split(",")):
        quiet = train(replace(base, threads=threads), data).history[0]["seconds"]
        hog = subprocess.Popen([sys.executable, "-c", HOG, str(args.hog_threads)])
        try:
            time.sleep(2)
            loaded = train(replace(base, threads=threads), data).history[0]["seconds"]
        finally:
            hog.kill()
        print(f"  --threads {threads} ({'torch default' if threads == 0 else threads}): quiet {quiet:6.1f}s, "
              f"busy {loaded:6.1f}s, busy/quiet {loaded / quiet:5.2f}×", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("levers", "busy", "padding"), default="levers")
    ap.add_argument("--levers", default=";".join(LEVERS), help="';'-separated names from LEVERS (levers suite)")
    ap.add_argument("--scale", type=float, default=0.19, help="fraction of Hume-Reaction's size to simulate")
    ap.add_argument("--workdir", type=Path, default=Path("scratch/bench_seqhead"), help="where the simulated set lives")
    ap.add_argument("--batches", type=int, default=40, help="steps timed per mode (0 = a full epoch)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--t", type=int, default=480)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--busy-threads", default="1,0", help="busy suite: ','-separated --threads values to compare")
    ap.add_argument("--hog-threads", type=int, default=0, help="busy suite: the second process's threads (0 = torch's "
                    "default)")
    ap.add_argument("--modes", default="none,truncate,pack,truncate+bucket,pack+bucket")
    args = ap.parse_args()
    device = resolve_device(args.device)
    h5 = args.workdir / f"hume_sim_{args.scale:g}.h5"
    if not h5.exists():
        t0 = time.time()
        res = simulate(SimulateOptions(h5, scale=args.scale, seed=0))
        print(f"simulated {sum(res.n_videos)} videos, {res.n_frames} frames in {time.time() - t0:.0f}s → {h5}")
    if args.suite == "busy":
        return busy(args, h5)
    with cpu_threads(args.threads):
        if args.suite == "levers":
            return levers(args, h5, device)
        padding(args, h5, device)


def padding(args, h5: Path, device: torch.device) -> None:
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
