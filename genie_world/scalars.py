"""Tensor -> Python float for logging, without autograd warnings."""

import torch


def item(x) -> float:
    return float(x.detach().item()) if isinstance(x, torch.Tensor) else float(x)
