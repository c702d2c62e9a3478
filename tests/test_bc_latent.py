"""Behaviour cloning from latent actions: labels come from the world model (latent action model + adapter),
never from the videos' own actions; the cloned policy loads as an RLlib module, starts PPO
(``train --init-policy``) with exactly its weights, and plays in the real game beside other policies,
with real-vs-imagined GIFs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.bc_latent import BCConfig, behaviour_clone, label_transitions
from pipelines.errors import ConfigError

pytestmark = pytest.mark.slow

SMALL_POLICY = dict(vision_dim=32, hidden_dim=64)


@pytest.fixture(scope="module")
def data_bundle(babyai_mixed_data, tmp_path_factory):
    """A random-weight bundle whose vocabulary covers the collected missions (and the demo prompt)."""
    from genie_world.config import resolve_config
    from genie_world.random_bundle import write_random_bundle
    from pipelines.data.manifest import read_manifest

    missions = sorted({r["mission"] for r in read_manifest(babyai_mixed_data, split=None)} | {"go to the red ball"})
    return write_random_bundle(tmp_path_factory.mktemp("bc_bundle") / "run", resolve_config("micro"), missions, 3)


def _clone(data_bundle, data, out, **cfg):
    result = behaviour_clone(BCConfig(bundle=str(data_bundle), data=str(data), out=str(out), steps=6, batch=16,
                                      log_every=3, wandb="disabled", **SMALL_POLICY, **cfg), log=lambda m: None)
    return out, result


@pytest.fixture(scope="module")
def cloned(data_bundle, babyai_mixed_data, tmp_path_factory):
    """The default clone: vision_arch tile_ego, symmetry augmentation on (BabyAI data)."""
    return _clone(data_bundle, babyai_mixed_data, tmp_path_factory.mktemp("bc") / "bc")


def test_labels_are_the_adapters_mapping_of_the_latent_actions(data_bundle, babyai_mixed_data):
    from genie_world.bundle import load_bundle
    from pipelines.data.clip_reader import ClipReader

    bundle = load_bundle(data_bundle, parts=("tokenizer", "latent_actions"))
    got = label_transitions(bundle, babyai_mixed_data, "train")
    with ClipReader(babyai_mixed_data, clip_len=2, split="train") as reader:
        clips = [reader[i] for i in range(len(reader))]  # manifest order, the same order label_transitions reads
    pairs = torch.from_numpy(np.stack([c["frames"] for c in clips]))  # [N, 2, H, W, 3]
    assert len(got.label) == len(clips)
    np.testing.assert_array_equal(got.frames, pairs[:, 0].numpy())
    latent = bundle.latent_actions.infer(pairs)[:, 0].numpy()
    context = bundle.tokenizer.encode(pairs[:, :1])[1][:, 0].numpy()
    np.testing.assert_array_equal(got.latent, latent)
    np.testing.assert_array_equal(got.label, bundle.adapter.latent_to_real(latent, context))
    np.testing.assert_array_equal(got.true, [int(c["actions"][0]) for c in clips])
    # Random weights: the labels are the model's, so they cannot all equal the videos' own actions.
    assert (got.label != got.true).any()
    np.testing.assert_array_equal(got.changed, (pairs[:, 0] != pairs[:, 1]).flatten(1).any(1).numpy())


def test_cloned_policy_is_an_rllib_module_trained_on_changed_transitions(cloned):
    from ray.rllib.core.rl_module.rl_module import RLModule

    out, result = cloned
    m = json.loads((out / "bc_metrics.json").read_text())
    assert m["train_transitions"] > 0 and m["train_transitions_unchanged_skipped"] > 0
    for key in ("label_vs_true_action_val", "policy_vs_label_val", "policy_vs_true_action_val"):
        assert 0.0 <= m[key] <= 1.0, key
    assert 0.0 <= m["agent_cell_accuracy_val"] <= 1.0
    module = RLModule.from_checkpoint(str(out / "policy"))
    assert module.arch == "tile_ego" and module.trunk.conv_frame == "room"
    obs = {"image": torch.zeros(2, 64, 64, 3, dtype=torch.uint8), "mission": torch.zeros(2, 16, dtype=torch.long)}
    logits = module.forward_inference({"obs": obs})["action_dist_inputs"]
    assert logits.shape == (2, 7)
    assert json.loads((out / "config.json").read_text())["config"]["steps"] == 6
    with pytest.raises(ConfigError, match="already holds a cloned policy"):
        behaviour_clone(BCConfig(bundle="unused", data="unused", out=str(out)), log=lambda m: None)


def test_ppo_starts_from_exactly_the_cloned_weights(cloned, data_bundle, tmp_path, ray_local):
    from ray.rllib.core.rl_module.rl_module import RLModule

    from pipelines.train_policy import TrainConfig, train

    out, _ = cloned
    run = tmp_path / "ppo"
    # lr 0: the one PPO iteration cannot move the weights, so the checkpoint shows what PPO started from.
    train(TrainConfig(env=f"world://{data_bundle}?prompt=go to the red ball&max_episode_steps=8", out=str(run),
                      init_policy=str(out), lr=0.0, num_envs=4, rollout_steps=8, total_timesteps=32,
                      minibatch_size=16, num_epochs=1, moco_queue_size=16, wandb="disabled", threads=1,
                      language_coeff=0.0, contrastive_coeff=0.0, **SMALL_POLICY), log=lambda m: None)
    ckpt = next((run / "checkpoints").iterdir()) / "learner_group" / "learner" / "rl_module" / "default_policy"
    started = RLModule.from_checkpoint(str(ckpt)).state_dict()
    cloned_state = RLModule.from_checkpoint(str(out / "policy")).state_dict()
    shared = [k for k in cloned_state if not k.startswith("aux.") and k != "num_updates"]
    assert shared and all(torch.equal(started[k], cloned_state[k]) for k in shared)
    # The clone's design, the frame of its convs included (their weights fit either frame).
    assert RLModule.from_checkpoint(str(ckpt)).model_config["vision_arch"] == "tile_ego"
    assert RLModule.from_checkpoint(str(ckpt)).trunk.conv_frame == "room"
    # The MoCo key encoder restarts as a copy of the loaded vision encoder.
    for k, v in started.items():
        if k.startswith("aux.key_vision."):
            assert torch.equal(v, cloned_state[k.replace("aux.key_vision.", "vision.")]), k


def test_init_policy_with_another_vocabulary_is_refused(cloned, tmp_path, ray_local):
    from pipelines.train_policy import TrainConfig, train

    out, _ = cloned
    with pytest.raises(ConfigError, match="instruction tokenizer"):
        train(TrainConfig(env="babyai:BabyAI-GoToRedBall-v0", out=str(tmp_path / "r"), init_policy=str(out),
                          num_envs=2, rollout_steps=8, total_timesteps=16, wandb="disabled", **SMALL_POLICY),
              log=lambda m: None)


def test_evaluate_named_policies_with_real_vs_imagined_gifs(cloned, data_bundle, tmp_path):
    from pipelines.evaluate import EvaluateConfig, evaluate

    out, _ = cloned
    ev = evaluate(EvaluateConfig(policy=f"bc={out},again={out}", levels="BabyAI-GoToRedBall-v0", episodes=3,
                                 max_steps=6, out=str(tmp_path / "ev"), bundle=str(data_bundle), gifs=1),
                  log=lambda m: None)
    assert [r["agent"] for r in ev["rows"]] == ["bc", "again", "random", "bot"]
    rows = {r["agent"]: r for r in ev["rows"]}
    assert rows["bc"]["success_rate"] == rows["again"]["success_rate"]  # greedy, same seeds: same play
    assert len(ev["gifs"]) == 2
    gif = Image.open(tmp_path / "ev" / ev["gifs"][0])
    assert gif.n_frames >= 2 and gif.width > 2 * gif.height * 0.9  # real | imagined, side by side
    assert "| BabyAI-GoToRedBall-v0 | bc | 3 |" in (tmp_path / "ev" / "evaluation.md").read_text()
    with pytest.raises(ConfigError, match="bad or repeated name"):
        evaluate(EvaluateConfig(policy=f"bot={out}", out=str(tmp_path / "x")), log=lambda m: None)


def test_a_policy_that_cannot_read_a_levels_missions_gets_a_row_saying_so(cloned, tmp_path):
    import shutil

    from pipelines.evaluate import EvaluateConfig, evaluate, format_table
    from sima_policy.instruction_tokenizer import InstructionTokenizer

    out, _ = cloned
    narrow = tmp_path / "narrow"
    shutil.copytree(out, narrow)  # the same policy, reading only GoToRedBall's one mission
    (narrow / "tokenizer.json").write_text(json.dumps(InstructionTokenizer.from_texts(["go to the red ball", "go to a red ball"]).to_json()))
    ev = evaluate(EvaluateConfig(policy=f"narrow={narrow}", levels="BabyAI-GoToLocal-v0,BabyAI-GoToRedBall-v0",
                                 episodes=3, max_steps=4, baselines="random", out=str(tmp_path / "ev")),
                  log=lambda m: None)
    rows = {(r["level"], r["agent"]): r for r in ev["rows"]}
    assert rows[("BabyAI-GoToLocal-v0", "narrow")]["skipped"].startswith("mission")
    assert rows[("BabyAI-GoToLocal-v0", "random")]["episodes"] == 3  # the other rows are kept
    assert rows[("BabyAI-GoToRedBall-v0", "narrow")]["episodes"] == 3
    assert "| BabyAI-GoToLocal-v0 | narrow | 0 | cannot read this level's missions |" in format_table(ev["rows"])
