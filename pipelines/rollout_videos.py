"""Real-vs-imagined rollout GIFs: an agent's episode in the real game beside the world model's imagined
rollout of the same actions, started from the same real first frame.

Left: what the agent saw in the real game. Right: what the world model imagines when fed the agent's
real actions (through the action adapter, exactly as in ``genie-sima train``). The imagined side keeps
going after an imagined termination: the point of the picture is how far imagination drifts from reality
under one action sequence, not the imagined episode's own end.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .pictures import frame_grid, save_gif


def imagine_same_actions(bundle, tapes: list[dict]) -> list[np.ndarray]:
    """For each tape {"frames": [T+1] real frames, "actions": [T], "mission"}: imagined frames [T+1, H, W, 3]."""
    from genie_world.world import World
    from genie_world.world_builder import WorldBuilder

    out = []
    builder = WorldBuilder(bundle)
    for tape in tapes:
        first = np.asarray(tape["frames"][0])[None]  # [1, H, W, 3]
        levels = builder.generate(image=first, num_worlds=1, mission=tape["mission"])
        world = World(bundle, 1, max_episode_steps=100_000, action_type="real")
        frames = [world.reset(levels).frames[0]]
        for a in tape["actions"]:
            frames.append(world.step(np.array([a])).frames[0])
        out.append(np.stack(frames))
    return out


def side_by_side(real: np.ndarray, imagined: np.ndarray, scale: int = 3) -> list[np.ndarray]:
    """[T+1] real and imagined frames -> GIF frames, real on the left, imagined on the right."""
    return [frame_grid(np.stack([r, i]), cols=2, scale=scale) for r, i in zip(real, imagined)]


def real_vs_imagined_gifs(bundle, tapes: list[dict], out_dir: Path, prefix: str, fps: int = 4) -> list[Path]:
    """One GIF per tape: OUT_DIR/PREFIX_epN_(success|failure).gif."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", prefix)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (tape, imagined) in enumerate(zip(tapes, imagine_same_actions(bundle, tapes))):
        real = np.stack(tape["frames"])
        outcome = "success" if tape.get("success") else "failure"
        paths.append(save_gif(Path(out_dir) / f"{safe}_ep{i}_{outcome}.gif", side_by_side(real, imagined), fps=fps))
    return paths
