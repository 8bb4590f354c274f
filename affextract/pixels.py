"""Pixel conventions shared by alignment, the model and training: the network sees RGB in [-1, 1], and the
grayscale variants weigh R, G, B by luma."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# ITU-R BT.601 luma weights of R, G, B (the ones OpenCV's RGB2GRAY uses).
LUMA = (0.299, 0.587, 0.114)


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (or integer-valued) pixels 0..255, any shape -> float32 in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def to_pixels(z: torch.Tensor) -> torch.Tensor:
    """[-1, 1] values -> 0..255 floats (not rounded or clipped): the inverse of to_unit."""
    return (z + 1.0) * 127.5
