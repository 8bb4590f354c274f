"""MMA training with the paper's multi-task loss (Eq. 3), single process or DDP under torchrun.

L = L_CCC + L_CCE + L_BCE + L_DM, plus L_teacher where teacher AUs from measured movement are given. Each
supervised term is averaged over the samples of the batch that carry its label (datasets annotate different
tasks), and a term with no labelled sample in the batch is 0.
L_DM (Eq. 1-2) matches the AU head to the pseudo-AUs r' = sum_e p(e) r_{AU|e} of the expression head on
every sample. The paper prints only the positive part -r' log r_AU, which is minimised by predicting every
AU present; by default this uses the full soft-target BCE -[r' log r + (1 - r') log(1 - r)] (the
minimiser is r = r'), and `dm_form="printed"` keeps the printed form.

Whole datasets live in memory as uint8 network inputs (datasets.prepare_inputs) on the training device;
augmentation (scale, shift, rotation, flip, then lighting, blur, noise, erasing) is one batched affine
resampling there.
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

from affextract.model import MMA, VARIANTS, MMAConfig, activate, resample, save_weights
from affextract.runtime import gpu_paths, ranks, resolve_device
from affextract.schema import AU, AU_PRIOR, AUS, EXPR, VA

DM_FORMS = ("full", "printed")
SELECT_METRICS = ("score", "acc_expr", "acc_expr_majority", "f1_expr", "ccc_va", "f1_au", "teacher")
HEADS = ("va", "expr", "au")


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_CCC = 1 - (CCC_valence + CCC_arousal) / 2 over the batch; (B, 2) tanh outputs and labels."""
    from affextract.evaluate import ccc

    return 1.0 - ccc(pred, target).mean()


def dm_loss(expr_logits: torch.Tensor, au_logits: torch.Tensor, form: str = "full", target_grad: bool = False,
            keep: torch.Tensor | None = None) -> torch.Tensor:
    """L_DM (Eq. 2): AU head vs the pseudo-AUs of Eq. 1; summed over the 17 AUs, averaged over the batch.

    `target_grad=False` treats r' as a fixed target, so L_DM teaches the AU head without pulling the
    expression head towards whatever the AU head currently says. `keep` (B, 17) bool, when given, limits
    the sum to those entries (the ones without a measured teacher AU).
    """
    if form not in DM_FORMS:
        raise ValueError(f"dm form {form!r} is not one of {DM_FORMS}")
    prior = torch.as_tensor(AU_PRIOR, device=expr_logits.device, dtype=torch.float32)  # (7, 17)
    r = torch.softmax(expr_logits.float(), 1) @ prior  # (B, 17) Eq. 1
    if not target_grad:
        r = r.detach()
    z = au_logits.float()
    if form == "printed":
        per = -r * F.logsigmoid(z)
    else:
        per = F.binary_cross_entropy_with_logits(z, r, reduction="none")
    if keep is not None:
        per = per * keep
    return per.sum(1).mean()


