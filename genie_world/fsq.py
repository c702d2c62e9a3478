"""Finite Scalar Quantization (Mentzer et al. 2023): round each channel to a few levels.

No codebook to collapse or re-seed: the code set is the grid prod(levels). Rounding uses a
straight-through estimator so gradients reach the encoder.
"""

from __future__ import annotations

import torch
from torch import nn


def parse_levels(levels) -> tuple[int, ...]:
    if isinstance(levels, str):
        levels = [int(x) for x in levels.split(",") if x.strip()]
    levels = tuple(int(x) for x in levels)
    if not levels or any(l < 2 for l in levels):
        raise ValueError(f"FSQ levels {levels!r}: expected a comma-separated list of integers >= 2")
    return levels


class FSQ(nn.Module):
    def __init__(self, levels):
        super().__init__()
        levels = parse_levels(levels)
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = int(torch.tensor(levels).prod().item())
        lv = torch.tensor(levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor((1,) + levels[:-1], dtype=torch.long), dim=0)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_half_width", torch.div(lv, 2, rounding_mode="floor"), persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash to (-L/2, L/2) with the half-step offset even level counts need."""
        eps = 1e-3
        half_l = (self._levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [..., dim] -> (codes in [-1, 1] [..., dim], indices [...])."""
        bounded = self.bound(z.float())
        rounded = bounded + (bounded.round() - bounded).detach()  # straight-through
        codes = rounded / self._half_width
        return codes.to(z.dtype), self.codes_to_indices(codes.detach())

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        digits = (codes.float() * self._half_width + self._half_width).round().long()  # [..., dim] in [0, L)
        return (digits * self._basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = torch.div(indices.long().unsqueeze(-1), self._basis, rounding_mode="floor") % self._levels.long()
        return (digits.float() - self._half_width) / self._half_width

    @torch.no_grad()
    def usage(self, indices: torch.Tensor) -> dict:
        """Fraction of the codebook used in a batch and the perplexity of code frequencies."""
        counts = torch.bincount(indices.flatten(), minlength=self.codebook_size).float()
        p = counts / counts.sum().clamp(min=1)
        perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
        return {"codebook_used": float((counts > 0).float().mean()), "codebook_perplexity": float(perplexity)}
