"""MTCNN face detector (Zhang et al. 2016) in torch, running the weights shipped in the PyPI package ``mtcnn`` 1.0.0.

The cascade is a port of that package's TensorFlow code (``mtcnn/stages``, ``mtcnn/utils``) with the same
normalisation, pyramid, box generation, NMS flavour, squaring, patch sampling, regression and thresholds, but
batched: every frame of a batch goes through P-Net at each scale in one call, and all proposals of all frames go
through R-Net and O-Net in one call each. Nothing loops over proposals in Python.

Deliberate differences from the TensorFlow code, each small:
- pyramid levels are generated while the scaled short side is >= 12 px (the original's fixed level count can ask
  P-Net for images smaller than its receptive field when ``min_face_size`` is large, which fails the whole batch);
- the pyramid resize is torch's ``area`` mode (integer-bin averaging) instead of ``tf.image.resize(AREA)``
  (fractional-coverage averaging), and scaled sizes are rounded up as in the reference MATLAB code.
The package itself is never imported (it needs TensorFlow): only its weight files are read.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import joblib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from affextract.runtime import gpu_paths

# Normalised images are (pixel - 127.5) / 128, as in mtcnn.utils.images.normalize_images.
_MEAN = 127.5
_STD = 128.0
_PNET_CELL = 12  # P-Net's receptive field (the smallest face it sees at a scale)
_PNET_STRIDE = 2
# Above this many IoU entries per NMS call, boxes are compared image by image and in row chunks to bound memory.
_NMS_DENSE_LIMIT = 1 << 22


def weights_dir() -> Path:
    """Folder holding pnet.lz4, rnet.lz4, onet.lz4 inside the installed ``mtcnn`` package (found, not imported)."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MTCNN weights ship in the PyPI package 'mtcnn' 1.0.0, which is not installed: "
            "run `pip install mtcnn==1.0.0` (TensorFlow is not needed)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "assets" / "weights"
    missing = [n for n in ("pnet.lz4", "rnet.lz4", "onet.lz4") if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: reinstall with `pip install --force-reinstall mtcnn==1.0.0`")
    return folder


class _KerasLoader:
    """Copies a Keras ``get_weights()`` list into torch layers in creation order."""

    def __init__(self, arrays: list[np.ndarray]):
        self._arrays = list(arrays)
        self._pos = 0

    def _next(self) -> torch.Tensor:
        array = self._arrays[self._pos]
        self._pos += 1
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def conv(self, layer: nn.Conv2d) -> None:
        layer.weight.copy_(self._next().permute(3, 2, 0, 1))  # (kh, kw, in, out) -> (out, in, kh, kw)
        layer.bias.copy_(self._next())

    def dense(self, layer: nn.Linear) -> None:
        layer.weight.copy_(self._next().T)  # (in, out) -> (out, in)
        layer.bias.copy_(self._next())

    def prelu(self, layer: nn.PReLU) -> None:
        layer.weight.copy_(self._next().reshape(-1))  # (1, 1, C) or (C,) -> (C,)

    def done(self) -> None:
        if self._pos != len(self._arrays):
            raise ValueError(f"weight file has {len(self._arrays)} arrays, the network used {self._pos}")


def _keras_flatten(x: torch.Tensor) -> torch.Tensor:
    """Keras Permute((2, 1, 3)) + Flatten on NHWC, from torch's (B, C, H, W): features ordered (W, H, C)."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal network, fully convolutional: (B, 3, H, W) -> box offsets (B, 4, h, w), face prob (B, h, w)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)  # Keras padding="same" with stride 2
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 4, 1)
        self.conv4_2 = nn.Conv2d(32, 2, 1)

    def load_keras(self, arrays: list[np.ndarray]) -> None:
        w = _KerasLoader(arrays)
        for conv, prelu in ((self.conv1, self.prelu1), (self.conv2, self.prelu2), (self.conv3, self.prelu3)):
            w.conv(conv)
            w.prelu(prelu)
        w.conv(self.conv4_1)
        w.conv(self.conv4_2)
        w.done()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x), torch.softmax(self.conv4_2(x), dim=1)[:, 1]


class RNet(nn.Module):
    """Refinement network: (P, 3, 24, 24) -> box offsets (P, 4), face prob (P,)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)  # "same": 22 -> 11
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2)  # "valid": 9 -> 4
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.fc4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.fc5_1 = nn.Linear(128, 4)
        self.fc5_2 = nn.Linear(128, 2)

    def load_keras(self, arrays: list[np.ndarray]) -> None:
        w = _KerasLoader(arrays)
        for conv, prelu in ((self.conv1, self.prelu1), (self.conv2, self.prelu2), (self.conv3, self.prelu3)):
            w.conv(conv)
            w.prelu(prelu)
        w.dense(self.fc4)
        w.prelu(self.prelu4)
        w.dense(self.fc5_1)
        w.dense(self.fc5_2)
        w.done()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))  # (P, 64, 3, 3)
        x = self.prelu4(self.fc4(_keras_flatten(x)))
        return self.fc5_1(x), torch.softmax(self.fc5_2(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output network: (P, 3, 48, 48) -> box offsets (P, 4), landmarks (P, 10) as x1..x5, y1..y5 in [0, 1] of the
    box, face prob (P,)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)  # "same": 46 -> 23
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2)  # "valid": 21 -> 10
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)  # "same": 8 -> 4
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.fc5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.fc6_1 = nn.Linear(256, 4)
        self.fc6_2 = nn.Linear(256, 10)
        self.fc6_3 = nn.Linear(256, 2)

    def load_keras(self, arrays: list[np.ndarray]) -> None:
        w = _KerasLoader(arrays)
        for conv, prelu in (
            (self.conv1, self.prelu1),
            (self.conv2, self.prelu2),
            (self.conv3, self.prelu3),
            (self.conv4, self.prelu4),
        ):
            w.conv(conv)
            w.prelu(prelu)
        w.dense(self.fc5)
        w.prelu(self.prelu5)
        w.dense(self.fc6_1)
        w.dense(self.fc6_2)
        w.dense(self.fc6_3)
        w.done()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))  # (P, 128, 3, 3)
        x = self.prelu5(self.fc5(_keras_flatten(x)))
        return self.fc6_1(x), self.fc6_2(x), torch.softmax(self.fc6_3(x), dim=1)[:, 1]


