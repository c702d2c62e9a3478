"""Imagined vs real: start a World on real BabyAI first frames, apply the same actions the real game
gets, and measure how far the imagined frames drift (PSNR per horizon) and how often the frame keeps
exactly one agent. Actions go through the action adapter (real keys, as a player or agent sends them)
or are the latent actions the LAM infers from the real frames (the model's own upper bound).

    python bench/imagined_vs_real.py --bundle runs/world-tiny [--episodes 16] [--horizon 12]

Needs a trained bundle with level constraints (``genie-sima pretrain`` writes them). One JSON line
per (actions, constrained, horizon).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--level", default="BabyAI-GoToLocal-v0")
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--horizon", type=int, default=12)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from genie_world.bundle import load_bundle
    from genie_world.metrics import psnr
    from genie_world.world import World
    from genie_world.world_builder import WorldBuilder
    from pipelines.data.babyai_game import BabyAIGame

    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    if not bundle.constraints or not bundle.constraints.exactly_one:
        raise SystemExit(f"{args.bundle} has no level constraints; re-run `genie-sima pretrain` on it")
    group = bundle.constraints.exactly_one[0]
    game = BabyAIGame(args.level, frame_size=bundle.config.frame_size)
    n, h = args.episodes, args.horizon
    rng = np.random.default_rng(args.seed)
    actions = rng.integers(0, 3, size=(h, n))  # left, right, forward: the moves that change the frame
    real, firsts = [], []
    for i in range(n):
        frames = [game.reset(args.seed + i)]
        for t in range(h):
            frames.append(game.step(int(actions[t, i]))[0])
        real.append(np.stack(frames))
    real = np.stack(real)  # [N, H+1, S, S, 3]
    latent = bundle.latent_actions.infer(torch.from_numpy(real)).numpy()  # [N, H]
    levels = WorldBuilder(bundle).generate(image=real[:, 0], num_worlds=n, mission=game.mission)
    for kind in ("real", "latent"):
        for constrained in (True, False):
            world = World(bundle, n, max_episode_steps=10_000, action_type=kind, constrained=constrained)
            world.reset(levels)
            for t in range(1, h + 1):
                s = world.step(actions[t - 1] if kind == "real" else latent[:, t - 1])
                if t in {1, 4, 8, 12, h}:
                    p = psnr(torch.from_numpy(s.frames).float() / 255, torch.from_numpy(real[:, t]).float() / 255)
                    one = float((np.isin(s.tokens, group).sum(1) == 1).mean())
                    ctx = dict(actions=kind, constrained=constrained, horizon=t, episodes=n, level=args.level)
                    emit("imagined_vs_real", "psnr_db", [float(p.mean())], "dB", **ctx)
                    emit("imagined_vs_real", "frames_with_one_agent", [one], "fraction", **ctx)


if __name__ == "__main__":
    main()
