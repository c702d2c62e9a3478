"""Serving speed: imagined env steps/s through a World directly and through a WorldModelServer with
4 client vector envs, for several batch sizes and model sizes; and step time at episode step 10 vs
500 (the KV window keeps it flat).

    python bench/serving.py [--presets tiny,tinyworlds] [--batches 1,64,1024] [--server-batches 64]
                            [--steps 20] [--threads 2] [--precision fp32] [--bundle RUN]

Speed does not depend on the weights, so by default each preset is a random-weight bundle built in
a temp dir (runs anywhere, no training); ``--bundle`` measures a trained one instead. ``tinyworlds``
is the world-model issue's size: 64x64, patch 4 (256 tokens), width 32, 8 heads, 4+4 tokenizer
blocks, 8 dynamics blocks, 10 MaskGIT steps per frame. One JSON line per figure (median of --steps
timed steps after 3 warm-up steps; 3 after 1 at batch >= 256).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit  # noqa: E402

PRESETS = {
    "tiny": ("tiny", {}),
    "tinyworlds": ("tiny", dict(patch=4, tok_width=32, tok_heads=8, tok_enc_blocks=4, tok_dec_blocks=4, lam_width=32,
                                lam_heads=8, dyn_width=32, dyn_heads=8, dyn_blocks=8, world_maskgit_steps=10,
                                head_width=32, prior_width=32)),
    "base": ("base", {}),
}
MISSION = "go to the red ball"


def random_bundle(preset: str, root: Path) -> Path:
    """A complete bundle of ``preset`` with random weights (what the tests build, at any size)."""
    from genie_world.config import resolve_config
    from genie_world.random_bundle import write_random_bundle

    base, overrides = PRESETS[preset]
    return write_random_bundle(root / preset, resolve_config(base, overrides), [MISSION, "go to the blue key"])


def bench_world(bundle, batch: int, steps: int, precision: str, device: str, ctx: dict) -> None:
    import numpy as np

    from genie_world.world import World
    from genie_world.world_builder import WorldBuilder

    levels = WorldBuilder(bundle, device=device).generate(MISSION, num_worlds=min(batch, 256), seed=0)
    world = World(bundle, batch, max_episode_steps=100_000, precision=precision)
    world.reset(levels)
    rng = np.random.default_rng(0)
    times, warm = [], 3 if batch < 256 else 1
    for i in range(steps + warm):
        acts = rng.integers(0, world.num_actions, batch)
        t0 = time.perf_counter()
        world.step(acts)
        sync(device)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    emit("serving", "world_env_steps_per_s", [batch / t for t in times], "1/s", batch=batch, path="world", **ctx)
    emit("serving", "world_step_s", times, "s", batch=batch, path="world", **ctx)


def bench_flat(bundle, batch: int, precision: str, device: str, ctx: dict) -> None:
    """Step time at episode step ~500 vs ~10, measured side by side: a long-running World is timed
    around its step 500 while a second World, reset every 20 steps, is timed around its step 10 in
    the same seconds, so machine drift (clocks, neighbours) hits both alike."""
    import numpy as np

    from genie_world.world import World
    from genie_world.world_builder import WorldBuilder

    levels = WorldBuilder(bundle, device=device).generate(MISSION, num_worlds=batch, seed=0)
    long_run = World(bundle, batch, max_episode_steps=100_000, precision=precision)
    fresh = World(bundle, batch, max_episode_steps=100_000, precision=precision)
    long_run.reset(levels)
    acts = np.full(batch, 2)  # forward
    late, early = [], []
    for t in range(1, 506):
        t0 = time.perf_counter()
        long_run.step(acts)
        sync(device)
        if t >= 495:
            late.append(time.perf_counter() - t0)
            fresh.reset(levels)
            for k in range(1, 11):
                t0 = time.perf_counter()
                fresh.step(acts)
                sync(device)
            early.append(time.perf_counter() - t0)  # the fresh world's step 10
    emit("serving", "step_s_at_episode_step_10", early, "s", batch=batch, path="world", **ctx)
    emit("serving", "step_s_at_episode_step_500", late, "s", batch=batch, path="world", **ctx)
    ratio = float(np.median(late) / np.median(early))
    emit("serving", "step_time_ratio_500_vs_10", [ratio], "x", batch=batch, path="world", **ctx)


def bench_server(bundle_dir, batch: int, steps: int, precision: str, threads: int, ctx: dict) -> None:
    import numpy as np
    import ray

    from genie_world.gym_env import WorldVectorEnv
    from genie_world.world_server import start_world_server

    clients = 4
    per = batch // clients
    name = f"bench-{ctx['preset']}-{batch}"
    server = start_world_server(bundle_dir, name=name, num_cpus=1, capacity=batch, max_batch=batch,
                                max_wait_ms=5.0, max_episode_steps=100_000, precision=precision, threads=threads)
    ray.get(server.info.remote())
    envs = [WorldVectorEnv(per, server=name, prompt=MISSION, seed=i) for i in range(clients)]
    for e in envs:
        e.reset()
    rounds = []

    def run(e, k):
        rng = np.random.default_rng(k)
        for _ in range(steps):
            e.step(rng.integers(0, 7, per))

    for k in range(2):  # warm-up, then timed
        th = [threading.Thread(target=run, args=(e, k)) for e in envs]
        t0 = time.perf_counter()
        for t in th:
            t.start()
        for t in th:
            t.join()
        rounds.append(time.perf_counter() - t0)
    stats = ray.get(server.stats.remote())
    emit("serving", "server_env_steps_per_s", [batch * steps / rounds[-1]], "1/s", batch=batch, clients=clients,
         path="server", mean_batch_envs=stats["mean_batch_envs"], mean_queue_ms=stats["mean_queue_ms"], **ctx)
    for e in envs:
        e.close()
    ray.kill(server)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,tinyworlds")
    ap.add_argument("--batches", default="1,64,1024")
    ap.add_argument("--server-batches", default="64")
    ap.add_argument("--flat-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--bundle", default=None, help="a trained bundle (replaces --presets)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: world,flat,server")
    args = ap.parse_args()

    import torch

    from genie_world.bundle import load_bundle

    torch.set_num_threads(args.threads)
    # Random-weight bundles drift into denormal floats over long rollouts, which the CPU handles
    # slowly; flushing them (as the world server does) keeps the flatness figure about the KV window.
    torch.set_flush_denormal(True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    skip = set(filter(None, args.skip.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="genie-sima-bench-"))
    runs = [("bundle", Path(args.bundle))] if args.bundle else [(p, random_bundle(p, tmp)) for p in args.presets.split(",")]
    for preset, run in runs:
        bundle = load_bundle(run, device=device)
        cfg = bundle.config
        ctx = {"preset": preset, "device_name": device, "precision": args.precision, "threads": args.threads,
               "tokens_per_frame": (cfg.frame_size // cfg.patch) ** 2, "dyn_width": cfg.dyn_width,
               "dyn_blocks": cfg.dyn_blocks, "maskgit_steps": cfg.world_maskgit_steps}
        if "world" not in skip:
            for b in map(int, args.batches.split(",")):
                bench_world(bundle, b, args.steps if b <= 256 else 3, args.precision, device, ctx)
        if "flat" not in skip:
            bench_flat(bundle, args.flat_batch, args.precision, device, ctx)
        if "server" not in skip:
            import ray

            if not ray.is_initialized():
                ray.init(address="local", num_cpus=max(2, args.threads), include_dashboard=False,
                         logging_level="ERROR")
            for b in map(int, args.server_batches.split(",")):
                bench_server(run, b, args.steps, args.precision, args.threads, ctx)


if __name__ == "__main__":
    main()
