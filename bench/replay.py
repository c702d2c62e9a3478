"""Replay buffer at 1e6 transitions: ours (in-process ring and through Ray shard actors) vs RLlib's
EpisodeReplayBuffer, in one run.

    python bench/replay.py [--capacity 1000000] [--shards 4] [--obs-tokens 64] [--episode-len 64]
                           [--runs 3] [--seconds 1.0] [--rllib-capacity 1000000] [--skip-ray] [--skip-rllib]

Same payload on both sides: episodes of --episode-len steps, P = --obs-tokens int16 tokens per
observation, int32 discrete actions, float32 rewards, terminated at the end. RLlib gets numpy'd
SingleAgentEpisodes (what EnvRunners hand over; one [L+1, P] obs array per episode) and carries no
per-step mission id (so its payload is, if anything, smaller than ours).

Figures (JSON lines; median over --runs, each run ~--seconds):
  *_add_full_per_s     transitions/s added into a buffer that is already FULL (every add evicts).
                       Ours: 16 episodes (1024 transitions) per call in-process; 64 episodes per client
                       call through the actors, 4 calls in flight. RLlib: one episode per add()
                       (its add loops over episodes; eviction rebuilds its index list per episode).
  *_sample_B_per_s     transitions/s for batches of B = 256 and 1024. Ours: uniform (and prioritised,
                       reported apart); through actors: synchronous, 4 batches in flight, and 32768/B
                       batches per round of shard calls (sample_batches, 2 rounds in flight). RLlib:
                       sample(num_items=B, n_step=1, sample_episodes=True) - transitions with their next
                       observation, what DQN/SAC draw - and, for reference, its default sequence mode
                       sample(B, batch_length_T=1) (observations only, no next observation).
  *_bytes_per_transition  ours: allocated ring + priority tree bytes / transitions held when full
                       (the 1-in-L final-observation rows included); RLlib: process RSS growth while
                       filling / transitions held. payload_bytes_per_transition: the raw fields of one
                       transition (o_t, a_t, r, terminated, truncated, mission_id, episode_id, step).
  ratio_*              ours / RLlib (bytes: ours / payload and ours / RLlib).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit  # noqa: E402

BENCH = "replay"
ROUND_ROWS = 32768  # rows per round of shard calls for the multi-batch sampling figure (~9 MB)


def make_batches(n_templates: int, episodes: int, L: int, P: int, seed: int = 0) -> list[dict]:
    """Batch templates of `episodes` whole episodes each; episode ids are replaced per add."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_templates):
        N = episodes * L
        obs = rng.integers(0, 1024, (episodes, L + 1, P)).astype(np.int16)
        term = np.zeros((episodes, L), bool)
        term[:, -1] = True
        out.append({"obs_tokens": obs[:, :-1].reshape(N, P), "next_obs_tokens": obs[:, 1:].reshape(N, P),
                    "action": rng.integers(0, 7, N).astype(np.int32), "reward": rng.random(N).astype(np.float32),
                    "terminated": term.ravel(), "truncated": np.zeros(N, bool),
                    "mission_id": rng.integers(0, 50, N).astype(np.int32),
                    "episode_id": np.zeros(N, np.int64), "step": np.tile(np.arange(L, dtype=np.int32), episodes)})
    return out


class Batches:
    """Cycles through templates, giving every batch fresh episode ids."""

    def __init__(self, templates: list[dict], L: int):
        self.templates, self.L, self.next_id, self.i = templates, L, 0, 0
        self.episodes = len(templates[0]["step"]) // L

    def __call__(self) -> dict:
        b = dict(self.templates[self.i % len(self.templates)])
        self.i += 1
        b["episode_id"] = np.repeat(np.arange(self.next_id, self.next_id + self.episodes, dtype=np.int64), self.L)
        self.next_id += self.episodes
        return b


def timed_rate(fn, items_per_call: int, seconds: float, min_calls: int = 3) -> float:
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return calls * items_per_call / (time.perf_counter() - t0)


def pipelined_rate(submit, wait, items_per_call: int, seconds: float, depth: int = 4) -> float:
    """Keep ``depth`` calls in flight for ``seconds``; the clock stops when the last one is back."""
    pending: deque = deque()
    calls, t0 = 0, time.perf_counter()
    while calls < depth or time.perf_counter() - t0 < seconds:
        pending.append(submit())
        calls += 1
        if len(pending) >= depth:
            wait(pending.popleft())
    while pending:
        wait(pending.popleft())
    return calls * items_per_call / (time.perf_counter() - t0)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# --- ours, in process ---------------------------------------------------------------------------
