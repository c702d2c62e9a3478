"""WorldModelServer: a Ray actor holding one World (on one GPU, or CPU) that serves many clients.

Clients ``open`` a block of envs (levels from a prompt, a LevelSet or a level file) and then ``step``
their whole block per call. The server gathers the step requests that arrive within ``max_wait_ms``
(or until every open client has one pending) into one World step of up to ``max_batch`` envs, so
per-call overhead vanishes as clients are added. Each client's block is contiguous in the World, so
when all clients step together the batch is one contiguous range (views, no copies).

Bad actions are refused to the caller that sent them before batching; the other callers' requests
are unaffected. A client's block is leased: one that has not stepped for ``lease_s`` seconds is
reclaimed when an ``open`` finds no room (a client whose process died without closing otherwise held
its envs for the server's lifetime); its next call is told so. Metrics (``ray.util.metrics``, tag ``server``): genie_sima_world_env_steps_per_s,
genie_sima_world_batch_fill, genie_sima_world_queue_latency_ms.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import ray

DEFAULT_NAME = "genie-sima-world"
NAMESPACE = "genie-sima"


DEFAULT_LEASE_S = 600.0
MAX_LEVELS_PER_CLIENT = 100_000  # levels one open may generate (each is a MaskGIT sample held in memory)


@dataclass
class _Client:
    start: int
    num_envs: int
    levels_desc: str
    owner: tuple | None = None  # (Ray actor id, pid) of the process that opened it
    last_seen: float = field(default_factory=time.monotonic)  # the lease: renewed by every step


@dataclass
class _Request:
    client: str
    actions: np.ndarray
    reset: bool
    future: asyncio.Future
    t_enqueued: float = field(default_factory=time.perf_counter)


class WorldModelServerImpl:
    """The actor's body; ``WorldModelServer`` below is it as a Ray actor."""

    def __init__(self, bundle_path: str, capacity: int = 256, max_batch: int = 1024, max_wait_ms: float = 2.0,
                 device: str | None = None, threads: int = 0, name: str = DEFAULT_NAME,
                 lease_s: float = DEFAULT_LEASE_S, **world_kwargs):
        import torch

        from .bundle import load_bundle
        from .world import World
        from .world_builder import WorldBuilder

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # One World, one stepper thread, and every torch call of this actor on it (loading and building
        # included): once a second thread has run torch ops, the process keeps two OpenMP teams and each
        # World step slows down (2 cores, tiny, batch 32: 690 World steps/s in the server vs 1,000 alone;
        # with this, 910; bench/serving.py's server path +22%).
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

        def build():
            if threads:
                torch.set_num_threads(threads)
            torch.set_flush_denormal(True)  # this actor's own process: denormals only slow the CPU down
            bundle = load_bundle(bundle_path, device=device)
            return bundle, World(bundle, capacity, **world_kwargs), WorldBuilder(bundle, device=device)

        self.bundle, self.world, self.builder = self._executor.submit(build).result()
        self.capacity, self.max_batch, self.max_wait = int(capacity), int(max_batch), max_wait_ms / 1000.0
        self.name, self.lease_s = name, float(lease_s)
        self.clients: dict[str, _Client] = {}
        self._expired: dict[str, float] = {}  # client -> idle seconds when its lease ran out (for its next call)
        self.pending: list[_Request] = []
        self._in_flight: set[str] = set()  # clients with a step request queued or being run
        self._wakeup: asyncio.Event | None = None
        self._loop_task = None
        self.stats_ = {"env_steps": 0, "batches": 0, "batch_envs": 0, "queue_s": 0.0, "step_s": 0.0, "requests": 0,
                       "stale_clients_closed": 0, "expired_clients_closed": 0, "episodes_terminated": 0, "episodes_truncated": 0, "started": time.time()}
        self._metrics = None
        try:
            from ray.util import metrics

            tags = ("server",)
            self._metrics = {
                "steps": metrics.Gauge("genie_sima_world_env_steps_per_s", "imagined env steps per second", tags),
                "fill": metrics.Gauge("genie_sima_world_batch_fill", "envs per World step / max_batch", tags),
                "latency": metrics.Histogram("genie_sima_world_queue_latency_ms", "time a step request waits to be batched",
                                             [0.5, 1, 2, 5, 10, 20, 50, 100, 500], tags),
            }
            for m in self._metrics.values():
                m.set_default_tags({"server": name})
        except Exception:  # noqa: BLE001 - metrics need a Ray worker; in-process use has none
            self._metrics = None
        self._window = (time.perf_counter(), 0)

    # --- clients ----------------------------------------------------------------------------
    def info(self) -> dict:
        w = self.world
        return {"name": self.name, "bundle": str(self.bundle.path), "fingerprint": self.bundle.fingerprint,
                "capacity": self.capacity, "free": self.capacity - sum(c.num_envs for c in self.clients.values()),
                "num_actions": w.num_actions, "action_names": w.action_names, "action_type": w.action_type,
                "frame_shape": w.frame_shape, "max_episode_steps": w.max_episode_steps,
                "vocabulary": self.bundle.vocab.words[1:] if self.bundle.vocab else []}

    def _allocate(self, n: int) -> int:
        taken = sorted((c.start, c.start + c.num_envs) for c in self.clients.values())
        pos = 0
        for lo, hi in taken:
            if lo - pos >= n:
                return pos
            pos = max(pos, hi)
        if self.capacity - pos >= n:
            return pos
        if self._expire_idle_clients():
            return self._allocate(n)
        free = self.capacity - sum(c.num_envs for c in self.clients.values())
        raise ValueError(f"world server {self.name!r}: cannot open {n} envs, {free} of {self.capacity} are free "
                         f"(in one block: raise capacity or close clients)")

    def _expire_idle_clients(self) -> int:
        """Close the blocks whose lease ran out (no step for ``lease_s``), except any with a step in flight."""
        now = time.monotonic()
        idle = [k for k, c in self.clients.items() if now - c.last_seen > self.lease_s and k not in self._in_flight]
        for k in idle:
            self._expired[k] = now - self.clients.pop(k).last_seen
        self.stats_["expired_clients_closed"] += len(idle)
        return len(idle)

    async def open(self, num_envs: int, prompt: str | None = None, levels=None, level_file: str | None = None,
                   seed: int = 0, mission: str | None = None, num_levels: int | None = None,
                   owner: tuple | None = None) -> dict:
        """Reserve ``num_envs`` envs playing levels from ``prompt`` (num_levels of them, default
        num_envs), a LevelSet, or a level file; returns the client id and the first observations.

        ``owner`` = (caller's Ray actor id, caller's pid). A restarted actor keeps its actor id but runs in
        a new process, so blocks held under the same actor id with another pid belong to its dead
        incarnation: they are closed before allocating (an EnvRunner that Ray or RLlib restarted gets
        its envs back instead of finding the server full).
        """
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self._open(num_envs, prompt, levels, level_file, seed, mission, num_levels, owner))

    async def close(self, client: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, lambda: self.clients.pop(client, None))

    def _open(self, num_envs, prompt, levels, level_file, seed, mission, num_levels, owner=None) -> dict:
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if num_envs > self.capacity:
            raise ValueError(f"world server {self.name!r}: cannot open {num_envs} envs, more than its capacity {self.capacity}")
        if num_levels is not None and (isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer))
                                       or not 1 <= num_levels <= MAX_LEVELS_PER_CLIENT):
            raise ValueError(f"world server {self.name!r}: num_levels must be an integer in 1..{MAX_LEVELS_PER_CLIENT}, "
                             f"got {num_levels!r}")
        if owner is not None and owner[0] is not None:
            stale = [k for k, c in self.clients.items()
                     if c.owner is not None and c.owner[0] == owner[0] and c.owner[1] != owner[1]]
            for k in stale:
                self.clients.pop(k)
            self.stats_["stale_clients_closed"] += len(stale)
        levels = self.builder.resolve(prompt=prompt, levels=levels, level_file=level_file,
                                      num_worlds=int(num_levels or num_envs), seed=seed, mission=mission)
        start = self._allocate(int(num_envs))
        client = uuid.uuid4().hex[:12]
        envs = np.arange(start, start + num_envs)
        first = self.world.reset(levels, envs=envs)
        self.clients[client] = _Client(start, int(num_envs), levels.prompt or levels.source,
                                       tuple(owner) if owner is not None else None)
        return {**first.as_dict(), "client": client, "envs": envs.tolist()}

    # --- stepping ---------------------------------------------------------------------------
    async def step(self, client: str, actions, reset: bool = False) -> dict:
        """Step (or, with ``reset``, restart) every env of ``client``; batched with other clients."""
        c = self.clients.get(client)
        if c is None:
            if client in self._expired:
                raise ValueError(f"world server {self.name!r}: client {client!r} was closed after "
                                 f"{self._expired[client]:.0f} s without a step (lease {self.lease_s:g} s) to make "
                                 "room for another client: open again")
            raise ValueError(f"world server {self.name!r}: unknown client {client!r} (closed, or the server "
                             "restarted: open again)")
        c.last_seen = time.monotonic()
        acts = np.zeros(c.num_envs, np.int64) if reset else self.world.check_actions(actions, c.num_envs)
        if client in self._in_flight:
            # A client's envs advance one call at a time. Refused here, to this caller only: taken into a
            # batch, the duplicate envs would fail the whole gather, every other client's steps with it.
            raise ValueError(f"world server {self.name!r}: client {client!r} already has a step in flight; "
                             "wait for its answer before stepping these envs again")
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())
        fut = asyncio.get_running_loop().create_future()
        self._in_flight.add(client)
        fut.add_done_callback(lambda _: self._in_flight.discard(client))
        self.pending.append(_Request(client, acts, reset, fut))
        self._wakeup.set()
        return await fut

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self.pending:
                continue
            deadline = time.perf_counter() + self.max_wait
            while (len({r.client for r in self.pending}) < len(self.clients)
                   and sum(self.clients[r.client].num_envs for r in self.pending if r.client in self.clients) < self.max_batch
                   and time.perf_counter() < deadline):
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(0.0, deadline - time.perf_counter()))
                    self._wakeup.clear()
                except asyncio.TimeoutError:
                    break
            batch, self.pending = self.pending, []
            t0 = time.perf_counter()
            try:
                await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as e:  # noqa: BLE001 - hand every waiting caller the error
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
            finally:
                # The World's own time (resets + steps): what the server costs beyond the Ray round trip.
                self.stats_["step_s"] += time.perf_counter() - t0

    def _run_batch(self, batch: list[_Request]) -> None:
        now = time.perf_counter()
        live = [r for r in batch if r.client in self.clients]
        for r in batch:
            if r.client not in self.clients:
                r.future.get_loop().call_soon_threadsafe(r.future.set_exception,
                                                         ValueError(f"client {r.client} was closed"))
        resets = [r for r in live if r.reset]
        for r in resets:
            c = self.clients[r.client]
            self._deliver(r, self.world.reset(envs=np.arange(c.start, c.start + c.num_envs)), 0, c.num_envs)
        steps = sorted((r for r in live if not r.reset), key=lambda r: self.clients[r.client].start)
        chunk: list[_Request] = []
        for r in steps + [None]:
            n = sum(self.clients[q.client].num_envs for q in chunk)
            if r is None or (chunk and n + self.clients[r.client].num_envs > self.max_batch):
                if chunk:
                    self._step_chunk(chunk, now)
                chunk = []
            if r is not None:
                chunk.append(r)

    def _step_chunk(self, chunk: list[_Request], now: float) -> None:
        envs = np.concatenate([np.arange(self.clients[r.client].start,
                                         self.clients[r.client].start + self.clients[r.client].num_envs) for r in chunk])
        out = self.world.step(np.concatenate([r.actions for r in chunk]), envs=envs)
        lo = 0
        for r in chunk:
            n = self.clients[r.client].num_envs
            self._deliver(r, out, lo, lo + n)
            lo += n
            self.stats_["queue_s"] += now - r.t_enqueued
            if self._metrics:
                self._metrics["latency"].observe((now - r.t_enqueued) * 1000)
        self.stats_["env_steps"] += len(envs)
        self.stats_["episodes_terminated"] += int(out.terminated.sum())  # in imagination: the head says "success"
        self.stats_["episodes_truncated"] += int(out.truncated.sum())
        self.stats_["batches"] += 1
        self.stats_["batch_envs"] += len(envs)
        self.stats_["requests"] += len(chunk)
        if self._metrics:
            self._metrics["fill"].set(len(envs) / self.max_batch)
            t0, n0 = self._window
            dt = time.perf_counter() - t0
            if dt >= 1.0:
                self._metrics["steps"].set((self.stats_["env_steps"] - n0) / dt)
                self._window = (time.perf_counter(), self.stats_["env_steps"])

    def _deliver(self, r: _Request, out, lo: int, hi: int) -> None:
        result = out.as_dict(lo, hi)
        r.future.get_loop().call_soon_threadsafe(lambda: r.future.done() or r.future.set_result(result))

    def stats(self) -> dict:
        s = dict(self.stats_)
        s["mean_batch_envs"] = s["batch_envs"] / max(1, s["batches"])
        s["mean_queue_ms"] = 1000 * s["queue_s"] / max(1, s["requests"])
        s["clients"] = len(self.clients)
        return s


WorldModelServer = ray.remote(WorldModelServerImpl)


def start_world_server(bundle_path, name: str = DEFAULT_NAME, num_gpus: float = 0, num_cpus: float = 1,
                       resources: dict | None = None, max_restarts: int = -1, **kwargs):
    """Start (or get, if one of that name runs) a named, detached-free WorldModelServer actor.

    ``resources`` lets cluster configs steer servers onto GPU nodes (``{"world_server": 1}``).
    ``max_restarts=-1``: Ray restarts a dead server; clients see "unknown client" and re-open.
    """
    return WorldModelServer.options(name=name, namespace=NAMESPACE, get_if_exists=True, num_gpus=num_gpus,
                                    num_cpus=num_cpus, resources=resources or {}, max_restarts=max_restarts,
                                    max_concurrency=1000).remote(str(bundle_path), name=name, **kwargs)


def get_world_server(name: str = DEFAULT_NAME):
    return ray.get_actor(name, namespace=NAMESPACE)
