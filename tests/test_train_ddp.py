"""`affextract train` under torchrun: 2 CPU ranks (gloo) train one MMA together on a FER+-layout file the test
writes, and what rank 0 writes shows it learning."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np

from affextract.training.datasets import FERPLUS_VOTES


def write_toy_ferplus(path, n_train: int, n_valid: int, seed: int = 0):
    """48x48 grey faces-to-be in the ferplus.h5 layout: 'happiness' images bright on top, 'sadness' at the bottom;
    all 10 votes for the class."""
    rng = np.random.default_rng(seed)
    n = n_train + n_valid
    images = rng.integers(0, 60, (n, 48, 48)).astype(np.uint8)
    cls = np.arange(n) % 2
    images[cls == 0, :20] += 180
    images[cls == 1, 28:] += 180
    votes = np.zeros((n, len(FERPLUS_VOTES)), np.uint8)
    votes[cls == 0, FERPLUS_VOTES.index("happiness")] = 10
    votes[cls == 1, FERPLUS_VOTES.index("sadness")] = 10
    with h5py.File(path, "w") as f:
        f["images"], f["votes"] = images, votes
        f["split"] = np.array(["train"] * n_train + ["valid"] * n_valid, dtype=h5py.string_dtype())
    return path


def test_two_gloo_ranks_train_one_model(tmp_path):
    data = write_toy_ferplus(tmp_path / "toy.h5", 64, 32)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", "29527", "-m", "affextract", "train",
                        "--data", f"ferplus:{data}:train", "--val", f"ferplus:{data}:valid",
                        "--derive-va", "--epochs", "4", "--batch-size", "8", "--lr", "3e-3", "--warmup", "0",
                        "--select", "acc_expr", "--device", "cpu", "--no-amp", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "best.json").read_text())
    assert info["metadata"]["training"]["world_size"] == 2
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2, 3]  # one record per epoch, written by rank 0 only
    # it learns: the training loss falls and valence/arousal (derived from the two classes) start to agree
    assert lines[-1]["train"]["loss"] < lines[0]["train"]["loss"], [x["train"] for x in lines]
    assert lines[-1]["val"]["ccc_va"] > 0.3 > lines[0]["val"]["ccc_va"], [x["val"] for x in lines]
