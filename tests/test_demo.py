"""`genie-sima demo --setting micro`: the whole loop through the real command line on a local Ray
(collect -> pretrain -> generate -> BC from latent actions -> PPO in imagination -> real-game PPO ->
real-game evaluation -> report.html), then a re-run that skips every finished step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_play import browser  # noqa: F401  (the headless Chromium fixture)

pytestmark = pytest.mark.slow

STEPS = ["collect", "pretrain", "generate", "bc", "starts", "ppo_in_imagination", "real_game_ppo", "evaluate"]


def _demo(out, *extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", "--setting", "micro", "--out", str(out),
                           "--wandb", "disabled", *extra], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.timeout(1500)  # two demo runs; about 5 minutes on an idle 2-core machine
def test_micro_demo_runs_end_to_end_and_resumes(tmp_path, browser):  # noqa: F811
    out = tmp_path / "demo"
    proc = _demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    timings = json.loads((out / "timings.json").read_text())
    assert sorted(k for k in timings if k != "total") == sorted(STEPS) and timings["total"] > 0
    agents = {r["agent"] for r in result["evaluation"]}
    assert agents == {"bc", "imagination_ppo", "real_game_ppo", "random", "bot"}
    assert all(r["level"] == "BabyAI-GoToRedBall-v0" and r["episodes"] == 2 for r in result["evaluation"])
    # Every policy also played the world model from the same real starts, its actions replayed in the game.
    imagined = {r["agent"]: r for r in result["evaluation"] if "imagined_success" in r}
    assert set(imagined) == {"bc", "imagination_ppo", "real_game_ppo"}
    assert all(r["imagined_episodes"] == 2 and 0 <= r["replayed_success"] <= 1 for r in imagined.values())
    # The imagined run started from the cloned policy; the real-game baseline got as many frames as the videos.
    ppo_log = (out / "ppo" / "logs" / "train_events.jsonl").read_text().splitlines()
    assert ppo_log and json.loads((out / "ppo" / "config.json").read_text())["config"]["init_policy"] == str(out / "bc")
    ppo_cfg = json.loads((out / "ppo" / "config.json").read_text())["config"]
    assert (ppo_cfg["gae_lambda"], ppo_cfg["kl_coeff"], ppo_cfg["minibatch_size"]) == (0.95, 0.0, 32)
    assert (ppo_cfg["language_coeff"], ppo_cfg["contrastive_coeff"]) == (0.0, 0.0)
    # It trained on real first frames of the videos: the prompt's mission on frames that show what it names.
    starts = out / "levels" / "starts.h5"
    assert ppo_cfg["env"] == f"world://{out / 'world'}?level_file={starts}"
    from genie_world.levels import load_levels
    pool = load_levels(starts)
    assert len(pool) == 4 and pool.source == "image" and pool.missions.count("go to the red ball") >= 3
    real_cfg = json.loads((out / "real_ppo" / "config.json").read_text())["config"]
    assert (real_cfg["total_timesteps"], real_cfg["num_envs"], real_cfg["gae_lambda"]) == (64, 4, 1.0)
    report = (out / "report.html").read_text()
    for heading in ("World model", "Levels from a prompt", "Behaviour cloning from latent actions",
                    "PPO in imagination", "The real game"):
        assert f"<h2>{heading}" in report, heading
    assert "Not run" not in report
    assert report.count("data:image/gif;base64,") >= 1 + 3  # level rollout + one real-vs-imagined GIF per policy
    assert "<td>imagination_ppo</td>" in report and "<polyline" in report
    assert "imagined minus real, same actions" in report
    assert "Trained on 4 levels made from the videos' real first frames" in report
    # A real browser renders the page: every inlined picture decodes, the evaluation table has its rows.
    browser.get((out / "report.html").as_uri())
    sizes = browser.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
    assert len(sizes) >= 5 and all(done and width > 0 for done, width in sizes), sizes
    cells = browser.execute_script("return Array.from(document.querySelectorAll('td')).map(c => c.textContent);")
    assert {"bc", "imagination_ppo", "real_game_ppo", "random", "bot"} <= set(cells)

    again = _demo(out)
    assert again.returncode == 0, again.stderr[-3000:]
    for step in STEPS:
        assert f"demo: {step}: already done, skipped" in again.stderr, step
    assert json.loads((out / "timings.json").read_text())["collect"] == timings["collect"]


def test_bad_world_override_is_refused_before_anything_runs(tmp_path):
    proc = _demo(tmp_path / "bad", "--world-overrides", "dyn_stepz=3")
    assert proc.returncode == 2 and "dyn_stepz=3" in proc.stderr and "world-model config field" in proc.stderr
    assert not (tmp_path / "bad" / "data").exists()
