"""Movement stage: MediaPipe Face Mesh v2 and blendshapes in torch, with head pose, gaze and MediaPipe's face crop.

Google's MediaPipe face models (Apache-2.0) are run from weights converted out of their .tflite files by
``tools/convert_mediapipe.py`` (``weights/NOTICE-mediapipe``, ``weights/LICENSE-mediapipe``); nothing here needs
TensorFlow, LiteRT or MediaPipe. Parity with the LiteRT runtime is tested in ``tests/test_movement.py``.

Pipeline per face: 5 detector points -> ``align.roi_from_points`` (MediaPipe's rotated square around the face) ->
``align.crop_faces`` (192x192 crop) -> ``FaceMesh`` (478 points + presence) -> points back to the image ->
``Blendshapes`` (52 coefficients from 146 of the points), ``head_pose`` (yaw, pitch, roll) and ``gaze``.
``Movement`` runs all of it on a batch of crops on one device.

Coordinates: image points are (x, y) pixels with x to the right and y down, measured like OpenCV's (pixel i's centre
at i). Crop points are pixels of the 192x192 crop in the same convention; the crop's corner (0, 0) is the ROI's
corner, as in MediaPipe's ImageToTensor. Mesh z is MediaPipe's relative depth (smaller = nearer the camera), in the
same pixel scale as x.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from affextract.faces.align import MESH_CROP_SIZE, mesh_to_image
from affextract.runtime import gpu_paths
# Names of the outputs, shared with the file format and seqhead (see there for their conventions).
from affextract.schema import BLENDSHAPE_NAMES, GAZE_NAMES, MESH_POINTS, POSE_NAMES, WEIGHTS_DIR  # noqa: F401
from affextract.weights import read_weights

MESH_WEIGHTS = WEIGHTS_DIR / "mediapipe_face_mesh_v2.safetensors"
BLENDSHAPE_WEIGHTS = WEIGHTS_DIR / "mediapipe_blendshapes.safetensors"
GEOMETRY_WEIGHTS = WEIGHTS_DIR / "mediapipe_face_geometry.safetensors"
MEDIAPIPE_FORMAT = "affextract-mediapipe"  # the format tag of the converted files' records

N_LANDMARKS = MESH_POINTS  # 468 face points + 2 x 5 iris points
N_FACE = 468  # face points (the canonical model's vertices); 468..472 right iris, 473..477 left iris (subject's)

# The 146 of the 478 mesh points fed to the blendshapes model, in order (MediaPipe face_blendshapes_graph.cc).
BLENDSHAPE_LANDMARKS = (
    0, 1, 4, 5, 6, 7, 8, 10, 13, 14, 17, 21, 33, 37, 39, 40, 46, 52, 53, 54, 55, 58, 61, 63, 65, 66, 67, 70, 78, 80,
    81, 82, 84, 87, 88, 91, 93, 95, 103, 105, 107, 109, 127, 132, 133, 136, 144, 145, 146, 148, 149, 150, 152, 153,
    154, 155, 157, 158, 159, 160, 161, 162, 163, 168, 172, 173, 176, 178, 181, 185, 191, 195, 197, 234, 246, 249, 251,
    263, 267, 269, 270, 276, 282, 283, 284, 285, 288, 291, 293, 295, 296, 297, 300, 308, 310, 311, 312, 314, 317, 318,
    321, 323, 324, 332, 334, 336, 338, 356, 361, 362, 365, 373, 374, 375, 377, 378, 379, 380, 381, 382, 384, 385, 386,
    387, 388, 389, 390, 397, 398, 400, 402, 405, 409, 415, 454, 466, 468, 469, 470, 471, 472, 473, 474, 475, 476, 477,
)


# ------------------------------------------------------------------------------------------------------- models


def _same_pad(x: torch.Tensor) -> torch.Tensor:
    """TF 'SAME' padding for a 3x3, stride-2 window on an even-sized input: one row/column after, none before."""
    return F.pad(x, (0, 1, 0, 1))


class _BlazeBlock(nn.Module):
    """Depthwise 3x3 -> PReLU -> pointwise -> + shortcut -> PReLU; stride 2 halves the size, the shortcut then is a
    2x2 max pool with zero channels appended."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, cout - cin
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1 if stride == 1 else 0, groups=cin)
        self.act_dw = nn.PReLU(cin)
        self.pw = nn.Conv2d(cin, cout, 1)
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            y, short = self.dw(x), x
        else:
            y, short = self.dw(_same_pad(x)), F.max_pool2d(x, 2)
        y = self.pw(self.act_dw(y))
        # The shortcut's appended channels are zeros: add into the first ones only, in place.
        (y[:, :short.shape[1]] if self.extra else y).add_(short)
        return self.act(y)