def mma_losses(
    out: torch.Tensor, va: torch.Tensor, expr: torch.Tensor, au: torch.Tensor,
    dm_form: str = "full", dm_target_grad: bool = False,
    teacher: torch.Tensor | None = None, expr_offset: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The four terms of Eq. 3, plus L_teacher, for (B, 26) pre-activations and labels with NaN = not annotated.

    va (B, 2) in [-1, 1]; expr (B, 7) target distribution (one-hot or votes); au (B, 17) in {0, 1};
    teacher (B, 17) soft AU targets in [0, 1] from a teacher (NaN = none): L_teacher is their BCE, averaged
    over the (sample, AU) pairs that have one; L_DM covers the other pairs (AUs without a teacher, such as
    AU11/AU23, and samples without one), so the prior never pulls against a measured movement.
    `expr_offset` (7,) is added to the expression logits inside L_CCE only (logit-adjusted loss, Menon et al. 2021: with tau * log(prior) the logits
    themselves learn the balanced posterior instead of the training set's class prior).
    """
    out = out.float()
    zero = out.new_zeros(())
    m = torch.isfinite(va).all(1)
    l_ccc = ccc_loss(torch.tanh(out[m, VA]), va[m]) if m.sum() >= 2 else zero
    m = torch.isfinite(expr).all(1)
    logits = out[m, EXPR] if expr_offset is None else out[m, EXPR] + expr_offset
    l_cce = -(expr[m] * torch.log_softmax(logits, 1)).sum(1).mean() if m.any() else zero
    m = torch.isfinite(au)
    l_bce = (
        F.binary_cross_entropy_with_logits(out[:, AU][m], au[m]) if m.any() else zero
    )
    has = torch.isfinite(teacher) if teacher is not None else None
    l_dm = dm_loss(out[:, EXPR], out[:, AU], dm_form, dm_target_grad, None if has is None else ~has)
    l_teacher = zero
    if has is not None and has.any():
        l_teacher = F.binary_cross_entropy_with_logits(out[:, AU][has], teacher[has])
    return {"ccc": l_ccc, "cce": l_cce, "bce": l_bce, "dm": l_dm, "teacher": l_teacher}


@dataclass(frozen=True)
class Augment:
    """Random geometric/photometric augmentation applied on the training device, per sample."""

    scale: float = 0.15  # zoom factor drawn from [1 - scale, 1 + scale]: crop-size variation between detectors
    shift: float = 0.08  # translation as a fraction of the image side, per axis
    rotate: float = 12.0  # rotation in degrees, +/-: residual roll after alignment
    flip: bool = True  # mirror half the faces (all labels here are left/right symmetric)
    contrast: float = 0.3  # multiply contrast by [1 - c, 1 + c] and shift brightness by +/- c/2
    erase: float = 0.5  # probability of blanking one random rectangle (up to a quarter of the face)
    gamma: float = 0.0  # gamma drawn from exp([-g, g]): lighting curves of other cameras (0 = off)
    blur: float = 0.0  # probability of a 3x3 box blur: softer faces (upscaled video, studio optics)
    noise: float = 0.0  # std of Gaussian pixel noise on the [-1, 1] scale, drawn per face from [0, noise]


# Named augmentation settings for the command line. "strong" widens the geometry and adds lighting curves,
# blur and noise, for faces from cameras and framings unlike the training set's.
AUGMENT_PRESETS = {
    "default": Augment(),
    "strong": Augment(scale=0.25, shift=0.1, rotate=20.0, contrast=0.5, erase=0.5, gamma=0.5, blur=0.3, noise=0.05),
}


def augment_batch(z: torch.Tensor, aug: Augment, gen: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, S, S) inputs in [-1, 1] -> augmented (B, C, S, S), one affine resampling for the batch."""
    b, dev = z.shape[0], z.device

    def u(*shape):  # uniform [-1, 1]
        return torch.rand(*shape, device=dev, generator=gen) * 2 - 1

    s = 1.0 + aug.scale * u(b)
    a = torch.deg2rad(aug.rotate * u(b))
    fl = torch.where(torch.rand(b, device=dev, generator=gen) < 0.5, -1.0, 1.0) if aug.flip else torch.ones(b, device=dev)
    theta = torch.zeros(b, 2, 3, device=dev)
    # Output -> input map: zoom in (s > 1) samples a smaller region, so divide by s.
    theta[:, 0, 0] = torch.cos(a) / s * fl
    theta[:, 0, 1] = -torch.sin(a) / s
    theta[:, 1, 0] = torch.sin(a) / s * fl
    theta[:, 1, 1] = torch.cos(a) / s
    theta[:, :, 2] = 2 * aug.shift * u(b, 2)
    # Fill outside the image with the face's own mean, not a hard black border the model could key on.
    mean = z.mean((1, 2, 3), keepdim=True)
    x = resample(z - mean, theta, z.shape[-1]) + mean
    if aug.gamma:
        x = ((x.clamp(-1, 1) + 1) / 2).pow(torch.exp(aug.gamma * u(b, 1, 1, 1))) * 2 - 1
    if aug.blur:
        soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
        x = torch.where((torch.rand(b, device=dev, generator=gen) < aug.blur)[:, None, None, None], soft, x)
    if aug.contrast:
        x = x * (1 + aug.contrast * u(b, 1, 1, 1)) + 0.5 * aug.contrast * u(b, 1, 1, 1)
    if aug.noise:
        x = x + aug.noise * torch.rand(b, 1, 1, 1, device=dev, generator=gen) * torch.randn(
            x.shape, device=dev, generator=gen)
    if aug.erase:
        side = z.shape[-1]
        h = (torch.rand(b, device=dev, generator=gen) * 0.5 * side).long() + 1
        w = (torch.rand(b, device=dev, generator=gen) * 0.5 * side).long() + 1
        y0 = (torch.rand(b, device=dev, generator=gen) * (side - h)).long()
        x0 = (torch.rand(b, device=dev, generator=gen) * (side - w)).long()
        ar = torch.arange(side, device=dev)
        box = ((ar[None, :, None] >= y0[:, None, None]) & (ar[None, :, None] < (y0 + h)[:, None, None])
               & (ar[None, None, :] >= x0[:, None, None]) & (ar[None, None, :] < (x0 + w)[:, None, None]))
        on = torch.rand(b, device=dev, generator=gen) < aug.erase
        x = torch.where((box & on[:, None, None])[:, None], mean, x)
    return x.clamp(-1, 1)


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
    from affextract.datasets import prepare_inputs
    from affextract.evaluate import score

    if not val_sets:
        raise ValueError("calibration needs validation data with expression labels")
    model = model.to(device).eval()
    inputs = [prepare_inputs(s, model).to(device).float() / 127.5 - 1.0 for s in val_sets]
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
                rows.append({"flip_tta": flip, "prior_tau": tau, **_merge_metrics(reports)})
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
    from affextract.model import load_weights

    model, info = load_weights(path, device)
    config, rows = calibrate(model, val_sets, prior, opts, device)
    calibrated = MMA(config)
    calibrated.load_state_dict(model.state_dict())
    chosen = {"flip_tta": config.flip_tta, "prior_tau": config.prior_tau}
    meta = {k: v for k, v in info.metadata.items() if k != "feature_names"}
    save_weights(calibrated, out or path, meta | {"calibration": {"options": asdict(opts), "chosen": chosen,
                                                                 "candidates": rows}})
    row = next((r for r in rows if r["flip_tta"] == config.flip_tta and r["prior_tau"] == config.prior_tau
                and r.get("f1_expr") is not None and (opts.min_majority is None
                                                      or r.get("acc_expr_majority", 0) >= opts.min_majority)), None)
    return chosen, row


@dataclass
class TrainResult:
    best_path: Path
    best_epoch: int
    best_metrics: dict
    history: list[dict]


def _select(metrics: dict, select: str) -> float:
    if select == "score":
        vals = [metrics[k] for k in ("ccc_va", "f1_expr", "f1_au") if metrics.get(k) is not None]
        return float(np.mean(vals)) if vals else -math.inf
    if select == "teacher":
        v = metrics.get("bce_teacher")
        return -math.inf if v is None else -float(v)
    v = metrics.get(select)
    return -math.inf if v is None else float(v)


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


def train(train_sets, val_sets, opts: TrainOptions, on_event: Callable[[dict], None] | None = None) -> TrainResult:
    """Train an MMA on FaceSets `train_sets`, pick the best epoch on `val_sets`; returns where it was saved.

    `on_event` receives dicts: {"event": "start"|"step"|"epoch"|"done", ...} for progress display.
    """
    from affextract.datasets import prepare_inputs
    from affextract.evaluate import predict_inputs, score

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
    emit = on_event or (lambda e: None)
    where = ranks()
    rank, world = where.rank, where.world
    if frozen and world > 1:
        raise ValueError("training only some heads runs in one process (it takes seconds); run it without torchrun")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = resolve_device(opts.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed)
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    config = opts.config or VARIANTS[opts.variant]
    model = MMA(config).to(device)
    if opts.init is not None:
        from affextract.model import load_weights

        init, init_info = load_weights(opts.init)
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
    steps_per_epoch = max(1, n // per_step)
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
    start_epoch, best, best_epoch, best_metrics, history = 0, -math.inf, -1, {}, []
    epochs = opts.epochs
    ckpt_path = out_dir / "checkpoint.pt"
    if opts.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"{ckpt_path}: nothing to resume; train without --resume first")
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)  # tensors and plain types only
        if ck["config"] != config.to_json():
            raise ValueError(f"{ckpt_path}: checkpoint architecture {ck['config']} differs from the requested one")
        model.load_state_dict(ck["model"])
        optim.load_state_dict(ck["optim"])
        start_epoch, best, best_epoch = ck["epoch"] + 1, ck["best"], ck["best_epoch"]
        history = json.loads(ck["history"])
        best_metrics = next((h["val"] for h in history if h["epoch"] == best_epoch), {})

    run_meta = {
        "training": {
            "datasets": [{"name": s.name, "n": len(s), "tasks": s.tasks} for s in train_sets],
            "validation": [{"name": s.name, "n": len(s)} for s in val_sets],
            "options": json.loads(json.dumps(asdict(replace(opts, config=None)), default=str)),
            "world_size": world,
            "expr_prior": None if prior is None else [round(float(p), 6) for p in prior / prior.sum()],
        },
        **opts.metadata,
    }
    emit({"event": "start", "n_train": n, "steps_per_epoch": steps_per_epoch, "epochs": epochs,
          "start_epoch": start_epoch, "device": str(device), "world_size": world})
    amp = opts.amp and gpu_paths(device)
    gen = torch.Generator(device=device)
    t_start = time.perf_counter()

    def lr_at(step: int, total: int) -> float:
        warm = opts.warmup_epochs * steps_per_epoch
        if step < warm:
            return opts.lr * (0.1 + 0.9 * step / warm)
        if opts.schedule == "constant":
            return opts.lr
        p = min(1.0, (step - warm) / max(1.0, total - warm))
        return opts.lr * 0.5 * (1 + math.cos(math.pi * p))

    for epoch in range(start_epoch, epochs):
        t_epoch = time.perf_counter()
        net.train()
        # Same permutation on every rank (seeded by epoch), each rank takes its slice.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed * 100003 + epoch)).to(device)
        gen.manual_seed(opts.seed * 7919 + epoch * world + rank)
        sums = {"loss": 0.0, "ccc": 0.0, "cce": 0.0, "bce": 0.0, "dm": 0.0, "teacher": 0.0}
        for step in range(steps_per_epoch):
            idx = perm[step * per_step + rank * opts.batch_size : step * per_step + (rank + 1) * opts.batch_size]
            z = x_train[idx] if frozen else augment_batch(x_train[idx].float() / 127.5 - 1.0, opts.augment, gen)
            if gpu_paths(device) and not frozen:
                z = z.contiguous(memory_format=torch.channels_last)
            for g in optim.param_groups:
                g["lr"] = lr_at(epoch * steps_per_epoch + step, epochs * steps_per_epoch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = net(z)
            terms = mma_losses(out, va_t[idx], ex_t[idx], au_t[idx], opts.dm_form, opts.dm_target_grad,
                               teach_t[idx] if has_teacher else None, expr_offset)
            loss = terms["ccc"] + terms["cce"] + terms["bce"] + terms["dm"] + opts.teacher_weight * terms["teacher"]
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if step % 20 == 0 or step == steps_per_epoch - 1:
                # .item() syncs; do it sparsely so the GPU stays busy.
                vals_now = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
                for k in sums:
                    sums[k] = vals_now[k] if step == 0 else 0.9 * sums[k] + 0.1 * vals_now[k]
                emit({"event": "step", "epoch": epoch, "step": step + 1, "steps": steps_per_epoch, **sums,
                      "lr": optim.param_groups[0]["lr"]})
        train_s = time.perf_counter() - t_epoch
        record = {"epoch": epoch, "train": sums, "seconds": round(train_s, 2)}
        if rank == 0:
            model.eval()
            metrics = {}
            for s, xv in vals:
                if frozen:
                    with torch.no_grad():
                        mirrored = None if xv[1] is None else model.heads(xv[1])
                        feats = activate(model.settle(model.heads(xv[0]), mirrored)).float().cpu().numpy()
                else:
                    feats = predict_inputs(model, xv, 1024, device)
                r = score(feats, s.va, s.expr, s.au, s.name)
                metrics[s.name] = {k: v for k, v in r.to_json().items() if k not in ("confusion", "expressions")}
                metrics[s.name] |= _teacher_metrics(feats[:, AU], s.teacher_au)
            flat = _merge_metrics(list(metrics.values()))
            record["val"] = flat
            record["val_sets"] = metrics
            sel = _select(flat, opts.select) if vals else float(epoch)
            history.append(record)
            if sel > best:
                best, best_epoch, best_metrics = sel, epoch, flat
                save_weights(model, out_dir / "best.safetensors", run_meta | {"epoch": epoch, "validation_metrics": flat})
            save_weights(model, out_dir / "last.safetensors", run_meta | {"epoch": epoch, "validation_metrics": flat})
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "epoch": epoch, "best": best,
                        "best_epoch": best_epoch, "epochs": epochs, "config": config.to_json(),
                        "history": json.dumps(history)}, ckpt_path)
            emit({"event": "epoch", **record, "best_epoch": best_epoch, "epochs": epochs})
        if opts.time_budget_s and epoch - start_epoch < 3:
            # Fit the whole run (schedule included) into the time budget, from the epochs timed so far
            # (the first ones include warm-up costs, so re-estimate a few times).
            per_epoch = (time.perf_counter() - t_start) / (epoch - start_epoch + 1)
            fit = int((opts.time_budget_s - (time.perf_counter() - t_start)) / per_epoch) + epoch + 1
            fit = torch.tensor(min(opts.epochs, max(epoch + 1, fit)), device=device)
            if world > 1:
                torch.distributed.broadcast(fit, 0)
            epochs = int(fit)
        if world > 1:
            torch.distributed.barrier()
        if epoch + 1 >= epochs:
            break
    if opts.calibrate is not None and rank == 0 and vals and prior is not None and best_epoch >= 0:
        chosen, row = calibrate_weights(out_dir / "best.safetensors", [s for s, _ in vals], prior, opts.calibrate,
                                        device=device)
        best_metrics = row or best_metrics
        emit({"event": "calibrated", **chosen, "val": best_metrics})
    emit({"event": "done", "best_epoch": best_epoch, "best": best_metrics, "seconds": time.perf_counter() - t_start})
    return TrainResult(out_dir / "best.safetensors", best_epoch, best_metrics, history)


