"""BabyAI collection with the real minigrid envs and bot, on a real local Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.data.babyai_game import BabyAIGame
from pipelines.data.manifest import read_manifest
from pipelines.data.shard_format import SCHEMA_VERSION, open_shard, read_episode_arrays, validate_shard
from tests.conftest import run_collect, shard_digests


def test_bot_episodes_all_succeed_on_gotolocal(babyai_bot_data):
    rows = read_manifest(babyai_bot_data)
    assert len(rows) == 24
    assert all(r["success"] for r in rows), [r for r in rows if not r["success"]]
    assert all(r["return"] > 0 for r in rows)


def test_manifest_matches_shard_contents(babyai_bot_data):
    rows = read_manifest(babyai_bot_data)
    assert [r["episode_index"] for r in rows] == list(range(24))  # none missing, none duplicated
    seen = 0
    for shard in sorted({r["shard"] for r in rows}):
        attrs = validate_shard(babyai_bot_data / shard)
        assert attrs["schema_version"] == SCHEMA_VERSION
        assert attrs["source"] == "babyai:BabyAI-GoToLocal-v0" and attrs["frame_size"] == 64
        assert attrs["action_names"][:3] == ["left", "right", "forward"]
        with open_shard(babyai_bot_data / shard) as fh:
            keys = set(fh["episodes"])
            shard_rows = [r for r in rows if r["shard"] == shard]
            assert keys == {r["episode_key"] for r in shard_rows}
            for r in shard_rows:
                g = fh["episodes"][r["episode_key"]]
                assert g["frames"].shape == (r["length"] + 1, 64, 64, 3)
                assert g["frames"].dtype == np.uint8
                assert g["frames"].compression == "gzip"
                assert g["actions"].shape == (r["length"],)
                assert np.isclose(g["rewards"][:].sum(), r["return"])
                assert g.attrs["mission"] == r["mission"] and r["mission"].startswith("go to")
                assert int(g.attrs["seed"]) == r["seed"]
                assert bool(g["terminated"][-1]) or bool(g["truncated"][-1])
                assert not g["terminated"][:-1].any()
            seen += len(keys)
    assert seen == len(rows)


@pytest.mark.parametrize("fixture", ["babyai_bot_data", "babyai_mixed_data"])
def test_replaying_seed_and_actions_reproduces_frames_exactly(fixture, request):
    data = request.getfixturevalue(fixture)
    rows = read_manifest(data)
    game = BabyAIGame("BabyAI-GoToLocal-v0", frame_size=64)
    for r in rows[:10]:
        with open_shard(data / r["shard"]) as fh:
            ep = read_episode_arrays(fh, r["episode_key"])
        frames = [game.reset(r["seed"])]
        assert game.mission == r["mission"]
        for a in ep["actions"]:
            frames.append(game.step(int(a))[0])
        np.testing.assert_array_equal(np.stack(frames), ep["frames"])


def test_mixed_behaviour_takes_random_actions_and_bot_recovers(babyai_bot_data, babyai_mixed_data):
    bot = {r["episode_index"]: r for r in read_manifest(babyai_bot_data)}
    mixed = {r["episode_index"]: r for r in read_manifest(babyai_mixed_data)}
    # Same base seed -> same levels; epsilon 0.5 random actions make episodes longer.
    assert all(bot[i]["seed"] == mixed[i]["seed"] for i in bot)
    assert np.mean([m["length"] for m in mixed.values()]) > np.mean([b["length"] for b in bot.values()])
    # The bot replans after random actions, so most mixed episodes still succeed.
    assert np.mean([m["success"] for m in mixed.values()]) >= 0.75


def test_splits_by_episode_and_config_saved(babyai_mixed_data):
    rows = read_manifest(babyai_mixed_data)
    assert {r["split"] for r in rows} == {"train", "val"}
    assert len(read_manifest(babyai_mixed_data, split="train")) + len(read_manifest(babyai_mixed_data, split="val")) == len(rows)
    cfg = json.loads((babyai_mixed_data / "collect_config.json").read_text())
    assert cfg["config"]["policy"] == "mixed" and cfg["config"]["epsilon"] == 0.5
    assert cfg["versions"]["minigrid"] and cfg["versions"]["ray"]


def test_same_seed_gives_same_bytes(ray_local, tmp_path):
    run_collect(tmp_path / "a", episodes=8, policy="mixed", workers=2)
    run_collect(tmp_path / "b", episodes=8, policy="mixed", workers=1)
    assert shard_digests(tmp_path / "a") == shard_digests(tmp_path / "b")
    assert (tmp_path / "a/manifest.parquet").read_bytes() == (tmp_path / "b/manifest.parquet").read_bytes()
    run_collect(tmp_path / "c", episodes=8, policy="mixed", seed=1)
    assert shard_digests(tmp_path / "c") != shard_digests(tmp_path / "a")


def test_growing_a_collection_keeps_shards_and_splits(ray_local, tmp_path):
    out = tmp_path / "grow"
    run_collect(out, episodes=8, policy="mixed", val_fraction=0.3)
    before = shard_digests(out)
    splits_before = {r["episode_key"]: r["split"] for r in read_manifest(out)}
    result = run_collect(out, episodes=12, policy="mixed", val_fraction=0.3)
    assert result["shards_kept"] == 2 and result["shards_collected"] == 1
    after = shard_digests(out)
    assert {k: after[k] for k in before} == before
    rows = read_manifest(out)
    assert [r["episode_index"] for r in rows] == list(range(12))
    assert all(splits_before[r["episode_key"]] == r["split"] for r in rows if r["episode_key"] in splits_before)


def test_changed_settings_for_existing_out_are_refused(ray_local, tmp_path):
    from pipelines.errors import ConfigError

    run_collect(tmp_path / "d", episodes=4, policy="bot")
    with pytest.raises(ConfigError, match=r"policy: 'bot' -> 'random'"):
        run_collect(tmp_path / "d", episodes=4, policy="random")


def test_unknown_level_names_the_registered_ones(ray_local, tmp_path):
    from pipelines.errors import SourceError

    with pytest.raises(SourceError, match=r"unknown BabyAI level 'BabyAI-Nope-v0'.*BabyAI-GoToLocal-v0"):
        run_collect(tmp_path / "e", source="babyai:BabyAI-Nope-v0")
    assert not (tmp_path / "e").exists() or not list((tmp_path / "e").iterdir())
