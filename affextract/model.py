"""MMA: the per-frame multi-task CNN (paper §3.1) and its safetensors weight files.

Residual units with batch norm -> a shared feed-forward embedding -> three heads (valence/arousal 2,
expressions 7, AUs 17). The model does its own preprocessing from the ArcFace-aligned 112x112 RGB crop
(grayscale, crop, resize to `input_size`), so whoever calls it only ever passes aligned crops, and the
preprocessing that the weights were trained with travels inside their config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from affextract.pixels import LUMA
from affextract.schema import AU, AUS, DEFAULT_WEIGHTS, EXPR, EXPRESSIONS, FEATURE_NAMES, VA, WEIGHTS_DIR

ALIGNED_SIZE = 112  # side of the ArcFace-aligned crop that forward() takes
WEIGHTS_FORMAT = "affextract-mma"


@dataclass(frozen=True)
class MMAConfig:
    """Architecture and preprocessing; stored with the weights so a file always runs as it was trained."""

    # Side of the square image the CNN sees after preprocessing; 48 = FER+'s native resolution,
    # a few ms per face on a CPU.
    input_size: int = 48
    # Feed one luminance channel instead of RGB: the default weights are trained on FER+ (grayscale),
    # so colour at inference would be a cue they never saw.
    grayscale: bool = True
    # Region (x0, y0, x1, y1) of the 112x112 aligned crop, in its pixels, resized to input_size.
    # It may reach outside the crop; the outside is filled with 0 (mid-grey in [-1, 1]). The default
    # frames the face like FER+ images: it maps the ArcFace template's 5 points onto the median of
    # the points MTCNN finds on FER+ faces (see the model card, weights/mma_ferplus_small.md, "Crop").
    crop: tuple[float, float, float, float] = (6.5, 14.0, 105.5, 113.0)
    # Resolution (pixels) the crop is first reduced to, with area averaging, before it is resized to
    # input_size: the native resolution of the training images (FER+: 48), so a sharp video crop
    # carries the same detail as the training faces. None = straight to input_size.
    source_size: int | None = 48
    # Channels of the stem convolution (stride 1, at input_size).
    stem_width: int = 32
    # Channels of each residual stage; every stage halves the resolution.
    widths: tuple[int, ...] = (32, 64, 128, 256)
    # Residual units (two 3x3 convs with batch norm) per stage.
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    # Width of the shared feed-forward embedding the three heads read.
    embed_dim: int = 256
    # Dropout on the shared embedding during training.
    dropout: float = 0.3
    # Inference only: average the outputs of the face and its mirror image (the labels are left/right
    # symmetric, so this removes one source of variance at twice the cost).
    flip_tta: bool = False
    # Inference only: class frequencies of the expressions in the training data (EXPRESSIONS order) and the
    # strength tau of the prior correction: tau * log(prior) is subtracted from the expression logits
    # (logit adjustment, Menon et al. 2021), so a training set's imbalance (FER+: 33% neutral, 1.7% disgust)
    # does not decide what new faces are called. tau = 0: no correction.
    expr_prior: tuple[float, ...] | None = None
    prior_tau: float = 0.0

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(f"widths {self.widths} and blocks {self.blocks} must be non-empty and of equal length")
        if len(self.crop) != 4 or not (self.crop[2] > self.crop[0] and self.crop[3] > self.crop[1]):
            raise ValueError(f"crop {self.crop} must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
        if self.source_size is not None and self.source_size < 8:
            raise ValueError(f"source_size {self.source_size} must be None or at least 8 pixels")
        if self.expr_prior is not None and (len(self.expr_prior) != len(EXPRESSIONS) or min(self.expr_prior) <= 0):
            raise ValueError(f"expr_prior {self.expr_prior} must hold {len(EXPRESSIONS)} positive class frequencies")
        if self.prior_tau and self.expr_prior is None:
            raise ValueError(f"prior_tau {self.prior_tau} needs expr_prior (the training class frequencies)")
        if self.input_size < 2 ** len(self.widths):
            raise ValueError(f"input_size {self.input_size} is too small for {len(self.widths)} stride-2 stages")

    @property
    def in_channels(self) -> int:
        return 1 if self.grayscale else 3

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> MMAConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MMA config fields {sorted(unknown)}: weights from a newer affextract?")
        d = dict(d)
        for k in ("crop", "widths", "blocks", "expr_prior"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


# Named variants: `small` is the shipped CPU-friendly default; `large` is for GPU users with the big datasets.
VARIANTS: dict[str, MMAConfig] = {
    "small": MMAConfig(),
    "large": MMAConfig(input_size=112, source_size=None, stem_width=64, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), embed_dim=512),
}


class _Residual(nn.Module):
    """Two 3x3 convs with batch norm plus a (projected when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.short(x), inplace=True)


