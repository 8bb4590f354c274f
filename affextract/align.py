"""Alignment: each face warped onto insightface's ArcFace 5-point template (similarity transform), the MMA's input;
`warp_affine`, the one warp of every model's crops (also the face mesh's, `movement.crop_faces`)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from affextract.runtime import gpu_paths


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
