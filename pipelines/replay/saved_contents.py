"""Read the transitions a replay checkpoint holds, straight from its ``shard_KK.npz`` files (no actors).

For inspection and tests: ``saved_transitions(directory)`` returns every stored transition (rows whose
priority leaf is > 0; final-observation rows are not transitions) of every shard, as one dict of columns
ordered by (episode_id, step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoint import load_arrays
from .schema import STORED_FIELDS


def saved_transitions(directory) -> dict[str, np.ndarray]:
    files = sorted(Path(directory).glob("shard_*.npz"))
    if not files:
        raise FileNotFoundError(f"replay checkpoint {directory}: no shard_*.npz files")
    parts = []
    for path in files:
        arrays = load_arrays(path)
        held = arrays["leaves"] > 0  # [C]: True where the row is a transition
        parts.append({f: arrays[f"col_{f}"][held] for f in STORED_FIELDS})
    out = {f: np.concatenate([p[f] for p in parts]) for f in STORED_FIELDS}
    order = np.lexsort((out["step"], out["episode_id"]))
    return {f: v[order] for f, v in out.items()}
