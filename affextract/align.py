"""Alignment: each face warped onto the ArcFace 5-point template (similarity transform), the MMA's input;
`warp_affine`, the one warp of every model's crops (also the face mesh's, `movement.crop_faces`).

The transform is insightface's `face_align.estimate_norm` (a least-squares similarity by Umeyama's method, without
reflection, onto the same template), computed here so that the default path does not need insightface; a test proves
the two agree to float64 rounding."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
    return warp_faces(frames, landmarks, size, device).float() / 127.5 - 1.0


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
