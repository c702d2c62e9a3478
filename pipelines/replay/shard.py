"""``ReplayShard``: one Ray actor around one ReplayStorage ring, with metrics, checkpoints and recovery.

Calls run one at a time (a plain actor), so an add is atomic with respect to every other call.
Started by ShardedReplay with ``max_restarts=-1``: when the process dies Ray re-runs ``__init__``
with the same arguments, which restores the shard's last checkpoint (if ``checkpoint_dir`` is set)
and reports how many transitions arrived after that checkpoint and were lost (log warning, stats
``last_restore`` / ``lost_total``, gauge genie_sima_replay_lost_transitions). Writers then resend
their last chunk and the episode high-water marks drop whatever the checkpoint already had.

Gauges (ray.util.metrics, tag ``shard`` = actor name), refreshed at most twice a second:
genie_sima_replay_size, genie_sima_replay_adds_per_s, genie_sima_replay_samples_per_s,
genie_sima_replay_lost_transitions.
"""

from __future__ import annotations

import logging
import time

import ray

from .checkpoint import AddJournal, checkpoint_path, journal_path, load_arrays, save_arrays
from .config import ReplayConfig
from .ring_storage import ReplayStorage

log = logging.getLogger(__name__)


@ray.remote
class ReplayShard:
    def __init__(self, shard: int, config: dict):
        cfg = ReplayConfig(**config)
        self.shard, self.cfg = int(shard), cfg
        self.name = f"{cfg.name}-{self.shard}"
        self.storage = ReplayStorage(cfg.capacity_per_shard, cfg.schema, alpha=cfg.alpha, priority_eps=cfg.priority_eps,
                                     max_episodes=cfg.max_episodes, seed=cfg.seed + self.shard, shard=self.shard)
        self.journal = AddJournal(journal_path(cfg.checkpoint_dir, self.shard)) if cfg.checkpoint_dir else None
        self.last_checkpoint: dict | None = None
        self.last_restore: dict | None = None
        self._restores = 0
        self._lost_here = 0
        self._gauges = _make_gauges(self.name)
        self._gauge_t = 0.0
        if self.journal is not None:
            ckpt = checkpoint_path(cfg.checkpoint_dir, self.shard)
            if ckpt.is_file():
                self.restore()
            elif self.journal.transitions_added:  # died before its first checkpoint: all of it is gone
                self._report_lost(self.journal.transitions_added, None)
                self.journal.transitions_added = 0
        self._set_gauges(force=True)

    # --- data ------------------------------------------------------------------------------
    def add(self, batch: dict) -> dict:
        out = self.storage.add(batch)
        if self.journal is not None and out["added"]:
            self.journal.transitions_added = self.storage.counters["transitions_added"]
        self._set_gauges()
        return out

    def sample(self, batch_size: int, prioritized: bool = False, beta: float = 0.4) -> dict:
        s = self.storage
        if s.size == 0:
            out = {"n": 0}
        else:
            out = s.sample(batch_size, prioritized=prioritized, beta=beta)
            out["n"] = int(batch_size)
        out["size"], out["priority_total"] = s.size, s.tree.total()
        self._set_gauges()
        return out

    def update_priorities(self, index, priorities) -> dict:
        out = self.storage.update_priorities(index, priorities)
        out["priority_total"] = self.storage.tree.total()
        return out

    # --- state -----------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"name": self.name, "shard": self.shard, "capacity_per_shard": self.storage.capacity,
                "schema": self.storage.schema.to_dict(), "alpha": self.storage.alpha,
                "checkpoint_dir": self.cfg.checkpoint_dir}

    def stats(self) -> dict:
        out = self.storage.stats()
        out.update(name=self.name, last_checkpoint=self.last_checkpoint, last_restore=self.last_restore,
                   lost_total=self._lost_total(), incarnation=self.journal.incarnations if self.journal else 1)
        self._set_gauges(force=True)
        return out

    def checkpoint(self, directory: str | None = None) -> dict:
        directory = directory or self.cfg.checkpoint_dir
        if not directory:
            raise ValueError(f"{self.name}: checkpoint needs a directory (ReplayConfig.checkpoint_dir is not set)")
        t0 = time.perf_counter()
        path = checkpoint_path(directory, self.shard)
        nbytes = save_arrays(path, self.storage.state_arrays())
        self.last_checkpoint = {"path": str(path), "bytes": nbytes, "seconds": time.perf_counter() - t0,
                                "transitions_added": self.storage.counters["transitions_added"],
                                "size": self.storage.size, "time": time.time()}
        return self.last_checkpoint

    def restore(self, directory: str | None = None) -> dict:
        """Load this shard's checkpoint from ``directory`` (default: the configured one).

        Lost = transitions accepted before the restore (this process's count, or the journal's after
        a crash) minus those the checkpoint holds.
        """
        directory = directory or self.cfg.checkpoint_dir
        if not directory:
            raise ValueError(f"{self.name}: restore needs a directory (ReplayConfig.checkpoint_dir is not set)")
        path = checkpoint_path(directory, self.shard)
        arrays = load_arrays(path)
        known = self.storage.counters["transitions_added"]
        # A new index generation, so priority updates for rows sampled before the restore are dropped.
        self._restores += 1
        gen = self.storage.generation + 1
        if self.journal is not None:
            known = max(known, self.journal.transitions_added)
            gen = self.journal.incarnations * 8 + self._restores  # distinct across incarnations (mod 256)
        out = self.storage.load_state(arrays, generation=gen, known_added=known)
        if self.journal is not None:
            self.journal.transitions_added = self.storage.counters["transitions_added"]
        out["path"] = str(path)
        self._report_lost(out["lost_since_checkpoint"], out)
        self._set_gauges(force=True)
        return out

    def _report_lost(self, lost: int, restored: dict | None) -> None:
        if restored is None:
            restored = {"lost_since_checkpoint": int(lost), "path": None, "size": 0}
        self.last_restore = {**restored, "time": time.time()}
        if self.journal is not None and lost:
            self.journal.add_lost(lost)
        self._lost_here += lost
        msg = (f"replay shard {self.name}: restored {restored['size']} transitions from {restored['path']}; "
               f"{lost} transitions added after that checkpoint were lost")
        (log.warning if lost else log.info)(msg)
        if lost:
            print(msg, flush=True)  # also in the driver's console via Ray's log forwarding
        if self._gauges:
            self._gauges["lost"].set(self._lost_total())

    def _lost_total(self) -> int:
        """Transitions lost to restores over the shard's life (all incarnations when it has a journal)."""
        return self.journal.lost_total if self.journal is not None else self._lost_here

    # --- metrics ---------------------------------------------------------------------------
    def _set_gauges(self, force: bool = False) -> None:
        if not self._gauges:
            return
        now = time.monotonic()
        if not force and now - self._gauge_t < 0.5:
            return
        self._gauge_t = now
        s = self.storage
        self._gauges["size"].set(s.size)
        self._gauges["adds"].set(s._add_rate.update(s.counters["transitions_added"]))
        self._gauges["samples"].set(s._sample_rate.update(s.counters["transitions_sampled"]))
        self._gauges["lost"].set(self._lost_total())

    def ping(self) -> str:
        return self.name

    def pid(self) -> int:
        import os

        return os.getpid()


def _make_gauges(name: str) -> dict | None:
    try:
        from ray.util import metrics

        tags = ("shard",)
        gauges = {
            "size": metrics.Gauge("genie_sima_replay_size", "transitions held by a replay shard", tags),
            "adds": metrics.Gauge("genie_sima_replay_adds_per_s", "transitions added per second", tags),
            "samples": metrics.Gauge("genie_sima_replay_samples_per_s", "transitions sampled per second", tags),
            "lost": metrics.Gauge("genie_sima_replay_lost_transitions",
                                  "transitions lost to shard restarts (added after the last checkpoint)", tags),
        }
        for g in gauges.values():
            g.set_default_tags({"shard": name})
        return gauges
    except Exception:  # noqa: BLE001 - metrics need a Ray worker
        return None
