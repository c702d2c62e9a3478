"""``genie-sima evaluate``: run a trained policy in the REAL game next to baselines, and write a table.

    genie-sima evaluate --policy RUN_OR_CHECKPOINT --levels BabyAI-GoToRedBall-v0,BabyAI-GoToLocal-v0
                        --episodes 200 [--baselines random,bot] [--out DIR]

Per level and agent: success rate, mean return, mean path length of successful episodes, and the
bot's path length on the same seeds. Episode i of every agent starts from the same level seed, so the
rows compare like with like. Writes DIR/evaluation.json and DIR/evaluation.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic_io import check_writable_dir, write_json_atomic
from .config import config_field as _f, save_config
from .errors import ConfigError
from .progress import ProgressLine


@dataclass
class EvaluateConfig:
    policy: str | None = _f(None, "a `genie-sima train --out` directory or one of its checkpoints (omit for baselines only)")
    levels: str = _f("BabyAI-GoToRedBall-v0,BabyAI-GoToLocal-v0", "comma-separated real BabyAI levels")
    episodes: int = _f(200, "episodes per level and agent")
    baselines: str = _f("random,bot", "comma-separated baselines to run beside the policy (random, bot, or empty)")
    out: str | None = _f(None, "directory for evaluation.json / evaluation.md (default: the policy's run dir)")
    max_steps: int = _f(64, "episode time limit in the real game")
    seed: int = _f(10_000, "first level seed (episode i uses seed + i)")
    greedy: bool = _f(True, "take the most probable action (else sample)")
    threads: int = _f(1, "torch threads")


def _checkpoint_dir(policy: str) -> Path:
    from .train_policy import latest_checkpoint

    p = Path(policy).resolve()  # RLlib reads checkpoints by URI: relative paths have no scheme
    if (p / "checkpoints").is_dir():
        newest = latest_checkpoint(p)
        if newest is None:
            raise ConfigError(f"--policy {p}: no checkpoints in {p / 'checkpoints'}")
        p = newest
    module = p / "learner_group" / "learner" / "rl_module" / "default_policy"
    if not module.is_dir():
        raise ConfigError(f"--policy {policy}: not a genie-sima train run or RLlib checkpoint ({module} missing)")
    return p


class PolicyAgent:
    """The trained RLModule acting on {"image", "mission" tokens} observations."""

    name = "policy"

    def __init__(self, checkpoint: Path, greedy: bool):
        import torch
        from ray.rllib.core.rl_module.rl_module import RLModule

        from sima_policy.instruction_tokenizer import InstructionTokenizer

        self.module = RLModule.from_checkpoint(str(checkpoint / "learner_group" / "learner" / "rl_module" / "default_policy"))
        self.module.eval()
        run = checkpoint.parent.parent
        self.tokenizer = InstructionTokenizer.from_json(json.loads((run / "tokenizer.json").read_text()))
        self.max_len = int(self.module.observation_space["mission"].shape[0])
        self.greedy, self.torch = greedy, torch
        self.rng = torch.Generator().manual_seed(0)

    def act(self, frames: np.ndarray, missions: list[str]) -> np.ndarray:
        torch = self.torch
        obs = {"image": torch.from_numpy(frames),
               "mission": torch.from_numpy(self.tokenizer.encode_batch(missions, self.max_len))}
        with torch.no_grad():
            logits = self.module.forward_inference({"obs": obs})["action_dist_inputs"]
        if self.greedy:
            return logits.argmax(-1).numpy()
        return torch.multinomial(logits.softmax(-1), 1, generator=self.rng)[:, 0].numpy()


def run_episodes(level: str, agent: str, episodes: int, seed: int, max_steps: int, policy=None,
                 frame_size: int = 64, progress=None) -> dict:
    """``agent``: policy | random | bot. Returns per-episode success, return and length."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    from .data.babyai_game import BabyAIGame

    rng = np.random.default_rng(seed)
    success, returns, lengths = [], [], []
    batch = 16 if agent == "policy" else 1
    pool = [BabyAIGame(level, frame_size=frame_size, max_steps=max_steps) for _ in range(min(batch, episodes))]
    for lo in range(0, episodes, batch):
        games = pool[:min(batch, episodes - lo)]  # made once, reset per episode
        frames = [g.reset(seed + lo + j) for j, g in enumerate(games)]
        bots = [BabyAIBot(g.unwrapped) for g in games] if agent == "bot" else None
        done = np.zeros(len(games), bool)
        ret, steps = np.zeros(len(games)), np.zeros(len(games), int)
        won = np.zeros(len(games), bool)
        while not done.all():
            if agent == "policy":
                acts = policy.act(np.stack(frames), [g.mission for g in games])
            elif agent == "bot":
                acts = [int(b.replan()) if not d else 0 for b, d in zip(bots, done)]
            else:
                acts = rng.integers(0, games[0].num_actions, len(games))
            for j, g in enumerate(games):
                if done[j]:
                    continue
                frames[j], r, term, trunc = g.step(int(acts[j]))
                ret[j] += r
                steps[j] += 1
                if term or trunc:
                    done[j] = True
                    won[j] = BabyAIGame.is_success(ret[j], term)
        success += won.tolist()
        returns += ret.tolist()
        lengths += steps.tolist()
        if progress is not None:
            progress(len(success))
    for g in pool:
        g.close()
    success_a, lengths_a = np.array(success), np.array(lengths)
    return {"episodes": episodes, "success_rate": float(success_a.mean()), "mean_return": float(np.mean(returns)),
            "mean_length_success": float(lengths_a[success_a].mean()) if success_a.any() else None}


