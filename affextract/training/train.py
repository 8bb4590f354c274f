"""MMA training with the paper's multi-task loss (Eq. 3, see losses), single process or DDP under torchrun.

Whole datasets live in memory as uint8 network inputs (datasets.prepare_inputs) on the training device;
augmentation (see augment) is one batched affine resampling there. `train` builds the model and its inputs, resumes
from a checkpoint, then runs epochs that each train, validate and save, and fits the number of epochs to the time
budget; calibration (see calibrate) then chooses the inference-time settings of the best weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from affextract.model import MMA, VARIANTS, MMAConfig, save_mma
from affextract.pixels import to_unit
from affextract.runtime import gpu_paths, ranks, resolve_device
from affextract.schema import AUS
from affextract.training.augment import Augment, augment_batch
from affextract.training.calibrate import CalibrateOptions, calibrate_weights
from affextract.training.losses import DM_FORMS, mma_losses
from affextract.training.validate import SELECT_METRICS, merge_metrics, select_value, validate

HEADS = ("va", "expr", "au")


@dataclass(frozen=True)
class TrainOptions:
    """How to train; stored in the checkpoint and the weights' metadata."""

    out_dir: Path = Path("runs/mma")  # checkpoint.pt, best/last .safetensors, metrics.jsonl go here
    variant: str = "small"  # architecture from model.VARIANTS
    config: MMAConfig | None = None  # explicit architecture (overrides variant)
    epochs: int = 30  # upper bound on epochs
    time_budget_s: float | None = None  # stop early so training ends within this many seconds (the schedule adapts)
    batch_size: int = 256  # per process
    lr: float = 1e-4  # Adam learning rate (the paper's)
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay; 0 = the paper's plain Adam
    warmup_epochs: float = 1.0  # linear warm-up from lr/10
    schedule: str = "cosine"  # "cosine" decays to 0 over the run after warm-up; "constant" keeps lr (the paper)
    dm_form: str = "full"  # L_DM form: "full" soft-target BCE, or "printed" (Eq. 2 as printed)
    dm_target_grad: bool = False  # let L_DM's gradient reach the expression head through r'
    # tau of the logit-adjusted expression loss: L_CCE sees logits + tau * log(prior of the training labels),
    # so the network does not learn the training set's class imbalance (FER+: 33% neutral). 0 = plain L_CCE.
    logit_adjust: float = 0.0
    teacher_weight: float = 1.0  # weight of L_teacher (BCE to teacher AUs, where the training sets have them)
    # Heads to train. A subset freezes the trunk, the shared embedding and the other heads of `init`: the
    # embeddings are computed once (no augmentation) and only the named heads are fitted on them, in seconds on a
    # CPU, and the frozen heads' outputs stay exactly those of `init`.
    heads: tuple[str, ...] = HEADS
    init: Path | None = None  # start from these weights (.safetensors): fine-tuning; None = random initialisation
    # After training, choose the inference-time settings of best.safetensors on the validation sets (see
    # calibrate); None = leave them off.
    calibrate: CalibrateOptions | None = None
    augment: Augment = field(default_factory=Augment)
    # validation metric that picks best.safetensors; "score" = mean of the available Table-5 metrics; "teacher" =
    # lowest L_teacher on the validation sets' teacher AUs
    select: str = "score"
    seed: int = 0
    device: str = "auto"  # "auto" = cuda if available; under torchrun each rank uses cuda:LOCAL_RANK
    amp: bool = True  # bf16 autocast on CUDA (and where runtime.gpu_paths)
    resume: bool = False  # continue from out_dir/checkpoint.pt
    metadata: dict = field(default_factory=dict)  # extra facts recorded with the weights (data, command line)


@dataclass
class TrainResult:
    best_path: Path
    best_epoch: int
    best_metrics: dict
    history: list[dict]


