"""The pieces between RLlib episodes and the shared replay, on real RLlib episode objects and a real Ray
actor: an episode cut into chunks by successive ``sample()`` calls becomes one whole replay batch; a missing
first chunk is refused; episode ids differ across runners; the mission table keeps its ids across a restart
and a save/load; the world env puts its tokens into the infos."""

from __future__ import annotations

import numpy as np
import pytest
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from pipelines.replay import TransitionSchema
from pipelines.replay.schema import order_by_episode
from pipelines.replay_feed import episode_id_int, episode_rows

P = 4


def _info(t: int, mission: str = "go to the red ball") -> dict:
    return {"world_tokens": np.full(P, t, np.int16), "mission": mission}


def _episode_in_chunks(length: int, cuts: list[int], truncated: bool = False,
                       bootstrap_step: bool = False) -> list[SingleAgentEpisode]:
    """A real episode of ``length`` steps, cut (as the EnvRunner cuts at the end of a sample) after each step
    in ``cuts``; returns its chunks in order. Observations are t, actions t % 3, rewards t / 10.

    ``bootstrap_step``: every returned chunk then gets what PPO's AddOneTsToEpisodesAndTruncate connector
    appends in place (the last observation, info and action again, reward 0, truncated)."""
    chunks = [SingleAgentEpisode()]
    chunks[0].add_env_reset(observation=np.float32(0), infos=_info(0))
    for t in range(length):
        last = t == length - 1
        chunks[-1].add_env_step(np.float32(t + 1), t % 3, t / 10, _info(t + 1), terminated=last and not truncated,
                                truncated=last and truncated)
        if t + 1 in cuts and not last:
            old = chunks[-1]
            chunks.append(old.cut(len_lookback_buffer=1))
            if bootstrap_step:
                old.add_env_step(np.float32(t + 1), t % 3, 0.0, {"world_tokens": np.full(P, -7, np.int16),
                                                                "mission": "bootstrap"}, truncated=True)
    return chunks


@pytest.mark.parametrize("bootstrap_step", [False, True])
@pytest.mark.parametrize("cuts", [[], [3], [1, 2, 5]])
def test_an_episode_in_chunks_becomes_one_whole_batch(cuts, bootstrap_step):
    chunks = _episode_in_chunks(7, cuts, bootstrap_step=bootstrap_step)
    assert len(chunks) == len(cuts) + 1
    rows = episode_rows(chunks)
    assert rows["step"].tolist() == list(range(7))
    assert rows["obs_tokens"][:, 0].tolist() == list(range(7))
    assert rows["next_obs_tokens"][:, 0].tolist() == list(range(1, 8))
    assert rows["action"].tolist() == [t % 3 for t in range(7)]
    np.testing.assert_allclose(rows["reward"], [t / 10 for t in range(7)])
    assert rows["terminated"].tolist() == [False] * 6 + [True] and not rows["truncated"].any()
    assert rows["missions"] == ["go to the red ball"] * 7
    # What the callback then sends passes the replay's own gatekeeper (types, o_{t+1} consistency, one end).
    rows["mission_id"] = np.zeros(7, np.int32)
    rows["episode_id"] = np.full(7, 5, np.int64)
    del rows["missions"]
    order_by_episode(TransitionSchema(obs_tokens=P, num_actions=3).validate(rows))


def test_truncated_episode_and_missing_chunks():
    rows = episode_rows(_episode_in_chunks(3, [], truncated=True))
    assert rows["truncated"].tolist() == [False, False, True] and not rows["terminated"].any()
    chunks = _episode_in_chunks(6, [2, 4])
    assert episode_rows(chunks[1:]) is None, "an episode without its first chunk must not be written"
    assert episode_rows([chunks[0], chunks[2]]) is None, "nor one with a chunk missing in the middle"
    assert episode_rows([]) is None
    bare = SingleAgentEpisode()  # an env without world_tokens in its infos (not a world env)
    bare.add_env_reset(observation=np.float32(0), infos={"mission": "x"})
    bare.add_env_step(np.float32(1), 0, 0.0, {"mission": "x"}, terminated=True)
    assert episode_rows([bare]) is None


def test_episode_ids_depend_on_the_runner():
    a, b = episode_id_int("abc", "actor1/10/1"), episode_id_int("abc", "actor1/11/1")  # a restarted runner
    assert a != b and 0 <= a < 2 ** 63 and 0 <= b < 2 ** 63
    assert episode_id_int("abc", "actor1/10/1") == a  # deterministic


def test_mission_table_ids_survive_a_restart_and_a_save(tmp_path, ray_local):
    import os
    import signal
    import time

    import ray

    from pipelines.replay.mission_table import load_mission_table, save_mission_table, start_mission_table

    live = tmp_path / "live" / "missions.json"
    table = start_mission_table("test-missions", [], path=str(live))
    try:
        assert ray.get(table.ids_of.remote(["b", "a", "b"])) == [0, 1, 0]
        assert ray.get(table.ids_of.remote(["c", "a"])) == [2, 1]
        pid = ray.get(table.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # Ray restarts it; the restarted table reloads its live file
            try:
                assert ray.get(table.texts_of.remote([0, 1, 2]), timeout=30) == ["b", "a", "c"]
                break
            except ray.exceptions.RayActorError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        save_mission_table(table, tmp_path / "ckpt")
        assert load_mission_table(tmp_path / "ckpt") == ["b", "a", "c"]
        with pytest.raises(ValueError, match="unknown mission ids"):
            ray.get(table.texts_of.remote([3]))
    finally:
        ray.kill(table, no_restart=True)


def test_world_env_infos_carry_the_frame_tokens(random_bundle):
    from genie_world.gym_env import WorldModelEnv, WorldVectorEnv

    env = WorldVectorEnv(3, bundle=random_bundle, prompt="go to the red ball", seed=0)
    _, infos = env.reset(seed=0)
    assert infos["world_tokens"].dtype == np.int16 and infos["world_tokens"].shape == (3, 64)
    _, _, _, _, infos = env.step(np.zeros(3, np.int64))
    assert infos["world_tokens"].shape == (3, 64) and infos["_world_tokens"].all()
    one = WorldModelEnv(bundle=random_bundle, prompt="go to the red ball")
    _, info = one.reset(seed=0)
    assert info["world_tokens"].shape == (64,) and isinstance(info["episode_step"], int)
