"""Soak: one WorldModelServer, 8 concurrent clients stepping as fast as they can for a bounded time.

Checks that every answer is the asker's own (its env block, its levels, and the latent actions its own
real actions map to from its own last frame), that the server actor's memory stays flat after warmup,
and that throughput in the last third of the run is close to the first third's.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import psutil
import pytest
import ray

from genie_world.action_adapter import ActionAdapter
from genie_world.world_server import start_world_server
from tests.conftest import MISSIONS

pytestmark = pytest.mark.slow

SIZES = [1, 2, 3, 4, 1, 2, 3, 4]  # envs per client: 20 of the server's 32
WARMUP_S, MEASURE_S = 4.0, 21.0
# Bounds (measured on the 2-core reference machine: see the README's Reliability table).
MAX_RSS_GROWTH_MIB = 48
MIN_LAST_TO_FIRST_THROUGHPUT = 0.5


class Client:
    """One thread stepping its own block of envs and checking every answer it gets."""

    def __init__(self, server, index: int, n: int, adapter: ActionAdapter):
        self.server, self.index, self.n, self.adapter = server, index, n, adapter
        self.prompt, self.seed = MISSIONS[index % len(MISSIONS)], 100 + index
        first = ray.get(server.open.remote(n, prompt=self.prompt, seed=self.seed))
        self.id, self.envs = first["client"], list(first["envs"])
        self.tokens, self.steps = first["tokens"], first["episode_steps"]
        self.done_at: list[tuple[float, int]] = []  # (time answered, envs stepped)
        self.problems: list[str] = []
        self.rng = np.random.default_rng(index)

    def check(self, actions: np.ndarray, out: dict) -> None:
        where = f"client {self.index} request {len(self.done_at)}"
        if list(out["envs"]) != self.envs or len(out["tokens"]) != self.n or out["frames"].shape != (self.n, 64, 64, 3):
            self.problems.append(f"{where}: got envs {list(out['envs'])}, own envs {self.envs}")
            return
        if any(f"-s{self.seed}-" not in lid for lid in out["level_ids"]) or set(out["missions"]) != {self.prompt}:
            self.problems.append(f"{where}: levels {out['level_ids']} / missions {out['missions']} are not its own")
        first = out["is_first"]
        if not np.array_equal(out["episode_steps"], np.where(first, 0, self.steps + 1)):
            self.problems.append(f"{where}: episode steps {out['episode_steps']} after {self.steps}")
        # The latent action applied is a function of this client's action and this client's last frame.
        want = self.adapter.real_to_latent(actions, self.tokens)
        if not np.array_equal(out["latent_actions"][~first], want[~first]):
            self.problems.append(f"{where}: latent actions {out['latent_actions']} are not those of its actions {want}")
        self.tokens, self.steps = out["tokens"], out["episode_steps"]

    def run(self, stop_at: float) -> None:
        try:
            while time.perf_counter() < stop_at:
                actions = self.rng.integers(0, 7, self.n)
                out = ray.get(self.server.step.remote(self.id, actions))
                self.done_at.append((time.perf_counter(), self.n))
                self.check(actions, out)
        except Exception as e:  # noqa: BLE001 - reported by the test, not lost in the thread
            self.problems.append(f"client {self.index}: {type(e).__name__}: {e}")


def test_eight_clients_for_25s_get_their_own_answers_flat_memory_steady_throughput(ray_local, random_bundle):
    adapter = ActionAdapter.from_json(json.loads((random_bundle / "action_adapter.json").read_text()))
    server = start_world_server(random_bundle, name="soak-world", num_cpus=0.5, capacity=32, max_batch=64,
                                max_wait_ms=20.0, max_episode_steps=8, threads=1)
    try:
        actor = psutil.Process(ray.get(server.__ray_call__.remote(lambda self: os.getpid())))
        clients = [Client(server, i, n, adapter) for i, n in enumerate(SIZES)]
        t0 = time.perf_counter()
        stop_at = t0 + WARMUP_S + MEASURE_S
        threads = [threading.Thread(target=c.run, args=(stop_at,), daemon=True) for c in clients]
        for th in threads:
            th.start()
        time.sleep(WARMUP_S)
        rss = [actor.memory_info().rss]
        while time.perf_counter() < stop_at:
            time.sleep(1.0)
            rss.append(actor.memory_info().rss)
        for th in threads:
            th.join(timeout=60)
        assert not any(th.is_alive() for th in threads), "a client hung"

        problems = [p for c in clients for p in c.problems]
        assert not problems, problems[:5]
        answered = sum(len(c.done_at) for c in clients)
        stats = ray.get(server.stats.remote())
        assert stats["requests"] == answered, (stats, answered)  # one answer per request, none lost or extra
        assert min(len(c.done_at) for c in clients) >= 20, "a client starved"

        growth_mib = (max(rss[len(rss) // 2:]) - rss[0]) / 2**20
        third = MEASURE_S / 3
        lo, hi = t0 + WARMUP_S, t0 + WARMUP_S + MEASURE_S

        def steps_per_s(a, b):
            return sum(n for c in clients for t, n in c.done_at if a <= t < b) / (b - a)

        first, last = steps_per_s(lo, lo + third), steps_per_s(hi - third, hi)
        print(f"soak: {answered} requests, {stats['env_steps']} env steps, mean batch {stats['mean_batch_envs']:.1f}; "
              f"RSS {rss[0] / 2**20:.0f} MiB after warmup, growth {growth_mib:+.1f} MiB; "
              f"env steps/s first third {first:.0f}, last third {last:.0f} (ratio {last / first:.2f})")
        assert growth_mib <= MAX_RSS_GROWTH_MIB, f"server RSS grew {growth_mib:.1f} MiB: {[r >> 20 for r in rss]}"
        assert last >= MIN_LAST_TO_FIRST_THROUGHPUT * first, (first, last)
        for c in clients:
            ray.get(server.close.remote(c.id))
        assert ray.get(server.info.remote())["free"] == 32
    finally:
        ray.kill(server)
