"""Single-process numpy path: clips of T frames with the T-1 transitions between them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .clip_index import build_clip_index
from .shard_format import open_shard, read_episode_arrays, validate_shard


class ClipReader:
    """Random access to clips; each item is a dict of numpy arrays.

    ``frames`` [T, H, W, 3] uint8, ``actions``/``rewards``/``terminated``/``truncated`` [T-1]
    (entry t takes frame t to t+1), ``mission`` str, ``episode_key`` str, ``start`` int,
    ``previous_frame`` [H, W, 3] (the frame before the clip; its first frame when ``start`` is 0).
    """

    def __init__(self, data_dir, clip_len: int, split: str | None = "train", stride: int = 1, first_only: bool = False):
        self.data_dir = Path(data_dir)
        self.clip_len = clip_len
        self.refs = build_clip_index(self.data_dir, clip_len, split, stride, first_only)
        for shard in sorted({r.shard for r in self.refs}):
            validate_shard(self.data_dir / shard)
        self._files: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.refs)

    def _file(self, shard: str):
        if shard not in self._files:
            self._files[shard] = open_shard(self.data_dir / shard)
        return self._files[shard]

    def __getitem__(self, i: int) -> dict:
        ref = self.refs[i]
        path = self.data_dir / ref.shard
        lo = max(ref.start - 1, 0)  # one frame more: the frame before the clip (see CLIP_COLUMNS)
        clip = read_episode_arrays(self._file(ref.shard), ref.episode_key, lo, ref.start + self.clip_len, path=path)
        clip["previous_frame"] = clip["frames"][0]
        if lo < ref.start:
            clip = {k: (v[1:] if k in ("frames", "actions", "rewards", "terminated", "truncated") else v)
                    for k, v in clip.items()}
        clip["episode_key"] = ref.episode_key
        clip["start"] = ref.start
        return clip

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def iter_shuffled(self, seed: int = 0):
        for i in np.random.default_rng(seed).permutation(len(self)):
            yield self[int(i)]

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
