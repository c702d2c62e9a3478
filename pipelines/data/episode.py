"""Play one episode with a behaviour policy and keep everything the world model needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EpisodeRecord:
    frames: np.ndarray  # [T+1, H, W, 3] uint8, frame t is before action t
    actions: np.ndarray  # [T] int64
    rewards: np.ndarray  # [T] float32
    terminated: np.ndarray  # [T] bool
    truncated: np.ndarray  # [T] bool
    mission: str
    level_id: str
    seed: int
    success: bool

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])

    @property
    def total_return(self) -> float:
        return float(self.rewards.sum(dtype=np.float64))


def episode_seeds(base_seed: int, episode_index: int) -> tuple[int, np.random.Generator]:
    """(env seed, behaviour rng) for one episode, independent of how episodes are sharded."""
    ss = np.random.SeedSequence([int(base_seed), int(episode_index)])
    env_seed = int(ss.generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)
    return env_seed, np.random.default_rng(ss.spawn(1)[0])


def record_episode(game, make_behaviour, env_seed: int) -> EpisodeRecord:
    """``make_behaviour(game)`` is called after reset: the BabyAI bot plans from the live level."""
    frames = [game.reset(env_seed)]
    behaviour = make_behaviour(game)
    mission = game.mission
    actions, rewards, terms, truncs = [], [], [], []
    while True:
        action = behaviour.act()
        frame, reward, terminated, truncated = game.step(action)
        frames.append(frame)
        actions.append(action)
        rewards.append(reward)
        terms.append(terminated)
        truncs.append(truncated)
        if terminated or truncated:
            break
    rewards_arr = np.asarray(rewards, dtype=np.float32)
    return EpisodeRecord(
        frames=np.stack(frames).astype(np.uint8),
        actions=np.asarray(actions, dtype=np.int64),
        rewards=rewards_arr,
        terminated=np.asarray(terms, dtype=bool),
        truncated=np.asarray(truncs, dtype=bool),
        mission=mission,
        level_id=game.level_id,
        seed=env_seed,
        success=game.is_success(float(rewards_arr.sum(dtype=np.float64)), bool(terms[-1])),
    )
