"""Held-out real episodes for the world model's fidelity report: the same game and behaviour as
``collect`` (the bot with epsilon-random actions), on level seeds the training data never used."""

from __future__ import annotations

from pathlib import Path

from genie_world.fidelity import RealEpisode

from .behaviour import make_behaviour
from .episode import episode_seeds, record_episode
from .game_source import make_game, parse_source
from .manifest import read_manifest

HELDOUT_BASE_SEED = 1_000_003  # no collect run in this project uses it as --seed


def heldout_episodes(source: str, episodes: int, frame_size: int = 64, epsilon: float = 0.2,
                     policy: str = "mixed", base_seed: int = HELDOUT_BASE_SEED, data_dir=None,
                     max_steps: int | None = None) -> list[RealEpisode]:
    """``episodes`` real episodes; with ``data_dir``, level seeds found in its manifest are skipped, so
    none of them was seen in training."""
    spec = parse_source(source)
    used = {int(r["seed"]) for r in read_manifest(Path(data_dir), split=None)} if data_dir else set()
    game = make_game(spec, frame_size, max_steps)
    out, index = [], 0
    try:
        while len(out) < episodes:
            env_seed, rng = episode_seeds(base_seed, index)
            index += 1
            if env_seed in used:
                continue
            ep = record_episode(game, lambda g, rng=rng: make_behaviour(spec.kind, policy, g, epsilon, rng), env_seed)
            out.append(RealEpisode(ep.frames, ep.actions, bool(ep.terminated[-1]), ep.mission))
    finally:
        game.close()
    return out
