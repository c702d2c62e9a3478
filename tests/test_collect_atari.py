"""Atari collection through the real ale-py with its bundled ROMs."""

from __future__ import annotations

import numpy as np

from pipelines.data.atari_game import AtariGame
from pipelines.data.manifest import read_manifest
from pipelines.data.shard_format import open_shard, read_episode_arrays, validate_shard
from tests.conftest import run_collect, shard_digests


def test_pong_shards(pong_data):
    rows = read_manifest(pong_data)
    assert [r["episode_index"] for r in rows] == [0, 1, 2]
    attrs = validate_shard(pong_data / rows[0]["shard"])
    assert attrs["num_actions"] == 6 and attrs["action_names"][0] == "NOOP"
    for r in rows:
        assert r["length"] == 40 and r["level_id"] == "ALE/Pong-v5" and r["mission"] == "play Pong"
        with open_shard(pong_data / r["shard"]) as fh:
            ep = read_episode_arrays(fh, r["episode_key"])
        assert ep["frames"].shape == (41, 64, 64, 3) and ep["frames"].dtype == np.uint8
        assert ep["truncated"][-1] and not ep["terminated"].any()
        assert ((0 <= ep["actions"]) & (ep["actions"] < 6)).all()
        # Real game video: the frames move.
        assert np.abs(np.diff(ep["frames"].astype(np.int16), axis=0)).sum() > 0


def test_pong_mixed_is_deterministic_and_holds_actions(ray_local, tmp_path):
    for name in ("a", "b"):
        run_collect(tmp_path / name, source="atari:Pong", episodes=2, policy="mixed", epsilon=0.1,
                    episodes_per_shard=1, max_steps=60)
    assert shard_digests(tmp_path / "a") == shard_digests(tmp_path / "b")
    row = read_manifest(tmp_path / "a")[0]
    with open_shard(tmp_path / "a" / row["shard"]) as fh:
        actions = read_episode_arrays(fh, row["episode_key"])["actions"]
    # epsilon 0.1 switching -> long runs of the same action (i.i.d. random would switch ~5/6 of steps).
    assert np.mean(actions[1:] != actions[:-1]) < 0.3


def test_atari_frames_resized_from_native(ray_local):
    game = AtariGame("Breakout", frame_size=32)
    frame = game.reset(0)
    assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
    game.close()
