"""`WorldPPO` owns its world server (real Ray, real RLlib, a random-weight bundle): the server exists once the
algorithm is built, its envs step on it, and `algo.stop()` takes it away; a build that fails kills it too."""

from __future__ import annotations

import dataclasses

import pytest

from pipelines.train_policy import TrainConfig, build_algo_config, parse_env, world_server_spec

pytestmark = pytest.mark.slow

SMALL = dict(num_envs=2, rollout_steps=8, minibatch_size=16, num_epochs=1, vision_dim=16, hidden_dim=32,
             moco_queue_size=32, threads=1, replay_capacity=0)


def _tokenizer(bundle_dir) -> dict:
    from genie_world.bundle import load_bundle
    from sima_policy.instruction_tokenizer import InstructionTokenizer

    vocab = load_bundle(bundle_dir, parts=("tokenizer",)).vocab
    return InstructionTokenizer.from_texts(vocab.words[1:], max_len=16).to_json()


def test_the_algorithm_starts_hands_out_and_stops_its_world_server(random_bundle, ray_local):
    import ray

    from genie_world.world_server import get_world_server
    from pipelines.world_ppo import WorldPPO

    cfg = TrainConfig(env=f"world://{random_bundle}?prompt=go to the red ball&max_episode_steps=4", **SMALL)
    spec = parse_env(cfg.env)
    server = world_server_spec(cfg, spec, "owned")
    name = server["name"]
    with pytest.raises(ValueError):
        get_world_server(name)  # nothing runs before the algorithm is built
    algo = build_algo_config(cfg, spec, _tokenizer(random_bundle), server).build_algo()
    try:
        assert isinstance(algo, WorldPPO)
        assert get_world_server(name)._actor_id == algo.world_server._actor_id
        assert algo.world_server_info["name"] == name and algo.world_server_info["capacity"] == cfg.num_envs
        # Handed to the envs through the env config, and the envs step on that server.
        assert algo.config.env_config["server"] == name
        assert algo.env_runner.env.unwrapped._backend.server == name
        before = ray.get(algo.world_server.stats.remote())["env_steps"]
        algo.env_runner.sample(num_timesteps=8, random_actions=True)
        stats = ray.get(algo.world_server.stats.remote())
        assert stats["clients"] == 1 and stats["env_steps"] > before
    finally:
        algo.stop()
    with pytest.raises(ValueError):
        get_world_server(name)  # killed for good, not restarted
    assert algo.world_server is None


def test_a_failed_build_kills_the_server_it_started(random_bundle, ray_local):
    from genie_world.world_server import get_world_server

    cfg = TrainConfig(env=f"world://{random_bundle}?prompt=go to the red ball", **SMALL)
    spec = parse_env(cfg.env)
    server = world_server_spec(cfg, spec, "failed-build")
    # A policy that cannot be built: PPO's setup (which builds the EnvRunner's and Learner's modules) fails
    # after the server started.
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from sima_policy.rl_module import SimaRLModule

    config = build_algo_config(cfg, spec, _tokenizer(random_bundle), server).rl_module(
        rl_module_spec=RLModuleSpec(module_class=SimaRLModule, model_config={"hidden_dim": "not a size"}))
    with pytest.raises(Exception, match="not a size|str") as failed:
        config.build_algo()
    # While the error is held (its traceback references the half-built algorithm and so the server's handle,
    # as in a caller that logs it), the server must already be gone: killed, not left to garbage collection.
    assert failed.traceback
    with pytest.raises(ValueError):
        get_world_server(server["name"])