# ----------------------------------------------------------------------------------------------- box helpers
# Proposals travel as one (K, 6) float tensor per batch: image index, x1, y1, x2, y2, score.


def pyramid_scales(height: int, width: int, min_face_size: float, scale_factor: float) -> list[float]:
    """Scales at which P-Net's 12 px window covers faces from ``min_face_size`` up to the short side."""
    short = min(height, width)
    scale = _PNET_CELL / float(min_face_size)
    scales = []
    while short * scale >= _PNET_CELL:
        scales.append(scale)
        scale *= scale_factor
    return scales


def _pairwise_overlap(a: torch.Tensor, b: torch.Tensor, method: str) -> torch.Tensor:
    """(..., P, 4), (..., Q, 4) -> (..., P, Q) overlap; areas without the +1 pixel, as in mtcnn.utils.bboxes.iou."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    if method == "union":
        return inter / (area_a[..., :, None] + area_b[..., None, :] - inter)
    return inter / torch.minimum(area_a[..., :, None], area_b[..., None, :])


def _suppressed_sorted(boxes: torch.Tensor, threshold: float, method: str) -> torch.Tensor:
    """Boxes (K, 4) of one image sorted by score -> (K,) bool, True where a higher-scored box overlaps it more than
    ``threshold``, computed in row chunks to bound memory."""
    k = boxes.shape[0]
    suppressed = torch.zeros(k, dtype=torch.bool, device=boxes.device)
    rows = max(1, _NMS_DENSE_LIMIT // max(k, 1))
    cols = torch.arange(k, device=boxes.device)
    for start in range(0, k, rows):
        overlap = _pairwise_overlap(boxes[start : start + rows], boxes, method)
        later = cols[None, :] > torch.arange(start, min(start + rows, k), device=boxes.device)[:, None]
        suppressed |= ((overlap > threshold) & later).any(0)
    return suppressed


def nms(props: torch.Tensor, threshold: float, method: str = "union") -> torch.Tensor:
    """Non-maximum suppression per image of (K, >=6) rows (extra columns ride along); returns the kept rows sorted
    by image then score.

    This is the package's matrix NMS (``mtcnn.utils.bboxes.nms``): a box goes when any higher-scored box of its image
    overlaps it above ``threshold``, even one that was itself suppressed. It is one batched matrix operation instead
    of a greedy loop, and it is what the weights' thresholds were tuned with.
    """
    if props.shape[0] == 0:
        return props
    order = torch.argsort(props[:, 5], descending=True, stable=True)
    order = order[torch.argsort(props[order, 0], stable=True)]
    props = props[order]
    image = props[:, 0].long()
    n_images = int(image.max()) + 1
    counts = torch.bincount(image, minlength=n_images)
    kmax = int(counts.max())
    if n_images * kmax * kmax <= _NMS_DENSE_LIMIT:
        # All images at once in a padded (n_images, kmax, kmax) block.
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(props.shape[0], device=props.device) - starts[image]
        padded = props.new_zeros(n_images, kmax, 4)
        padded[image, rank] = props[:, 1:5]
        valid = torch.zeros(n_images, kmax, dtype=torch.bool, device=props.device)
        valid[image, rank] = True
        overlap = _pairwise_overlap(padded, padded, method)
        upper = torch.ones(kmax, kmax, dtype=torch.bool, device=props.device).triu(1)
        suppressed = ((overlap > threshold) & upper & valid[:, :, None]).any(1)
        return props[~suppressed[image, rank]]
    keep = []
    for i in torch.nonzero(counts).flatten().tolist():
        group = props[image == i]
        keep.append(group[~_suppressed_sorted(group[:, 1:5], threshold, method)])
    return torch.cat(keep)


def square(props: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square around its centre (mtcnn.utils.bboxes.resize_to_square)."""
    props = props.clone()
    w = props[:, 3] - props[:, 1]
    h = props[:, 4] - props[:, 2]
    side = torch.maximum(w, h)
    props[:, 1] += w * 0.5 - side * 0.5
    props[:, 2] += h * 0.5 - side * 0.5
    props[:, 3] = props[:, 1] + side
    props[:, 4] = props[:, 2] + side
    return props


