"""Which clips exist: (shard, episode, start frame) for clips of ``clip_len`` consecutive frames."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .manifest import read_manifest


@dataclass(frozen=True)
class ClipRef:
    shard: str
    episode_key: str
    start: int


def build_clip_index(data_dir: Path, clip_len: int, split: str | None = "train", stride: int = 1,
                     first_only: bool = False) -> list[ClipRef]:
    """All clip start positions, in manifest order. Episodes shorter than ``clip_len`` frames are skipped.

    ``first_only`` keeps only clips starting at frame 0 (first frames, e.g. for the prompt prior).
    """
    if clip_len < 2:
        raise ConfigError(f"clip_len {clip_len!r}: expected an integer >= 2 (a clip holds at least one transition)")
    if stride < 1:
        raise ConfigError(f"stride {stride!r}: expected an integer >= 1")
    refs = []
    for row in read_manifest(data_dir, split=split):
        n_frames = row["length"] + 1
        stop = min(1, n_frames - clip_len + 1) if first_only else n_frames - clip_len + 1
        for start in range(0, stop, stride):
            refs.append(ClipRef(row["shard"], row["episode_key"], start))
    return refs
