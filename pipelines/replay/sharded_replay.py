"""``ShardedReplay``: the client that owns N ReplayShard actors and looks like one buffer.

* add: the whole batch is validated here first (a bad batch reaches no shard), split by owner shard
  (routing.shard_of(episode_id): one episode, one shard), one call per shard, all in flight at once.
  Each shard's part is atomic. A call that fails because its shard died is resent once the shard is
  back; the shard's episode high-water marks drop any step it already holds, so resending is safe
  whether or not the first attempt landed (or whether the shard came back from an older checkpoint).
* sample: counts per shard drawn from a multinomial over shard sizes (uniform) or priority masses
  (prioritised), so the union is the global uniform / proportional distribution; one call per shard,
  all in flight. ``probs`` is each item's global draw probability, ``weights`` the importance
  weights (N * probs) ** -beta over the global size N, divided by the batch maximum. Sizes and masses
  come back with every reply, so the split costs no extra round trip. ``sample_batches(B, K)`` gets
  K batches from one such round: per-call overhead dominates through actors, so a learner should
  fetch its minibatches K at a time.
* update_priorities: indices carry their shard (routing.py), one call per shard.
* checkpoint_all / restore / stats: one call per shard, pipelined.
"""

from __future__ import annotations

import time

import numpy as np
import ray
from ray.exceptions import RayActorError

from ..errors import ConfigError
from .config import NAMESPACE, ReplayConfig
from .routing import decode_index, shard_of
from .schema import STORED_FIELDS, order_by_episode
from .shard import ReplayShard

_SAMPLE_FIELDS = STORED_FIELDS + ("next_obs_tokens", "index", "probs")


def start_shard(cfg: ReplayConfig, k: int):
    """Create (or get, if it runs) shard actor ``k`` of ``cfg.name``; Ray restarts it if it dies."""
    return ReplayShard.options(name=f"{cfg.name}-{k}", namespace=NAMESPACE, get_if_exists=True, max_restarts=-1,
                               num_cpus=cfg.num_cpus_per_shard).remote(k, _config_dict(cfg))


