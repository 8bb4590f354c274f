"""What each inference-time lever of the MMA gives on FER+ valid and on a folder of posed faces (the model card's
lever table): prior correction tau, test-time flip (alone and with each tau), crop of the aligned face.

    python benchmarks/mma_levers.py --ferplus ferplus.h5 --posed posed_faces/ [--weights W.safetensors ...]

Each weights file is scored as stored (its own settings), then with the levers varied one at a time around
no correction. The posed photos go through the detector and alignment of `affextract run` once; each lever
then re-reads the aligned crops through the model's own preprocessing. tau is chosen on FER+ valid
(`affextract train --calibrate` does it), never on the posed faces: they are reported, not tuned on.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from affextract.training.datasets import align_raw, load_ferplus, load_folder, prepare_inputs
from affextract.training.evaluate import predict_inputs, score
from affextract.model import MMA, load_mma
from affextract.pixels import to_pixels
from affextract.training.train import expression_prior

CROPS = {"tighter (16, 24, 96, 104)": (16.0, 24.0, 96.0, 104.0), "whole 112": (0.0, 0.0, 112.0, 112.0),
         "looser (2, 8, 110, 116)": (2.0, 8.0, 110.0, 116.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferplus", type=Path, required=True, help="ferplus.h5 (train for the prior, valid for scores)")
    ap.add_argument("--posed", type=Path, required=True, help="folder of class folders (DIR/<source>/<expression>/)")
    ap.add_argument("--weights", type=Path, nargs="*", default=[None], help="weights to score (default: shipped)")
    ap.add_argument("--taus", type=float, nargs="*", default=[0.25, 0.5, 0.75, 1.0, 1.25])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    val = load_ferplus(args.ferplus, "valid")
    prior = tuple(float(p) for p in expression_prior([load_ferplus(args.ferplus, "train")]))
    posed = load_folder(args.posed)
    aligned = align_raw(posed, list(range(len(posed))))  # (N, 3, 112, 112) in [-1, 1], once for every lever

    def scores(model: MMA, label: str) -> dict:
        fv = predict_inputs(model, prepare_inputs(val, model))
        rv = score(fv, val.va, val.expr, val.au)
        with torch.no_grad():
            z = to_pixels(model.preprocess(aligned)).round().clamp(0, 255).to(torch.uint8)
        fp = predict_inputs(model, z)
        groups = np.asarray(posed.groups)
        rp = score(fp, posed.va, posed.expr, posed.au)
        row = {"lever": label, "valid_f1": rv.f1_expr, "valid_majority_acc": rv.acc_expr_majority,
               "posed_f1": rp.f1_expr, "posed_acc": rp.acc_expr, "posed_min_class_f1": min(rp.f1_per_expr.values()),
               **{f"posed_{g}_f1": score(fp[groups == g], posed.va[groups == g], posed.expr[groups == g],
                                         posed.au[groups == g]).f1_expr for g in sorted(set(posed.groups))},
               "posed_f1_per_class": rp.f1_per_expr}
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        return row

    for w in args.weights:
        base, info = load_mma(w)
        plain = replace(base.config, flip_tta=False, prior_tau=0.0)

        def variant(**kw) -> MMA:
            m = MMA(replace(plain, **kw))
            m.load_state_dict(base.state_dict())
            return m.eval()

        print(f"# {info.name} (stored settings: flip_tta {base.config.flip_tta}, prior_tau {base.config.prior_tau})")
        scores(base, "as stored")
        scores(variant(), "no correction")
        for tau in args.taus:
            scores(variant(expr_prior=prior, prior_tau=tau), f"prior correction tau={tau}")
        scores(variant(flip_tta=True), "test-time flip")
        for tau in args.taus:
            scores(variant(flip_tta=True, expr_prior=prior, prior_tau=tau), f"flip + prior correction tau={tau}")
        for name, crop in CROPS.items():
            scores(variant(crop=crop), f"crop {name}")


if __name__ == "__main__":
    main()
