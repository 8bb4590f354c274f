"""Inference-time settings chosen on validation data after training: the prior correction tau of the expression
logits and the test-time flip."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from affextract.model import MMA, MMAConfig, activate, save_mma
from affextract.pixels import to_unit
from affextract.schema import EXPR
from affextract.training.validate import merge_metrics


@dataclass(frozen=True)
class CalibrateOptions:
    """How the inference-time settings (prior correction tau, test-time flip) are chosen on validation data."""

    taus: tuple[float, ...] = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # candidate taus
    flips: tuple[bool, ...] = (False, True)  # candidate test-time flip settings
    metric: str = "f1_expr"  # validation metric to maximise (macro F1 over the 7 expressions)
    # Only settings that keep the majority-vote accuracy at or above this count (None = no floor): a prior
    # correction buys balanced recall with accuracy on the frequent classes, and this caps what it may spend.
    min_majority: float | None = 0.85


def calibrate(model: MMA, val_sets, prior: np.ndarray, opts: CalibrateOptions = CalibrateOptions(),
              device: str | torch.device = "cpu") -> tuple[MMAConfig, list[dict]]:
    """Choose flip_tta and prior_tau on validation FaceSets: every candidate is scored and the best `opts.metric`
    among those meeting `opts.min_majority` wins (none meeting it: no correction, no flip).

    Returns the model's config with the chosen settings (expr_prior = `prior`) and one row per candidate.
    """
    from affextract.training.datasets import prepare_inputs
    from affextract.training.evaluate import score

    if not val_sets:
        raise ValueError("calibration needs validation data with expression labels")
    model = model.to(device).eval()
    inputs = [to_unit(prepare_inputs(s, model).to(device)) for s in val_sets]
    offset = -np.log(prior / prior.sum())  # (7,) per unit of tau
    rows = []
    with torch.no_grad():
        for flip in opts.flips:
            outs = []
            for z in inputs:
                o = torch.cat([model.net(z[i:i + 1024]) for i in range(0, len(z), 1024)])
                if flip:
                    o = 0.5 * (o + torch.cat([model.net(z[i:i + 1024].flip(-1)) for i in range(0, len(z), 1024)]))
                outs.append(o.cpu())
            for tau in opts.taus:
                reports = []
                for s, o in zip(val_sets, outs):
                    o = o.clone()
                    o[:, EXPR] += torch.as_tensor(tau * offset, dtype=o.dtype)
                    reports.append(score(activate(o).numpy(), s.va, s.expr, s.au, s.name).to_json())
                rows.append({"flip_tta": flip, "prior_tau": tau, **merge_metrics(reports)})
    ok = [r for r in rows if opts.min_majority is None or (r.get("acc_expr_majority") or 0) >= opts.min_majority]
    best = max(ok, key=lambda r: r.get(opts.metric) or -math.inf) if ok else {"flip_tta": False, "prior_tau": 0.0}
    config = replace(model.config, flip_tta=best["flip_tta"], prior_tau=float(best["prior_tau"]),
                     expr_prior=tuple(round(float(p), 6) for p in prior / prior.sum()))
    return config, rows


def calibrate_weights(path: str | Path, val_sets, prior: np.ndarray, opts: CalibrateOptions = CalibrateOptions(),
                      out: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[dict, dict | None]:
    """Calibrate the weights file `path` on `val_sets` (see calibrate) and write them with the chosen settings to
    `out` (default: in place); the candidates' scores go into the metadata. Returns the chosen settings and their
    validation scores (None when no candidate met the floor)."""
    from affextract.model import load_mma

    model, info = load_mma(path, device)
    config, rows = calibrate(model, val_sets, prior, opts, device)
    calibrated = MMA(config)
    calibrated.load_state_dict(model.state_dict())
    chosen = {"flip_tta": config.flip_tta, "prior_tau": config.prior_tau}
    meta = {k: v for k, v in info.metadata.items() if k != "feature_names"}
    save_mma(calibrated, out or path, meta | {"calibration": {"options": asdict(opts), "chosen": chosen,
                                                                 "candidates": rows}})
    row = next((r for r in rows if r["flip_tta"] == config.flip_tta and r["prior_tau"] == config.prior_tau
                and r.get("f1_expr") is not None and (opts.min_majority is None
                                                      or r.get("acc_expr_majority", 0) >= opts.min_majority)), None)
    return chosen, row
