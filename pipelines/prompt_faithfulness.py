"""Do levels generated from a prompt contain what it names? (BabyAI: each tile of the decoded first
frame is read back against the game's own renderings; see data/babyai_tiles.py.)"""

from __future__ import annotations

import numpy as np
import torch

from genie_world.patches import to_uint8
from genie_world.world_builder import WorldBuilder

from .data.babyai_tiles import level_contents

FAITHFUL_TARGET = 0.95
PROMPTS = ("go to the red ball", "go to the blue key", "go to the green box", "go to the purple ball")


def is_babyai(bundle) -> bool:
    return str(bundle.meta.get("provenance", {}).get("source", "")).startswith("babyai:")


@torch.no_grad()
def decode_levels(bundle, levels) -> np.ndarray:
    """First frames [N, S, S, 3] uint8 of a LevelSet."""
    ids = torch.as_tensor(levels.first_tokens, dtype=torch.long)
    return torch.cat([to_uint8(bundle.tokenizer.decode(ids[i:i + 256, None]))[:, 0]
                      for i in range(0, len(ids), 256)]).numpy()


def prompt_faithfulness(bundle, prompt: str, num_worlds: int = 256, seed: int = 0, levels=None) -> dict:
    """Share of ``num_worlds`` levels from ``prompt`` that show the named object and exactly one agent
    (``levels``: measure these instead of generating them)."""
    builder = WorldBuilder(bundle)
    if levels is None:
        levels = builder.generate(prompt, num_worlds=num_worlds, seed=seed)
    else:
        builder.last_acceptance = None
    c = level_contents(decode_levels(bundle, levels), prompt)  # BabyAI tiles are 8 pixels in this project's frames
    ok = c["has_object"] & c["one_agent"]
    # Named objects per level: the real game's rooms show about one (GoToRedBall: 1.4); a prior that paints
    # the named object on many tiles makes imagined levels easier than real ones.
    out = {"prompt": prompt, "levels": len(levels), "faithful": float(ok.mean()), "has_object": float(c["has_object"].mean()),
           "named_objects_per_level": float(c["named_objects"].mean()),
           "one_agent": float(c["one_agent"].mean()), "unknown_tiles_per_level": float(c["unknown_tiles"].mean())}
    if builder.last_acceptance is not None:
        out["candidates_accepted"] = round(builder.last_acceptance, 4)
    return out
