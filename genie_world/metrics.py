"""Image quality metrics that need no pretrained network: PSNR and SSIM (frames in [0, 1])."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB over [..., H, W, C]; identical frames are capped at 100 dB."""
    mse = ((pred.float().clamp(0, 1) - target.float()) ** 2).flatten(-3).mean(-1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM (Wang et al. 2004; 11x11 Gaussian, sigma 1.5, valid windows) over [..., H, W, C]."""
    lead = pred.shape[:-3]
    h, w, c = pred.shape[-3:]
    x = pred.float().clamp(0, 1).reshape(-1, h, w, c).permute(0, 3, 1, 2)  # [N, C, H, W]
    y = target.float().reshape(-1, h, w, c).permute(0, 3, 1, 2)
    win = _gaussian_window().to(x.device).expand(c, 1, 11, 11)
    blur = lambda z: F.conv2d(z, win, groups=c)  # noqa: E731  (valid windows only, as the reference)
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3)).reshape(lead)
