"""Prompt faithfulness: of N levels a bundle generates from each prompt, the share that show the object
the prompt names and exactly one agent (BabyAI tiles read back against the game's own renderings).

    python bench/prompt_levels.py --bundle runs/world-tiny [--num-worlds 256] [--prompts "go to the red ball,..."]

One JSON line per prompt and measure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit  # noqa: E402


def main() -> None:
    from pipelines.prompt_faithfulness import PROMPTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--num-worlds", type=int, default=256)
    ap.add_argument("--prompts", default=",".join(PROMPTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from genie_world.bundle import load_bundle
    from pipelines.prompt_faithfulness import prompt_faithfulness

    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    for prompt in [p.strip() for p in args.prompts.split(",") if p.strip()]:
        r = prompt_faithfulness(bundle, prompt, args.num_worlds, args.seed)
        for k in ("faithful", "has_object", "one_agent", "candidates_accepted", "named_objects_per_level"):
            if k in r:
                emit("prompt_levels", k, [r[k]], "tiles" if k == "named_objects_per_level" else "fraction",
                     bundle=args.bundle, prompt=prompt,
                     num_worlds=args.num_worlds, seed=args.seed)


if __name__ == "__main__":
    main()
