"""Face stage: detectors (MTCNN default, SCRFD optional), primary-face tracking and ArcFace alignment.

Detectors take batches of same-size uint8 RGB frames (N, H, W, 3) and return one ``Faces`` per frame. The
primary face of a video is chosen by ``PrimaryFaceTracker`` and cut out by ``align_faces``, one batched warp.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from affextract.mtcnn import MTCNN

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")  # left = image left


@dataclass(frozen=True)
class Faces:
    """Detections in one frame, best score first."""

    boxes: np.ndarray  # (M, 4) float32 x1, y1, x2, y2 in source pixels
    scores: np.ndarray  # (M,) float32 detector confidence
    landmarks: np.ndarray  # (M, 5, 2) float32 (x, y) in LANDMARK_NAMES order, image coordinates

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls) -> Faces:
        return cls(
            np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32)
        )

    @property
    def areas(self) -> np.ndarray:
        """(M,) box areas in px²."""
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])


@runtime_checkable
class Detector(Protocol):
    """A face detector. Detectors that can also re-fit one known box per frame cheaply (for tracking between full
    detections) provide ``refine(frames, boxes) -> Faces`` with one row per frame (score may be low); check with
    ``hasattr(detector, "refine")``."""

    name: str

    def settings(self) -> dict:
        """JSON-able name + settings (stored in the HDF5 'detector' attribute)."""
        ...

    def detect(self, frames: np.ndarray) -> list[Faces]:
        """Frames (N, H, W, 3) uint8 RGB of one size -> N ``Faces``; batches internally."""
        ...


def _options(cls: type, detector: str, options: dict):
    """Build an options dataclass, naming the accepted options when one is unknown."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for detector '{detector}'; known: {', '.join(known)}")
    return cls(**options)


def _jsonable(settings: dict) -> dict:
    """Settings as they read back from JSON (tuples become lists), so stored and live settings compare equal."""
    return json.loads(json.dumps(settings))


def _check_frames(frames) -> np.ndarray | torch.Tensor:
    if not isinstance(frames, torch.Tensor):
        frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype not in (np.uint8, torch.uint8):
        raise ValueError(
            f"frames must be a (N, H, W, 3) uint8 RGB array, got shape {tuple(frames.shape)} dtype {frames.dtype}"
        )
    return frames


# ------------------------------------------------------------------------------------------------------ MTCNN


