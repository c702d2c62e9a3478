"""Fixed cost of one pretraining stage: a no-op ``TorchTrainer.fit`` at several controller poll intervals.

    python bench/train_stage.py [--intervals 2.0,0.2] [--rounds 3]

Every ``genie-sima pretrain`` stage is one Ray Train run with the pipeline's scaling (1 worker, 0.5 CPU);
this times that run with a training function that only reports once, so what is left is Ray Train's
start (controller, placement group, worker actor, train context) and finish. The intervals alternate
within each round (order flipped every round) on one local Ray, so machine drift hits them alike.
Prints one JSON line per interval: the median fit time over the rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit  # noqa: E402
from pipelines.pretrain import HEALTH_CHECK_INTERVAL_ENV  # noqa: E402


def _report_once(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--intervals", default="2.0,0.2", help="controller poll intervals in seconds, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    try:
        intervals = [float(v) for v in args.intervals.split(",")]
    except ValueError:
        ap.error(f"--intervals {args.intervals!r}: expected comma-separated numbers of seconds")
    if not intervals or min(intervals) <= 0 or args.rounds < 1:
        ap.error("--intervals must be > 0 and --rounds >= 1")

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    samples: dict[float, list[float]] = {v: [] for v in intervals}
    with tempfile.TemporaryDirectory(prefix="bench-train-stage-") as storage:

        def fit_seconds(interval: float, name: str) -> float:
            # Ray Train hands the variable from the driver's environment to the controller it starts.
            os.environ[HEALTH_CHECK_INTERVAL_ENV] = str(interval)
            t0 = time.perf_counter()
            TorchTrainer(_report_once, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                         run_config=RunConfig(name=name, storage_path=storage)).fit()
            return time.perf_counter() - t0

        try:
            fit_seconds(intervals[0], "warmup")  # unmeasured: the first fit on a fresh Ray starts Train's state actor
            for rnd in range(args.rounds):
                for v in (intervals if rnd % 2 == 0 else intervals[::-1]):
                    samples[v].append(fit_seconds(v, f"r{rnd}-{v}"))
        finally:
            ray.shutdown()
    for v in intervals:
        emit("train_stage", "noop_fit_s", samples[v], "s", health_check_interval_s=v, workers=1, rounds=args.rounds)


if __name__ == "__main__":
    main()
