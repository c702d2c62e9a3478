"""Real actions <-> latent actions, fitted from a few hundred labelled transitions.

A count table C[real, latent] over transitions where the frame changed. latent -> real is the
most frequent real action per latent (how an agent's latent choice becomes a key press); real -> latent
the most frequent latent per real action (how keys drive the world model). Real actions that never
changed the frame map to the latent the LAM gives unchanged transitions (a no-op).
"""

from __future__ import annotations

import numpy as np


class ActionAdapter:
    def __init__(self, num_real: int, num_latent: int, counts: np.ndarray | None = None, noop_latent: int = 0,
                 real_names: list[str] | None = None):
        self.num_real, self.num_latent = num_real, num_latent
        self.counts = np.zeros((num_real, num_latent), np.int64) if counts is None else np.asarray(counts, np.int64)
        self.noop_latent = int(noop_latent)
        self.real_names = list(real_names) if real_names else [str(i) for i in range(num_real)]

    @classmethod
    def fit(cls, real: np.ndarray, latent: np.ndarray, changed: np.ndarray, num_real: int, num_latent: int,
            max_transitions: int = 200, real_names=None) -> "ActionAdapter":
        real, latent, changed = np.asarray(real), np.asarray(latent), np.asarray(changed, bool)
        real, latent, changed = real[:max_transitions], latent[:max_transitions], changed[:max_transitions]
        counts = np.zeros((num_real, num_latent), np.int64)
        np.add.at(counts, (real[changed], latent[changed]), 1)
        still = latent[~changed]
        noop = int(np.bincount(still, minlength=num_latent).argmax()) if still.size else 0
        return cls(num_real, num_latent, counts, noop, real_names)

    @property
    def num_labelled(self) -> int:
        return int(self.counts.sum())

    def latent_to_real(self, latent: np.ndarray) -> np.ndarray:
        table = self.counts.argmax(0)  # [num_latent]
        unseen = self.counts.sum(0) == 0
        table[unseen] = int(self.counts.sum(1).argmax()) if self.counts.any() else 0
        return table[np.asarray(latent)]

    def real_to_latent(self, real: np.ndarray) -> np.ndarray:
        table = self.counts.argmax(1)  # [num_real]
        table[self.counts.sum(1) == 0] = self.noop_latent
        return table[np.asarray(real)]

    def accuracy(self, real: np.ndarray, latent: np.ndarray, changed: np.ndarray) -> float:
        changed = np.asarray(changed, bool)
        if not changed.any():
            return float("nan")
        return float((self.latent_to_real(np.asarray(latent)[changed]) == np.asarray(real)[changed]).mean())

    def to_json(self) -> dict:
        return {"num_real": self.num_real, "num_latent": self.num_latent, "counts": self.counts.tolist(),
                "noop_latent": self.noop_latent, "real_names": self.real_names}

    @classmethod
    def from_json(cls, d: dict) -> "ActionAdapter":
        return cls(d["num_real"], d["num_latent"], np.array(d["counts"]), d["noop_latent"], d.get("real_names"))
