"""PPO in imagination end to end: env steps/s of ``genie-sima train`` on a world:// env, where each iteration's
seconds go, and the World's own steps/s at the same batch, measured in the same run.

    python bench/train_throughput.py [--bundle RUN] [--levels FILE | --prompt TEXT] [--num-envs 32]
                                     [--rollout-steps 32] [--iterations 6] [--threads 2]
                                     [--train-args '{"init_policy": "runs/demo/bc", "reference_kl_coeff": 0.05}']

Speed does not depend on the weights, so by default the world is a random-weight ``tiny`` bundle built in a
temp dir (``--bundle`` measures a trained one). The default setting is the throughput issue's: a policy from
scratch, 32 envs x 32 steps, every other ``train`` flag at its default; ``--train-args`` sets any
``TrainConfig`` field (e.g. the demo's PPO: ``init_policy``, ``reference_kl_coeff``, ``critic_warmup_steps``,
``freeze_vision_steps``). The first iteration (Ray and the model warming up) is not counted.

Figures (medians over the counted iterations; one JSON line each):
- ``train_env_steps_per_s``: env steps per iteration over the iteration's wall clock (a progress line to the
  next: sampling, learning, weight sync, metrics, checkpoint), what a user waits for;
- ``split_<part>_s``: seconds per iteration from ``train_events.jsonl`` (``time/*``: sample, world (the
  world server's own stepping, inside sample), learn, learn_make_batch (GAE), learn_reference,
  learn_aux_draw, sync_weights, checkpoint, iteration);
- ``world_env_steps_per_s``: a World stepping a batch of --num-envs directly, with the same torch threads,
  timed after training in this process (no Ray round trip);
- ``train_over_world``: the ratio of the two (the issue's target is >= 0.5).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit  # noqa: E402
from bench.serving import MISSION, random_bundle  # noqa: E402

SPLIT = ("train", "sample", "world", "learn", "learn_make_batch", "learn_reference", "learn_aux_draw",
         "sync_weights", "checkpoint", "video", "real_eval", "iteration")


def world_steps_per_s(bundle: str, batch: int, steps: int, env: dict) -> list[float]:
    """The World alone at ``batch`` envs on the levels the train run used."""
    import numpy as np

    from genie_world.bundle import load_bundle
    from genie_world.levels import load_levels
    from genie_world.world import World
    from genie_world.world_builder import WorldBuilder

    bundle = load_bundle(bundle)
    if "level_file" in env:
        levels = load_levels(env["level_file"], bundle)
    else:
        levels = WorldBuilder(bundle).generate(env["prompt"], num_worlds=min(batch, 256), seed=0)
    world = World(bundle, batch, max_episode_steps=int(env.get("max_episode_steps", 64)))
    world.reset(levels)
    rng = np.random.default_rng(0)
    rates = []
    for i in range(steps + 3):
        acts = rng.integers(0, world.num_actions, batch)
        t0 = time.perf_counter()
        world.step(acts)
        if i >= 3:
            rates.append(batch / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="a world bundle (pretrain --out); default: random-weight tiny")
    ap.add_argument("--prompt", default=MISSION)
    ap.add_argument("--levels", default=None, help="a level file (generate --out) instead of --prompt")
    ap.add_argument("--max-episode-steps", type=int, default=64)
    ap.add_argument("--num-envs", type=int, default=32)
    ap.add_argument("--rollout-steps", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=6, help="train iterations (the first is not counted)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process (train --threads)")
    ap.add_argument("--world-steps", type=int, default=30, help="timed World steps for world_env_steps_per_s")
    ap.add_argument("--train-args", default="{}", help="JSON object of other TrainConfig fields")
    ap.add_argument("--out", default=None, help="keep the train run here (default: a temp dir)")
    args = ap.parse_args()
    try:
        extra = json.loads(args.train_args)
        assert isinstance(extra, dict)
    except (ValueError, AssertionError):
        ap.error(f"--train-args {args.train_args!r}: expected a JSON object of TrainConfig fields")
    if args.iterations < 2 or args.num_envs < 1 or args.rollout_steps < 1:
        ap.error("--iterations must be >= 2 (the first is not counted), --num-envs and --rollout-steps >= 1")

    import dataclasses

    import torch

    from pipelines.train_policy import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(extra) - fields)
    if unknown:
        ap.error(f"--train-args: unknown TrainConfig fields {unknown}")
    with tempfile.TemporaryDirectory(prefix="bench-train-throughput-") as tmp:
        bundle = args.bundle
        if bundle is None:
            bundle = str(random_bundle("tiny", Path(tmp)))
        env = {"level_file": str(Path(args.levels).resolve())} if args.levels else {"prompt": args.prompt}
        env["max_episode_steps"] = args.max_episode_steps
        query = "&".join(f"{k}={v}" for k, v in env.items())
        out = Path(args.out) if args.out else Path(tmp) / "run"
        per_iter = args.num_envs * args.rollout_steps
        cfg = TrainConfig(**{**dict(env=f"world://{bundle}?{query}", out=str(out), num_envs=args.num_envs,
                                    rollout_steps=args.rollout_steps, total_timesteps=per_iter * args.iterations,
                                    threads=args.threads, wandb="disabled", video_every=0,
                                    checkpoint_every=10 ** 6), **extra})
        stamps: list[float] = []

        def log(line: str) -> None:
            if re.match(r"train: iter \d+ ", line):
                stamps.append(time.perf_counter())
            print(line, file=sys.stderr, flush=True)

        train(cfg, log=log)
        import ray

        ray.shutdown()
        events = [json.loads(line) for line in (out / "logs" / "train_events.jsonl").read_text().splitlines()]
        steps = [b["steps"] - a["steps"] for a, b in zip(events, events[1:])]
        rates = [n / (t1 - t0) for n, t0, t1 in zip(steps, stamps, stamps[1:])]
        torch.set_num_threads(args.threads)
        world = world_steps_per_s(bundle, args.num_envs, args.world_steps, env)

    ctx = dict(batch=args.num_envs, rollout_steps=args.rollout_steps, iterations=args.iterations, threads=args.threads,
               bundle="random tiny" if args.bundle is None else args.bundle,
               train_args=extra, counted_iterations=len(rates))
    emit("train_throughput", "train_env_steps_per_s", rates, "1/s", **ctx)
    for part in SPLIT:
        values = [e[f"time/{part}_s"] for e in events[1:] if f"time/{part}_s" in e]
        if values:
            emit("train_throughput", f"split_{part}_s", values, "s", **ctx)
    emit("train_throughput", "world_env_steps_per_s", world, "1/s", **ctx)
    emit("train_throughput", "train_over_world", [statistics.median(rates) / statistics.median(world)], "ratio", **ctx)


if __name__ == "__main__":
    main()