@dataclass(frozen=True)
class MTCNNOptions:
    # Smallest face searched, in pixels (absolute floor of the size rule below). MTCNN's usual 20.
    min_face_size: int = 20
    # Smallest face searched as a fraction of the frame's short side; the effective minimum is
    # max(min_face_size, min_face_ratio * short side). 0.1 = 36 px on 640x360: the subject of a face/reaction video
    # is far larger, faces below that are bystanders or too small for expression analysis (the affect model sees
    # 112 px crops), and P-Net's pyramid cost falls with the square of the minimum (about 3x less work than 20 px).
    # Set 0 to search down to min_face_size.
    min_face_ratio: float = 0.1
    # Pyramid step between scales (MTCNN paper).
    scale_factor: float = 0.709
    # Face-probability thresholds of P-Net, R-Net, O-Net (MTCNN paper / mtcnn package defaults).
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8)
    # NMS overlap thresholds: P-Net per scale, P-Net across scales, R-Net (IoU), O-Net (overlap over smaller box).
    nms_thresholds: tuple[float, float, float, float] = (0.5, 0.7, 0.7, 0.7)
    # Pyramid resize: "antialias" (antialiased bilinear straight on uint8 frames, ~10x faster on CPU) or "area"
    # (the mtcnn package's box filter). Both find the same faces to within a pixel or two on the test images.
    pyramid_resize: str = "antialias"
    # Frames per P-Net call; bounds memory (a 640x360 batch of 16 needs ~100 MB on CPU).
    batch_size: int = 16

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "nms_thresholds", tuple(float(t) for t in self.nms_thresholds))
        if len(self.thresholds) != 3 or len(self.nms_thresholds) != 4:
            raise ValueError("thresholds needs 3 values (P-, R-, O-Net) and nms_thresholds 4")
        if self.min_face_size < 12:
            raise ValueError(f"min_face_size must be >= 12 px (P-Net's window), got {self.min_face_size}")
        if not 0 < self.scale_factor < 1:
            raise ValueError(f"scale_factor must be in (0, 1), got {self.scale_factor}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.pyramid_resize not in ("antialias", "area"):
            raise ValueError(f"pyramid_resize must be 'antialias' or 'area', got {self.pyramid_resize!r}")

    def min_face_for(self, height: int, width: int) -> float:
        """Effective minimum face size in px for a frame size."""
        return max(float(self.min_face_size), self.min_face_ratio * min(height, width))


def _to_faces(dets: torch.Tensor, n_frames: int) -> list[Faces]:
    """(K, 16) MTCNN rows grouped by image -> one Faces per frame."""
    dets = dets.detach().cpu().numpy().astype(np.float32, copy=False)
    image = dets[:, 0].astype(np.int64)
    out = []
    for i in range(n_frames):
        rows = dets[image == i]
        marks = np.stack([rows[:, 6:11], rows[:, 11:16]], axis=-1)  # (M, 5, 2)
        out.append(Faces(np.ascontiguousarray(rows[:, 1:5]), np.ascontiguousarray(rows[:, 5]), marks))
    return out


class MTCNNDetector:
    """MTCNN in torch with the weights of the PyPI package ``mtcnn`` 1.0.0; offline, any torch device."""

    name = "mtcnn"
    Options = MTCNNOptions

    def __init__(self, device: str | torch.device = "cpu", **options):
        self.options = _options(MTCNNOptions, self.name, options)
        self.device = torch.device(device)
        self.model = MTCNN().to(self.device)

    def settings(self) -> dict:
        return _jsonable({"name": self.name, **asdict(self.options)})

    def detect(self, frames: np.ndarray) -> list[Faces]:
        frames = _check_frames(frames)
        n, h, w = frames.shape[:3]
        o = self.options
        out: list[Faces] = []
        for start in range(0, n, o.batch_size):
            chunk = frames[start : start + o.batch_size]
            dets = self.model.detect(
                chunk, o.min_face_for(h, w), o.scale_factor, o.thresholds, o.nms_thresholds, o.pyramid_resize
            )
            out.extend(_to_faces(dets, len(chunk)))
        return out

    def refine(self, frames: np.ndarray, boxes: np.ndarray) -> Faces:
        """O-Net on one box per frame, frames (N, H, W, 3), boxes (N, 4) -> Faces with N rows (row i = frame i).

        Costs one 48x48 O-Net pass per frame, so a tracker can follow the face between full detections; a low score
        means the face is gone. Non-finite boxes give NaN rows with score 0.
        """
        frames = _check_frames(frames)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if boxes.shape[0] != frames.shape[0]:
            raise ValueError(f"refine needs one box per frame: {frames.shape[0]} frames, {boxes.shape[0]} boxes")
        dets = [self.model.refine(frames[s : s + 256], boxes[s : s + 256]) for s in range(0, len(boxes), 256)]
        rows = torch.cat(dets).cpu().numpy() if dets else np.zeros((0, 16), np.float32)
        return Faces(
            np.ascontiguousarray(rows[:, 1:5]),
            np.ascontiguousarray(rows[:, 5]),
            np.stack([rows[:, 6:11], rows[:, 11:16]], axis=-1),
        )


# ------------------------------------------------------------------------------------------------------ SCRFD


@dataclass(frozen=True)
class ScrfdOptions:
    # Local SCRFD/RetinaFace .onnx file. When set, it is used as is and nothing is downloaded.
    model_path: str | None = None
    # insightface model pack fetched by insightface on first use when model_path is not set.
    model_pack: str = "buffalo_l"
    # Detector file inside the pack (buffalo_l: det_10g.onnx = SCRFD-10GF; buffalo_s/buffalo_sc: det_500m.onnx).
    model_file: str = "det_10g.onnx"
    # insightface's model root; packs live in <root>/models/<pack>/.
    root: str = "~/.insightface"
    # Let insightface download the pack when it is missing (needs network).
    download: bool = True
    # Square network input side; frames are letterboxed into it (insightface's default 640).
    det_size: int = 640
    # Score threshold and NMS IoU threshold (insightface defaults).
    det_thresh: float = 0.5
    nms_thresh: float = 0.4


def scrfd_download_url(pack: str) -> str:
    """URL from which the installed insightface fetches a model pack."""
    from insightface.utils import storage

    if hasattr(storage, "model_zoo_download_url"):
        return storage.model_zoo_download_url(f"{pack}.zip")
    return f"https://github.com/deepinsight/insightface/releases/download/v0.7/{pack}.zip"


class ScrfdDetector:
    """insightface's SCRFD (the paper used its RetinaFace) through ``insightface.model_zoo``; runs one frame at a
    time in onnxruntime (the exported models have a batch dimension of 1)."""

    name = "scrfd"
    Options = ScrfdOptions

    def __init__(self, device: str | torch.device = "cpu", **options):
        self.options = _options(ScrfdOptions, self.name, options)
        self.device = torch.device(device)
        self.model_path = self._locate()
        from insightface.model_zoo import get_model

        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        model = get_model(str(self.model_path), providers=providers)
        if model is None or getattr(model, "taskname", None) != "detection":
            raise ValueError(f"{self.model_path} is not a SCRFD/RetinaFace detection model")
        size = (self.options.det_size, self.options.det_size)
        model.prepare(
            0 if self.device.type == "cuda" else -1,
            input_size=size,
            det_thresh=self.options.det_thresh,
            nms_thresh=self.options.nms_thresh,
        )
        self.model = model

    def _missing(self, path: Path, why: str) -> FileNotFoundError:
        o = self.options
        url = scrfd_download_url(o.model_pack)
        pack_dir = Path(os.path.expanduser(o.root)) / "models" / o.model_pack
        return FileNotFoundError(
            f"SCRFD model not available: {why}.\n"
            f"Download {url}, unzip it so that {pack_dir / o.model_file} exists, "
            f"or put any SCRFD .onnx file somewhere and pass it with the detector option model_path "
            f"(get_detector('scrfd', model_path='/path/to/{o.model_file}')).\n"
            f"The default detector 'mtcnn' needs no download."
        )

    def _locate(self) -> Path:
        o = self.options
        if o.model_path is not None:
            path = Path(os.path.expanduser(o.model_path))
            if not path.is_file():
                raise self._missing(path, f"model_path {path} does not exist")
            return path
        path = Path(os.path.expanduser(o.root)) / "models" / o.model_pack / o.model_file
        if path.is_file():
            return path
        if not o.download:
            raise self._missing(path, f"{path} does not exist and download=False")
        from insightface.utils.storage import ensure_available

        try:
            ensure_available("models", o.model_pack, root=os.path.expanduser(o.root))
        except Exception as error:  # any network/zip failure: the user needs the manual route
            raise self._missing(path, f"{path} does not exist and the download failed ({error!r})") from error
        if not path.is_file():
            raise self._missing(path, f"the pack {o.model_pack} has no {o.model_file}")
        return path

    def settings(self) -> dict:
        return _jsonable({"name": self.name, **asdict(self.options), "model_file_used": str(self.model_path)})

    def detect(self, frames: np.ndarray) -> list[Faces]:
        frames = _check_frames(frames)
        if isinstance(frames, torch.Tensor):
            frames = frames.cpu().numpy()
        out = []
        for frame in frames:
            det, kps = self.model.detect(np.ascontiguousarray(frame[:, :, ::-1]))  # insightface takes BGR
            det = np.asarray(det, np.float32).reshape(-1, 5)
            if kps is None:
                kps = np.full((len(det), 5, 2), np.nan, np.float32)
            out.append(
                Faces(
                    np.ascontiguousarray(det[:, :4]),
                    np.ascontiguousarray(det[:, 4]),
                    np.asarray(kps, np.float32).reshape(-1, 5, 2),
                )
            )
        return out


# --------------------------------------------------------------------------------------------------- registry

DETECTORS: dict[str, type] = {"mtcnn": MTCNNDetector, "scrfd": ScrfdDetector}


def get_detector(name: str = "mtcnn", device: str = "cpu", **options) -> Detector:
    """Detector by registry name, on a torch device string ('cpu', 'cuda', 'cuda:1'), with its options."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector '{name}'; known: {', '.join(DETECTORS)}")
    return DETECTORS[name](device=device, **options)


# --------------------------------------------------------------------------------------------------- tracking


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(P, 4), (Q, 4) x1, y1, x2, y2 -> (P, Q) intersection over union."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass(frozen=True)
class TrackerOptions:
    # A detection continues the track when its IoU with the last tracked box is at least this.
    iou_threshold: float = 0.3
    # After this many consecutive frames without the tracked face, the largest face is taken again
    # (30 = about one second of 30 fps video).
    max_lost: int = 30


class PrimaryFaceTracker:
    """Picks the one subject of a video, frame after frame.

    Rule: the first face is the largest; afterwards the face overlapping the last tracked box best (IoU >=
    ``iou_threshold``) is followed, so a larger bystander entering the frame is ignored. When no face overlaps,
    the frame has no primary face; after ``max_lost`` such frames in a row the largest face is acquired again.
    """

    def __init__(self, iou_threshold: float = TrackerOptions.iou_threshold, max_lost: int = TrackerOptions.max_lost):
        self.options = TrackerOptions(iou_threshold=iou_threshold, max_lost=max_lost)
        self.box: np.ndarray | None = None  # (4,) last tracked box
        self.lost = 0  # consecutive frames without the tracked face

    def reset(self) -> None:
        self.box = None
        self.lost = 0

    def update(self, faces: Faces, frames: int = 1) -> int | None:
        """Index of the primary face in ``faces``, or None when this frame has none.

        ``frames``: how many frames this update stands for (the key-frame interval when only key frames are
        detected), so that ``max_lost`` counts frames of video whatever the interval.
        """
        finite = np.isfinite(faces.boxes).all(1) if len(faces) else np.zeros(0, bool)
        if not finite.any():
            self.lost += frames
            return None
        if self.box is None or self.lost >= self.options.max_lost:
            index = int(np.argmax(np.where(finite, faces.areas, -np.inf)))
        else:
            iou = np.where(finite, box_iou(self.box, faces.boxes)[0], -1.0)
            index = int(np.argmax(iou))
            if iou[index] < self.options.iou_threshold:
                self.lost += frames
                return None
        self.box = faces.boxes[index].astype(np.float32).copy()
        self.lost = 0
        return index


# -------------------------------------------------------------------------------------------------- alignment


def alignment_matrices(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """(N, 5, 2) landmarks -> (N, 2, 3) float64 similarity transforms image -> crop onto the ArcFace template
    (insightface.utils.face_align.estimate_norm). Rows with non-finite landmarks are NaN."""
    from insightface.utils.face_align import estimate_norm

    landmarks = np.asarray(landmarks, np.float64).reshape(-1, 5, 2)
    out = np.full((len(landmarks), 2, 3), np.nan)
    with warnings.catch_warnings():
        # insightface calls skimage's SimilarityTransform.estimate, deprecated (not changed) in skimage 0.26.
        warnings.simplefilter("ignore", FutureWarning)
        for i, marks in enumerate(landmarks):
            if np.isfinite(marks).all():
                out[i] = estimate_norm(marks, image_size=size)
    return out


def align_faces(frames, landmarks, size: int = 112, device: str | torch.device = "cpu") -> torch.Tensor:
    """Frames (N, H, W, 3) uint8 RGB (numpy or torch), landmarks (N, 5, 2) -> (N, 3, size, size) float32 RGB in
    [-1, 1], each face warped onto the ArcFace 5-point template. Rows with non-finite landmarks (no face) come back
    black (all -1)."""
    return warp_faces(frames, landmarks, size, device).float() / 127.5 - 1.0


def warp_faces(frames, landmarks, size: int = 112, device: str | torch.device = "cpu", method: str = "auto"
               ) -> torch.Tensor:
    """As align_faces, but (N, 3, size, size) uint8 on ``device``: the aligned crops as insightface's ``norm_crop``
    makes them.

    ``method="cv2"`` (the default on the CPU): one cv2.warpAffine per face, exactly ``norm_crop`` and much cheaper
    there than converting frames to float. ``"grid"`` (the default on GPUs): all faces in one batched bilinear warp
    (affine_grid + grid_sample, zero border) on the device, within one grey level of ``norm_crop``.
    """
    if method not in ("auto", "cv2", "grid"):
        raise ValueError(f"unknown warp method {method!r}; known: auto, cv2, grid")
    device = torch.device(device)
    images = torch.as_tensor(frames)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"frames must be (N, H, W, 3) RGB, got shape {tuple(images.shape)}")
    n, h, w, _ = images.shape
    matrices = alignment_matrices(landmarks, size)
    if len(matrices) != n:
        raise ValueError(f"align_faces needs one landmark set per frame: {n} frames, {len(matrices)} landmark sets")
    if n == 0:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8, device=device)
    ok = np.isfinite(matrices).all((1, 2))
    if method == "cv2" or (method == "auto" and device.type == "cpu"):
        import cv2

        images = images.cpu().numpy()
        out = np.zeros((n, size, size, 3), np.uint8)
        for i in np.flatnonzero(ok):
            out[i] = cv2.warpAffine(images[i], matrices[i], (size, size), borderValue=0.0)
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(device)
    full = np.zeros((n, 3, 3))
    full[:, :2] = np.where(ok[:, None, None], matrices, [[1.0, 0, 0], [0, 1.0, 0]])
    full[:, 2, 2] = 1.0
    inverse = np.linalg.inv(full)  # crop pixels -> frame pixels
    # Only the window of each frame that the crop samples is moved and converted to float (a face is a small part of
    # a frame), padded to a common size so the warp stays one batched call.
    corners = np.array([[0, size - 1, 0, size - 1], [0, 0, size - 1, size - 1], [1, 1, 1, 1]], np.float64)
    pre = inverse[:, :2] @ corners  # (n, 2, 4) frame coordinates of the crop's corners
    x0 = np.clip(np.floor(pre[:, 0].min(1)) - 1, 0, w - 1).astype(int)
    y0 = np.clip(np.floor(pre[:, 1].min(1)) - 1, 0, h - 1).astype(int)
    x1 = np.clip(np.ceil(pre[:, 0].max(1)) + 2, x0 + 1, w).astype(int)
    y1 = np.clip(np.ceil(pre[:, 1].max(1)) + 2, y0 + 1, h).astype(int)
    ww, wh = max(2, int((x1 - x0).max())), max(2, int((y1 - y0).max()))
    windows = torch.zeros(n, 3, wh, ww, dtype=images.dtype, device=images.device)  # channels first while uint8
    for i in np.flatnonzero(ok):
        windows[i, :, : y1[i] - y0[i], : x1[i] - x0[i]] = images[i, y0[i]:y1[i], x0[i]:x1[i]].permute(2, 0, 1)
    # theta maps normalised crop coordinates to normalised window coordinates (align_corners=True: -1..1 spans pixel
    # centres 0..size-1): theta = to_norm(window) @ shift(-x0, -y0) @ inverse(M) @ from_norm(crop). Samples beyond
    # the window are beyond the frame (the window is clipped only by the frame's edges), so zero padding is right.
    shift = np.tile(np.eye(3), (n, 1, 1))
    shift[:, 0, 2], shift[:, 1, 2] = -x0, -y0
    from_crop = np.array([[(size - 1) / 2, 0, (size - 1) / 2], [0, (size - 1) / 2, (size - 1) / 2], [0, 0, 1]])
    to_window = np.array([[2 / (ww - 1), 0, -1], [0, 2 / (wh - 1), -1], [0, 0, 1]])
    theta = (to_window @ shift @ inverse @ from_crop)[:, :2]
    grid = F.affine_grid(
        torch.as_tensor(theta, dtype=torch.float32, device=device), [n, 3, size, size], align_corners=True
    )
    source = windows.to(device, non_blocking=True).float()
    crops = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    crops[torch.as_tensor(~ok, device=device)] = 0.0
    return crops.round_().clamp_(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------ per-video tracking


@dataclass(frozen=True)
class PrimaryFaces:
    """The primary face of each frame of a batch (NaN rows and face=False where there is none)."""

    face: np.ndarray  # (N,) bool
    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (N,) float32
    landmarks: np.ndarray  # (N, 5, 2) float32
    detected: np.ndarray  # (N,) bool: True where a full detection ran, False where the box was only refined


@dataclass(frozen=True)
class StreamOptions:
    # Run the full detector on every k-th frame of the video; frames in between only re-fit the tracked box with
    # the detector's refine() (MTCNN: one O-Net pass, ~20x cheaper than a full detection). 1 = detect every frame.
    detect_every: int = 1
    # A refined box with a lower score means the face is gone from that frame.
    min_refine_score: float = 0.8


class PrimaryFaceStream:
    """Primary face of every frame of one video, fed in order, batch after batch.

    Key frames (every ``detect_every``-th) get a full detection and go through ``PrimaryFaceTracker``; the frames
    after a key frame refine the key frame's primary box (one batched ``refine`` call), so no frame depends on its
    predecessor and the whole batch stays batched. A face that appears between key frames is picked up at the next
    key frame. Detectors without ``refine`` are run on every frame.
    """

    def __init__(self, detector: Detector, detect_every: int = 1, min_refine_score: float = 0.8,
                 tracker: PrimaryFaceTracker | None = None):
        if detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {detect_every}")
        self.detector = detector
        refines = hasattr(detector, "refine")
        self.options = StreamOptions(detect_every if refines else 1, min_refine_score)
        self.tracker = tracker if tracker is not None else PrimaryFaceTracker()
        self.position = 0  # frames of this video seen so far
        self._key_box: np.ndarray | None = None  # primary box of the latest key frame, None if it had no face

    def __call__(self, frames: np.ndarray) -> PrimaryFaces:
        frames = _check_frames(frames)
        n = len(frames)
        out = PrimaryFaces(
            np.zeros(n, bool),
            np.full((n, 4), np.nan, np.float32),
            np.zeros(n, np.float32),
            np.full((n, 5, 2), np.nan, np.float32),
            (self.position + np.arange(n)) % self.options.detect_every == 0,
        )
        keys = np.flatnonzero(out.detected)
        key_faces = self.detector.detect(frames[keys]) if len(keys) else []
        refine_rows, refine_boxes = [], []
        key_iter = iter(zip(keys.tolist(), key_faces))
        next_key = next(key_iter, None)
        for i in range(n):
            if next_key is not None and next_key[0] == i:
                faces = next_key[1]
                index = self.tracker.update(faces, frames=self.options.detect_every)
                if index is not None:
                    out.face[i] = True
                    out.boxes[i], out.scores[i], out.landmarks[i] = (
                        faces.boxes[index], faces.scores[index], faces.landmarks[index]
                    )
                self._key_box = None if index is None else faces.boxes[index]
                next_key = next(key_iter, None)
            elif self._key_box is not None:
                refine_rows.append(i)
                refine_boxes.append(self._key_box)
        if refine_rows:
            rows = np.asarray(refine_rows)
            refined = self.detector.refine(frames[rows], np.stack(refine_boxes))
            ok = refined.scores >= self.options.min_refine_score
            out.face[rows[ok]] = True
            out.boxes[rows[ok]] = refined.boxes[ok]
            out.scores[rows[ok]] = refined.scores[ok]
            out.landmarks[rows[ok]] = refined.landmarks[ok]
        self.position += n
        return out