class ShardedReplay:
    def __init__(self, config: ReplayConfig | None = None, **overrides):
        if config is not None and overrides:
            raise ConfigError("ShardedReplay: pass a ReplayConfig or field overrides, not both")
        self.config = cfg = config or ReplayConfig(**overrides)
        self.schema = cfg.schema
        self.shards = [start_shard(cfg, k) for k in range(cfg.num_shards)]
        for k, info in enumerate(ray.get([s.describe.remote() for s in self.shards])):
            mine = {"capacity_per_shard": cfg.capacity_per_shard, "schema": self.schema.to_dict(), "alpha": cfg.alpha}
            theirs = {key: info[key] for key in mine}
            if theirs != mine:
                raise ConfigError(f"replay shard {cfg.name}-{k} already runs with {theirs}, not {mine}; "
                                  f"use another ReplayConfig.name or the same settings")
        n = cfg.num_shards
        self._sizes = np.zeros(n, np.int64)
        self._masses = np.zeros(n, np.float64)
        self._fresh = False  # sizes/masses known from a reply
        self.rng = np.random.default_rng(cfg.seed + 10_007)

    # --- add --------------------------------------------------------------------------------
    def add(self, batch: dict) -> dict:
        return self.add_wait(self.add_submit(batch))

    def add_submit(self, batch: dict) -> list:
        """Validate, split by owner shard and send; ``add_wait`` collects. Raises ValueError, sending nothing."""
        b = self.schema.validate(batch)
        n = len(b["step"])
        if n == 0:
            return []
        b = order_by_episode(b)  # semantic checks too, so no shard ever sees a part of a bad batch
        owner = shard_of(b["episode_id"], self.config.num_shards)
        order = np.argsort(owner, kind="stable")
        counts = np.bincount(owner, minlength=self.config.num_shards)
        if counts.max() > self.config.capacity_per_shard:
            k = int(counts.argmax())
            raise ValueError(f"add: {int(counts[k])} transitions for shard {k} exceed its capacity of "
                             f"{self.config.capacity_per_shard} rows; send smaller batches")
        pending, lo = [], 0
        for k, c in enumerate(counts.tolist()):
            if c:
                part = {f: v[order[lo:lo + c]] for f, v in b.items()}
                pending.append((k, part, self.shards[k].add.remote(part)))
            lo += c
        return pending

    def add_wait(self, pending: list) -> dict:
        total = {"added": 0, "duplicates": 0, "retries": 0}
        for k, part, ref in pending:
            out, retries = self._get_retrying(k, ref, "add", part)
            total["added"] += out["added"]
            total["duplicates"] += out["duplicates"]
            total["retries"] += retries
            self._sizes[k], self._masses[k] = out["size"], out["priority_total"]
        return total

    # --- sample -----------------------------------------------------------------------------
    def sample(self, batch_size: int, prioritized: bool = False, beta: float | None = None) -> dict:
        return self.sample_wait(self.sample_submit(batch_size, prioritized, beta))

    def sample_batches(self, batch_size: int, num_batches: int, prioritized: bool = False,
                       beta: float | None = None) -> list[dict]:
        """``num_batches`` independent batches for the price of one call per shard (a learner's minibatches)."""
        return self.sample_wait(self.sample_submit(batch_size, prioritized, beta, num_batches=num_batches))

    def sample_submit(self, batch_size: int, prioritized: bool = False, beta: float | None = None,
                      num_batches: int | None = None) -> dict:
        """Send one sample call per shard that gets a share; ``sample_wait`` assembles the batch(es).

        K batches of B are one multinomial(K*B, q) split over the shards (the sum of K independent
        multinomial(B, q) splits has exactly that law); the K*B rows are shuffled together and cut
        into K batches, so each batch is B independent draws from the global distribution.
        """
        B, K = int(batch_size), 1 if num_batches is None else int(num_batches)
        if B < 1 or K < 1:
            raise ValueError(f"sample: batch_size and num_batches must be >= 1, got {batch_size}, {num_batches}")
        beta = self.config.beta if beta is None else float(beta)
        weights = self._split_weights(prioritized)
        q = weights / weights.sum()
        counts = self.rng.multinomial(B * K, q)
        refs = [(k, c, self.shards[k].sample.remote(c, prioritized, beta)) for k, c in enumerate(counts.tolist()) if c]
        return {"B": B, "K": K, "prioritized": prioritized, "beta": beta, "q": q, "refs": refs,
                "list": num_batches is not None}

    def sample_wait(self, pending: dict) -> dict | list[dict]:
        parts = []
        for k, c, ref in pending["refs"]:
            out, _ = self._get_retrying(k, ref, "sample", c, pending["prioritized"], pending["beta"])
            self._sizes[k], self._masses[k] = out["size"], out["priority_total"]
            if out["n"]:  # 0: that shard was emptied meanwhile (restarted without a checkpoint)
                out["probs"] = pending["q"][k] * out["probs"]  # global draw probability
                parts.append(out)
        self._fresh = True
        if not parts:
            raise ValueError("sample: the replay holds no transitions yet")
        total = sum(p["n"] for p in parts)
        perm = self.rng.permutation(total)  # mix the shards' rows
        rows = {f: np.concatenate([p[f] for p in parts])[perm] for f in _SAMPLE_FIELDS}
        B, K = pending["B"], pending["K"]
        bounds = np.linspace(0, total, K + 1).astype(np.int64) if total < B * K else np.arange(K + 1) * B
        size = float(self._sizes.sum())
        batches = []
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            batch = {f: v[lo:hi] for f, v in rows.items()}
            if pending["prioritized"] and hi > lo:
                w = (size * batch["probs"]) ** (-pending["beta"])
                batch["weights"] = (w / w.max()).astype(np.float32)
            else:
                batch["weights"] = np.ones(hi - lo, np.float32)
            batches.append(batch)
        return batches if pending["list"] else batches[0]

    def _split_weights(self, prioritized: bool) -> np.ndarray:
        if not self._fresh:
            self._refresh()
        w = (self._masses if prioritized else self._sizes).astype(np.float64)
        if w.sum() <= 0:
            self._refresh()
            w = (self._masses if prioritized else self._sizes).astype(np.float64)
            if w.sum() <= 0:
                raise ValueError("sample: the replay holds no transitions yet")
        return w

    def _refresh(self) -> None:
        for k, st in enumerate(self._call_all("stats")):
            self._sizes[k], self._masses[k] = st["size"], st["priority_total"]
        self._fresh = True

    # --- priorities -------------------------------------------------------------------------
    def update_priorities(self, index, priorities) -> dict:
        idx, pr = np.asarray(index), np.asarray(priorities)
        if idx.ndim != 1 or idx.dtype.kind not in "iu" or pr.shape != idx.shape:
            raise ValueError(f"update_priorities: expected index int [K] and priorities [K], got "
                             f"{idx.dtype} {list(idx.shape)} and {pr.dtype} {list(pr.shape)}")
        shard = decode_index(idx)[0]
        if idx.size and (shard.min() < 0 or shard.max() >= self.config.num_shards):
            raise ValueError(f"update_priorities: index names shard {int(shard.max())}, this replay has "
                             f"{self.config.num_shards}")
        pending = []
        for k in np.unique(shard).tolist():
            sel = shard == k
            args = (idx[sel], pr[sel])
            pending.append((k, args, self.shards[k].update_priorities.remote(*args)))
        total = {"updated": 0, "stale": 0}
        for k, args, ref in pending:
            out, _ = self._get_retrying(k, ref, "update_priorities", *args)
            total["updated"] += out["updated"]
            total["stale"] += out["stale"]
            self._masses[k] = out["priority_total"]
        return total

    # --- whole-buffer operations ------------------------------------------------------------
    @property
    def known_size(self) -> int:
        """Transitions held, as of the shards' last replies (costs no call; may lag other writers)."""
        return int(self._sizes.sum())

    def stats(self) -> dict:
        shards = self._call_all("stats")
        for k, st in enumerate(shards):
            self._sizes[k], self._masses[k] = st["size"], st["priority_total"]
        keys = ("size", "transitions_added", "duplicates_dropped", "transitions_sampled", "adds_per_s",
                "samples_per_s", "bytes", "lost_total")
        out = {key: sum(st[key] for st in shards) for key in keys}
        out.update(capacity_rows=self.config.capacity, shards=shards,
                   payload_bytes_per_transition=self.schema.payload_bytes(),
                   bytes_per_row=out["bytes"] / self.config.capacity)
        return out

    def checkpoint_all(self, directory: str | None = None) -> list[dict]:
        return self._call_all("checkpoint", directory)

    def restore(self, directory: str | None = None) -> dict:
        shards = self._call_all("restore", directory)
        for k, r in enumerate(shards):
            self._sizes[k] = r["size"]
        self._fresh = False
        return {"lost_since_checkpoint": sum(r["lost_since_checkpoint"] for r in shards), "shards": shards}

    def wait_ready(self) -> list[str]:
        return self._call_all("ping")

    def kill(self) -> None:
        """End the shard actors for good (no restart)."""
        for s in self.shards:
            ray.kill(s, no_restart=True)

    # --- plumbing ---------------------------------------------------------------------------
    def _call_all(self, method: str, *args) -> list:
        refs = [getattr(s, method).remote(*args) for s in self.shards]
        return [self._get_retrying(k, ref, method, *args)[0] for k, ref in enumerate(refs)]

    def _get_retrying(self, k: int, ref, method: str, *args):
        """ray.get, resending the call while shard ``k`` is dead or restarting. Returns (result, retries)."""
        retries, delay = 0, 0.05
        while True:
            try:
                return ray.get(ref), retries
            except RayActorError:
                if retries >= self.config.retries:
                    raise
                retries += 1
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                ref = getattr(self.shards[k], method).remote(*args)


def _config_dict(cfg: ReplayConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
