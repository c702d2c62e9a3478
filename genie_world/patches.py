"""Frames <-> patch sequences."""

from __future__ import annotations

import torch


def to_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float in [0, 1]."""
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoded pixels in about [0, 1] -> uint8 [..., H, W, 3] (the inverse of ``to_float``)."""
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def patchify(frames: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, T, H, W, C] -> [B, T, P, patch*patch*C] with P = (H/patch)*(W/patch), row-major."""
    b, t, h, w, c = frames.shape
    if h % patch or w % patch:
        raise ValueError(f"frame size {h}x{w} is not divisible by patch size {patch}")
    x = frames.reshape(b, t, h // patch, patch, w // patch, patch, c)
    x = x.permute(0, 1, 2, 4, 3, 5, 6)  # [B, T, h', w', patch, patch, C]
    return x.reshape(b, t, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: torch.Tensor, patch: int, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """[B, T, P, patch*patch*C] -> [B, T, H, W, C]."""
    b, t, p, _ = x.shape
    hp, wp = height // patch, width // patch
    x = x.reshape(b, t, hp, wp, patch, patch, channels).permute(0, 1, 2, 4, 3, 5, 6)  # [B, T, h', patch, w', patch, C]
    return x.reshape(b, t, height, width, channels)