def train(train_sets, val_sets, opts: TrainOptions, on_event: Callable[[dict], None] | None = None) -> TrainResult:
    """Train an MMA on FaceSets `train_sets`, pick the best epoch on `val_sets`; returns where it was saved.

    `on_event` receives dicts: {"event": "start"|"step"|"epoch"|"calibrated"|"done", ...} for progress display.
    """
    where = ranks()
    rank, world = where.rank, where.world
    frozen = _check(train_sets, opts, world)
    emit = on_event or (lambda e: None)
    device = _start_process(opts, world)
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _build(train_sets, val_sets, opts, device, rank, world, frozen)
    ckpt_path = out_dir / "checkpoint.pt"
    state = _resume(ckpt_path, run, device) if opts.resume else _State()
    epochs = opts.epochs
    run_meta = _run_meta(train_sets, val_sets, opts, world, run.prior)
    emit({"event": "start", "n_train": run.n, "steps_per_epoch": run.steps_per_epoch, "epochs": epochs,
          "start_epoch": state.start_epoch, "device": str(device), "world_size": world})
    gen = torch.Generator(device=device)
    t_start = time.perf_counter()
    for epoch in range(state.start_epoch, epochs):
        t_epoch = time.perf_counter()
        sums = _train_epoch(run, opts, epoch, epochs, gen, emit)
        record = {"epoch": epoch, "train": sums, "seconds": round(time.perf_counter() - t_epoch, 2)}
        if rank == 0:
            metrics = validate(run.model, run.vals, run.frozen, device)
            flat = merge_metrics(list(metrics.values()))
            record["val"] = flat
            record["val_sets"] = metrics
            _save(run, state, record, opts.select, epochs, out_dir, run_meta)
            emit({"event": "epoch", **record, "best_epoch": state.best_epoch, "epochs": epochs})
        if opts.time_budget_s and epoch - state.start_epoch < 3:
            epochs = _fit_budget(opts, epoch, state.start_epoch, t_start, device, world)
        if world > 1:
            torch.distributed.barrier()
        if epoch + 1 >= epochs:
            break
    best_metrics = state.best_metrics
    if opts.calibrate is not None and rank == 0 and run.vals and run.prior is not None and state.best_epoch >= 0:
        chosen, row = calibrate_weights(out_dir / "best.safetensors", [s for s, _ in run.vals], run.prior,
                                        opts.calibrate, device=device)
        best_metrics = row or best_metrics
        emit({"event": "calibrated", **chosen, "val": best_metrics})
    emit({"event": "done", "best_epoch": state.best_epoch, "best": best_metrics,
          "seconds": time.perf_counter() - t_start})
    return TrainResult(out_dir / "best.safetensors", state.best_epoch, best_metrics, state.history)


def _check(train_sets, opts: TrainOptions, world: int) -> bool:
    """Refuse options that cannot train; returns whether only some heads train (the rest frozen)."""
    if opts.dm_form not in DM_FORMS:
        raise ValueError(f"dm_form {opts.dm_form!r} is not one of {DM_FORMS}")
    if opts.select not in SELECT_METRICS:
        raise ValueError(f"select {opts.select!r} is not one of {SELECT_METRICS}")
    if opts.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule {opts.schedule!r} is not 'cosine' or 'constant'")
    if not train_sets:
        raise ValueError("no training data")
    if opts.variant not in VARIANTS and opts.config is None:
        raise ValueError(f"variant {opts.variant!r} is not one of {sorted(VARIANTS)}")
    if not opts.heads or not set(opts.heads) <= set(HEADS) or len(set(opts.heads)) != len(opts.heads):
        raise ValueError(f"heads {opts.heads} must be distinct names among {HEADS}")
    frozen = set(opts.heads) != set(HEADS)
    if frozen and opts.init is None:
        raise ValueError(f"training only the heads {opts.heads} freezes the rest of a trained model: give init weights")
    if frozen and world > 1:
        raise ValueError("training only some heads runs in one process (it takes seconds); run it without torchrun")
    return frozen


def _start_process(opts: TrainOptions, world: int) -> torch.device:
    """Join the torchrun group, pick and set up the device, seed the random generators."""
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = resolve_device(opts.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed)
    return device