def test_world_server_count_names_capacity_and_refusals():
    from pipelines.errors import ConfigError
    from pipelines.mission_tokens import world_server_for
    from pipelines.world_ppo import WorldEnvRunner, WorldPPOConfig, world_server_names

    spec = parse_env("world://some/run?prompt=go to the red ball")
    one = world_server_spec(TrainConfig(env="x", num_envs=4, num_env_runners=3), spec, "r")
    assert one["name"] == "genie-sima-train-r" and one["count"] == 1 and one["capacity"] == 12
    two = world_server_spec(TrainConfig(env="x", num_envs=4, num_env_runners=3, world_servers=2), spec, "r")
    assert two["count"] == 2 and two["capacity"] == two["max_batch"] == 8  # ceil(3 / 2) runners x 4 envs
    three = world_server_spec(TrainConfig(env="x", num_envs=4, num_env_runners=3, world_servers=3), spec, "r")
    assert three["capacity"] == 4
    assert world_server_names("n", 1) == ["n"] and world_server_names("n", 2) == ["n-0", "n-1"]
    # Placement: explicit GPUs and a custom resource per server (what cluster/*.yaml advertise on GPU nodes).
    assert one["resources"] == {} and one["num_gpus"] in (0.0, 1.0)
    placed = world_server_spec(TrainConfig(env="x", world_server_gpus=1, world_server_resource="world_server"),
                               spec, "r")
    assert placed["num_gpus"] == 1.0 and placed["resources"] == {"world_server": 1}
    for servers, runners in ((0, 2), (-1, 2), (3, 2), (2, 0)):  # 0 runners: sampling in the driver, one runner
        with pytest.raises(ConfigError, match=f"--world-servers {servers}|got {servers}"):
            world_server_spec(TrainConfig(env="x", num_env_runners=runners, world_servers=servers), spec, "r")
    with pytest.raises(ConfigError, match=r"--world-servers 3 > 2 env runners \(--num-env-runners 2\)"):
        world_server_spec(TrainConfig(env="x", num_env_runners=2, world_servers=3), spec, "r")
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(ValueError, match=f"count must be an integer >= 1, got {bad!r}"):
            WorldPPOConfig().world_server("n", "b", count=bad)
    config = WorldPPOConfig().world_server("n", "b", count=2, capacity=8)
    assert config.world_server_spec == {"name": "n", "bundle": "b", "count": 2, "capacity": 8}
    assert config.env_runner_cls is WorldEnvRunner
    # EnvRunner i (0: the local one, 1..K remote) -> servers[(max(i, 1) - 1) % count]
    assert [world_server_for(["a", "b"], i) for i in range(5)] == ["a", "a", "b", "a", "b"]
    assert [world_server_for(["a"], i) for i in range(3)] == ["a", "a", "a"]


def test_several_world_servers_each_serve_one_env_runner(random_bundle, ray_local):
    import ray

    from genie_world.world_server import get_world_server

    # 2 EnvRunners (0.5 CPU each, build_algo_config) + 2 servers (0.5 CPU each, world_server_spec) = the 2 CPUs.
    cfg = TrainConfig(env=f"world://{random_bundle}?prompt=go to the red ball&max_episode_steps=4",
                      num_env_runners=2, world_servers=2, **SMALL)
    spec = parse_env(cfg.env)
    server = world_server_spec(cfg, spec, "several")
    names = [f"{server['name']}-0", f"{server['name']}-1"]
    assert server["capacity"] == cfg.num_envs  # one runner's envs per server
    assert server["num_gpus"] == 0.0  # -1 (auto) resolved against this local Ray, which has no GPU
    half = build_algo_config(dataclasses.replace(cfg, learner_gpus=0.5), spec, _tokenizer(random_bundle), server)
    assert half.num_gpus_per_learner == 0.5  # --learner-gpus reaches RLlib (not built: no GPU here)
    algo = build_algo_config(cfg, spec, _tokenizer(random_bundle), server).build_algo()
    try:
        assert len(algo.world_servers) == 2 and algo.world_server is algo.world_servers[0]
        assert [get_world_server(n)._actor_id for n in names] == [s._actor_id for s in algo.world_servers]
        assert algo.world_server_info["name"] == names[0]
        assert algo.config.env_config["servers"] == names and "server" not in algo.config.env_config
        result = algo.train()
        assert result["env_runners"]["num_env_steps_sampled"] > 0
        # Each remote EnvRunner picked its own server: runner i -> servers[i - 1].
        picked = dict(algo.env_runner_group.foreach_env_runner(
            lambda r: (r.worker_index, r.env.unwrapped._backend.server), local_env_runner=False))
        assert picked == {1: names[0], 2: names[1]}
        for s in algo.world_servers:
            info, stats = ray.get([s.info.remote(), s.stats.remote()])
            # Exactly one runner's block of envs is open on each, and it stepped them.
            assert stats["clients"] == 1 and info["free"] == 0 and info["capacity"] == cfg.num_envs
            assert stats["env_steps"] > 0
    finally:
        algo.stop()
    for n in names:
        with pytest.raises(ValueError):
            get_world_server(n)
    assert algo.world_servers == [] and algo.world_server is None
