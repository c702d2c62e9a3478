"""Label-preserving symmetry augmentation for full-view grid worlds (BabyAI/MiniGrid frames).

Rotating the whole rendered room by 90 degrees rotates the agent's triangle with it, so "turn left",
"turn right", "forward", "pickup", ... still name the same move: the label is unchanged. Mirroring the
room turns every left turn into a right turn, so a mirrored frame takes the swapped label. Together the
8 symmetries of the square give 8 views of every transition; cloning from a few thousand bot episodes
needs them.
"""

from __future__ import annotations

import torch


def grid_symmetry(images: torch.Tensor, labels: torch.Tensor, left: int, right: int,
                  generator: torch.Generator | None = None, cells: torch.Tensor | None = None, grid: int = 8):
    """``images`` [B, H, W, C] (square), ``labels`` [B] -> (images, labels, cells), one random symmetry per row.

    ``left``/``right``: the action ids a mirror swaps. ``cells`` (optional) int [B, K] flat indices into the
    ``grid`` x ``grid`` cell grid (-1: unknown) move with the frame. Draws are made for every row, so a
    fixed ``generator`` seed gives the same views.
    """
    b = images.shape[0]
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"grid_symmetry needs square frames, got {tuple(images.shape)}")
    turns = torch.randint(0, 4, (b,), generator=generator)  # [B] quarter turns
    mirror = torch.rand(b, generator=generator) < 0.5  # [B]
    out = torch.where(mirror[:, None, None, None], images.flip(2), images)  # [B, H, W, C]: left-right mirror
    swapped = torch.where(labels == left, right, torch.where(labels == right, left, labels))
    labels = torch.where(mirror, swapped, labels)
    # One rot90 per distinct turn count (4 at most) instead of one per row.
    rotated = out.clone()
    for k in range(1, 4):
        rows = turns == k
        if rows.any():
            rotated[rows] = torch.rot90(out[rows], k, dims=(1, 2))  # [n, H, W, C]
    if cells is not None:
        cells = _move_cells(cells, mirror, turns, grid)
    return rotated, labels, cells


def _move_cells(cells: torch.Tensor, mirror: torch.Tensor, turns: torch.Tensor, grid: int) -> torch.Tensor:
    """Cell indices [B, K] under the same mirror-then-rotate as the frames (-1 stays -1)."""
    r, c = cells // grid, cells % grid  # [B, K]
    c = torch.where(mirror[:, None], grid - 1 - c, c)
    for k in range(1, 4):
        # one quarter turn of torch.rot90 (dims H, W) sends cell (r, c) to (grid - 1 - c, r)
        rows = (turns >= k)[:, None]
        r, c = torch.where(rows, grid - 1 - c, r), torch.where(rows, r, c)
    return torch.where(cells >= 0, r * grid + c, cells)