def crop_theta(crop: tuple[float, float, float, float], size: int = ALIGNED_SIZE) -> torch.Tensor:
    """(2, 3) affine for F.affine_grid that samples `crop` (pixels of a size x size image)."""
    x0, y0, x1, y1 = crop
    # affine_grid maps output coords in [-1, 1] to input coords in [-1, 1] (align_corners=False).
    sx, sy = (x1 - x0) / size, (y1 - y0) / size
    tx, ty = (x0 + x1) / size - 1.0, (y0 + y1) / size - 1.0
    return torch.tensor([[sx, 0.0, tx], [0.0, sy, ty]], dtype=torch.float32)


class MMA(nn.Module):
    """Multi-task CNN: aligned face -> 26 values in FEATURE_NAMES order."""

    def __init__(self, config: MMAConfig | None = None) -> None:
        super().__init__()
        self.config = config or MMAConfig()
        c = self.config
        self.stem = nn.Sequential(
            nn.Conv2d(c.in_channels, c.stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(c.stem_width), nn.ReLU(True)
        )
        units, cin = [], c.stem_width
        for width, n in zip(c.widths, c.blocks):
            for i in range(n):
                units.append(_Residual(cin, width, 2 if i == 0 else 1))
                cin = width
        self.trunk = nn.Sequential(*units)
        self.embed = nn.Sequential(
            nn.Linear(cin, c.embed_dim), nn.BatchNorm1d(c.embed_dim), nn.ReLU(True), nn.Dropout(c.dropout)
        )
        self.va_head = nn.Linear(c.embed_dim, VA.stop - VA.start)
        self.expr_head = nn.Linear(c.embed_dim, len(EXPRESSIONS))
        self.au_head = nn.Linear(c.embed_dim, len(AUS))
        # Fixed resampling of the aligned crop; a buffer so it follows .to(device) and is not trained.
        self.register_buffer("_theta", crop_theta(c.crop), persistent=False)
        self.register_buffer("_luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)
        offset = torch.zeros(len(EXPRESSIONS))
        if c.prior_tau:
            p = torch.tensor(c.expr_prior, dtype=torch.float64)
            offset = (-c.prior_tau * torch.log(p / p.sum())).float()
        self.register_buffer("_expr_offset", offset, persistent=False)  # (7,) added to expression logits

    def preprocess(self, x: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, 112, 112) RGB in [-1, 1] -> (B, C, S, S) network input.

        `theta` (B, 2, 3), when given, replaces the fixed crop (training composes augmentation into it).
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"MMA expects (B, 3, H, W) RGB aligned crops, got {tuple(x.shape)}")
        c = self.config
        if c.grayscale:
            x = (x * self._luma.to(x.dtype)).sum(1, keepdim=True)
        theta = self._theta.expand(x.shape[0], 2, 3) if theta is None else theta
        size = c.source_size or c.input_size
        # Sample k times finer and average k x k blocks: area reduction, so no aliasing from a sharp crop.
        k = max(1, round((c.crop[2] - c.crop[0]) / size))
        x = F.avg_pool2d(resample(x, theta, size * k), k) if k > 1 else resample(x, theta, size)
        return to_input(x, c.input_size)

    def net(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) network input -> (B, 26) pre-activation outputs."""
        return self.heads(self.embedding(z))

    def embedding(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) network input -> (B, embed_dim) shared embedding that the three heads read."""
        return self.embed(self.trunk(self.stem(z)).mean((2, 3)))

    def heads(self, e: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) shared embedding -> (B, 26) pre-activation outputs."""
        return torch.cat([self.va_head(e), self.expr_head(e), self.au_head(e)], 1)

    def infer(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) network input -> (B, 26) pre-activation with the inference-time settings of the config
        (test-time flip, prior correction); training calls `net` directly."""
        return self.settle(self.net(z), self.net(z.flip(-1)) if self.config.flip_tta else None)

    def settle(self, out: torch.Tensor, mirrored: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 26) pre-activation of the faces, and of their mirror images when flip_tta is on -> (B, 26) with the
        inference-time settings applied (the mean of the two, the prior correction)."""
        if mirrored is not None:
            out = 0.5 * (out + mirrored)
        if self.config.prior_tau:
            out = torch.cat([out[:, VA], out[:, EXPR] + self._expr_offset.to(out.dtype), out[:, AU]], 1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) aligned RGB in [-1, 1] -> (B, 26) pre-activation (VA, expression logits, AU logits)."""
        return self.infer(self.preprocess(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) -> (B, 26) in FEATURE_NAMES order: tanh VA, softmax expressions, sigmoid AUs."""
        return activate(self(x))


def resample(x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Sample (B, C, H, W) through (B, 2, 3) affines to (B, C, size, size); outside the image is 0."""
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) image already framed like the network input -> (B, C, size, size), bilinear."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)


def activate(out: torch.Tensor) -> torch.Tensor:
    """(B, 26) pre-activation -> (B, 26) features: tanh VA, softmax expressions, sigmoid AUs."""
    return torch.cat([torch.tanh(out[:, VA]), torch.softmax(out[:, EXPR], 1), torch.sigmoid(out[:, AU])], 1)


@dataclass(frozen=True)
class WeightsInfo:
    """What a weights file is: its name, checksum, architecture and how it was made."""

    name: str  # file stem, e.g. "mma_ferplus_small"
    sha256: str  # of the .safetensors file, checked at load time
    config: MMAConfig
    metadata: dict = field(default_factory=dict)  # training data, version, feature names, preprocessing, scores


def save_mma(model: MMA, path: str | Path, metadata: dict, half: bool = True) -> str:
    """Write `path` (.safetensors) and its .json (config, metadata, sha256); return the sha256.

    `half` stores floating tensors as fp16 (halves the file; the loader casts back to fp32).
    """
    from affextract.weights import write_weights

    meta = {"feature_names": list(FEATURE_NAMES), **metadata}
    return write_weights(model.state_dict(), path, WEIGHTS_FORMAT, {"config": model.config.to_json(), "metadata": meta},
                         half=half)


def load_mma(path: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[MMA, WeightsInfo]:
    """Load an MMA from `path` (.safetensors + .json beside it; None = the shipped default), in eval mode.

    Refuses a file whose SHA-256 differs from the one recorded in its json. Never unpickles.
    """
    from affextract.weights import read_weights

    if path is None:
        if not DEFAULT_WEIGHTS.exists():
            raise FileNotFoundError(
                f"no default MMA weights in {WEIGHTS_DIR}; pass --weights PATH.safetensors "
                "(train some with `affextract train`)"
            )
        path = DEFAULT_WEIGHTS
    path = Path(path)
    remake = "re-download or re-train it (`affextract train`)"
    state, doc = read_weights(path, WEIGHTS_FORMAT, "MMA weights", remake, fields=("config",))
    config = MMAConfig.from_json(doc["config"])
    names = doc.get("metadata", {}).get("feature_names")
    if names is not None and tuple(names) != FEATURE_NAMES:
        raise ValueError(f"{path.with_suffix('.json')}: feature names {names} differ from this affextract's "
                         f"{FEATURE_NAMES}")
    model = MMA(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.to(device).eval()
    return model, WeightsInfo(name=path.stem, sha256=doc["sha256"], config=config, metadata=doc.get("metadata", {}))
