"""Face detectors: MTCNN (default, offline) and SCRFD (optional), behind one registry.

Detectors take batches of same-size uint8 RGB frames (N, H, W, 3) and return one ``Faces`` per frame. Which face is
the video's subject is decided in ``affextract.faces.tracking``; the crops are cut in ``affextract.faces.align``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported where a detector is built or run, not here: describing a detector's settings must stay cheap
# (a rerun with nothing to do checks them without loading torch).

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


def check_frames(frames) -> np.ndarray | torch.Tensor:
    import torch

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
        import torch

        from affextract.faces.mtcnn import MTCNN

        self.options = _options(MTCNNOptions, self.name, options)
        self.device = torch.device(device)
        self.model = MTCNN().to(self.device)

    @classmethod
    def describe(cls, **options) -> dict:
        """The settings a detector built with these options reports, without loading its networks."""
        return _jsonable({"name": cls.name, **asdict(_options(MTCNNOptions, cls.name, options))})

    def settings(self) -> dict:
        return self.describe(**asdict(self.options))

    def detect(self, frames: np.ndarray) -> list[Faces]:
        frames = check_frames(frames)
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
        frames = check_frames(frames)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if boxes.shape[0] != frames.shape[0]:
            raise ValueError(f"refine needs one box per frame: {frames.shape[0]} frames, {boxes.shape[0]} boxes")
        dets = [self.model.refine(frames[s : s + 256], boxes[s : s + 256]) for s in range(0, len(boxes), 256)]
        rows = np.concatenate([d.cpu().numpy() for d in dets]) if dets else np.zeros((0, 16), np.float32)
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


class MissingExtra(RuntimeError):
    """An optional part is used without the packages it needs; the message says what to install."""


def _need_scrfd_packages() -> None:
    """insightface and onnxruntime come with the `scrfd` extra only: the default detector needs neither."""
    try:
        import insightface  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise MissingExtra(f"the scrfd detector needs insightface and onnxruntime ({e}): pip install -e '.[scrfd]' in "
                           "the affextract folder (or pip install insightface onnxruntime); the default detector, "
                           "mtcnn, needs neither") from None


def scrfd_download_url(pack: str) -> str:
    """URL from which the installed insightface fetches a model pack."""
    from insightface.utils import storage

    if hasattr(storage, "model_zoo_download_url"):
        return storage.model_zoo_download_url(f"{pack}.zip")
    return f"https://github.com/deepinsight/insightface/releases/download/v0.7/{pack}.zip"


def _scrfd_missing(o: ScrfdOptions, why: str) -> FileNotFoundError:
    url = scrfd_download_url(o.model_pack)
    pack_dir = Path(os.path.expanduser(o.root)) / "models" / o.model_pack
    return FileNotFoundError(
        f"SCRFD model not available: {why}.\n"
        f"Download {url}, unzip it so that {pack_dir / o.model_file} exists, "
        f"or put any SCRFD .onnx file somewhere and pass it with the detector option model_path "
        f"(get_detector('scrfd', model_path='/path/to/{o.model_file}')).\n"
        f"The default detector 'mtcnn' needs no download."
    )


def _scrfd_model(o: ScrfdOptions) -> Path:
    """The .onnx file the options name, fetched by insightface when allowed and missing."""
    if o.model_path is not None:
        path = Path(os.path.expanduser(o.model_path))
        if not path.is_file():
            raise _scrfd_missing(o, f"model_path {path} does not exist")
        return path
    path = Path(os.path.expanduser(o.root)) / "models" / o.model_pack / o.model_file
    if path.is_file():
        return path
    if not o.download:
        raise _scrfd_missing(o, f"{path} does not exist and download=False")
    from insightface.utils.storage import ensure_available

    try:
        ensure_available("models", o.model_pack, root=os.path.expanduser(o.root))
    except Exception as error:  # any network/zip failure: the user needs the manual route
        raise _scrfd_missing(o, f"{path} does not exist and the download failed ({error!r})") from error
    if not path.is_file():
        raise _scrfd_missing(o, f"the pack {o.model_pack} has no {o.model_file}")
    return path


class ScrfdDetector:
    """insightface's SCRFD (the paper used its RetinaFace) through ``insightface.model_zoo``; runs one frame at a
    time in onnxruntime (the exported models have a batch dimension of 1)."""

    name = "scrfd"
    Options = ScrfdOptions

    def __init__(self, device: str | torch.device = "cpu", **options):
        import torch

        _need_scrfd_packages()
        self.options = _options(ScrfdOptions, self.name, options)
        self.device = torch.device(device)
        self.model_path = _scrfd_model(self.options)
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

    @classmethod
    def describe(cls, **options) -> dict:
        """The settings a detector built with these options reports (the model file it would use), without loading
        the model."""
        _need_scrfd_packages()
        o = _options(ScrfdOptions, cls.name, options)
        return _jsonable({"name": cls.name, **asdict(o), "model_file_used": str(_scrfd_model(o))})

    def settings(self) -> dict:
        return _jsonable({"name": self.name, **asdict(self.options), "model_file_used": str(self.model_path)})

    def detect(self, frames: np.ndarray) -> list[Faces]:
        frames = check_frames(frames)
        if not isinstance(frames, np.ndarray):  # a torch tensor
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


def _registered(name: str) -> type:
    if name not in DETECTORS:
        raise ValueError(f"unknown detector '{name}'; known: {', '.join(DETECTORS)}")
    return DETECTORS[name]


def get_detector(name: str = "mtcnn", device: str = "cpu", **options) -> Detector:
    """Detector by registry name, on a torch device string ('cpu', 'cuda', 'cuda:1'), with its options."""
    return _registered(name)(device=device, **options)


def describe_detector(name: str = "mtcnn", **options) -> dict:
    """The JSON-able settings ``get_detector(name, **options).settings()`` would report, checked (unknown names and
    options, a missing model file) without building the detector: cheap enough to check a run before any work."""
    return _registered(name).describe(**options)
