"""Where the agent is and which way it faces, read off consecutive grid frames (no game state needed).

In a full-view grid video only the agent's own cells change on a turn or a step: a turn redraws one cell
(the agent's); a step forward swaps two (the agent's tile moves onto the floor cell ahead). So the agent's
cell is known for every changed transition, and a step also names its direction (the cell it entered).
These are the targets of the egocentric policy's agent/direction detectors (vision_arch "tile_ego").
"""

from __future__ import annotations

import numpy as np

from sima_policy.tile_film import DIRECTION_STEPS  # the order of the direction detector's classes

__all__ = ["DIRECTION_STEPS", "agent_cells", "direction_of"]


def _tiles(frames: np.ndarray, tile: int) -> np.ndarray:
    n, h, w, c = frames.shape
    g = h // tile
    x = frames.reshape(n, g, tile, w // tile, tile, c).transpose(0, 1, 3, 2, 4, 5)  # [N, G, G, t, t, C]
    return x.reshape(n, g * (w // tile), -1)  # [N, cells, t*t*C]


def agent_cells(now: np.ndarray, nxt: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """frames t and t+1 [N, H, W, 3] -> (agent cell [N], entered cell [N]) as flat cell indices, -1 unknown.

    One changed cell: it is the agent's (a turn). Two cells that swapped contents: a step; the agent's cell
    is the one whose tile is unique in frame t (the other holds floor, repeated all over the room).
    """
    t0, t1 = _tiles(now, tile), _tiles(nxt, tile)  # [N, cells, D]
    changed = (t0 != t1).any(2)  # [N, cells]
    agent, entered = np.full(len(now), -1, np.int64), np.full(len(now), -1, np.int64)
    for i in np.flatnonzero(changed.sum(1) <= 2):
        cells = np.flatnonzero(changed[i])
        if len(cells) == 1:
            agent[i] = cells[0]
        elif len(cells) == 2:
            x, y = cells
            if not ((t0[i, x] == t1[i, y]).all() and (t0[i, y] == t1[i, x]).all()):
                continue
            copies_x, copies_y = ((t0[i] == t0[i, x]).all(1).sum(), (t0[i] == t0[i, y]).all(1).sum())
            if copies_x != copies_y:
                agent[i], entered[i] = (x, y) if copies_x < copies_y else (y, x)
    return agent, entered


def direction_of(agent, entered, grid: int):
    """Direction index (``DIRECTION_STEPS``) of a step from cell ``agent`` into cell ``entered`` (numpy
    arrays or torch tensors of flat cell indices)."""
    dr, dc = entered // grid - agent // grid, entered % grid - agent % grid
    index = 0 * dr
    for d, (step_r, step_c) in enumerate(DIRECTION_STEPS):
        index = index + d * ((dr == step_r) & (dc == step_c))
    return index
