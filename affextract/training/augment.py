"""Training-time augmentation: scale, shift, rotation, flip, then lighting, blur, noise and erasing, as one batched
affine resampling on the training device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from affextract.model import resample


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