def bench_inproc(args, ctx) -> dict:
    from pipelines.replay import ReplayStorage, TransitionSchema

    gc.collect()
    rss0 = rss()
    store = ReplayStorage(args.capacity, TransitionSchema(args.obs_tokens), seed=0)
    nxt = Batches(make_batches(8, 16, args.episode_len, args.obs_tokens), args.episode_len)
    t0 = time.perf_counter()
    while store.rows_written < args.capacity:
        store.add(nxt())
    fill_s = time.perf_counter() - t0
    st = store.stats()
    res = {"payload": st["payload_bytes_per_transition"], "bytes": st["bytes_per_transition_held"],
           "rss_bytes": (rss() - rss0) / st["size"]}
    res["add"] = [timed_rate(lambda: store.add(nxt()), 16 * args.episode_len, args.seconds) for _ in range(args.runs)]
    for B in (256, 1024):
        res[f"sample_{B}"] = [timed_rate(lambda: store.sample(B), B, args.seconds) for _ in range(args.runs)]
        res[f"sample_prio_{B}"] = [timed_rate(lambda: store.sample(B, prioritized=True), B, args.seconds)
                                  for _ in range(args.runs)]
    c = dict(ctx, impl="ours-inproc", capacity=args.capacity, size=store.size, fill_s=round(fill_s, 2))
    emit(BENCH, "ours_inproc_add_full_per_s", res["add"], "transitions/s", batch=16 * args.episode_len, **c)
    for B in (256, 1024):
        emit(BENCH, f"ours_inproc_sample_{B}_per_s", res[f"sample_{B}"], "transitions/s", batch=B, mode="uniform", **c)
        emit(BENCH, f"ours_inproc_sample_prio_{B}_per_s", res[f"sample_prio_{B}"], "transitions/s", batch=B,
             mode="prioritised", **c)
    emit(BENCH, "payload_bytes_per_transition", [res["payload"]], "bytes", **c)
    emit(BENCH, "ours_bytes_per_transition", [res["bytes"]], "bytes", rss_growth_bytes_per_transition=
         round(res["rss_bytes"], 1), bytes_per_row=st["bytes_per_row"], **c)
    return res


