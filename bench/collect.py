"""Collection throughput: frames/s for BabyAI mixed collection with K workers on a local Ray.

    python bench/collect.py [--level BabyAI-GoToLocal-v0] [--episodes 256] [--workers 2] [--runs 5]

Ray is started once and warmed up; each run collects into a fresh directory. Prints JSON lines:
end-to-end frames/s (driver wall clock, includes HDF5 writing and the manifest) and episodes/s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--level", default="BabyAI-GoToLocal-v0")
    ap.add_argument("--episodes", type=int, default=256)
    ap.add_argument("--episodes-per-shard", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    import ray

    from pipelines.collect import CollectConfig, collect

    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level="ERROR")
    root = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    fps, eps = [], []
    try:
        for run in range(args.runs + 1):  # run 0 warms up worker processes and imports
            out = root / f"run{run}"
            cfg = CollectConfig(source=f"babyai:{args.level}", out=str(out), episodes=args.episodes,
                                policy="mixed", epsilon=args.epsilon, workers=args.workers,
                                episodes_per_shard=args.episodes_per_shard, seed=run)
            t0 = time.perf_counter()
            result = collect(cfg, log=lambda m: None)
            dt = time.perf_counter() - t0
            frames = sum(r + 1 for r in _lengths(out))
            if run > 0:
                fps.append(frames / dt)
                eps.append(result["episodes"] / dt)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()
    ctx = dict(level=args.level, policy="mixed", epsilon=args.epsilon, workers=args.workers,
               episodes=args.episodes, episodes_per_shard=args.episodes_per_shard, frame_size=64)
    emit("collect", "frames_per_s", fps, "1/s", **ctx)
    emit("collect", "episodes_per_s", eps, "1/s", **ctx)


def _lengths(out: Path) -> list[int]:
    from pipelines.data.manifest import read_manifest

    return [r["length"] for r in read_manifest(out)]


if __name__ == "__main__":
    main()
