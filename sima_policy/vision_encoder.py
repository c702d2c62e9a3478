"""Small CNN over 64x64 RGB frames -> one embedding per frame.

No BatchNorm on purpose: every frame is encoded on its own, so padded or masked rows of a batch can
never change the embedding of another row (the loss masks rely on this), and train/eval behave the same.
"""

from __future__ import annotations

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """``images``: [B, H, W, 3] pixel values in [0, 255] (uint8 or float) -> [B, out_dim]."""

    def __init__(self, out_dim: int = 128, channels: tuple[int, ...] = (32, 64, 64), image_size: int = 64):
        super().__init__()
        layers, c_in, size = [], 3, image_size
        for c_out in channels:
            # k4 s2 p1 halves the side exactly: 64 -> 32 -> 16 -> 8
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.GroupNorm(1, c_out), nn.SiLU()]
            c_in, size = c_out, size // 2
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * size * size, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.image_size = image_size
        self.out_dim = out_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-3:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"VisionEncoder expects [B, {self.image_size}, {self.image_size}, 3] frames, "
                             f"got {tuple(images.shape)}")
        lead = images.shape[:-3]
        x = images.reshape(-1, *images.shape[-3:]).float()  # [N, H, W, 3]
        x = x.permute(0, 3, 1, 2) / 127.5 - 1.0  # [N, 3, H, W] in [-1, 1]
        x = self.conv(x).flatten(1)  # [N, C * h * w]
        return self.norm(self.fc(x)).reshape(*lead, self.out_dim)  # [B, D]
