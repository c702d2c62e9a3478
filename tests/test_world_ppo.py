"""`WorldPPO` owns its world server (real Ray, real RLlib, a random-weight bundle): the server exists once the
algorithm is built, its envs step on it, and `algo.stop()` takes it away; a build that fails kills it too."""

from __future__ import annotations

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