# --- ours, through Ray shard actors ---------------------------------------------------------------
def bench_ray(args, ctx) -> dict:
    import ray

    from pipelines.replay import ReplayConfig, ShardedReplay

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        cfg = ReplayConfig(name="bench-replay", num_shards=args.shards, capacity_per_shard=args.capacity // args.shards,
                           obs_tokens=args.obs_tokens, num_cpus_per_shard=0.25)
        client = ShardedReplay(cfg)
        per_call = 64 * args.episode_len
        nxt = Batches(make_batches(4, 64, args.episode_len, args.obs_tokens, seed=1), args.episode_len)
        t0 = time.perf_counter()
        while min(s["rows_written"] for s in client.stats()["shards"]) < cfg.capacity_per_shard:
            pipelined_rate(lambda: client.add_submit(nxt()), client.add_wait, per_call, 0.0, depth=4)
        fill_s = time.perf_counter() - t0
        res = {"add": [pipelined_rate(lambda: client.add_submit(nxt()), client.add_wait, per_call, args.seconds)
                       for _ in range(args.runs)]}
        for B in (256, 1024):
            res[f"sample_{B}"] = [timed_rate(lambda: client.sample(B), B, args.seconds) for _ in range(args.runs)]
            res[f"sample_pipe_{B}"] = [pipelined_rate(lambda: client.sample_submit(B), client.sample_wait, B,
                                                      args.seconds) for _ in range(args.runs)]
            k = max(1, ROUND_ROWS // B)  # a learner's minibatches fetched together: one call per shard
            res[f"sample_multi_{B}"] = [pipelined_rate(lambda: client.sample_submit(B, num_batches=k),
                                                       client.sample_wait, B * k, args.seconds, depth=2)
                                        for _ in range(args.runs)]
        st = client.stats()
        c = dict(ctx, impl="ours-ray", shards=args.shards, capacity=cfg.capacity, size=st["size"],
                 fill_s=round(fill_s, 2), num_cpus_per_shard=cfg.num_cpus_per_shard)
        emit(BENCH, "ours_ray_add_full_per_s", res["add"], "transitions/s", batch=per_call, in_flight=4, **c)
        for B in (256, 1024):
            emit(BENCH, f"ours_ray_sample_{B}_per_s", res[f"sample_{B}"], "transitions/s", batch=B, mode="uniform",
                 in_flight=1, **c)
            emit(BENCH, f"ours_ray_sample_pipelined_{B}_per_s", res[f"sample_pipe_{B}"], "transitions/s", batch=B,
                 mode="uniform", in_flight=4, **c)
            emit(BENCH, f"ours_ray_sample_multibatch_{B}_per_s", res[f"sample_multi_{B}"], "transitions/s", batch=B,
                 batches_per_call=max(1, ROUND_ROWS // B), mode="uniform", in_flight=2, **c)
        client.kill()
        return res
    finally:
        ray.shutdown()


# --- RLlib ----------------------------------------------------------------------------------------
def bench_rllib(args, ctx) -> dict:
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode
    from ray.rllib.utils.replay_buffers import EpisodeReplayBuffer

    L, P = args.episode_len, args.obs_tokens
    rng = np.random.default_rng(2)
    templates = []
    for _ in range(8):
        obs = rng.integers(0, 1024, (L + 1, P)).astype(np.int16)
        ep = SingleAgentEpisode(observations=list(obs), actions=list(rng.integers(0, 7, L).astype(np.int32)),
                                rewards=list(rng.random(L).astype(np.float32)), terminated=True,
                                len_lookback_buffer=0)
        templates.append(ep.to_numpy())  # what EnvRunners hand over
    counter = [0]

    def add_one(buf):
        ep = templates[counter[0] % len(templates)]
        ep.id_ = f"ep{counter[0]}"  # add() deep-copies the episode, so the template can be reused
        counter[0] += 1
        buf.add(ep)

    gc.collect()
    rss0 = rss()
    buf = EpisodeReplayBuffer(capacity=args.rllib_capacity)
    t0 = time.perf_counter()
    while buf.get_num_timesteps() + L <= args.rllib_capacity:
        add_one(buf)
    fill_s = time.perf_counter() - t0
    gc.collect()
    held = buf.get_num_timesteps()
    res = {"bytes": (rss() - rss0) / held}
    assert held == args.rllib_capacity or held + L > args.rllib_capacity
    res["add"] = [timed_rate(lambda: add_one(buf), L, args.seconds) for _ in range(args.runs)]
    assert buf.get_num_timesteps() <= args.rllib_capacity  # still full, evicting on every add
    for B in (256, 1024):
        buf.sample(num_items=B, n_step=1, sample_episodes=True, to_numpy=True)  # warm-up (imports)
        res[f"sample_{B}"] = [timed_rate(lambda: buf.sample(num_items=B, n_step=1, sample_episodes=True,
                                                            to_numpy=True), B, args.seconds) for _ in range(args.runs)]
        res[f"sample_seq_{B}"] = [timed_rate(lambda: buf.sample(num_items=B, batch_length_T=1), B, args.seconds)
                                  for _ in range(args.runs)]
    c = dict(ctx, impl="rllib-EpisodeReplayBuffer", capacity=args.rllib_capacity, size=buf.get_num_timesteps(),
             episodes=buf.get_num_episodes(), fill_s=round(fill_s, 2))
    emit(BENCH, "rllib_add_full_per_s", res["add"], "transitions/s", batch=L, **c)
    for B in (256, 1024):
        emit(BENCH, f"rllib_sample_{B}_per_s", res[f"sample_{B}"], "transitions/s", batch=B,
             mode="sample_episodes=True,n_step=1", **c)
        emit(BENCH, f"rllib_sample_seq_{B}_per_s", res[f"sample_seq_{B}"], "transitions/s", batch=B,
             mode="batch_length_T=1 (no next obs)", **c)
    emit(BENCH, "rllib_bytes_per_transition", [res["bytes"]], "bytes", method="RSS growth while filling", **c)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--obs-tokens", type=int, default=64)
    ap.add_argument("--episode-len", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--rllib-capacity", type=int, default=1_000_000,
                    help="RLlib buffer capacity (filled completely before its add rate is measured)")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-rllib", action="store_true")
    args = ap.parse_args()
    ctx = dict(obs_tokens=args.obs_tokens, obs_dtype="int16", episode_len=args.episode_len)
    t_start = time.perf_counter()

    ours = bench_inproc(args, ctx)
    ray_res = None if args.skip_ray else bench_ray(args, ctx)
    if args.skip_rllib:
        return
    rl = bench_rllib(args, ctx)

    med = lambda xs: float(np.median(xs))  # noqa: E731
    rctx = dict(ctx, rllib_capacity=args.rllib_capacity, capacity=args.capacity, target=">= 100x (bytes <= 1.1x)")
    sides = [("inproc", ours)] + ([("ray", ray_res)] if ray_res else [])
    variants = {"inproc": [("", "sample_{B}", "1 call per batch")]}
    if ray_res:
        variants["ray"] = [("_sync", "sample_{B}", "1 batch per round of shard calls, 1 in flight"),
                           ("_pipelined", "sample_pipe_{B}", "1 batch per round of shard calls, 4 in flight"),
                           ("_multibatch", "sample_multi_{B}",
                            f"{ROUND_ROWS}/B batches per round of shard calls, 2 in flight")]
    for side, res in sides:
        emit(BENCH, f"ratio_add_full_{side}_vs_rllib", [med(res["add"]) / med(rl["add"])], "x", **rctx)
        for B in (256, 1024):
            for suffix, key, how in variants[side]:
                key = key.format(B=B)
                emit(BENCH, f"ratio_sample_{B}_{side}{suffix}_vs_rllib", [med(res[key]) / med(rl[f"sample_{B}"])],
                     "x", ours=how, rllib="sample_episodes=True,n_step=1", **rctx)
                emit(BENCH, f"ratio_sample_{B}_{side}{suffix}_vs_rllib_seq_mode",
                     [med(res[key]) / med(rl[f"sample_seq_{B}"])], "x", ours=how, rllib="batch_length_T=1", **rctx)
    emit(BENCH, "ratio_bytes_ours_vs_payload", [ours["bytes"] / ours["payload"]], "x", **rctx)
    emit(BENCH, "ratio_bytes_ours_vs_rllib", [ours["bytes"] / rl["bytes"]], "x", **rctx)
    print(f"# total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