@dataclass
class _Run:
    """What the epochs work on, built once."""

    model: MMA
    config: MMAConfig  # the model's architecture and inference-time settings (checked on resume)
    net: torch.nn.Module  # what a step calls: MMA.net or the heads on embeddings, DDP-wrapped under torchrun
    optim: torch.optim.Optimizer
    # (N, C, S, S) uint8 inputs on the device, or (N, embed_dim) embeddings when only heads train
    x: torch.Tensor
    labels: tuple  # va (N, 2), expr (N, 7), au (N, 17) and teacher AUs (N, 17) or None, on the device
    vals: list  # (FaceSet, prepared inputs) per validation set; empty on ranks other than 0
    prior: np.ndarray | None  # (7,) expression prior of the training data, where it has expression labels
    expr_offset: torch.Tensor | None  # (7,) logit adjustment of L_CCE
    frozen: bool  # only some heads train
    n: int  # training samples
    per_step: int  # samples per step over all ranks
    steps_per_epoch: int
    amp: bool  # bf16 autocast
    device: torch.device
    rank: int
    world: int


@dataclass
class _State:
    """Where the run stands: restored on resume, updated after each epoch."""

    start_epoch: int = 0
    best: float = -math.inf  # the selection value of the best epoch
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def _build(train_sets, val_sets, opts: TrainOptions, device: torch.device, rank: int, world: int,
           frozen: bool) -> _Run:
    """The model (from `opts.init` where given), its inputs and labels on the device, and the optimiser."""
    from affextract.training.datasets import prepare_inputs

    model, config = _model(opts, device, frozen)
    # Inputs and labels of every set, prepared once with the model's own preprocessing, kept on the device.
    x_train = torch.cat([prepare_inputs(s, model) for s in train_sets]).to(device)
    va_t, ex_t, au_t, teach_t = (t.to(device) for t in _labels(train_sets))
    has_teacher = bool(torch.isfinite(teach_t).any())
    prior = expression_prior(train_sets) if (opts.logit_adjust or any("expr" in s.tasks for s in train_sets)) else None
    expr_offset = (torch.as_tensor(opts.logit_adjust * np.log(prior / prior.sum()), dtype=torch.float32, device=device)
                   if opts.logit_adjust else None)
    vals = [(s, prepare_inputs(s, model)) for s in val_sets] if rank == 0 else []
    n = len(x_train)
    per_step = opts.batch_size * world
    if gpu_paths(device):
        model = model.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    if frozen:
        # The frozen part is a fixed function: its embeddings (B, embed_dim) replace the images as training inputs.
        model.eval()
        x_train = _embeddings(model, x_train)
        # Validation reads the embeddings too (and those of the mirror images where the config averages with them).
        vals = [(s, (_embeddings(model, xv), _embeddings(model, xv, True) if config.flip_tta else None))
                for s, xv in vals]
        params = [p for h in opts.heads for p in getattr(model, f"{h}_head").parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)

    net = _HeadsOnly(model) if frozen else _NetOnly(model)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay) if opts.weight_decay \
        else torch.optim.Adam(params, lr=opts.lr)
    return _Run(model, config, net, optim, x_train, (va_t, ex_t, au_t, teach_t if has_teacher else None), vals,
                prior, expr_offset, frozen, n, per_step, max(1, n // per_step), opts.amp and gpu_paths(device),
                device, rank, world)


def _model(opts: TrainOptions, device: torch.device, frozen: bool) -> tuple[MMA, MMAConfig]:
    """A new MMA of the requested architecture, loaded with `opts.init` where given."""
    config = opts.config or VARIANTS[opts.variant]
    model = MMA(config).to(device)
    if opts.init is not None:
        from affextract.model import load_mma

        init, init_info = load_mma(opts.init)
        if frozen:
            # The expression head stays as it is, so the inference-time settings chosen for it still hold.
            config = init_info.config
            model = MMA(config).to(device)
        elif opts.config is None and opts.variant == "small":
            # Fine-tuning keeps the architecture and preprocessing of the start point, not its inference-time
            # corrections (they were chosen for those weights).
            config = replace(init_info.config, flip_tta=False, expr_prior=None, prior_tau=0.0)
            model = MMA(config).to(device)
        try:
            model.load_state_dict(init.state_dict())
        except RuntimeError as e:
            raise ValueError(f"{opts.init}: weights do not fit the requested architecture ({e})") from None
    return model, config


def _resume(ckpt_path: Path, run: _Run, device: torch.device) -> _State:
    """Restore the model, the optimiser and the run's state from `ckpt_path`."""
    if not ckpt_path.exists():
        raise FileNotFoundError(f"{ckpt_path}: nothing to resume; train without --resume first")
    ck = torch.load(ckpt_path, map_location=device, weights_only=True)  # tensors and plain types only
    if ck["config"] != run.config.to_json():
        raise ValueError(f"{ckpt_path}: checkpoint architecture {ck['config']} differs from the requested one")
    run.model.load_state_dict(ck["model"])
    run.optim.load_state_dict(ck["optim"])
    history = json.loads(ck["history"])
    best_metrics = next((h["val"] for h in history if h["epoch"] == ck["best_epoch"]), {})
    return _State(ck["epoch"] + 1, ck["best"], ck["best_epoch"], best_metrics, history)


def _run_meta(train_sets, val_sets, opts: TrainOptions, world: int, prior: np.ndarray | None) -> dict:
    """The facts recorded with every weights file the run writes."""
    return {
        "training": {
            "datasets": [{"name": s.name, "n": len(s), "tasks": s.tasks} for s in train_sets],
            "validation": [{"name": s.name, "n": len(s)} for s in val_sets],
            "options": json.loads(json.dumps(asdict(replace(opts, config=None)), default=str)),
            "world_size": world,
            "expr_prior": None if prior is None else [round(float(p), 6) for p in prior / prior.sum()],
        },
        **opts.metadata,
    }


def _lr_at(opts: TrainOptions, step: int, total: int, steps_per_epoch: int) -> float:
    """Learning rate at `step` of `total`: linear warm-up from lr/10, then constant or cosine to 0."""
    warm = opts.warmup_epochs * steps_per_epoch
    if step < warm:
        return opts.lr * (0.1 + 0.9 * step / warm)
    if opts.schedule == "constant":
        return opts.lr
    p = min(1.0, (step - warm) / max(1.0, total - warm))
    return opts.lr * 0.5 * (1 + math.cos(math.pi * p))


def _train_epoch(run: _Run, opts: TrainOptions, epoch: int, epochs: int, gen: torch.Generator,
                 emit: Callable[[dict], None]) -> dict:
    """One epoch of steps on this rank's slices; returns the smoothed loss terms."""
    device, rank, frozen, spe = run.device, run.rank, run.frozen, run.steps_per_epoch
    va_t, ex_t, au_t, teach_t = run.labels
    run.net.train()
    # Same permutation on every rank (seeded by epoch), each rank takes its slice.
    perm = torch.randperm(run.n, generator=torch.Generator().manual_seed(opts.seed * 100003 + epoch)).to(device)
    gen.manual_seed(opts.seed * 7919 + epoch * run.world + rank)
    sums = {"loss": 0.0, "ccc": 0.0, "cce": 0.0, "bce": 0.0, "dm": 0.0, "teacher": 0.0}
    for step in range(spe):
        idx = perm[step * run.per_step + rank * opts.batch_size : step * run.per_step + (rank + 1) * opts.batch_size]
        z = run.x[idx] if frozen else augment_batch(to_unit(run.x[idx]), opts.augment, gen)
        if gpu_paths(device) and not frozen:
            z = z.contiguous(memory_format=torch.channels_last)
        for g in run.optim.param_groups:
            g["lr"] = _lr_at(opts, epoch * spe + step, epochs * spe, spe)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.amp):
            out = run.net(z)
        terms = mma_losses(out, va_t[idx], ex_t[idx], au_t[idx], opts.dm_form, opts.dm_target_grad,
                           None if teach_t is None else teach_t[idx], run.expr_offset)
        loss = terms["ccc"] + terms["cce"] + terms["bce"] + terms["dm"] + opts.teacher_weight * terms["teacher"]
        run.optim.zero_grad(set_to_none=True)
        loss.backward()
        run.optim.step()
        if step % 20 == 0 or step == spe - 1:
            # .item() syncs; do it sparsely so the GPU stays busy.
            vals_now = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
            for k in sums:
                sums[k] = vals_now[k] if step == 0 else 0.9 * sums[k] + 0.1 * vals_now[k]
            emit({"event": "step", "epoch": epoch, "step": step + 1, "steps": spe, **sums,
                  "lr": run.optim.param_groups[0]["lr"]})
    return sums