# (in channels, out channels, stride) of the trunk's blocks, as in face_landmarks_detector.tflite.
_MESH_BLOCKS = ((16, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1),
                (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 128, 1), (128, 128, 2), (128, 128, 1), (128, 128, 1),
                (128, 128, 2), (128, 128, 1), (128, 128, 1))


class FaceMesh(nn.Module):
    """Face Mesh v2: (B, 3, 192, 192) RGB in [0, 1] -> landmarks (B, 478, 3) in crop pixels, presence logit (B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 0)
        self.stem_act = nn.PReLU(16)
        self.blocks = nn.Sequential(*(_BlazeBlock(*b) for b in _MESH_BLOCKS))
        self.neck = nn.Conv2d(128, 8, 1)
        self.neck_act = nn.PReLU(8)
        self.neck_block = _BlazeBlock(8, 8, 1)
        self.presence = nn.Conv2d(8, 1, 3)  # 3x3 'VALID' on the 3x3 map: one value
        self.landmarks = nn.Conv2d(8, 3 * N_LANDMARKS, 3)

    def layers(self) -> list[nn.Module]:
        """Parametrised layers in the order the .tflite graph applies them (the converter fills them in this order)."""
        out: list[nn.Module] = [self.stem, self.stem_act]
        for b in [*self.blocks, None, self.neck_block]:
            out += [self.neck, self.neck_act] if b is None else [b.dw, b.act_dw, b.pw, b.act]
        return out + [self.presence, self.landmarks]

    # The stem and the first blocks (96x96x16 and 48x48x32 maps, 0.6 MB per face in fp32) run a few faces at a time
    # so that each layer's output is still in the core's cache when the next layer reads it; the cost per face then
    # no longer grows with the batch (on the CPU, batch 64 ran twice as fast as without; benchmarks/bench_movement.py).
    # The later blocks' smaller maps run on the whole batch, where larger matrices make the convolutions efficient.
    # A GPU has no such cache limit and wants the whole batch in every kernel.
    cache_blocks = 5  # blocks run per chunk: up to the last 48x48 one
    cache_faces = 4  # faces per chunk (the CPU branch, see runtime.gpu_paths)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, 3, 192, 192) -> (B, 478, 3), (B,)
        parts = []
        chunks = () if gpu_paths(x.device) else x.split(self.cache_faces)
        for chunk in chunks or (x,):  # (x,): an empty batch still gives empty outputs
            h = self.stem_act(self.stem(_same_pad(chunk)))
            for block in self.blocks[:self.cache_blocks]:
                h = block(h)
            parts.append(h)
        h = torch.cat(parts) if len(parts) != 1 else parts[0]  # keeps channels-last
        for block in self.blocks[self.cache_blocks:]:
            h = block(h)
        h = self.neck_block(self.neck_act(self.neck(h)))
        return self.landmarks(h).reshape(-1, N_LANDMARKS, 3), self.presence(h).reshape(-1)


class _MixerBlock(nn.Module):
    """MLP-Mixer block: token mixing then channel mixing, each after a layer norm without bias, with residuals."""

    def __init__(self, tokens: int, channels: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, bias=False)
        self.token1, self.token2 = nn.Linear(tokens, token_hidden), nn.Linear(token_hidden, tokens)
        self.norm2 = nn.LayerNorm(channels, bias=False)
        self.channel1, self.channel2 = nn.Linear(channels, channel_hidden), nn.Linear(channel_hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, C), tokens first
        # Tokens first makes both mixings one plain matrix product over the whole batch, without transposes: token
        # mixing is (hidden, T) @ (T, B * C), channel mixing (T * B, C) @ (C, hidden).
        t, b, c = x.shape
        y = self.norm1(x).view(t, b * c)
        h = torch.addmm(self.token1.bias[:, None], self.token1.weight, y).relu_()
        x = torch.addmm(self.token2.bias[:, None], self.token2.weight, h).view(t, b, c).add_(x)
        h = F.linear(self.norm2(x).view(t * b, c), self.channel1.weight, self.channel1.bias).relu_()
        return F.linear(h, self.channel2.weight, self.channel2.bias).view(t, b, c).add_(x)


class Blendshapes(nn.Module):
    """MediaPipe's blendshapes MLP-Mixer: (B, 146, 2) points (x, y in pixels of any one image) -> (B, 52) in [0, 1].

    The points are centred and scaled to unit mean distance inside, so any image's pixel frame works."""

    def __init__(self, points: int = len(BLENDSHAPE_LANDMARKS), tokens: int = 96, channels: int = 64,
                 blocks: int = 4, outputs: int = len(BLENDSHAPE_NAMES)) -> None:
        super().__init__()
        self.register_buffer("input_scale", torch.ones(()))  # constant of the graph after normalisation
        self.points_to_tokens = nn.Linear(points, tokens)
        self.embed = nn.Linear(2, channels)
        self.extra_token = nn.Parameter(torch.zeros(1, 1, channels))
        self.blocks = nn.ModuleList(_MixerBlock(tokens + 1, channels, 384, 256) for _ in range(blocks))
        self.out = nn.Linear(channels, outputs)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        x = points - points.mean(1, keepdim=True)
        x = x / x.norm(dim=2).mean(1)[:, None, None] * self.input_scale  # (B, 146, 2)
        b, p, _ = x.shape
        tokens = torch.addmm(self.points_to_tokens.bias[:, None], self.points_to_tokens.weight,
                             x.transpose(0, 1).reshape(p, b * 2))  # (96, B * 2)
        x = self.embed(tokens.view(len(tokens), b, 2))  # (96, B, 64)
        x = torch.cat([self.extra_token.view(1, 1, -1).expand(1, b, -1), x])  # (97, B, 64)
        for block in self.blocks:
            x = block(x)
        return torch.sigmoid(self.out(x[0]))

    def set_eps(self, eps: float) -> None:
        for block in self.blocks:
            block.norm1.eps = block.norm2.eps = eps