@torch.no_grad()
def _embeddings(model: MMA, x: torch.Tensor, mirror: bool = False) -> torch.Tensor:
    """uint8 (N, C, S, S) network inputs -> (N, embed_dim) shared embeddings in eval mode (of the mirror images)."""
    model.eval()
    z = [x[s:s + 512].float() / 127.5 - 1.0 for s in range(0, len(x), 512)]
    return torch.cat([model.embedding(b.flip(-1) if mirror else b) for b in z])


class _HeadsOnly(torch.nn.Module):
    """The three heads on precomputed embeddings, with the embedding's training-time dropout."""

    def __init__(self, model: MMA) -> None:
        super().__init__()
        self.model = model

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.model.heads(F.dropout(e, self.model.config.dropout, self.training))


def _teacher_metrics(au: np.ndarray, teacher: np.ndarray | None) -> dict:
    """(N, 17) AU probabilities against (N, 17) teacher AUs (NaN = none) -> their mean BCE over the pairs that
    have a teacher ({} when there is none)."""
    if teacher is None or not np.isfinite(teacher).any():
        return {}
    m = np.isfinite(teacher)
    p = np.clip(au[m].astype(np.float64), 1e-6, 1 - 1e-6)
    t = teacher[m]
    return {"bce_teacher": float(-(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()), "n_teacher": int(m.sum())}


class _NetOnly(torch.nn.Module):
    """MMA.net as a module's forward: training feeds prepared inputs, and DDP wraps forward()."""

    def __init__(self, model: MMA) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.net(z)


def _merge_metrics(reports: list[dict]) -> dict:
    """Sample-weighted mean of each metric over the validation sets that have it."""
    out = {}
    for key, n_key in (("ccc_va", "n_va"), ("f1_expr", "n_expr"), ("acc_expr", "n_expr"),
                       ("acc_expr_majority", "n_expr_majority"), ("f1_au", "n_au"), ("bce_teacher", "n_teacher")):
        have = [(r[key], r[n_key]) for r in reports if r.get(key) is not None]
        if have:
            w = sum(n for _, n in have)
            out[key] = sum(v * n for v, n in have) / max(w, 1)
    return out
