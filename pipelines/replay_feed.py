"""``ReplayFeed``: the EnvRunner callback that writes every FINISHED episode into the shared replay.

Why at episode end: an episode reaches the replay whole, in ONE ``add`` call (atomic per shard, and an
episode lives in one shard), or not at all. The episodes that finish during one ``sample()`` share that
call: it is sent in ``on_sample_end`` (one call per shard; per-episode calls cost ~2 ms each through the
actor, 30x more than their share of a batched one). Episodes an env failure cuts short (a killed world server:
RLlib recreates the env and drops them) never reach ``on_episode_end``, so the replay never holds a
half-written episode. A chunk of an episode returned by an earlier ``sample()`` is read back from
``prev_episode_chunks``; an episode whose first chunk is missing is counted and skipped, not written.

What goes in, per step t of an episode of T steps (rows t = 0 .. T-1):
    obs_tokens = infos[t]["world_tokens"] (the world env puts its token ids there), next_obs_tokens =
    infos[t+1]["world_tokens"], action a_t, reward r_{t+1}, terminated/truncated on the last row only,
    mission_id (MissionTable), episode_id, step t.

The int64 ``episode_id`` hashes RLlib's episode id (a random uuid) together with the EnvRunner's actor id,
pid and worker index, so a restarted EnvRunner never reuses one. ``on_sample_end`` waits for the add:
when ``sample()`` returns, its finished episodes are in the replay (the learner that trains on that sample
can already draw them). An EnvRunner that dies mid-sample loses the finished episodes it had not sent yet,
whole (RLlib loses that sample too).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from ray.rllib.callbacks.callbacks import RLlibCallback

EPISODES_KEY = "replay_episodes_added"
TRANSITIONS_KEY = "replay_transitions_added"
SKIPPED_KEY = "replay_episodes_incomplete"
CHUNKED_KEY = "replay_episodes_from_chunks"  # episodes that spanned more than one sample() (read back in chunks)


def replay_feed_callback(replay_config: dict, mission_table: str) -> type:
    """A ``ReplayFeed`` class bound to one run's replay (``ReplayConfig`` as a dict) and mission table name:
    RLlib instantiates callback classes without arguments in every EnvRunner."""
    return type("ReplayFeed", (ReplayFeed,), {"replay_config": dict(replay_config), "mission_table": mission_table})


def episode_id_int(rllib_id: str, runner: str) -> int:
    """A non-negative int64 from RLlib's episode id and the runner's identity (blake2b, 63 bits)."""
    digest = hashlib.blake2b(f"{runner}/{rllib_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def episode_rows(chunks: list) -> dict | None:
    """One finished episode (its chunks in order) -> a replay batch without ids, or None if a chunk is missing.

    A chunk's real steps end where the next chunk starts (``t_started``): its own length may be one more,
    because PPO's learner connector (AddOneTsToEpisodesAndTruncate) appends an artificial bootstrap step
    to returned chunks IN PLACE, and a driver-side EnvRunner hands the learner the very objects it keeps
    in ``prev_episode_chunks``. Each chunk's infos run from its own first observation, and a chunk's last
    real observation is the next chunk's first, so only the last chunk keeps its final info.
    """
    if not chunks or chunks[0].t_started != 0:
        return None
    infos, actions, rewards, n = [], [], [], 0
    for a, b in zip(chunks, chunks[1:] + [None]):
        k = len(a) if b is None else b.t_started - a.t_started  # real steps of chunk a
        if not 1 <= k <= len(a):  # a chunk in the middle is missing (or the chunks are out of order)
            return None
        own = list(a.get_infos())  # len(a) + 1 dicts
        infos.extend(own[: k + 1] if b is None else own[:k])
        actions.append(np.asarray(a.get_actions()).reshape(len(a))[:k])
        rewards.append(np.asarray(a.get_rewards(), np.float32).reshape(len(a))[:k])
        n += k
    if len(infos) != n + 1 or n == 0 or any("world_tokens" not in d for d in infos):
        return None
    tokens = np.stack([np.asarray(d["world_tokens"]) for d in infos])  # [T+1, P]
    last = chunks[-1]
    return {
        "obs_tokens": tokens[:-1], "next_obs_tokens": tokens[1:],
        "action": np.concatenate(actions), "reward": np.concatenate(rewards),
        "terminated": np.r_[np.zeros(n - 1, bool), bool(last.is_terminated)],
        "truncated": np.r_[np.zeros(n - 1, bool), bool(last.is_truncated)],
        "missions": [str(d["mission"]) for d in infos[:-1]],
        "step": np.arange(n, dtype=np.int32),
    }


class ReplayFeed(RLlibCallback):
    replay_config: dict = {}
    mission_table: str = ""

    def __init__(self):
        super().__init__()
        self._replay = None
        self._missions = None
        self._mission_ids: dict[str, int] = {}  # this process's cache of the table
        self._finished: list[dict] = []  # whole episodes waiting for this sample's add
        self._runner = None

    # ---- lazily, in the EnvRunner process ----------------------------------------------------------------
    def _connect(self, env_runner) -> None:
        import ray

        from .replay import ReplayConfig, ShardedReplay
        from .replay.mission_table import get_mission_table

        self._replay = ShardedReplay(ReplayConfig(**self.replay_config))
        self._missions = get_mission_table(self.mission_table)
        try:
            actor = ray.get_runtime_context().get_actor_id()
        except Exception:  # noqa: BLE001 - the driver's local EnvRunner is no actor
            actor = None
        self._runner = f"{actor}/{os.getpid()}/{getattr(env_runner, 'worker_index', 0)}"

    def _ids_of(self, missions: list[str]) -> np.ndarray:
        import ray

        unknown = sorted(set(missions) - set(self._mission_ids))
        if unknown:
            self._mission_ids.update(zip(unknown, ray.get(self._missions.ids_of.remote(unknown))))
        return np.array([self._mission_ids[m] for m in missions], np.int32)

    # ---- hooks -------------------------------------------------------------------------------------------
    def on_episode_end(self, *, episode, prev_episode_chunks=None, env_runner=None, metrics_logger=None, **kwargs):
        if self._replay is None:
            self._connect(env_runner)
        chunks = list(prev_episode_chunks or []) + [episode]
        rows = episode_rows(chunks)
        if rows is None:
            if metrics_logger is not None:
                metrics_logger.log_value(SKIPPED_KEY, 1, reduce="lifetime_sum")
            return
        n = len(rows["step"])
        rows["mission_id"] = self._ids_of(rows.pop("missions"))
        rows["episode_id"] = np.full(n, episode_id_int(episode.id_, self._runner), np.int64)
        self._finished.append(rows)
        if metrics_logger is not None:
            metrics_logger.log_value(EPISODES_KEY, 1, reduce="lifetime_sum")
            metrics_logger.log_value(TRANSITIONS_KEY, n, reduce="lifetime_sum")
            metrics_logger.log_value(CHUNKED_KEY, int(len(chunks) > 1), reduce="lifetime_sum")

    def on_sample_end(self, *, env_runner=None, metrics_logger=None, samples=None, **kwargs):
        finished, self._finished = self._finished, []
        if not finished:  # also: no episode has ended yet, so this runner has not connected to the replay
            return
        # ONE add for all of them (each episode lands whole: it lives in one shard, each shard's part is atomic),
        # split only where a part could exceed a shard's ring.
        limit = max(1, self._replay.config.capacity_per_shard // 2)
        group, rows = [], 0
        for e in finished + [None]:
            if group and (e is None or rows + len(e["step"]) > limit):
                self._replay.add({f: np.concatenate([g[f] for g in group]) for f in group[0]})
                group, rows = [], 0
            if e is not None:
                group.append(e)
                rows += len(e["step"])
