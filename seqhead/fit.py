"""The torch side of training: routed Adam, training steps and the epoch loop of a network head (early stopping, an
optional exponential moving average of the weights, calibration, checkpoints).

`seqhead.train` imports this module only once its inputs have been read and checked, so a wrong path or option
fails before torch loads.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import save_file as save_torch

from .config import Progress
from .data import batches, pad_batch
from .infer import predict_raw
from .metrics import calibrate, fit_calibration, pearson, pearson_loss
from .model import SeqHead

# Calibration is refitted whenever validation improves (the run directory always holds a usable best epoch), so it
# uses at most this many training videos (a seeded sample): two numbers per target need no more, and the cost of
# the extra forward pass stays small at Hume scale.
CALIBRATION_VIDEOS = 1000


# --------------------------------------------------------------------------------------------------- optimiser


class RoutedAdam(torch.optim.Optimizer):
    """Adam whose routed parameters update only the columns a batch routes, moments and step counts included.

    `step(routes={param: n})` updates columns [:n] of a 2-D parameter and leaves columns [n:] bit-exactly as they
    were: weights, first and second moments and their per-column step counts (bias correction stays per column,
    so a column that sat out k steps resumes exactly where it stopped). Other parameters follow plain Adam.
    A zero gradient is not enough under Adam: the moments would keep moving the weights.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, routes: dict | None = None):
        routes = routes or {}
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                    # Step counts per column (2-D weights), so bias correction can stay per column.
                    st["step"] = torch.zeros(p.shape[1] if p.dim() == 2 else 1, dtype=torch.float64, device=p.device)
                if p.dim() == 2:
                    n = routes.get(p, p.shape[1])
                    w, g = p[:, :n], p.grad[:, :n]
                    m, v, s = st["exp_avg"][:, :n], st["exp_avg_sq"][:, :n], st["step"][:n]
                else:
                    w, g, m, v, s = p, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"]
                s += 1
                bc1 = (1 - b1 ** s).to(p.dtype)
                bc2 = (1 - b2 ** s).to(p.dtype)
                if group["weight_decay"]:
                    g = g.add(w, alpha=group["weight_decay"])
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / bc2).sqrt_().add_(group["eps"])
                w.addcdiv_(m / bc1, denom, value=-group["lr"])


# --------------------------------------------------------------------------------------------------- step


def train_step(model: SeqHead, optim: RoutedAdam, seqs: list[np.ndarray], y: torch.Tensor, loss: str,
               device: torch.device, clip: float = 0.0) -> float:
    """One optimisation step on a batch of standardised sequences; the routed columns go to the optimiser."""
    cfg = model.cfg
    # Padding to t only where the encoder must see it: no mask, or no padding skipped (the naive baseline).
    x, ln = pad_batch(seqs, cfg.t if not cfg.mask or cfg.skip_padding == "none" else None)
    x, ln, y = torch.from_numpy(x).to(device), torch.from_numpy(ln).to(device), y.to(device)
    pred = model(x, ln)
    value = pearson_loss(pred, y) if loss == "pearson" else torch.nn.functional.mse_loss(pred, y)
    optim.zero_grad(set_to_none=True)
    value.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    n = model.routed_columns(ln)
    optim.step({model.fc1.weight: n} if n is not None else None)
    return value.item()


# --------------------------------------------------------------------------------------------------- epoch loop


class WeightAverage:
    """Exponential moving average of a model's weights, updated after every step: `decay` per step, with the usual
    warm-up min(decay, (1 + n) / (10 + n)) so the first steps are not frozen at the random start."""

    def __init__(self, model: SeqHead, decay: float):
        self.model = copy.deepcopy(model).eval()
        self.decay, self.n = decay, 0
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: SeqHead) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for a, p in zip(self.model.parameters(), model.parameters()):
            a.lerp_(p, 1 - d)


def fit_network(opts, data, writer, model_cfg, train_seqs: list[np.ndarray], val_seqs: list[np.ndarray],
                device: torch.device, rng: np.random.Generator, early_stopping: bool,
                progress: Callable[[Progress], None] | None, t0: float):
    """Train a network head for `opts` and keep its run directory up to date.

    With early stopping, the weights of the epoch with the best validation mean Pearson are kept (saved whenever
    validation improves); without (a validation set too small to choose on), every epoch is saved and the last
    one is kept. With `opts.ema`, the averaged weights are the ones validated, calibrated and saved.
    Returns (validation r per target, best epoch, epochs run, history, interrupted, calibrated validation
    predictions).
    """
    torch.manual_seed(opts.seed)
    model = SeqHead(model_cfg).to(device)
    optim = RoutedAdam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    average = WeightAverage(model, opts.ema) if opts.ema else None
    lengths = np.array([max(len(s), 1) for s in train_seqs])
    y_train = torch.from_numpy(data.y_train)
    calib = np.sort(rng.permutation(len(train_seqs))[:CALIBRATION_VIDEOS])
    best, best_epoch, stale, epochs_run = -np.inf, 0, 0, 0
    saved = None  # what the run directory holds: (weights, slope, intercept, raw validation predictions)
    history: list[dict] = []
    interrupted = False

    def save(status: str) -> np.ndarray:
        state, slope, intercept, raw_val = saved
        return writer.write(lambda p: save_torch(state, str(p)), model_cfg.to_dict(), slope, intercept,
                            calibrate(raw_val, slope, intercept), status, best_epoch, epochs_run, time.time() - t0)

    try:
        for epoch in range(1, opts.epochs + 1):
            te = time.time()
            model.train()
            losses = []
            plan = batches(lengths, opts.batch_size, rng, opts.bucket)[: opts.max_batches]
            for b, idx in enumerate(plan):
                losses.append(train_step(model, optim, [train_seqs[i] for i in idx], y_train[idx], opts.loss,
                                         device, opts.clip))
                if average is not None:
                    average.update(model)
                if progress:
                    progress(Progress(epoch, opts.epochs, b + 1, len(plan), time.time() - te,
                                      float(np.mean(losses)), None, best_epoch))
            kept = average.model if average is not None else model
            raw_val = predict_raw(kept, val_seqs, device)
            r = float(pearson(raw_val, data.y_val).mean())
            epochs_run = epoch
            if r > best or not early_stopping:
                best, best_epoch, stale = max(r, best), epoch, 0
                state = {k: v.detach().cpu().clone().contiguous() for k, v in kept.state_dict().items()}
                slope, intercept = fit_calibration(predict_raw(kept, [train_seqs[i] for i in calib], device),
                                                   data.y_train[calib])
                saved = (state, slope, intercept, raw_val)
                save("training")
            else:
                stale += 1
            history.append(dict(epoch=epoch, train_loss=float(np.mean(losses)), val_mean_pearson=r,
                                seconds=time.time() - te))
            writer.history(history, best_epoch, curve=False)
            if progress:
                progress(Progress(epoch, opts.epochs, len(plan), len(plan), history[-1]["seconds"],
                                  history[-1]["train_loss"], r, best_epoch))
            if early_stopping and stale >= opts.patience:
                break
    except KeyboardInterrupt:
        if saved is None:
            raise
        interrupted = True
    # Rewritten from memory: an interrupt may have landed between two files of a checkpoint.
    r_val = save("interrupted" if interrupted else "complete")
    writer.history(history, best_epoch, curve=True)
    state, slope, intercept, raw_val = saved
    return r_val, best_epoch, epochs_run, history, interrupted, calibrate(raw_val, slope, intercept)
