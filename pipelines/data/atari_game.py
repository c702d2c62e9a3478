"""Atari games through ale-py (ROMs bundled): frameskip 4, sticky actions, frames resized."""

from __future__ import annotations

import numpy as np

from ..errors import SourceError
from .frames import resize_frame

DEFAULT_ATARI_MAX_STEPS = 2000


def _known_games() -> list[str]:
    import gymnasium as gym
    import ale_py

    gym.register_envs(ale_py)
    return sorted(k[len("ALE/"):-len("-v5")] for k in gym.registry if k.startswith("ALE/") and k.endswith("-v5"))


class AtariGame:
    """``ALE/<game>-v5`` with frameskip 4 and repeat_action_probability 0.25 (sticky actions)."""

    def __init__(self, game: str, frame_size: int = 64, max_steps: int | None = None):
        import gymnasium as gym

        games = _known_games()
        if game not in games:
            raise SourceError(
                f"unknown Atari game {game!r} in --source 'atari:{game}'; known games: {', '.join(games)}"
            )
        self.level_id = f"ALE/{game}-v5"
        self.frame_size = frame_size
        self.env = gym.make(
            self.level_id,
            frameskip=4,
            repeat_action_probability=0.25,
            max_episode_steps=max_steps or DEFAULT_ATARI_MAX_STEPS,
        )
        self.num_actions = int(self.env.action_space.n)
        self.action_names = tuple(self.env.unwrapped.get_action_meanings())
        self._last_obs: np.ndarray | None = None

    @property
    def mission(self) -> str:
        # Atari has no language task; the caption names the game so prompts can refer to it.
        return f"play {self.level_id.split('/')[1].split('-')[0]}"

    def frame(self) -> np.ndarray:
        assert self._last_obs is not None, "reset() first"
        return resize_frame(self._last_obs, self.frame_size)

    def reset(self, seed: int) -> np.ndarray:
        self._last_obs, _ = self.env.reset(seed=int(seed))
        return self.frame()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool]:
        self._last_obs, reward, terminated, truncated, _ = self.env.step(int(action))
        return self.frame(), float(reward), bool(terminated), bool(truncated)

    @staticmethod
    def is_success(total_return: float, terminated: bool) -> bool:
        return bool(total_return > 0)

    def close(self) -> None:
        self.env.close()
