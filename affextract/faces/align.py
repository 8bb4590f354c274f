"""The crops every model sees, all cut by `warp_affine`: each face warped onto the ArcFace 5-point template
(similarity transform), the MMA's input (`warp_faces`, `align_faces`); and MediaPipe's face crop, the face mesh's
input (`roi_from_points`, `crop_faces`), with the affines that take the mesh's points back to the image
(`invert_affine`, `mesh_to_image`) and MediaPipe's own next-frame crop (`roi_from_mesh`).

The transform is insightface's `face_align.estimate_norm` (a least-squares similarity by Umeyama's method, without
reflection, onto the same template), computed here so that the default path does not need insightface; a test proves
the two agree to float64 rounding."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from affextract.pixels import to_unit
from affextract.runtime import gpu_paths

# insightface's `arcface_dst`: where the eyes, nose tip and mouth corners of a 112x112 ArcFace crop lie (x, y). Kept
# in float32 as insightface keeps it: its mean then rounds as insightface's does, and the crops come out identical to
# the last grey level (cv2's fixed-point warp turns a 1e-6 pixel shift into a changed pixel now and then).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], np.float32)


def arcface_template(size: int = 112) -> np.ndarray:
    """(5, 2) template for a size x size crop (size a multiple of 112, or of 128 with insightface's 8 px shift)."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * np.float32(size / 112.0)
    if size % 128 == 0:
        dst = ARCFACE_TEMPLATE * np.float32(size / 128.0)
        dst[:, 0] += np.float32(8.0 * size / 128.0)
        return dst
    raise ValueError(f"ArcFace crops are a multiple of 112 or 128 pixels wide, not {size}")


def similarity_matrices(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(N, P, 2) point sets -> (N, 2, 3) float64 least-squares similarity transforms (rotation, one scale,
    translation; never a reflection) mapping each set onto `dst` (P, 2): Umeyama (1991), as skimage's
    SimilarityTransform.estimate. A set whose points all coincide has no such transform: NaN."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst)  # (its own precision: the float32 template's mean is rounded as in insightface)
    n, p = src.shape[:2]
    src_mean, dst_mean = src.mean(1), dst.mean(0)  # (N, 2), (2,)
    src_c, dst_c = src - src_mean[:, None], dst - dst_mean
    cov = np.einsum("pi,npj->nij", dst_c, src_c) / p  # (N, 2, 2) = dst_c.T @ src_c / P
    u, sv, vt = np.linalg.svd(cov)
    rank = (sv > sv[:, :1] * max(cov.shape[1:]) * np.finfo(np.float64).eps).sum(1)
    # The last singular direction is flipped where the best orthogonal fit would be a reflection; for rank 1 (all
    # points on a line) the sign of U·Vᵀ decides it, as in Umeyama's paper.
    flip = np.where(rank == 1, np.linalg.det(u) * np.linalg.det(vt) < 0, np.linalg.det(cov) < 0)
    d = np.ones((n, 2))
    d[:, 1] = np.where(flip, -1.0, 1.0)
    rot = u @ (d[:, :, None] * vt)  # U diag(d) Vᵀ
    # (rank 1: the second singular value is 0, so its sign does not change the scale)
    scale = (sv * d).sum(1) / src_c.var(1).sum(1)
    out = np.empty((n, 2, 3))
    out[:, :, :2] = scale[:, None, None] * rot
    out[:, :, 2] = dst_mean - np.einsum("nij,nj->ni", out[:, :, :2], src_mean)
    out[rank == 0] = np.nan
    return out


def alignment_matrices(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """(N, 5, 2) landmarks -> (N, 2, 3) float64 similarity transforms image -> crop onto the ArcFace template
    (what insightface.utils.face_align.estimate_norm gives). Rows with non-finite landmarks are NaN."""
    landmarks = np.asarray(landmarks, np.float64).reshape(-1, 5, 2)
    out = np.full((len(landmarks), 2, 3), np.nan)
    ok = np.isfinite(landmarks).all((1, 2))
    if ok.any():
        with np.errstate(invalid="ignore", divide="ignore"):  # coinciding points give NaN, as documented
            out[ok] = similarity_matrices(landmarks[ok], arcface_template(size))
    return out


def align_faces(frames, landmarks, size: int = 112, device: str | torch.device = "cpu") -> torch.Tensor:
    """Frames (N, H, W, 3) uint8 RGB (numpy or torch), landmarks (N, 5, 2) -> (N, 3, size, size) float32 RGB in
    [-1, 1], each face warped onto the ArcFace 5-point template. Rows with non-finite landmarks (no face) come back
    black (all -1)."""
    return to_unit(warp_faces(frames, landmarks, size, device))


def warp_faces(frames, landmarks, size: int = 112, device: str | torch.device = "cpu", method: str = "auto"
               ) -> torch.Tensor:
    """As align_faces, but (N, 3, size, size) uint8 on ``device``: the aligned crops as insightface's ``norm_crop``
    makes them (``warp_affine`` with the ArcFace template's transforms)."""
    matrices = alignment_matrices(landmarks, size)
    if len(matrices) != len(frames):
        raise ValueError(f"align_faces needs one landmark set per frame: {len(frames)} frames, {len(matrices)} "
                         "landmark sets")
    return warp_affine(frames, matrices, size, device, method)


def warp_affine(frames, matrices: np.ndarray, size: int, device: str | torch.device = "cpu", method: str = "auto"
                ) -> torch.Tensor:
    """Frames (N, H, W, 3) uint8 RGB (numpy or torch) and (N, 2, 3) affines image -> crop pixels -> (N, 3, size,
    size) uint8 crops on ``device``, bilinear, black beyond the frame; rows with non-finite affines are black. The one
    warp of the crops every model sees (the MMA's aligned faces, the face mesh's crops).

    ``method="cv2"`` (the default on the CPU): one cv2.warpAffine per face, which is what insightface's ``norm_crop``
    and MediaPipe's CPU ImageToTensor do, and much cheaper there than converting frames to float. ``"grid"`` (the
    default on GPUs, and wherever ``runtime.gpu_paths`` says so): all faces in one batched bilinear warp
    (affine_grid + grid_sample, zero border) on the device, within one grey level of cv2.
    """
    if method not in ("auto", "cv2", "grid"):
        raise ValueError(f"unknown warp method {method!r}; known: auto, cv2, grid")
    device = torch.device(device)
    images = torch.as_tensor(frames)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"frames must be (N, H, W, 3) RGB, got shape {tuple(images.shape)}")
    n, h, w, _ = images.shape
    matrices = np.asarray(matrices, np.float64).reshape(-1, 2, 3)
    if len(matrices) != n:
        raise ValueError(f"one affine per frame needed: {n} frames, {len(matrices)} affines")
    if n == 0:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8, device=device)
    ok = np.isfinite(matrices).all((1, 2))
    if method == "cv2" or (method == "auto" and not gpu_paths(device)):
        import cv2

        images = images.cpu().numpy()
        out = np.zeros((n, size, size, 3), np.uint8)
        for i in np.flatnonzero(ok):
            out[i] = cv2.warpAffine(images[i], matrices[i], (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
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


# -- MediaPipe's face crop (the face mesh's input) ----------------------------------------------------------------

MESH_CROP_SIZE = 192  # side of the face mesh input

# MediaPipe's face crop (face_landmarks_detector_graph.cc, used on every tracked frame): the bounding box of the 478
# points, rotated so that the line from point 33 to point 263 (the outer eye corners, image-left one first) is
# horizontal, its long side times 1.5 as the side of a square.
ROI_SCALE = 1.5
ROI_EYES = (33, 263)

# Where the 5 points of MTCNN (LANDMARK_NAMES order: image-left eye, image-right eye, nose, image-left and image-right
# mouth corner) fall in MediaPipe's crop (192x192 pixels), on average: measured with tools/fit_mediapipe_crop.py by
# running the mesh to its own crop's fixed point on 202 faces of 5 real clips. ``roi_from_points`` places this
# template; its crop lands within 2.4% (median; 95%: 5.4%) of the side from MediaPipe's, with a side within 5-10%.
POINTS_TEMPLATE = np.array([[72.03, 72.19], [119.97, 72.19], [96.0, 96.36], [74.63, 121.07], [117.37, 121.07]])


def roi_matrices(center: np.ndarray, side: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotated squares (N, 2) centres, (N,) sides in image pixels, (N,) angles in radians (of the square's x axis,
    clockwise on screen) -> (N, 2, 3) float64 affines image -> 192x192 crop, as MediaPipe's ImageToTensor cuts them
    (the square's corners go to the crop's corners)."""
    center, side, angle = np.asarray(center, np.float64), np.asarray(side, np.float64), np.asarray(angle, np.float64)
    k = MESH_CROP_SIZE / side
    c, s = np.cos(angle) * k, np.sin(angle) * k
    out = np.empty((len(side), 2, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1] = c, s, -s, c
    out[:, :, 2] = MESH_CROP_SIZE / 2 - np.einsum("nij,nj->ni", out[:, :, :2], center)
    return out


def invert_affine(m: np.ndarray) -> np.ndarray:
    """(N, 2, 3) affines -> their inverses (N, 2, 3)."""
    m = np.asarray(m, np.float64)
    lin = np.linalg.inv(m[:, :, :2])
    return np.concatenate([lin, -np.einsum("nij,nj->ni", lin, m[:, :, 2])[:, :, None]], 2)


def roi_from_mesh(mesh: np.ndarray) -> np.ndarray:
    """(N, 478, >=2) mesh points in image pixels -> (N, 2, 3) image -> crop affines: MediaPipe's crop for the next
    frame (its landmarks-to-ROI rule), hence also the crop the mesh was trained on."""
    xy = np.asarray(mesh, np.float64)[:, :, :2]
    lo, hi = xy.min(1), xy.max(1)
    d = xy[:, ROI_EYES[1]] - xy[:, ROI_EYES[0]]
    # The side comes from the box in image axes, before rotation, as MediaPipe computes it.
    return roi_matrices((lo + hi) / 2, ROI_SCALE * (hi - lo).max(1), np.arctan2(d[:, 1], d[:, 0]))


def roi_from_points(points: np.ndarray) -> np.ndarray:
    """(N, 5, 2) detector points (MTCNN order, image pixels) -> (N, 2, 3) image -> crop affines approximating
    MediaPipe's crop: eyes level (the angle of the eye line), scale and position by least squares of
    ``POINTS_TEMPLATE`` onto the points at that angle. Rows with non-finite points are NaN."""
    p = np.asarray(points, np.float64).reshape(-1, 5, 2)
    d = p[:, 1] - p[:, 0]
    angle = np.arctan2(d[:, 1], d[:, 0])
    t = POINTS_TEMPLATE - POINTS_TEMPLATE.mean(0)  # (5, 2) crop pixels, centred
    c, s = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], 1)  # (N, 2, 2) crop axes -> image axes
    rt = np.einsum("nij,kj->nki", rot, t)  # template rotated into the image, (N, 5, 2)
    pc = p - p.mean(1, keepdims=True)
    scale = (rt * pc).sum((1, 2)) / (t ** 2).sum()  # image pixels per crop pixel
    # Crop centre (96, 96) in the image: the points' mean minus the rotated, scaled template mean offset.
    offset = np.einsum("nij,j->ni", rot, POINTS_TEMPLATE.mean(0) - MESH_CROP_SIZE / 2)
    center = p.mean(1) - scale[:, None] * offset
    return roi_matrices(center, scale * MESH_CROP_SIZE, angle)


def crop_faces(frames, image_to_crop: np.ndarray, device: str | torch.device = "cpu", method: str = "auto"
               ) -> torch.Tensor:
    """Frames (N, H, W, 3) uint8 RGB (numpy or torch) and (N, 2, 3) image -> crop affines -> (N, 3, 192, 192) uint8
    on ``device``; rows with non-finite affines are black. ``warp_affine``, the warp of the MMA's faces too:
    bilinear, black outside the frame, as MediaPipe's CPU ImageToTensor (``method`` as there)."""
    return warp_affine(frames, image_to_crop, MESH_CROP_SIZE, device, method)


def mesh_to_image(mesh: torch.Tensor, crop_to_image: torch.Tensor) -> torch.Tensor:
    """(B, 478, 3) crop pixels and (B, 2, 3) crop -> image affines -> (B, 478, 3) image pixels; z scaled like x."""
    xy = mesh[..., :2] @ crop_to_image[:, :, :2].transpose(1, 2) + crop_to_image[:, None, :, 2]
    scale = crop_to_image[:, :, :2].det().abs().sqrt()[:, None, None]
    return torch.cat([xy, mesh[..., 2:] * scale], -1)
