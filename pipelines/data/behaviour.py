"""Behaviour policies that generate the video: bot, epsilon-random + bot replanning, random.

``act()`` returns the action to take; ``taken(action)`` is implied by the next ``act`` call so the
BabyAI bot can replan after a random action (``BabyAIBot.replan(action_taken)``).
"""

from __future__ import annotations

import numpy as np

POLICIES = ("bot", "random", "mixed")


class RandomBehaviour:
    def __init__(self, num_actions: int, rng: np.random.Generator):
        self.num_actions, self.rng = num_actions, rng

    def act(self) -> int:
        return int(self.rng.integers(self.num_actions))


class BabyAIBotBehaviour:
    """minigrid's bundled expert; with ``epsilon`` > 0 it is the ``mixed`` behaviour."""

    def __init__(self, game, epsilon: float, rng: np.random.Generator):
        from minigrid.utils.baby_ai_bot import BabyAIBot

        self._bot_cls = BabyAIBot
        self.game, self.epsilon, self.rng = game, epsilon, rng
        self.bot = BabyAIBot(game.unwrapped)
        self.last_taken: int | None = None
        self.bot_failures = 0

    def act(self) -> int:
        try:
            suggested = int(self.bot.replan(self.last_taken))
        except Exception:  # noqa: BLE001 - the bot asserts on states random actions can create
            # A fresh bot plans from the current state; if even that fails, act randomly.
            self.bot_failures += 1
            try:
                self.bot = self._bot_cls(self.game.unwrapped)
                suggested = int(self.bot.replan())
            except Exception:  # noqa: BLE001
                suggested = int(self.rng.integers(self.game.num_actions))
        # Draw the epsilon coin every step (even at epsilon 0) so the random stream is the same
        # for every epsilon and episodes stay reproducible from the seed alone.
        coin = self.rng.random()
        rand_action = int(self.rng.integers(self.game.num_actions))
        action = rand_action if coin < self.epsilon else suggested
        self.last_taken = action
        return action


class StickyRandomBehaviour:
    """Atari ``mixed``: repeat the previous action, switching to a random one with prob. epsilon.

    Atari has no bundled expert; held actions give longer purposeful-looking motion than i.i.d.
    random presses, so the video mixes both kinds of play.
    """

    def __init__(self, num_actions: int, epsilon: float, rng: np.random.Generator):
        self.num_actions, self.epsilon, self.rng = num_actions, epsilon, rng
        self.current = int(rng.integers(num_actions))

    def act(self) -> int:
        if self.rng.random() < self.epsilon:
            self.current = int(self.rng.integers(self.num_actions))
        return self.current


def make_behaviour(kind: str, policy: str, game, epsilon: float, rng: np.random.Generator):
    if policy == "random":
        return RandomBehaviour(game.num_actions, rng)
    if kind == "babyai":
        return BabyAIBotBehaviour(game, epsilon if policy == "mixed" else 0.0, rng)
    if policy == "bot":
        from ..errors import SourceError

        raise SourceError("--policy bot: Atari has no bundled expert; use --policy random or mixed")
    return StickyRandomBehaviour(game.num_actions, epsilon, rng)
