"""Imagined success against the real game's, from the same starts: does the world model pay what the game pays?

A policy trained in imagination is only as good as the imagination is honest about it. For episodes
``seed .. seed + n - 1`` of a real level: the level's real first frame and mission become a World level
(``WorldBuilder.generate(image=..., mission=...)``); the policy plays it in the World (acting on imagined
frames) until the termination head ends it or the time limit; then the actions it took are replayed, one
for one, in the real game from the same seed. Per episode that gives an imagined outcome and the real
outcome of the same actions:

- ``imagined_success``: episodes the World ended by predicted termination (what PPO in imagination is paid for);
- ``replayed_success``: episodes whose imagined actions win the real game;
- ``imagined_only_wins``: imagined wins the real game does not give for the same actions (the World
  over-pays; a policy that seeks these out is exploiting the world model);
- ``real_only_wins``: real wins of those actions that imagination missed.

The gap ``imagined_success - replayed_success`` is the imagination issue's "imagined success within 10
points of real-game success" at a checkpoint, measured on the same starts and actions.
"""

from __future__ import annotations

import numpy as np


def imagined_vs_real(bundle, level: str, agent, episodes: int, seed: int, max_steps: int) -> dict:
    """``agent``: a PolicyAgent (pipelines.evaluate); ``bundle``: a loaded WorldBundle."""
    from genie_world.world import World
    from genie_world.world_builder import WorldBuilder

    from .data.babyai_game import BabyAIGame

    frame_size = int(bundle.config.frame_size)
    games = [BabyAIGame(level, frame_size=frame_size, max_steps=max_steps) for _ in range(episodes)]
    try:
        first = np.stack([g.reset(seed + i) for i, g in enumerate(games)])  # [N, H, W, 3]
        missions = [g.mission for g in games]
        levels = WorldBuilder(bundle).generate(image=first, mission=missions, num_worlds=episodes)
        world = World(bundle, episodes, max_episode_steps=max_steps)
        frames = world.reset(levels).frames
        done = np.zeros(episodes, bool)
        imagined_win = np.zeros(episodes, bool)
        actions: list[list[int]] = [[] for _ in range(episodes)]
        while not done.all():
            acts = agent.act(frames, missions)
            step = world.step(acts)
            for j in np.flatnonzero(~done):
                actions[j].append(int(acts[j]))
                if step.terminated[j] or step.truncated[j]:
                    done[j] = True
                    imagined_win[j] = bool(step.terminated[j])
            frames = step.frames
        real_win = np.zeros(episodes, bool)
        for j, game in enumerate(games):
            game.reset(seed + j)
            ret = 0.0
            for a in actions[j]:
                _, r, term, trunc = game.step(a)
                ret += r
                if term or trunc:
                    real_win[j] = BabyAIGame.is_success(ret, term)
                    break
    finally:
        for g in games:
            g.close()
    return {"imagined_episodes": episodes, "imagined_success": float(imagined_win.mean()),
            "replayed_success": float(real_win.mean()),
            "imagined_only_wins": int((imagined_win & ~real_win).sum()),
            "real_only_wins": int((real_win & ~imagined_win).sum()),
            "mean_imagined_length": float(np.mean([len(a) for a in actions]))}
