"""Frame resizing shared by the games (PIL's BOX filter: deterministic area averaging)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [size, size, 3] uint8; a no-op when already that size."""
    if frame.shape[0] == size and frame.shape[1] == size:
        return np.ascontiguousarray(frame, dtype=np.uint8)
    img = Image.fromarray(frame).resize((size, size), resample=Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)