def _save(run: _Run, state: _State, record: dict, select: str, epochs: int, out_dir: Path, run_meta: dict) -> None:
    """Note the validated epoch `record`; write best (when it is), last, metrics.jsonl and the checkpoint."""
    epoch, flat = record["epoch"], record["val"]
    sel = select_value(flat, select) if run.vals else float(epoch)
    state.history.append(record)
    if sel > state.best:
        state.best, state.best_epoch, state.best_metrics = sel, epoch, flat
        save_mma(run.model, out_dir / "best.safetensors", run_meta | {"epoch": epoch, "validation_metrics": flat})
    save_mma(run.model, out_dir / "last.safetensors", run_meta | {"epoch": epoch, "validation_metrics": flat})
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    torch.save({"model": run.model.state_dict(), "optim": run.optim.state_dict(), "epoch": epoch, "best": state.best,
                "best_epoch": state.best_epoch, "epochs": epochs, "config": run.config.to_json(),
                "history": json.dumps(state.history)}, out_dir / "checkpoint.pt")


def _fit_budget(opts: TrainOptions, epoch: int, start_epoch: int, t_start: float, device: torch.device,
                world: int) -> int:
    """The number of epochs that fits the run (schedule included) into `opts.time_budget_s`, from the epochs timed
    so far; rank 0's estimate holds on every rank."""
    # The first epochs include warm-up costs, so the caller re-estimates a few times.
    per_epoch = (time.perf_counter() - t_start) / (epoch - start_epoch + 1)
    fit = int((opts.time_budget_s - (time.perf_counter() - t_start)) / per_epoch) + epoch + 1
    fit = torch.tensor(min(opts.epochs, max(epoch + 1, fit)), device=device)
    if world > 1:
        torch.distributed.broadcast(fit, 0)
    return int(fit)


