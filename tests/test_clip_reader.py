"""Clip readers: the numpy path and the Ray Data Datasource return aligned (frame_t, action_t, frame_t+1)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.babyai_game import BabyAIGame
import torch

from pipelines.data.clip_datasource import TENSOR_COLUMNS, clip_dataset
from pipelines.data.clip_reader import ClipReader
from pipelines.data.manifest import read_manifest
from pipelines.data.shard_format import open_shard, read_episode_arrays
from pipelines.errors import ConfigError

T = 4


def _episodes(data):
    out = {}
    for r in read_manifest(data):
        with open_shard(data / r["shard"]) as fh:
            out[r["episode_key"]] = (r, read_episode_arrays(fh, r["episode_key"]))
    return out


def test_numpy_clips_are_aligned_triples(babyai_mixed_data):
    episodes = _episodes(babyai_mixed_data)
    reader = ClipReader(babyai_mixed_data, clip_len=T, split=None)
    expected = sum(max(0, r["length"] + 1 - T + 1) for r, _ in episodes.values())
    assert len(reader) == expected > 0
    for clip in reader:
        assert clip["frames"].shape == (T, 64, 64, 3) and clip["actions"].shape == (T - 1,)
        r, ep = episodes[clip["episode_key"]]
        s = clip["start"]
        for t in range(T - 1):
            # frame_t, action_t, frame_t+1 of the clip are the episode's at s+t.
            np.testing.assert_array_equal(clip["frames"][t], ep["frames"][s + t])
            assert clip["actions"][t] == ep["actions"][s + t]
            np.testing.assert_array_equal(clip["frames"][t + 1], ep["frames"][s + t + 1])
            assert clip["rewards"][t] == ep["rewards"][s + t]
        assert clip["mission"] == r["mission"]
        # The frame before the clip (the action into its first frame comes from it); the first frame itself
        # when the clip starts its episode.
        np.testing.assert_array_equal(clip["previous_frame"], ep["frames"][max(s - 1, 0)])
    reader.close()


def test_clip_triples_agree_with_the_real_game(babyai_mixed_data):
    """Stepping the real env with action_t from frame_t's state produces frame_t+1."""
    rows = {r["episode_key"]: r for r in read_manifest(babyai_mixed_data)}
    game = BabyAIGame("BabyAI-GoToLocal-v0")
    with ClipReader(babyai_mixed_data, clip_len=T, split=None, stride=2) as reader:
        for i in range(0, len(reader), max(1, len(reader) // 8)):
            clip = reader[i]
            r = rows[clip["episode_key"]]
            with open_shard(babyai_mixed_data / r["shard"]) as fh:
                actions = read_episode_arrays(fh, r["episode_key"])["actions"]
            frame = game.reset(r["seed"])
            for a in actions[: clip["start"]]:
                frame = game.step(int(a))[0]
            for t in range(T - 1):
                np.testing.assert_array_equal(frame, clip["frames"][t])
                frame = game.step(int(clip["actions"][t]))[0]
                np.testing.assert_array_equal(frame, clip["frames"][t + 1])


def test_ray_data_clips_equal_numpy_clips(babyai_mixed_data):
    with ClipReader(babyai_mixed_data, clip_len=T, split="train", stride=1) as reader:
        expected = {(c["episode_key"], c["start"]): c for c in reader}
    ds = clip_dataset(babyai_mixed_data, clip_len=T, split="train")
    rows = ds.take_all()
    assert len(rows) == len(expected)
    assert {(r["episode_key"], int(r["start"])) for r in rows} == set(expected)
    for r in rows:
        c = expected[(r["episode_key"], int(r["start"]))]
        np.testing.assert_array_equal(r["frames"], c["frames"])
        np.testing.assert_array_equal(r["actions"], c["actions"])
        np.testing.assert_array_equal(r["rewards"], c["rewards"])
        np.testing.assert_array_equal(r["previous_frame"], c["previous_frame"])
        assert r["mission"] == c["mission"]


def test_ray_data_streams_shuffled_torch_batches(babyai_mixed_data):
    ds = clip_dataset(babyai_mixed_data, clip_len=T, split=None, shuffle_blocks_seed=0)
    plain = [(k, int(s)) for b in clip_dataset(babyai_mixed_data, clip_len=T, split=None).iter_batches(batch_size=16)
             for k, s in zip(b["episode_key"], b["start"])]
    shuffled, n_batches = [], 0
    tensors = clip_dataset(babyai_mixed_data, clip_len=T, split=None, columns=list(TENSOR_COLUMNS))
    for batch in tensors.iter_torch_batches(batch_size=16, local_shuffle_buffer_size=64, local_shuffle_seed=0):
        assert batch["frames"].shape[1:] == (T, 64, 64, 3) and batch["frames"].dtype == torch.uint8
        assert batch["actions"].shape[1:] == (T - 1,)
        n_batches += 1
    for b in ds.iter_batches(batch_size=16, local_shuffle_buffer_size=64, local_shuffle_seed=0):
        shuffled += [(k, int(s)) for k, s in zip(b["episode_key"], b["start"])]
    assert sorted(shuffled) == sorted(plain) and shuffled != plain
    assert n_batches == -(-len(plain) // 16)


def test_split_and_argument_checks(babyai_mixed_data):
    n_all = len(ClipReader(babyai_mixed_data, clip_len=T, split=None))
    n_train = len(ClipReader(babyai_mixed_data, clip_len=T, split="train"))
    n_val = len(ClipReader(babyai_mixed_data, clip_len=T, split="val"))
    assert n_train + n_val == n_all and n_val > 0
    with pytest.raises(ConfigError, match=r"columns \['pixels'\]: unknown clip columns"):
        clip_dataset(babyai_mixed_data, clip_len=T, columns=["pixels"])
    with pytest.raises(ConfigError, match="clip_len 1"):
        ClipReader(babyai_mixed_data, clip_len=1)
    long_clips = ClipReader(babyai_mixed_data, clip_len=1000, split=None)
    assert len(long_clips) == 0  # every episode is shorter than 1000 frames
