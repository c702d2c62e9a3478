"""`genie-sima train`: PPO + the SIMA losses through real RLlib, in a world served by a real
WorldModelServer (imagination) and in the real BabyAI game; checkpoints, resume and refusals."""

from __future__ import annotations

import json
import os

import pytest

from pipelines.errors import ConfigError
from pipelines.train_policy import TrainConfig, parse_env, train

pytestmark = pytest.mark.slow

SMALL = dict(num_envs=4, rollout_steps=16, minibatch_size=32, num_epochs=1, vision_dim=32, hidden_dim=64,
             moco_queue_size=64, checkpoint_every=1, wandb="offline", threads=1, replay_capacity=4096)


def test_two_ppo_iterations_against_a_world_model_server_then_resume(random_bundle, tmp_path, ray_local,
                                                                     monkeypatch):
    import torch

    out = tmp_path / "run"
    env = f"world://{random_bundle}?prompt=go to the red ball&max_episode_steps=8"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch_threads = torch.get_num_threads()
    result = train(TrainConfig(env=env, out=str(out), total_timesteps=128, **{**SMALL, "threads": torch_threads + 1}),
                   log=lambda m: None)
    # --threads held for the run only: the calling process gets its own settings back
    assert torch.get_num_threads() == torch_threads and "OMP_NUM_THREADS" not in os.environ
    assert result["iterations"] == 2 and result["env_steps"] >= 128
    m = result["metrics"]
    for key in ("learners/default_policy/policy_loss", "learners/default_policy/language_matching_loss",
                "learners/default_policy/contrastive_loss", "env_runners/episode_return_mean"):
        assert key in m, key
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]
    assert json.loads((out / "config.json").read_text())["config"]["env"] == env
    assert (out / "tokenizer.json").exists() and list((out / "tensorboard" / "train").glob("events.*"))
    events = [json.loads(line) for line in (out / "logs" / "train_events.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in events] == [1, 2]
    for e in events:  # where each iteration's seconds went: the parts fit inside the iteration they belong to
        for key in ("time/train_s", "time/sample_s", "time/learn_s", "time/learn_make_batch_s", "time/world_s",
                    "time/checkpoint_s", "time/iteration_s"):
            assert e[key] >= 0.0, (key, e)
        assert e["time/sample_s"] + e["time/learn_s"] <= e["time/train_s"] <= e["time/iteration_s"], e
        assert 0.0 < e["time/world_s"] <= e["time/iteration_s"], e
    # The default --video-every (10) still logs the last iteration of a short run.
    assert TrainConfig().video_every == 10 and sorted(p.name for p in (out / "videos").iterdir()) == [
        "rollout_iter_000002.gif"]
    with pytest.raises(ConfigError, match="already has checkpoints"):
        train(TrainConfig(env=env, out=str(out), total_timesteps=192, **SMALL), log=lambda m: None)
    again = train(TrainConfig(env=env, out=str(out), total_timesteps=192, resume=True, **SMALL), log=lambda m: None)
    assert again["iterations"] == 3 and again["env_steps"] >= 192


def test_one_ppo_iteration_in_the_real_game_then_evaluate_it(tmp_path, ray_local):
    from pipelines.evaluate import EvaluateConfig, evaluate

    run = tmp_path / "real"
    result = train(TrainConfig(env="babyai:BabyAI-GoToRedBall-v0", out=str(run), total_timesteps=64, **SMALL),
                   log=lambda m: None)
    assert result["iterations"] == 1 and "learners/default_policy/total_loss" in result["metrics"]
    ev = evaluate(EvaluateConfig(policy=str(run), levels="BabyAI-GoToRedBall-v0", episodes=6, max_steps=32),
                  log=lambda m: None)
    rows = {r["agent"]: r for r in ev["rows"]}
    assert set(rows) == {"policy", "random", "bot"} and all(r["episodes"] == 6 for r in rows.values())
    assert rows["bot"]["success_rate"] == 1.0  # the bot solves GoToRedBall: the harness counts success right
    assert 0.0 <= rows["policy"]["success_rate"] <= 1.0
    table = (run / "evaluation.md").read_text()
    assert "| BabyAI-GoToRedBall-v0 | bot | 6 | 1.000 |" in table


def test_env_spec_refusals():
    with pytest.raises(ConfigError, match="expected 'world://RUN"):
        parse_env("atari:Pong")
    with pytest.raises(ConfigError, match="exactly one of prompt"):
        parse_env("world://runs/x")
    with pytest.raises(ConfigError, match=r"unknown parameters \['promt'\]"):
        parse_env("world://runs/x?promt=go")
    spec = parse_env("world://runs/x?prompt=go%20to%20the%20red%20ball&num_levels=8")
    assert spec.target == "runs/x" and spec.params == {"prompt": "go to the red ball", "num_levels": "8"}


def test_a_world_bundle_without_action_adapter_is_refused_before_anything_starts(random_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "no_adapter"
    shutil.copytree(random_bundle, bundle)
    (bundle / "action_adapter.json").unlink()
    out = tmp_path / "agent"
    with pytest.raises(ConfigError, match="has no action_adapter.json"):
        train(TrainConfig(env=f"world://{bundle}?prompt=go to the red ball", out=str(out)), log=lambda m: None)
    assert not out.exists()


def test_gae_lambda_and_ppo_kl_penalty_reach_rllibs_ppo_config():
    from pipelines.train_policy import build_algo_config

    tokenizer = {"words": ["<pad>", "go"], "max_len": 16}
    spec = parse_env("babyai:BabyAI-GoToRedBall-v0")
    default = build_algo_config(TrainConfig(env="babyai:BabyAI-GoToRedBall-v0", out="x", **SMALL), spec, tokenizer, None)
    assert (default.lambda_, default.use_kl_loss, default.kl_coeff) == (1.0, True, 0.2)  # RLlib's defaults
    tuned = build_algo_config(TrainConfig(env="babyai:BabyAI-GoToRedBall-v0", out="x", gae_lambda=0.95, kl_coeff=0.0,
                                          **SMALL), spec, tokenizer, None)
    assert (tuned.lambda_, tuned.use_kl_loss, tuned.kl_coeff) == (0.95, False, 0.0)