# ------------------------------------------------------------------------------------------------------ weights


def read_mediapipe(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 tensors, record) of a converted MediaPipe file, checked against the SHA-256 in its record."""
    return read_weights(path, MEDIAPIPE_FORMAT, "converted MediaPipe weights",
                        "reinstall affextract or rerun tools/convert_mediapipe.py")


def _load(model: nn.Module, path: Path) -> tuple[nn.Module, dict]:
    state, doc = read_mediapipe(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not fit {type(model).__name__} (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.eval(), doc


def load_face_mesh(path: str | Path = MESH_WEIGHTS) -> FaceMesh:
    """The converted Face Mesh v2 (fp32, CPU, eval mode)."""
    return _load(FaceMesh(), Path(path))[0]


def load_blendshapes(path: str | Path = BLENDSHAPE_WEIGHTS) -> Blendshapes:
    """The converted blendshapes model (fp32, CPU, eval mode)."""
    model, doc = _load(Blendshapes(), Path(path))
    if tuple(doc.get("names", ())) != BLENDSHAPE_NAMES:
        raise ValueError(f"{path}: blendshape names differ from this affextract's BLENDSHAPE_NAMES")
    model.set_eps(float(doc["config"]["eps"]))
    return model


def load_geometry(path: str | Path = GEOMETRY_WEIGHTS) -> tuple[torch.Tensor, torch.Tensor]:
    """MediaPipe's canonical face: vertices (468, 3) in cm and Procrustes landmark weights (468,)."""
    state, _ = read_mediapipe(path)
    return state["canonical"], state["weights"]


