"""Read a BabyAI frame back as a grid of named tiles, by comparing each tile with the game's own
renderings (minigrid's ``Grid.render_tile``): floor, wall, the agent facing each way, and every
object type in every colour. Used to check generated levels against what their prompt names.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

OBJECT_TYPES = ("ball", "box", "key")
AGENT_PREFIX = "agent"
UNKNOWN = "?"
# A tile further than this (mean absolute difference, 0-255) from every rendering is unknown.
MAX_TILE_MAD = 24.0


@lru_cache(maxsize=4)
def reference_tiles(tile: int = 8) -> tuple[tuple[str, ...], np.ndarray]:
    """(names, renderings [K, tile, tile, 3] uint8) of every tile a BabyAI room shows."""
    from minigrid.core.constants import COLOR_NAMES
    from minigrid.core.grid import Grid
    from minigrid.core.world_object import Ball, Box, Door, Key, Wall

    names, tiles = ["floor", "wall"], [Grid.render_tile(None, None, False, tile), Grid.render_tile(Wall(), None, False, tile)]
    for d in range(4):
        names.append(f"{AGENT_PREFIX}_{d}")
        tiles.append(Grid.render_tile(None, d, False, tile))
    for colour in COLOR_NAMES:
        for kind, cls in zip(OBJECT_TYPES, (Ball, Box, Key)):
            names.append(f"{colour} {kind}")
            tiles.append(Grid.render_tile(cls(colour), None, False, tile))
        for state, kwargs in (("open", dict(is_open=True)), ("closed", {}), ("locked", dict(is_locked=True))):
            names.append(f"{colour} door {state}")
            tiles.append(Grid.render_tile(Door(colour, **kwargs), None, False, tile))
    return tuple(names), np.stack(tiles).astype(np.uint8)


def classify_tiles(frames: np.ndarray, tile: int = 8) -> np.ndarray:
    """frames [N, S, S, 3] uint8 -> tile names [N, S/tile, S/tile] (``UNKNOWN`` when none is close)."""
    names, refs = reference_tiles(tile)
    n, s = frames.shape[:2]
    g = s // tile
    cells = frames.reshape(n, g, tile, g, tile, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, -1).astype(np.int16)
    flat = refs.reshape(len(refs), -1).astype(np.int16)
    mad = np.abs(cells[:, :, None, :] - flat[None, None]).mean(-1)  # [N, G*G, K]
    best = mad.argmin(-1)
    out = np.asarray(names, dtype=object)[best]
    out[mad.min(-1) > MAX_TILE_MAD] = UNKNOWN
    return out.reshape(n, g, g)


_OBJECT = re.compile(r"\b(?:the|a)\s+(?:(\w+)\s+)?(ball|box|key|door)\b")


def prompt_object(prompt: str) -> tuple[str | None, str] | None:
    """'go to the red ball' -> ('red', 'ball'); 'go to a key' -> (None, 'key'); None if no object is named."""
    m = _OBJECT.search(prompt.lower())
    if not m:
        return None
    colour, kind = m.group(1), m.group(2)
    return (colour if colour not in (None, "the", "a") else None), kind


def level_contents(frames: np.ndarray, prompt: str, tile: int = 8) -> dict[str, np.ndarray]:
    """Per frame: ``has_object`` (a tile shows what ``prompt`` names), ``named_objects`` (how many tiles
    do), ``one_agent`` (exactly one agent tile), ``unknown_tiles`` (tiles like no rendering)."""
    grid = classify_tiles(frames, tile).reshape(len(frames), -1)
    agents = np.char.startswith(grid.astype(str), AGENT_PREFIX).sum(1)
    want = prompt_object(prompt)
    if want is None:
        named = np.ones(len(frames), int)
    else:
        colour, kind = want
        named = np.array([sum(t.split(" ")[1:2] == [kind] and (colour is None or t.startswith(colour + " "))
                              for t in row if " " in t) for row in grid])
    return {"has_object": named > 0, "named_objects": named, "one_agent": agents == 1,
            "unknown_tiles": (grid == UNKNOWN).sum(1)}
