"""Imagined success against the real game's for the same actions (pipelines/imagined_vs_real.py), on a
micro bundle whose termination head is set to always or never fire, with a scripted agent: the imagined
outcome follows the head, the real outcome is exactly what the same actions give in the real game."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genie_world.bundle import load_bundle
from pipelines.data.babyai_game import BabyAIGame
from pipelines.imagined_vs_real import imagined_vs_real

LEVEL = "BabyAI-GoToRedBall-v0"
SEED = 500
# forward-heavy, so that some of these fixed sequences win the real level and some do not
SCRIPT = [2, 2, 1, 2, 2, 2, 0, 2, 2, 2, 1, 2]


class ScriptedAgent:
    """Plays SCRIPT[t] at step t in every env; records the missions and frames it was shown."""

    def __init__(self):
        self.t, self.missions, self.shapes = 0, set(), set()

    def act(self, frames: np.ndarray, missions: list[str]) -> np.ndarray:
        self.missions.update(missions)
        self.shapes.add(frames.shape)
        a = SCRIPT[self.t % len(SCRIPT)]
        self.t += 1
        return np.full(len(missions), a)


def head_that(bundle, fires: bool):
    """Termination logit +-50 whatever the frame and mission."""
    last = bundle.reward_head.out[-1]
    with torch.no_grad():
        last.weight[1].zero_()
        last.bias[1] = 50.0 if fires else -50.0
    return bundle


def real_outcomes(actions: list[int], episodes: int, max_steps: int) -> list[bool]:
    """The ground truth, played directly: each seed's game, the fixed actions until it ends."""
    won = []
    for i in range(episodes):
        game = BabyAIGame(LEVEL, frame_size=64, max_steps=max_steps)
        game.reset(SEED + i)
        ret, result = 0.0, False
        for a in actions:
            _, r, term, trunc = game.step(a)
            ret += r
            if term or trunc:
                result = BabyAIGame.is_success(ret, term)
                break
        game.close()
        won.append(result)
    return won


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """A random-weight micro bundle that reads GoToRedBall's missions ("go to a/the red ball")."""
    from genie_world.config import resolve_config
    from genie_world.random_bundle import write_random_bundle

    return write_random_bundle(tmp_path_factory.mktemp("imagined") / "run", resolve_config("micro"),
                               ["go to the red ball", "go to a red ball"], 0)


@pytest.fixture
def bundle(bundle_dir):
    return load_bundle(bundle_dir)  # each test sets the head its own way


def test_a_head_that_never_fires_imagines_no_win_and_the_replay_is_the_real_game(bundle):
    n, steps = 16, len(SCRIPT)
    agent = ScriptedAgent()
    got = imagined_vs_real(head_that(bundle, fires=False), LEVEL, agent, n, SEED, steps)
    expected = real_outcomes(SCRIPT, n, steps)
    assert got["imagined_success"] == 0.0 and got["imagined_only_wins"] == 0
    assert got["mean_imagined_length"] == steps  # every imagined episode ran to the time limit
    assert got["replayed_success"] == pytest.approx(np.mean(expected))
    assert got["real_only_wins"] == sum(expected)
    assert 0 < sum(expected) < n, "the script should win some of these levels and lose others"
    assert agent.missions <= {"go to the red ball", "go to a red ball"} and agent.shapes == {(n, 64, 64, 3)}


def test_a_head_that_always_fires_imagines_a_win_at_step_one(bundle):
    n = 16
    got = imagined_vs_real(head_that(bundle, fires=True), LEVEL, ScriptedAgent(), n, SEED, len(SCRIPT))
    expected = real_outcomes(SCRIPT[:1], n, len(SCRIPT))  # one action was played before the head ended it
    assert got["imagined_success"] == 1.0 and got["mean_imagined_length"] == 1
    assert got["replayed_success"] == pytest.approx(np.mean(expected))
    assert got["imagined_only_wins"] == n - sum(expected) and got["real_only_wins"] == 0


def test_evaluate_reports_imagined_beside_real_and_needs_a_bundle(bundle_dir, random_bundle, tmp_path):
    from pipelines.errors import ConfigError
    from pipelines.evaluate import EvaluateConfig, evaluate

    with pytest.raises(ConfigError, match="--imagined needs --bundle"):
        evaluate(EvaluateConfig(policy=None, baselines="random", imagined=2), log=lambda m: None)
    with pytest.raises(ConfigError, match=r"--imagined must be in \[0, --episodes=3\]"):
        evaluate(EvaluateConfig(policy=None, baselines="random", episodes=3, imagined=4, bundle=str(random_bundle)),
                 log=lambda m: None)
    policy = _tiny_policy(tmp_path / "policy")
    ev = evaluate(EvaluateConfig(policy=f"p={policy}", levels=LEVEL, episodes=3, max_steps=4, baselines="random",
                                 bundle=str(bundle_dir), imagined=2, gifs=0, out=str(tmp_path / "ev")),
                  log=lambda m: None)
    rows = {r["agent"]: r for r in ev["rows"]}
    assert rows["p"]["imagined_episodes"] == 2 and 0.0 <= rows["p"]["imagined_success"] <= 1.0
    assert 1 <= rows["p"]["mean_imagined_length"] <= 4
    assert "imagined_success" not in rows["random"]  # baselines play only the real game
    table = (tmp_path / "ev" / "evaluation.md").read_text()
    assert "imagined success (first N starts)" in table and "(N=2)" in table
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["rows"][0]["imagined_episodes"] == 2
    # The imagined episodes sample from their own stream: the real-game rows are those of a run without them.
    levels = f"{LEVEL},BabyAI-GoToRedBallGrey-v0"
    with_imagined, without = (evaluate(EvaluateConfig(policy=f"p={policy}", levels=levels, episodes=16, max_steps=32,
                                                      baselines="", greedy=False, bundle=str(bundle_dir), imagined=k,
                                                      gifs=0, out=str(tmp_path / f"ev{k}")), log=lambda m: None)
                              for k in (8, 0))
    real = [[(r["level"], r["success_rate"], r["mean_return"]) for r in ev["rows"]] for ev in (with_imagined, without)]
    assert real[0] == real[1] and any(ret > 0 for _, _, ret in real[1]), real
    # A world model that cannot read a level's missions: the row says so, the real-game figures stay.
    ev = evaluate(EvaluateConfig(policy=f"p={policy}", levels=LEVEL, episodes=3, max_steps=4, baselines="",
                                 bundle=str(random_bundle), imagined=2, gifs=0, out=str(tmp_path / "ev2")),
                  log=lambda m: None)
    (row,) = ev["rows"]
    assert row["episodes"] == 3 and "unknown words" in row["imagined_skipped"] and "imagined_success" not in row


def _tiny_policy(out):
    """A random-weight SIMA policy saved as a bc run reads: RLlib module checkpoint + tokenizer.json."""
    import gymnasium as gym

    from pipelines.bc_latent import build_policy
    from sima_policy.instruction_tokenizer import InstructionTokenizer

    tokenizer = InstructionTokenizer.from_texts(["go to the red ball", "go to a red ball"])
    obs = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8),
                           "mission": gym.spaces.Box(0, tokenizer.vocab_size - 1, (tokenizer.max_len,), np.int64)})
    module = build_policy(obs, gym.spaces.Discrete(7), 32, 64, "conv")
    out.mkdir(parents=True)
    module.save_to_path(str(out / "policy"))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer.to_json()))
    (out / "config.json").write_text("{}")
    return out