def evaluate(cfg: EvaluateConfig, log=print) -> dict:
    import torch

    if cfg.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {cfg.episodes}")
    levels = [lv.strip() for lv in cfg.levels.split(",") if lv.strip()]
    baselines = [b.strip() for b in cfg.baselines.split(",") if b.strip()]
    bad = [b for b in baselines if b not in ("random", "bot")]
    if bad:
        raise ConfigError(f"--baselines: unknown {bad}; expected random, bot")
    if not cfg.policy and not baselines:
        raise ConfigError("nothing to evaluate: give --policy and/or --baselines")
    torch.set_num_threads(cfg.threads)
    checkpoint = _checkpoint_dir(cfg.policy) if cfg.policy else None
    out = Path(cfg.out) if cfg.out else (checkpoint.parent.parent if checkpoint else Path("."))
    check_writable_dir(out, "--out")
    policy = PolicyAgent(checkpoint, cfg.greedy) if checkpoint else None
    agents = (["policy"] if policy else []) + baselines
    rows = []
    total = len(levels) * len(agents) * cfg.episodes
    line = ProgressLine("evaluate", total, "episodes", every_s=5.0)
    for level in levels:
        for agent in agents:
            base = len(rows) * cfg.episodes
            r = run_episodes(level, agent, cfg.episodes, cfg.seed, cfg.max_steps, policy,
                             progress=lambda n, base=base: line.update(base + n))
            rows.append({"level": level, "agent": agent, **r})
            log(f"evaluate: {level} {agent}: success {r['success_rate']:.3f} return {r['mean_return']:.3f}")
    result = {"policy": str(checkpoint) if checkpoint else None, "rows": rows}
    write_json_atomic(out / "evaluation.json", result)
    save_config(cfg, out / "evaluation.config.json")
    (out / "evaluation.md").write_text(format_table(rows))
    return result


def format_table(rows: list[dict]) -> str:
    lines = ["| level | agent | episodes | success | mean return | mean length (successes) |", "|---|---|---|---|---|---|"]
    for r in rows:
        length = "" if r["mean_length_success"] is None else f"{r['mean_length_success']:.1f}"
        lines.append(f"| {r['level']} | {r['agent']} | {r['episodes']} | {r['success_rate']:.3f} | "
                     f"{r['mean_return']:.3f} | {length} |")
    return "\n".join(lines) + "\n"
