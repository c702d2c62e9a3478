"""Fidelity of a world bundle: held-out real episodes replayed action for action in a World started
from each episode's real first frame (see genie_world/fidelity.py for every measure).

    python bench/fidelity.py --bundle runs/world-tiny [--episodes 128] [--epsilon 0.2]

The episodes come from the bundle's own game (its provenance) with the bot and epsilon-random
actions, on level seeds absent from its training data. One JSON line per figure on stdout; a table
with the targets on stderr.
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
    ap.add_argument("--source", default=None, help="game to record episodes from (default: the bundle's)")
    ap.add_argument("--episodes", type=int, default=128)
    ap.add_argument("--epsilon", type=float, default=0.2, help="random-action share of the recording bot")
    ap.add_argument("--seed", type=int, default=None, help="base seed of the held-out episodes")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from genie_world.bundle import load_bundle
    from pipelines.data.heldout import HELDOUT_BASE_SEED, heldout_episodes
    from pipelines.fidelity_report import fidelity_table
    from genie_world.fidelity import measure_fidelity

    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    prov = bundle.meta.get("provenance", {})
    source = args.source or prov.get("source")
    if not source:
        raise SystemExit(f"{args.bundle}: no source in its provenance; pass --source babyai:<level>")
    data_dir = prov.get("data_dir") if Path(str(prov.get("data_dir", ""))).is_dir() else None
    seed = HELDOUT_BASE_SEED if args.seed is None else args.seed
    episodes = heldout_episodes(source, args.episodes, bundle.config.frame_size, args.epsilon,
                                base_seed=seed, data_dir=data_dir)
    metrics = measure_fidelity(bundle, episodes)
    ctx = dict(bundle=str(args.bundle), source=source, episodes=args.episodes, epsilon=args.epsilon, seed=seed)
    for k, v in metrics.items():
        emit("fidelity", k, [float(v)], "fraction" if "psnr" not in k else "dB", **ctx)
    print(fidelity_table(metrics), file=sys.stderr)


if __name__ == "__main__":
    main()