def _apply_offsets(props: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Box regression of R-Net/O-Net (mtcnn.utils.bboxes.adjust_bboxes): offsets (K, 4) in units of box size + 1."""
    props = props.clone()
    w = props[:, 3] - props[:, 1] + 1
    h = props[:, 4] - props[:, 2] + 1
    props[:, 1:5] += offsets * torch.stack([w, h, w, h], 1)
    return props


def crop_and_resize(frames: torch.Tensor, props: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised bilinear patches (K, 3, size, size) of ``frames`` (B, H, W, 3) (uint8 or float pixels) under the
    (K, >=5) rows (image index, x1, y1, x2, y2).

    Same sampling as the package's call of ``tf.image.crop_and_resize`` on normalised images: boxes are divided by
    H and W (not H-1, W-1) and sampled on TF's grid, and samples falling outside the image are 0 (mid-grey). Gathers
    straight from the frames, so neither whole frames nor per-proposal copies of them are ever made.
    """
    b, h, w, c = frames.shape
    device = frames.device
    steps = torch.arange(size, device=device, dtype=torch.float32) / (size - 1)  # (S,)
    ys = (props[:, 2:3] + steps * (props[:, 4:5] - props[:, 2:3])) * ((h - 1) / h)  # (K, S)
    xs = (props[:, 1:2] + steps * (props[:, 3:4] - props[:, 1:2])) * ((w - 1) / w)
    inside = ((ys >= 0) & (ys <= h - 1))[:, None, :, None] & ((xs >= 0) & (xs <= w - 1))[:, None, None, :]
    y0 = ys.floor().clamp(0, h - 1).long()
    x0 = xs.floor().clamp(0, w - 1).long()
    y1 = ys.ceil().clamp(0, h - 1).long()
    x1 = xs.ceil().clamp(0, w - 1).long()
    wy = (ys - ys.floor())[:, None, :, None]  # (K, 1, S, 1)
    wx = (xs - xs.floor())[:, None, None, :]  # (K, 1, 1, S)
    # Flat index into frames.reshape(-1) for each (proposal, channel, row, col).
    base = props[:, 0].long()[:, None] * (h * w * c) + torch.arange(c, device=device)  # (K, C)
    flat = frames.reshape(-1)

    def at(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        idx = base[:, :, None, None] + (yi * (w * c))[:, None, :, None] + (xi * c)[:, None, None, :]
        return flat[idx].float()  # (K, C, S, S)

    top_left, top_right = at(y0, x0), at(y0, x1)
    bottom_left, bottom_right = at(y1, x0), at(y1, x1)
    top = top_left + (top_right - top_left) * wx
    bottom = bottom_left + (bottom_right - bottom_left) * wx
    pixels = top + (bottom - top) * wy
    # channels_last: R-Net/O-Net pooling is many times faster on CPU in that layout.
    return ((pixels - _MEAN) / _STD * inside).contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------- cascade


class MTCNN(nn.Module):
    """The three networks and the cascade. Device-agnostic: move with ``.to(device)``.

    ``detect`` takes a batch of same-size frames; ``refine`` runs O-Net alone on one given box per frame.
    Results are (K, 16) tensors: image index, x1, y1, x2, y2, score, 5 landmark x, 5 landmark y (landmark order:
    left eye, right eye, nose, left mouth corner, right mouth corner, left meaning image left).
    """

    def __init__(self, weights: Path | None = None):
        super().__init__()
        folder = Path(weights) if weights is not None else weights_dir()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        with torch.no_grad():
            for net, name in ((self.pnet, "pnet"), (self.rnet, "rnet"), (self.onet, "onet")):
                net.load_keras(joblib.load(folder / f"{name}.lz4"))
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.pnet.conv1.weight.device

    def _frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) RGB frames as a tensor on the model's device, dtype kept (uint8 normally)."""
        x = torch.as_tensor(frames).to(self.device, non_blocking=True)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"frames must be (N, H, W, 3) RGB, got shape {tuple(x.shape)}")
        return x

    @torch.inference_mode()
    def detect(
        self,
        frames: np.ndarray | torch.Tensor,
        min_face_size: float = 20.0,
        scale_factor: float = 0.709,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8),
        nms_thresholds: tuple[float, float, float, float] = (0.5, 0.7, 0.7, 0.7),
        resize: str = "antialias",
    ) -> torch.Tensor:
        """Frames (B, H, W, 3) uint8 RGB -> (K, 16) detections of the whole batch, grouped by image, best first.

        ``resize`` builds the pyramid: "area" is the package's box filter; "antialias" (antialiased bilinear, a
        triangle filter) runs straight on uint8 channels_last frames on CPU, about 10x faster, and finds the same
        faces to within a pixel or two.
        """
        if resize not in ("area", "antialias"):
            raise ValueError(f"resize must be 'area' or 'antialias', got {resize!r}")
        frames = self._frames(frames)
        b, h, w, _ = frames.shape
        empty = torch.zeros(0, 16, device=self.device)
        if b == 0:
            return empty
        props = self._pnet_stage(frames, min_face_size, scale_factor, thresholds[0], nms_thresholds[:2], resize)
        if props.shape[0] == 0:
            return empty
        props = self._rnet_stage(frames, props, thresholds[1], nms_thresholds[2])
        if props.shape[0] == 0:
            return empty
        dets = self._onet(frames, props)
        dets = dets[dets[:, 5] > thresholds[2]]
        dets = nms(dets, nms_thresholds[3], "min")  # O-Net's NMS: overlap over the smaller box
        return _clip_boxes(dets, h, w)

    @torch.inference_mode()
    def refine(self, frames: np.ndarray | torch.Tensor, boxes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """O-Net on one box per frame: frames (B, H, W, 3), boxes (B, 4) x1, y1, x2, y2 -> (B, 16), no threshold.

        The box is squared first, as O-Net expects R-Net's squared proposals. Non-finite boxes give NaN rows.
        """
        frames = self._frames(frames)
        b, h, w, _ = frames.shape
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=self.device).reshape(b, 4)
        finite = torch.isfinite(boxes).all(1)
        props = torch.cat(
            [torch.arange(b, device=self.device, dtype=torch.float32)[:, None], boxes.nan_to_num(0.0),
             boxes.new_zeros(b, 1)], 1
        )
        dets = _clip_boxes(self._onet(frames, square(props)), h, w)
        dets[~finite, 1:] = float("nan")
        dets[~finite, 5] = 0.0
        return dets

    def _pnet_stage(self, frames, min_face_size, scale_factor, threshold, nms_thresholds, resize) -> torch.Tensor:
        b, h, w, _ = frames.shape
        # (B, 3, H, W) view of the (B, H, W, 3) frames: channels_last memory, which torch's CPU kernels (uint8
        # antialiased resize, oneDNN convolutions, max pooling) run several times faster than NCHW.
        pixels = frames.permute(0, 3, 1, 2)
        if resize == "area" or gpu_paths(pixels.device):
            pixels = pixels.float()  # area resize, and antialiased resize off CPU, need float input
        per_scale = []
        first = None
        for scale in pyramid_scales(h, w, min_face_size, scale_factor):
            size = (math.ceil(h * scale), math.ceil(w * scale))
            # Levels after the first are resized from the first (already reduced) level rather than from the full
            # frame: nearly the same pixels for a fraction of the memory traffic.
            source = pixels if first is None else first
            if resize == "area":
                scaled = F.interpolate(source, size=size, mode="area")
            else:
                scaled = F.interpolate(source, size=size, mode="bilinear", antialias=True, align_corners=False)
            if first is None and scale < 1:
                first = scaled
            scaled = ((scaled.float() - _MEAN) / _STD).contiguous(memory_format=torch.channels_last)
            offsets, prob = self.pnet(scaled)  # (B, 4, h', w'), (B, h', w')
            image, y, x = torch.nonzero(prob > threshold, as_tuple=True)
            if image.numel() == 0:
                continue
            reg = offsets[image, :, y, x]  # (K, 4)
            # Window corners in the scaled image as mtcnn.utils.bboxes.generate_bounding_box: (2x+1, 2y+1) to
            # (2x+12, 2y+12), regressed by 11 px units, then mapped back to source pixels.
            x1 = x.float() * _PNET_STRIDE + 1
            y1 = y.float() * _PNET_STRIDE + 1
            x2 = x.float() * _PNET_STRIDE + _PNET_CELL
            y2 = y.float() * _PNET_STRIDE + _PNET_CELL
            side = _PNET_CELL - 1
            corners = torch.stack(
                [x1 + reg[:, 0] * side, y1 + reg[:, 1] * side, x2 + reg[:, 2] * side, y2 + reg[:, 3] * side], 1
            ) / scale
            props = torch.cat([image.float()[:, None], corners, prob[image, y, x][:, None]], 1)
            per_scale.append(nms(props, nms_thresholds[0], "union"))
        if not per_scale:
            return torch.zeros(0, 6, device=self.device)
        return square(nms(torch.cat(per_scale), nms_thresholds[1], "union"))

    def _rnet_stage(self, frames, props, threshold, nms_threshold) -> torch.Tensor:
        offsets, prob = self.rnet(crop_and_resize(frames, props, 24))
        props = torch.cat([props[:, :5], prob[:, None]], 1)
        props = _apply_offsets(props, offsets)
        props = props[props[:, 5] > threshold]
        return square(nms(props, nms_threshold, "union"))

    def _onet(self, frames, props) -> torch.Tensor:
        """O-Net on squared proposals -> (K, 16) with regressed boxes, score and landmarks in source pixels."""
        offsets, marks, prob = self.onet(crop_and_resize(frames, props, 48))
        # Landmarks are relative to the box O-Net saw (before its own regression), as mtcnn.utils.landmarks.
        w = props[:, 3:4] - props[:, 1:2] + 1
        h = props[:, 4:5] - props[:, 2:3] + 1
        lx = w * marks[:, :5] + props[:, 1:2] - 1
        ly = h * marks[:, 5:] + props[:, 2:3] - 1
        out = _apply_offsets(torch.cat([props[:, :5], prob[:, None]], 1), offsets)
        return torch.cat([out, lx, ly], 1)


def _clip_boxes(dets: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Boxes into [0, W-1] x [0, H-1] (mtcnn.utils.bboxes.limit_bboxes); landmarks are left as predicted."""
    dets = dets.clone()
    dets[:, [1, 3]] = dets[:, [1, 3]].clamp(0, w - 1)
    dets[:, [2, 4]] = dets[:, [2, 4]].clamp(0, h - 1)
    return dets
