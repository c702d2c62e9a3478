"""Per-episode high-water marks: the last step of each recent episode this buffer has stored.

This is what makes ``add`` idempotent. A writer that is not sure its add landed (the shard died, the
call timed out, the shard was restored from a checkpoint) simply sends the same chunk again: steps
at or below the episode's mark are dropped as duplicates, newer steps land. Together with
"one episode -> one shard" routing, at-least-once delivery becomes exactly-once storage.

Writers send an episode's chunks in step order (env runners do; one client's calls to one actor run
in submission order, and the client resends a failed call before waiting on later ones), so
"step <= mark" really means "already stored". Gaps are allowed (a new run starts).

Bounded: the least recently written episodes are forgotten past ``max_episodes`` (a retry only ever
concerns the last few chunks, so the bound only has to cover the episodes written meanwhile).
The table is saved with every checkpoint, so after a restore it agrees with the restored rows.
"""

from __future__ import annotations

import numpy as np


class EpisodeHighWater:
    def __init__(self, max_episodes: int = 65_536):
        if max_episodes < 1:
            raise ValueError(f"EpisodeHighWater: max_episodes must be >= 1, got {max_episodes}")
        self.max_episodes = int(max_episodes)
        self._last: dict[int, int] = {}  # episode_id -> last stored step; insertion order = recency

    def __len__(self) -> int:
        return len(self._last)

    def lookup(self, episode_ids: np.ndarray) -> np.ndarray:
        """Last stored step per id (int64), -1 for episodes never seen."""
        get = self._last.get
        return np.fromiter((get(e, -1) for e in episode_ids.tolist()), np.int64, len(episode_ids))

    def record(self, episode_ids: np.ndarray, last_steps: np.ndarray) -> None:
        d = self._last
        for e, s in zip(episode_ids.tolist(), last_steps.tolist()):
            prev = d.pop(e, -1)
            d[e] = max(prev, s)
        if len(d) > self.max_episodes + self.max_episodes // 8:  # amortised pruning of the oldest
            keep = list(d.items())[-self.max_episodes:]
            self._last = dict(keep)

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.fromiter(self._last.keys(), np.int64, len(self._last))
        steps = np.fromiter(self._last.values(), np.int64, len(self._last))
        return ids, steps

    def load_arrays(self, ids: np.ndarray, steps: np.ndarray) -> None:
        self._last = dict(zip(np.asarray(ids, np.int64).tolist(), np.asarray(steps, np.int64).tolist()))
