"""The shared replay inside `genie-sima train` (real Ray, real RLlib, a real world server on a random-weight
bundle): it holds exactly the finished episodes, whole and once each; the auxiliary losses draw from it;
it is saved with every train checkpoint and restored by --resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.replay.saved_contents import saved_transitions
from pipelines.train_policy import TrainConfig, train
from pipelines.train_replay import TrainReplay

pytestmark = pytest.mark.slow

# rollout_steps 4: most episodes (up to 8 steps) span two or more sample() calls, so the replay feed must put
# them back together from RLlib's chunks.
SMALL = dict(num_envs=4, rollout_steps=4, minibatch_size=16, num_epochs=1, vision_dim=32, hidden_dim=64,
             moco_queue_size=64, checkpoint_every=1, wandb="disabled", threads=1, replay_capacity=4096,
             replay_shards=2, aux_batch_size=16)


def check_whole_episodes(rows: dict) -> np.ndarray:
    """Every episode id's steps are 0..n-1, each once, and only the last one ends it; returns the ids."""
    ep, st = rows["episode_id"], rows["step"]
    ends = rows["terminated"] | rows["truncated"]
    ids, start, counts = np.unique(ep, return_index=True, return_counts=True)
    for e, lo, n in zip(ids.tolist(), start.tolist(), counts.tolist()):
        assert st[lo:lo + n].tolist() == list(range(n)), f"episode {e}: steps {st[lo:lo + n].tolist()}"
        assert ends[lo + n - 1], f"episode {e}: its last transition (step {n - 1}) does not end it (half-written)"
        assert not ends[lo:lo + n - 1].any(), f"episode {e} ends before its last step"
    return ids


def test_replay_holds_the_finished_episodes_feeds_the_aux_losses_and_resumes(random_bundle, tmp_path, ray_local):
    out = tmp_path / "run"
    env = f"world://{random_bundle}?prompt=go to the red ball&max_episode_steps=8"
    result = train(TrainConfig(env=env, out=str(out), total_timesteps=32, **SMALL), log=lambda m: None)
    assert result["iterations"] == 2
    m = result["metrics"]

    saved = out / "checkpoints" / "iter_000002" / "replay"
    rows = saved_transitions(saved)
    ids = check_whole_episodes(rows)
    finished = int(m["env_runners/num_episodes_lifetime"])
    assert finished > 0 and len(ids) == finished, (len(ids), finished)
    assert int(m["env_runners/replay_episodes_added"]) == finished
    assert m["env_runners/replay_episodes_from_chunks"] > 0, "no episode spanned two samples: chunking untested"
    assert m.get("env_runners/replay_episodes_incomplete", 0) == 0
    assert len(rows["step"]) == int(m["env_runners/replay_transitions_added"])
    assert (rows["episode_id"] >= 0).all()
    # Mission ids map back to text through the table saved beside the shards.
    table = json.loads((saved / "missions.json").read_text())["missions"]
    assert table and rows["mission_id"].max() < len(table) and all(isinstance(t, str) and t for t in table)
    # Tokens are what the world model produced: inside its vocabulary, not all one value.
    tokens = rows["obs_tokens"]
    assert tokens.shape[1] == 64 and tokens.min() >= 0 and len(np.unique(tokens)) > 1

    # The auxiliary losses drew their rows from the replay (the first minibatch may fall back while it is empty).
    assert m["learners/default_policy/aux_replay_samples"] > 0
    assert m["learners/default_policy/replay_size"] > 0
    assert "learners/default_policy/language_matching_loss" in m and "learners/default_policy/contrastive_loss" in m

    # Restored into fresh shards, that checkpoint comes back exactly: ring layout, priorities, episode
    # high-water marks and the mission table (checked by saving it again).
    probe = TrainReplay("restore-probe", tmp_path / "probe", 4096, 2, 64,
                        json.loads(str(np.load(saved / "shard_00.npz")["meta"]))["schema"]["num_actions"])
    try:
        assert probe.restore(saved.parent)["size"] == len(rows["step"])
        probe.save(tmp_path / "probe_ckpt")
    finally:
        probe.stop()
    copy = tmp_path / "probe_ckpt" / "replay"
    for shard in ("shard_00.npz", "shard_01.npz"):
        a, b = np.load(saved / shard), np.load(copy / shard)
        for key in a.files:
            if key != "meta":
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{shard} {key}")
    assert (copy / "missions.json").read_text() == (saved / "missions.json").read_text()

    # --resume restores the replay of the newest checkpoint, and the next checkpoint still holds it, row for row.
    logs: list[str] = []
    again = train(TrainConfig(env=env, out=str(out), total_timesteps=48, resume=True, **SMALL), log=logs.append)
    assert again["iterations"] == 3
    restored = [line for line in logs if "restored" in line and "replay" in line]
    assert restored and f"restored {len(rows['step'])} transitions from iter_000002" in restored[0], logs
    after = saved_transitions(out / "checkpoints" / "iter_000003" / "replay")
    old = np.isin(after["episode_id"], ids)
    for f in rows:
        np.testing.assert_array_equal(after[f][old], rows[f], err_msg=f)
    new_ids = check_whole_episodes({k: v[~old] for k, v in after.items()})
    assert len(new_ids) > 0 and not np.isin(new_ids, ids).any()
    # The older checkpoint's replay is untouched by the later save (its own files, not the live ones).
    np.testing.assert_array_equal(saved_transitions(saved)["episode_id"], rows["episode_id"])


def test_replay_off_and_refusals(random_bundle, tmp_path, ray_local):
    from pipelines.errors import ConfigError

    env = f"world://{random_bundle}?prompt=go to the red ball&max_episode_steps=8"
    small = {**SMALL, "replay_capacity": 0}
    result = train(TrainConfig(env=env, out=str(tmp_path / "off"), total_timesteps=16, **small), log=lambda m: None)
    assert not (tmp_path / "off" / "checkpoints" / "iter_000001" / "replay").exists()
    assert "learners/default_policy/aux_replay_samples" not in result["metrics"]
    with pytest.raises(ConfigError, match="--replay-capacity 3"):
        train(TrainConfig(env=env, out=str(tmp_path / "bad"), total_timesteps=64, **{**SMALL, "replay_capacity": 3}))
    with pytest.raises(ConfigError, match="--aux-batch-size"):
        train(TrainConfig(env=env, out=str(tmp_path / "bad"), total_timesteps=64, **{**SMALL, "aux_batch_size": 1}))
