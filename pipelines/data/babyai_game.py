"""BabyAI / MiniGrid levels rendered as full-grid RGB, with the mission text."""

from __future__ import annotations

import contextlib
import io

import numpy as np

from ..errors import SourceError
from .frames import resize_frame

# minigrid's Actions enum order: left, right, forward, pickup, drop, toggle, done.
BABYAI_ACTION_NAMES = ("left", "right", "forward", "pickup", "drop", "toggle", "done")


def _registered_babyai_levels() -> list[str]:
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the BabyAI-* ids)

    return sorted(k for k in gym.registry if k.startswith("BabyAI-"))


class BabyAIGame:
    """One BabyAI level. ``frame`` is the full grid at ``frame_size`` (8x8 room, tile 8 -> 64x64)."""

    num_actions = len(BABYAI_ACTION_NAMES)
    action_names = BABYAI_ACTION_NAMES

    def __init__(self, level_id: str, frame_size: int = 64, max_steps: int | None = None):
        import gymnasium as gym
        import minigrid  # noqa: F401

        levels = _registered_babyai_levels()
        if level_id not in levels:
            raise SourceError(
                f"unknown BabyAI level {level_id!r} in --source 'babyai:{level_id}'; "
                f"registered levels: {', '.join(levels)}"
            )
        kwargs = {} if max_steps is None else {"max_steps": max_steps}
        self.level_id = level_id
        self.frame_size = frame_size
        self.env = gym.make(level_id, **kwargs)
        self.unwrapped = self.env.unwrapped

    @property
    def mission(self) -> str:
        return str(self.unwrapped.mission)

    def frame(self) -> np.ndarray:
        u = self.unwrapped
        tile = max(1, self.frame_size // max(u.width, u.height))
        raw = u.get_frame(highlight=False, tile_size=tile)  # [h*tile, w*tile, 3]
        return resize_frame(raw, self.frame_size)

    def reset(self, seed: int) -> np.ndarray:
        # BabyAI's level generator prints every rejected sample ("Sampling rejected: ...").
        with contextlib.redirect_stdout(io.StringIO()):
            self.env.reset(seed=int(seed))
        return self.frame()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool]:
        _, reward, terminated, truncated, _ = self.env.step(int(action))
        return self.frame(), float(reward), bool(terminated), bool(truncated)

    @staticmethod
    def is_success(total_return: float, terminated: bool) -> bool:
        # BabyAI pays a positive reward only on completing the mission.
        return bool(terminated and total_return > 0)

    def close(self) -> None:
        self.env.close()
