"""Which shard owns an episode, and what a sampled transition's index means.

Routing: shard = splitmix64(episode_id) mod num_shards. A pure function of the id (not Python's
salted ``hash``), so every writer in every process sends all chunks of one episode to the same
shard: an episode is never split over shards and its dedup mark lives in one place. splitmix64
spreads sequential ids evenly.

Index: one int64 per sampled transition, handed back with priority updates.

    bit 63      0 (indices stay non-negative)
    bits 56-62  shard number (up to 127 shards)
    bits 48-55  shard generation mod 256 (bumped on every restore)
    bits  0-47  absolute write position of the row (row = position mod capacity)

The absolute position tells a shard whether the row has been overwritten since it was sampled
(position < rows_written - capacity) without storing anything per row, and the generation
tells it the index predates a restore; either way the update is dropped, never misapplied.
"""

from __future__ import annotations

import numpy as np

MAX_SHARDS = 127
_POS_BITS, _GEN_BITS = 48, 8
_POS_MASK = (1 << _POS_BITS) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    z = np.asarray(x, np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def shard_of(episode_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Owning shard (int64) of each episode id."""
    return (splitmix64(episode_ids) % np.uint64(num_shards)).astype(np.int64)


def encode_index(shard: int, generation: int, positions: np.ndarray) -> np.ndarray:
    pos = np.asarray(positions, np.int64)
    return (np.int64(shard) << 56) | (np.int64(generation % 256) << _POS_BITS) | pos


def decode_index(index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard, generation, position) arrays."""
    idx = np.asarray(index, np.int64)
    return idx >> 56, (idx >> _POS_BITS) & 0xFF, idx & _POS_MASK
