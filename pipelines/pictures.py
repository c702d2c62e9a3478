"""Pictures users look at: level grids (PNG) and rollout animations (GIF), written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .atomic_io import write_file_atomic


def frame_grid(frames: np.ndarray, cols: int | None = None, scale: int = 2, pad: int = 2) -> np.ndarray:
    """uint8 frames [N, H, W, 3] -> one uint8 image, ``cols`` per row, each frame scaled by ``scale``."""
    frames = np.asarray(frames)
    n, h, w, _ = frames.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    hs, ws = h * scale, w * scale
    out = np.full((rows * (hs + pad) + pad, cols * (ws + pad) + pad, 3), 40, np.uint8)
    big = frames.repeat(scale, 1).repeat(scale, 2)  # [N, H*scale, W*scale, 3]
    for i in range(n):
        r, c = divmod(i, cols)
        out[pad + r * (hs + pad):pad + r * (hs + pad) + hs, pad + c * (ws + pad):pad + c * (ws + pad) + ws] = big[i]
    return out


def save_png(path, image: np.ndarray) -> Path:
    path = Path(path)
    write_file_atomic(path, lambda p: Image.fromarray(image).save(p, format="PNG"))
    return path


def save_gif(path, frames: list[np.ndarray], fps: int = 4) -> Path:
    """frames: a list of uint8 images [H, W, 3], one per animation step."""
    path = Path(path)
    images = [Image.fromarray(f) for f in frames]
    write_file_atomic(path, lambda p: images[0].save(p, format="GIF", save_all=True, append_images=images[1:],
                                                     duration=int(1000 / fps), loop=0))
    return path
