"""Ray Data has no HDF5 reader: this Datasource streams clips straight from the shards.

One ReadTask covers a run of episodes of one shard; it reads each episode once and slices every
clip out of it, yielding blocks of at most ``rows_per_block`` clips.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ..errors import ConfigError
from .clip_index import ClipRef, build_clip_index
from .shard_format import open_shard, read_episode_arrays, validate_shard

# previous_frame: the frame before the clip's first one (the first one itself when the clip starts its
# episode, i.e. start == 0): what the dynamics needs to know the action that led into the clip.
CLIP_COLUMNS = ("frames", "actions", "rewards", "terminated", "truncated", "mission", "episode_key", "start",
                "previous_frame")
TENSOR_COLUMNS = ("frames", "actions", "rewards", "terminated", "truncated", "start", "previous_frame")


def _read_clips(data_dir: str, shard: str, refs: list[ClipRef], clip_len: int, rows_per_block: int):
    path = Path(data_dir) / shard
    by_episode: dict[str, list[int]] = defaultdict(list)
    for r in refs:
        by_episode[r.episode_key].append(r.start)
    rows: dict[str, list] = {c: [] for c in CLIP_COLUMNS}

    def flush():
        batch = {c: np.stack(rows[c]) if c in ("frames", "actions", "rewards", "terminated", "truncated", "previous_frame")
                 else np.asarray(rows[c]) for c in CLIP_COLUMNS}
        for c in CLIP_COLUMNS:
            rows[c].clear()
        return BlockAccessor.batch_to_block(batch)

    with open_shard(path) as fh:
        for key, starts in by_episode.items():
            ep = read_episode_arrays(fh, key, path=path)  # whole episode once
            for s in starts:
                e = s + clip_len
                rows["frames"].append(ep["frames"][s:e])  # [T, H, W, 3]
                for c in ("actions", "rewards", "terminated", "truncated"):
                    rows[c].append(ep[c][s:e - 1])  # [T-1]
                rows["mission"].append(ep["mission"])
                rows["episode_key"].append(key)
                rows["start"].append(s)
                rows["previous_frame"].append(ep["frames"][max(s - 1, 0)])
                if len(rows["start"]) >= rows_per_block:
                    yield flush()
    if rows["start"]:
        yield flush()


class ClipDatasource(Datasource):
    """Clips of ``clip_len`` frames from a collected data directory (see ``clip_dataset``)."""

    def __init__(self, data_dir, clip_len: int, split: str | None = "train", stride: int = 1, rows_per_block: int = 64,
                 first_only: bool = False):
        self.data_dir = str(Path(data_dir))
        self.clip_len = clip_len
        self.rows_per_block = rows_per_block
        self.refs = build_clip_index(Path(data_dir), clip_len, split, stride, first_only)
        self.frame_size = 0
        for shard in sorted({r.shard for r in self.refs}):
            self.frame_size = validate_shard(Path(data_dir) / shard)["frame_size"]

    def _row_bytes(self) -> int:
        fs = self.frame_size
        return (self.clip_len + 1) * fs * fs * 3 + (self.clip_len - 1) * 14 + 64

    def estimate_inmemory_data_size(self) -> int:
        return len(self.refs) * self._row_bytes()

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        by_shard: dict[str, list[ClipRef]] = defaultdict(list)
        for r in self.refs:
            by_shard[r.shard].append(r)
        # Split each shard's clips into contiguous runs so there are about `parallelism` tasks.
        target = max(1, -(-len(self.refs) // max(1, parallelism)))
        data_dir, clip_len, rows_per_block = self.data_dir, self.clip_len, self.rows_per_block
        tasks = []
        for shard, refs in sorted(by_shard.items()):
            for i in range(0, len(refs), target):
                chunk = refs[i:i + target]
                meta = BlockMetadata(
                    num_rows=len(chunk), size_bytes=len(chunk) * self._row_bytes(),
                    exec_stats=None, input_files=(str(Path(data_dir) / shard),),
                )
                fn = partial(_read_clips, data_dir, shard, chunk, clip_len, rows_per_block)
                tasks.append(ReadTask(fn, meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "GenieSimaClips"


def clip_dataset(data_dir, clip_len: int, split: str | None = "train", stride: int = 1,
                 shuffle_blocks_seed: int | None = None, rows_per_block: int = 64,
                 columns: list[str] | None = None, first_only: bool = False):
    """A streaming ``ray.data.Dataset`` of clips (columns: ``CLIP_COLUMNS`` or ``columns``).

    Shuffle at iteration time with a buffer, e.g.
    ``ds.iter_torch_batches(batch_size=32, local_shuffle_buffer_size=512, local_shuffle_seed=0)``;
    ``shuffle_blocks_seed`` additionally randomises which shard runs come first. Torch batches
    cannot hold strings: pass ``columns=TENSOR_COLUMNS`` (or tokenize ``mission`` first).
    """
    import ray.data

    ds = ray.data.read_datasource(ClipDatasource(data_dir, clip_len, split, stride, rows_per_block, first_only))
    if columns is not None:
        unknown = [c for c in columns if c not in CLIP_COLUMNS]
        if unknown:
            raise ConfigError(f"columns {unknown}: unknown clip columns; known: {list(CLIP_COLUMNS)}")
        ds = ds.select_columns(list(columns))
    if shuffle_blocks_seed is not None:
        ds = ds.randomize_block_order(seed=shuffle_blocks_seed)
    return ds
