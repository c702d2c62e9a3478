"""Replay state on disk: one uncompressed .npz per shard, written atomically, plus a tiny add journal.

Checkpoint file ``shard_KK.npz``: every ring column and the priority leaves, only the rows ever written
(inner sums are recomputed on load, bit for bit), the episode high-water table and a JSON ``meta`` entry
(ring position, counters, rng state, schema). Written to a sibling temp file, fsynced, renamed over the old one and the
directory fsynced (genie_world.atomic_files), so a crash mid-write leaves the previous checkpoint.
npz rather than HDF5/safetensors: numpy only, no pickle (loaded with allow_pickle=False), and
uncompressed so a 250k-row shard (~40 MB) saves in well under a second.

Journal ``shard_KK.journal``: a 32-byte memory-mapped counter of transitions accepted, updated on
every add (a store into a shared page: no syscall, no fsync). The page outlives a killed shard
process, so its replacement can tell how many transitions arrived after the last checkpoint and
were lost. It does not outlive the machine (the checkpoint directory then usually goes with it).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from genie_world.atomic_files import write_file_atomic

JOURNAL_MAGIC = 0x52504C4A31  # "RPLJ1"


def checkpoint_path(directory, shard: int) -> Path:
    return Path(directory) / f"shard_{shard:02d}.npz"


def journal_path(directory, shard: int) -> Path:
    return Path(directory) / f"shard_{shard:02d}.journal"


def save_arrays(path, arrays: dict[str, np.ndarray]) -> int:
    """Atomically write ``arrays`` as an .npz at ``path``; returns its size in bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a temp name
            np.savez(fh, **arrays)

    write_file_atomic(path, write)
    return path.stat().st_size


def load_arrays(path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"replay checkpoint {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"replay checkpoint {path}: unreadable ({e})") from None


class AddJournal:
    """[magic, transitions_added, incarnations, lost_total] as int64 in a memory-mapped file."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size != 32
        if fresh:
            self.path.write_bytes(np.array([JOURNAL_MAGIC, 0, 0, 0], np.int64).tobytes())
        self._m = np.memmap(self.path, dtype=np.int64, mode="r+", shape=(4,))
        if int(self._m[0]) != JOURNAL_MAGIC:
            self._m[:] = (JOURNAL_MAGIC, 0, 0, 0)
        self._m[2] += 1  # this process is one more incarnation of the shard

    @property
    def transitions_added(self) -> int:
        return int(self._m[1])

    @transitions_added.setter
    def transitions_added(self, value: int) -> None:
        self._m[1] = value

    @property
    def incarnations(self) -> int:
        return int(self._m[2])

    @property
    def lost_total(self) -> int:
        return int(self._m[3])

    def add_lost(self, n: int) -> None:
        self._m[3] += n

    def flush(self) -> None:
        self._m.flush()
