"""A complete world bundle with random weights and a random state-conditioned action adapter.

Mechanics tests (World, server, play) and speed benchmarks need a bundle of a given size but not a
trained one: cost does not depend on the weights. Nothing here is for real use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .action_adapter import ActionAdapter
from .build import PART_NAMES, build_part
from .bundle import save_json, save_part, update_bundle_meta
from .config import WorldModelConfig
from .text_encoder import Vocabulary

BABYAI_ACTIONS = ["left", "right", "forward", "pickup", "drop", "toggle", "done"]


def write_random_bundle(run: Path, cfg: WorldModelConfig, missions: list[str], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    vocab = Vocabulary.from_texts(missions)
    save_json(run, "config.json", {"config": dataclasses.asdict(cfg)})
    save_json(run, "vocab.json", vocab.to_json())
    for name in PART_NAMES:
        save_part(run, name, build_part(name, cfg, len(vocab)))
    rng = np.random.default_rng(seed)
    tokens = np.arange(0, 1000, 7)
    a, r = cfg.num_latent_actions, len(BABYAI_ACTIONS)
    adapter = ActionAdapter(r, a, tokens, rng.normal(size=(a, len(tokens), r)), rng.normal(size=(a, r)),
                            noop_latent=0, real_names=BABYAI_ACTIONS, num_labelled=0, no_effect_real=[r - 1])
    save_json(run, "action_adapter.json", adapter.to_json())
    update_bundle_meta(run, provenance={"data_dir": "random weights"})
    return run