def _labels(sets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(va, expr, au, teacher AUs) of all sets, concatenated; teacher is NaN for sets without one."""
    teacher = [s.teacher_au if s.teacher_au is not None else np.full((len(s), len(AUS)), np.nan, np.float32)
               for s in sets]
    return tuple(torch.from_numpy(np.concatenate([getattr(s, k) for s in sets])) for k in ("va", "expr", "au")) + (
        torch.from_numpy(np.concatenate(teacher).astype(np.float32)),)


def expression_prior(sets) -> np.ndarray:
    """(7,) mean expression target over the samples of `sets` that have one: the class prior of the training data."""
    e = np.concatenate([s.expr for s in sets])
    e = e[np.isfinite(e).all(1)]
    if not len(e):
        raise ValueError("no expression labels in the training data: the expression prior is undefined")
    return np.clip(e.mean(0), 1e-4, None)

@torch.no_grad()
def _embeddings(model: MMA, x: torch.Tensor, mirror: bool = False) -> torch.Tensor:
    """uint8 (N, C, S, S) network inputs -> (N, embed_dim) shared embeddings in eval mode (of the mirror images)."""
    model.eval()
    z = [to_unit(x[s:s + 512]) for s in range(0, len(x), 512)]
    return torch.cat([model.embedding(b.flip(-1) if mirror else b) for b in z])


class _HeadsOnly(torch.nn.Module):
    """The three heads on precomputed embeddings, with the embedding's training-time dropout."""

    def __init__(self, model: MMA) -> None:
        super().__init__()
        self.model = model

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.model.heads(F.dropout(e, self.model.config.dropout, self.training))


class _NetOnly(torch.nn.Module):
    """MMA.net as a module's forward: training feeds prepared inputs, and DDP wraps forward()."""

    def __init__(self, model: MMA) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.net(z)
