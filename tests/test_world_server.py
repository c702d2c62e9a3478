"""WorldModelServer on a real local Ray: concurrent vector-env clients, batching, refusals, gym API."""

from __future__ import annotations

import threading
import time

import gymnasium as gym
import numpy as np
import pytest
import ray
from gymnasium.utils.env_checker import check_env

import genie_world  # noqa: F401 - registers genie-sima/World-v0
from genie_world.gym_env import WorldModelEnv, WorldVectorEnv
from genie_world.world_server import get_world_server, start_world_server

PROMPTS = ["go to the red ball", "go to the blue key", "pick up the green box"]


@pytest.fixture(scope="module")
def server(ray_local, random_bundle):
    handle = start_world_server(random_bundle, name="test-world", num_cpus=0.5, capacity=32, max_batch=64,
                                max_wait_ms=50.0, max_episode_steps=6, threads=1)
    ray.get(handle.info.remote())
    yield handle
    ray.kill(handle)


def test_three_concurrent_vector_env_clients_get_exactly_their_own_envs(server, random_bundle):
    sizes, steps = [3, 5, 4], 10
    clients = [WorldVectorEnv(n, server="test-world", prompt=p, seed=i, max_episode_steps=6)
               for i, (n, p) in enumerate(zip(sizes, PROMPTS))]
    actions = [np.random.default_rng(i).integers(0, 7, size=(steps, n)) for i, n in enumerate(sizes)]
    results: dict[int, list] = {i: [] for i in range(3)}
    firsts = {}
    for i, env in enumerate(clients):
        obs, _ = env.reset()
        firsts[i] = (env._backend.client, obs)

    def run(i):
        for t in range(steps):
            results[i].append(clients[i].step(actions[i][t]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    stats = ray.get(server.stats.remote())
    assert stats["mean_batch_envs"] > max(sizes), f"requests were not batched: {stats}"
    assert 0.0 < stats["step_s"] < time.time() - stats["started"], stats  # the World's own seconds
    owned = set()
    for i, env in enumerate(clients):
        envs = set(env._last["envs"].tolist())
        assert len(envs) == sizes[i] and not envs & owned, "clients share envs"
        owned |= envs
        # Each client gets its own envs: the same trajectory as the same levels in a private World.
        local = WorldVectorEnv(sizes[i], bundle=random_bundle, prompt=PROMPTS[i], seed=i, max_episode_steps=6)
        obs, _ = local.reset()
        np.testing.assert_array_equal(obs["image"], firsts[i][1]["image"])
        for t in range(steps):
            lo, lr, lte, ltr, linfo = local.step(actions[i][t])
            so, sr, ste, str_, sinfo = results[i][t]
            np.testing.assert_array_equal(so["image"], lo["image"], err_msg=f"client {i} step {t}")
            np.testing.assert_array_equal(ste, lte)
            np.testing.assert_array_equal(str_, ltr)
            assert so["mission"] == (PROMPTS[i],) * sizes[i]
        env.close()
    assert ray.get(server.info.remote())["free"] == 32


def test_bad_actions_are_refused_to_their_sender_only(server):
    good = WorldVectorEnv(2, server=get_world_server("test-world"), prompt=PROMPTS[0])
    bad = WorldVectorEnv(2, server="test-world", prompt=PROMPTS[1])
    good.reset()
    bad.reset()
    with pytest.raises(Exception, match=r"actions\[1\] = 9"):
        bad.step(np.array([0, 9]))
    obs, *_ = good.step(np.array([1, 2]))
    assert obs["image"].shape == (2, 64, 64, 3)
    with pytest.raises(Exception, match="cannot open 100 envs"):
        WorldVectorEnv(100, server="test-world", prompt=PROMPTS[0]).reset()
    with pytest.raises(Exception, match="unknown words"):
        WorldVectorEnv(1, server="test-world", prompt="go to the purple ball").reset()
    good.close()
    bad.close()


def test_single_env_passes_gymnasium_env_checker(random_bundle):
    env = WorldModelEnv(bundle=random_bundle, prompt=PROMPTS[0], max_episode_steps=5)
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs) and info["is_first"]
    with pytest.raises(ValueError, match="expected an integer in"):
        env.step(7)


def test_registered_id_makes_single_and_vector_envs(random_bundle, server):
    env = gym.make("genie-sima/World-v0", bundle=str(random_bundle), prompt=PROMPTS[2])
    obs, _ = env.reset(seed=0)
    assert obs["mission"] == PROMPTS[2] and obs["image"].dtype == np.uint8
    vec = gym.make_vec("genie-sima/World-v0", num_envs=3, vectorization_mode="vector_entry_point",
                       server="test-world", prompt=PROMPTS[2])
    obs, _ = vec.reset(seed=0)
    assert obs["image"].shape == (3, 64, 64, 3)
    assert vec.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    vec.close()


def test_a_second_step_in_flight_is_refused_to_its_client_only(server):
    """Two concurrent step calls from one client and one from another, in one gather: whichever of the
    client's two calls reaches the server second is refused to it alone (Ray does not keep one caller's
    order for an async actor: either may arrive first); the other and the other client's step succeed."""
    a = ray.get(server.open.remote(2, prompt=PROMPTS[0]))["client"]
    b = ray.get(server.open.remote(3, prompt=PROMPTS[1]))["client"]
    try:
        for _ in range(3):  # the gather window (50 ms) holds all three requests each time
            refs = [server.step.remote(a, [1, 2]), server.step.remote(a, [0, 0]), server.step.remote(b, [2, 2, 2])]
            outcomes = []
            for ref in refs:
                try:
                    outcomes.append(ray.get(ref))
                except Exception as e:  # noqa: BLE001
                    outcomes.append(e)
            mine, other = outcomes[:2], outcomes[2]
            answered = [o for o in mine if isinstance(o, dict)]
            refused = [o for o in mine if isinstance(o, Exception)]
            assert len(answered) == 1 and answered[0]["envs"] is not None and len(answered[0]["rewards"]) == 2, mine
            assert len(refused) == 1 and "already has a step in flight" in str(refused[0]), mine
            assert isinstance(other, dict) and len(other["rewards"]) == 3
        assert len(ray.get(server.step.remote(a, [2, 2]))["rewards"]) == 2  # answered: the client steps again
    finally:
        ray.get([server.close.remote(a), server.close.remote(b)])


def test_idle_blocks_are_leased_open_is_capped_and_a_wedged_server_times_out(ray_local, random_bundle, monkeypatch):
    """A client whose process died without closing held its envs for the server's lifetime; now its block
    is reclaimed once idle past the lease, when an open needs the room. Calls that would tie up the server
    are refused; a client waiting on a server that does not answer gets a TimeoutError naming it."""
    import genie_world.gym_env as gym_env

    name = "test-world-lease"
    handle = start_world_server(random_bundle, name=name, num_cpus=0.5, capacity=4, max_episode_steps=6, threads=1,
                                lease_s=1.0)
    try:
        gone = ray.get(handle.open.remote(4, prompt=PROMPTS[0]))["client"]  # its owner "dies": never closes
        with pytest.raises(ValueError, match="cannot open 2 envs, 0 of 4 are free"):
            ray.get(handle.open.remote(2, prompt=PROMPTS[1]))  # within the lease: still its
        time.sleep(1.5)
        other = ray.get(handle.open.remote(2, prompt=PROMPTS[1]))
        assert other["envs"] == [0, 1] and ray.get(handle.stats.remote())["expired_clients_closed"] == 1
        with pytest.raises(ValueError, match=rf"client '{gone}' was closed after \d+ s without a step \(lease 1 s\)"):
            ray.get(handle.step.remote(gone, np.zeros(4, np.int64)))
        ray.get(handle.step.remote(other["client"], np.zeros(2, np.int64)))  # a stepping client keeps its block
        with pytest.raises(ValueError, match="num_levels must be an integer in 1..100000, got 1000000000"):
            ray.get(handle.open.remote(1, prompt=PROMPTS[0], num_levels=10**9))
        with pytest.raises(ValueError, match="cannot open 5 envs, more than its capacity 4"):
            ray.get(handle.open.remote(5, prompt=PROMPTS[0]))

        env = WorldVectorEnv(2, server=name, prompt=PROMPTS[2], seed=0, max_episode_steps=6)
        env.reset()
        monkeypatch.setattr(gym_env, "SERVER_CALL_TIMEOUT_S", 1.0)
        ray.get(handle.__ray_call__.remote(lambda self: self._executor.submit(time.sleep, 5) and None))  # wedged
        with pytest.raises(TimeoutError, match=f"world server '{name}': no answer to step within 1 s"):
            env.step(np.zeros(2, np.int64))
    finally:
        ray.kill(handle)