# --------------------------------------------------------------------------------------------- pose and gaze

EYEBALL_RADIUS_CM = 1.2  # adult eyeball radius: turns the iris offset (cm, head frame) into an eye rotation
# (outer corner, inner corner, iris centre) of the subject's right and left eye.
_EYES = ((33, 133, 468), (263, 362, 473))


def _to_camera(mesh: torch.Tensor) -> torch.Tensor:
    """Image-pixel mesh (x right, y down, z away from the camera) -> camera axes as the canonical face's
    (x right, y up, z towards the camera), so a frontal upright face has the identity rotation."""
    return mesh * mesh.new_tensor([1.0, -1.0, -1.0])


def procrustes(points: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted similarity fit ``points ~ s * reference @ R.T + t``: (B, P, 3), (P, 3), (P,) -> rotation (B, 3, 3),
    scale (B,), translation (B, 3) (Umeyama 1991; reflections excluded)."""
    w = weights / weights.sum()
    mp = (w[:, None] * points).sum(1, keepdim=True)
    mr = (w[:, None] * reference).sum(0)
    p, r = points - mp, reference - mr
    cov = torch.einsum("p,bpi,pj->bij", w, p, r)  # (B, 3, 3)
    u, sv, vt = torch.linalg.svd(cov)
    d = torch.ones_like(sv)
    d[:, 2] = torch.sign(torch.linalg.det(u @ vt))
    rot = u @ torch.diag_embed(d) @ vt
    scale = (sv * d).sum(1) / (w[:, None] * r ** 2).sum()
    t = mp[:, 0] - scale[:, None] * (mr @ rot.transpose(1, 2))
    return rot, scale, t


def euler_degrees(rot: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) head rotations (canonical face -> camera axes) -> (B, 3) yaw, pitch, roll in degrees (POSE_NAMES),
    with rot = Ry(yaw) @ Rx(-pitch) @ Rz(roll) about the camera's axes (x right, y up, z towards the camera)."""
    yaw = torch.atan2(rot[:, 0, 2], rot[:, 2, 2])
    pitch = torch.asin(rot[:, 1, 2].clamp(-1, 1))
    roll = torch.atan2(rot[:, 1, 0], rot[:, 1, 1])
    return torch.rad2deg(torch.stack([yaw, pitch, roll], 1))


def gaze_degrees(mesh: torch.Tensor, rot: torch.Tensor, scale: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, 478, 3) camera-axes mesh and its head fit -> (B, 2) gaze yaw, pitch in degrees (GAZE_NAMES).

    In the head's frame (cm), each eye turns by the iris centre's offset from the midpoint of its corners over the
    eyeball radius; the two eyes' directions are averaged and turned by the head rotation into camera axes."""
    head = torch.einsum("bpi,bij->bpj", mesh - t[:, None], rot) / scale[:, None, None]  # R^T (q - t) / s
    dirs = []
    for outer, inner, iris in _EYES:
        off = (head[:, iris, :2] - (head[:, outer, :2] + head[:, inner, :2]) / 2) / EYEBALL_RADIUS_CM
        off = off.clamp(-0.95, 0.95)
        dirs.append(torch.cat([off, (1 - (off ** 2).sum(1, keepdim=True)).clamp_min(0.05).sqrt()], 1))
    g = torch.einsum("bij,bj->bi", rot, F.normalize(dirs[0] + dirs[1], dim=1))
    return torch.rad2deg(torch.stack([torch.atan2(g[:, 0], g[:, 2]), torch.asin(g[:, 1].clamp(-1, 1))], 1))


# ------------------------------------------------------------------------------------------------------ the stage


@dataclass(frozen=True)
class MovementOptions:
    # Faces per forward pass of the mesh and blendshapes (the mesh splits its first layers further, see FaceMesh);
    # 16 and 64 cost about the same per face on the CPU (benchmarks/bench_movement.py); raise it on a GPU.
    batch_size: int = 16
    # Run the mesh channels-last (NHWC), which oneDNN's CPU depthwise convolutions prefer.
    channels_last: bool = True


@dataclass(frozen=True)
class MovementOut:
    """Per face (n rows), as float32 numpy arrays."""

    blendshapes: np.ndarray  # (n, 52) in [0, 1], BLENDSHAPE_NAMES order (index 0 = _neutral)
    pose: np.ndarray  # (n, 3) yaw, pitch, roll in degrees (POSE_NAMES)
    gaze: np.ndarray  # (n, 2) gaze yaw, pitch in degrees (GAZE_NAMES)
    presence: np.ndarray  # (n,) the mesh's face-presence probability
    mesh: np.ndarray  # (n, 478, 3) points in image pixels (x, y; z relative depth scaled like x)


class Movement:
    """MediaPipe face mesh + blendshapes + head pose + gaze on batches of 192x192 crops, on one torch device.

        mv = Movement("cpu")
        m = align.roi_from_points(landmarks5)             # (n, 2, 3) image -> crop
        out = mv(align.crop_faces(frames, m), align.invert_affine(m))
    """

    def __init__(self, device: str | torch.device = "cpu", options: MovementOptions | None = None) -> None:
        self.device = torch.device(device)
        self.options = options or MovementOptions()
        self.mesh = load_face_mesh().to(self.device)
        if self.options.channels_last:
            self.mesh = self.mesh.to(memory_format=torch.channels_last)
        self.blendshapes = load_blendshapes().to(self.device)
        canonical, weights = load_geometry()
        self.canonical, self.weights = canonical.to(self.device), weights.to(self.device)
        self._index = torch.as_tensor(BLENDSHAPE_LANDMARKS, device=self.device)

    @torch.inference_mode()
    def __call__(self, crops: torch.Tensor, crop_to_image) -> MovementOut:
        """crops (n, 3, 192, 192) uint8 RGB (any device) and (n, 2, 3) crop -> image affines -> MovementOut."""
        if crops.ndim != 4 or tuple(crops.shape[1:]) != (3, MESH_CROP_SIZE, MESH_CROP_SIZE):
            raise ValueError(f"Movement expects (n, 3, {MESH_CROP_SIZE}, {MESH_CROP_SIZE}) crops, got {tuple(crops.shape)}")
        affine = torch.as_tensor(np.asarray(crop_to_image, np.float32), device=self.device).reshape(-1, 2, 3)
        if len(affine) != len(crops):
            raise ValueError(f"{len(crops)} crops but {len(affine)} crop -> image affines")
        meshes, logits, blends = [], [], []
        for s in range(0, len(crops), self.options.batch_size):
            x = crops[s:s + self.options.batch_size].to(self.device, non_blocking=True).float().div_(255)
            if self.options.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            landmarks, logit = self.mesh(x)
            meshes.append(mesh_to_image(landmarks, affine[s:s + len(x)]))
            logits.append(logit)
            blends.append(self.blendshapes(meshes[-1][:, self._index, :2]))
        if not meshes:
            empty = torch.zeros(0, device=self.device)
            meshes, logits, blends = [empty.view(0, N_LANDMARKS, 3)], [empty], [empty.view(0, len(BLENDSHAPE_NAMES))]
        mesh, blend = torch.cat(meshes), torch.cat(blends)
        camera = _to_camera(mesh)
        rot, scale, t = procrustes(camera[:, :N_FACE], self.canonical, self.weights)
        pose = euler_degrees(rot)
        gaze = gaze_degrees(camera, rot, scale, t)
        out = (blend, pose, gaze, torch.sigmoid(torch.cat(logits)), mesh)
        return MovementOut(*(v.float().cpu().numpy() for v in out))
