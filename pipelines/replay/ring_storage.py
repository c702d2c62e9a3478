"""The replay's storage: preallocated numpy rings, one row per observation, plus a priority sum tree.

Next observations are derived from the ring, not stored twice
-------------------------------------------------------------
Row i holds o_t with the transition taken from it (a_t, r_{t+1}, terminated, truncated, ids, t).
o_{t+1} is simply row i+1 (mod capacity). An add call sorts its transitions by (episode_id, step)
and cuts them into runs of consecutive steps of one episode; each run is written contiguously and
followed by one extra "final observation" row holding the run's last next_obs_tokens. That row is
not a transition: its priority leaf is 0, so it is never sampled (leaf > 0 <=> row is a transition).
When the next chunk of the same episode arrives and the ring's newest row is exactly that final
observation (same episode, step and tokens), the chunk starts ON that row, so an episode written in
several chunks costs one extra row in all, not one per chunk.

Bytes per transition, P = 64 tokens, discrete action: 128 (o_t int16) + 4 action + 4 reward +
1 terminated + 1 truncated + 4 mission_id + 8 episode_id + 4 step = 154 payload, + 4.26 priority
tree = 158.3 per row; times (1 + runs/transitions) for the final-observation rows (64-step episodes:
~160.7, i.e. 1.04x the payload). Storing next_obs_tokens per row instead would cost 286 (1.86x).
Overwriting in ring order is safe: a transition's successor row was always written after it, so it
is overwritten after it.

An add is all or nothing: everything is validated and every destination row computed before the
first write, and nothing after the first write can fail. Steps an episode already has (its
high-water mark, see episode_index.py) are dropped as duplicates, so retrying an add is harmless.
"""

from __future__ import annotations

import json
import time

import numpy as np

from .episode_index import EpisodeHighWater
from .rates import RateWindow
from .routing import decode_index, encode_index
from .schema import STORED_FIELDS, TransitionSchema, order_by_episode
from .sum_tree import SumTree

STATE_FORMAT = "genie-sima-replay-shard/1"


class ReplayStorage:
    def __init__(self, capacity: int, schema: TransitionSchema | None = None, *, alpha: float = 0.6,
                 priority_eps: float = 1e-6, max_episodes: int = 65_536, seed: int | None = None, shard: int = 0):
        if int(capacity) < 2:
            raise ValueError(f"ReplayStorage: capacity must be >= 2 rows, got {capacity}")
        if not (alpha >= 0 and priority_eps > 0):
            raise ValueError(f"ReplayStorage: expected alpha >= 0 and priority_eps > 0, got {alpha}, {priority_eps}")
        self.capacity = int(capacity)
        self.schema = schema or TransitionSchema()
        self.alpha, self.priority_eps = float(alpha), float(priority_eps)
        self.shard = int(shard)
        specs = self.schema.field_specs()
        self.cols = {f: np.zeros((self.capacity,) + specs[f][1], specs[f][0]) for f in STORED_FIELDS}
        self.tree = SumTree(self.capacity)
        self.episodes = EpisodeHighWater(max_episodes)
        self.rng = np.random.default_rng(seed)
        self.generation = 0
        self.rows_written = 0  # absolute rows ever written; next row = rows_written % capacity
        self.size = 0  # transitions held (rows whose priority leaf is > 0)
        self.max_priority = 1.0
        self.counters = {"transitions_added": 0, "duplicates_dropped": 0, "final_obs_rows": 0, "add_calls": 0,
                         "transitions_sampled": 0, "sample_calls": 0, "priorities_updated": 0,
                         "priority_updates_stale": 0}
        self.busy_s = {"add": 0.0, "sample": 0.0}
        self._add_rate, self._sample_rate = RateWindow(), RateWindow()

    # --- add --------------------------------------------------------------------------------
    def add(self, batch: dict) -> dict:
        """Add a batch of transitions (see schema.py). Returns counts; raises ValueError, writing nothing."""
        t0 = time.perf_counter()
        b = self.schema.validate(batch)
        n = len(b["step"])
        if n > self.capacity:
            raise ValueError(f"add: {n} transitions in one call exceed the capacity of {self.capacity} rows")
        if n == 0:
            return self._add_result(0, 0, 0)
        b = order_by_episode(b)

        # Drop steps this buffer already holds (a retried chunk), keep the rest.
        ep, st = b["episode_id"], b["step"]
        g_start = np.flatnonzero(np.r_[True, ep[1:] != ep[:-1]])
        g_len = np.diff(np.r_[g_start, n])
        keep = st > np.repeat(self.episodes.lookup(ep[g_start]), g_len)
        m = int(keep.sum())
        if m == 0:
            return self._add_result(0, n, 0, t0)
        if m < n:
            b = {k: v[keep] for k, v in b.items()}
            ep, st = b["episode_id"], b["step"]

        cont = (ep[1:] == ep[:-1]) & (st[1:] == st[:-1] + 1)  # row k+1 continues row k's run
        run_id = np.cumsum(np.r_[True, ~cont]) - 1  # [m]
        ends = np.flatnonzero(np.r_[~cont, True])  # last transition of each run
        r = ends.size
        merge = self._continues_newest_row(int(ep[0]), int(st[0]), b["obs_tokens"][0])
        rows_needed = m + r  # written from `base`; when merging, the first one is the reused final-obs row
        if rows_needed > self.capacity:
            raise ValueError(f"add: {m} transitions in {r} episode runs need {rows_needed} rows (one final "
                             f"observation per run), more than the capacity of {self.capacity}")

        # Destination rows (absolute positions mod capacity). Nothing has been changed so far.
        C = self.capacity
        base = self.rows_written - merge
        rows_t = (base + np.arange(m) + run_id) % C
        rows_f = (base + ends + np.arange(r) + 1) % C
        rows_all = (base + np.arange(rows_needed)) % C
        leaves = self.tree.leaves
        overwritten = int(np.count_nonzero(leaves[rows_all] > 0))
        prio = np.float32(self.max_priority ** self.alpha)
        e_end = np.flatnonzero(np.r_[ep[1:] != ep[:-1], True])  # last kept step of each episode
        final_obs = b["next_obs_tokens"][ends]

        # --- writes (cannot fail from here on) ---
        c = self.cols
        for f in STORED_FIELDS:
            c[f][rows_t] = b[f]
        c["obs_tokens"][rows_f] = final_obs
        c["action"][rows_f] = 0
        c["reward"][rows_f] = 0.0
        c["terminated"][rows_f] = False
        c["truncated"][rows_f] = False
        c["mission_id"][rows_f] = b["mission_id"][ends]
        c["episode_id"][rows_f] = ep[ends]
        c["step"][rows_f] = st[ends] + 1
        self.tree.set(np.concatenate([rows_t, rows_f]),
                      np.concatenate([np.full(m, prio, np.float32), np.zeros(r, np.float32)]))
        self.rows_written = base + rows_needed
        self.size += m - overwritten
        self.episodes.record(ep[e_end], st[e_end])
        self.counters["final_obs_rows"] += r - merge
        return self._add_result(m, n - m, rows_needed - merge, t0)

    def _continues_newest_row(self, episode_id: int, step: int, obs: np.ndarray) -> int:
        """1 if the ring's newest row is the final observation this chunk starts from, else 0."""
        if self.rows_written == 0:
            return 0
        row = (self.rows_written - 1) % self.capacity
        c = self.cols
        same = (self.tree.leaves[row] == 0 and int(c["episode_id"][row]) == episode_id
                and int(c["step"][row]) == step and np.array_equal(c["obs_tokens"][row], obs))
        return int(same)

    def _add_result(self, added: int, duplicates: int, rows: int, t0: float | None = None) -> dict:
        self.counters["transitions_added"] += added
        self.counters["duplicates_dropped"] += duplicates
        self.counters["add_calls"] += 1
        if t0 is not None:
            self.busy_s["add"] += time.perf_counter() - t0
        self._add_rate.update(self.counters["transitions_added"])
        return {"added": added, "duplicates": duplicates, "rows": rows, "size": self.size,
                "priority_total": self.tree.total()}

    # --- sample -----------------------------------------------------------------------------
    def sample(self, batch_size: int, prioritized: bool = False, beta: float = 0.4) -> dict[str, np.ndarray]:
        """``batch_size`` transitions, uniformly or in proportion to priority**alpha.

        Returns the stored fields plus next_obs_tokens [B, P], index (int64, for update_priorities),
        probs (float64: this buffer's probability of drawing each item) and weights (float32
        importance weights (size * probs) ** -beta, divided by the batch maximum; 1 when uniform).
        """
        t0 = time.perf_counter()
        B = int(batch_size)
        if B < 1:
            raise ValueError(f"sample: batch_size must be >= 1, got {batch_size}")
        if self.size == 0:
            raise ValueError("sample: the replay holds no transitions yet")
        leaves = self.tree.leaves
        if prioritized:
            total = self.tree.total()
            u = (np.arange(B) + self.rng.random(B)) * (total / B)  # stratified: one draw per 1/B of the mass
            rows = self.tree.find(u)[self.rng.permutation(B)]
            probs = leaves[rows].astype(np.float64) / total
            weights = (self.size * probs) ** (-float(beta))
            weights = (weights / weights.max()).astype(np.float32)
        else:
            filled = min(self.rows_written, self.capacity)
            rows = self.rng.integers(0, filled, B)
            bad = leaves[rows] <= 0  # final-observation rows: draw again (they are < half of all rows)
            while bad.any():
                rows[bad] = self.rng.integers(0, filled, int(bad.sum()))
                bad = leaves[rows] <= 0
            probs = np.full(B, 1.0 / self.size)
            weights = np.ones(B, np.float32)
        out = self._gather(rows)
        out["probs"], out["weights"] = probs, weights
        self.counters["transitions_sampled"] += B
        self.counters["sample_calls"] += 1
        self.busy_s["sample"] += time.perf_counter() - t0
        self._sample_rate.update(self.counters["transitions_sampled"])
        return out

    def _gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        c, C, W = self.cols, self.capacity, self.rows_written
        out = {f: c[f][rows] for f in STORED_FIELDS}
        out["next_obs_tokens"] = c["obs_tokens"][(rows + 1) % C]
        positions = W - 1 - ((W - 1 - rows) % C)  # absolute write position of each row
        out["index"] = encode_index(self.shard, self.generation, positions)
        return out

    def get_rows(self, rows) -> dict[str, np.ndarray]:
        """Raw ring rows (any kind) with their priority leaves; for inspection and tests."""
        rows = np.asarray(rows, np.int64)
        out = {f: self.cols[f][rows].copy() for f in STORED_FIELDS}
        out["priority"] = self.tree.leaves[rows].copy()
        return out

    # --- priorities -------------------------------------------------------------------------
    def update_priorities(self, index, priorities) -> dict:
        """Set the priorities of sampled transitions (by the ``index`` a sample returned).

        Indices whose row was overwritten since, or that predate a restore, are skipped and counted
        as stale. Priorities must be finite and >= 0; leaves hold (priority + eps) ** alpha.
        """
        idx, pr = np.asarray(index), np.asarray(priorities)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise ValueError(f"update_priorities: index must be a 1-D integer array, got {idx.dtype} {list(idx.shape)}")
        if pr.shape != idx.shape or pr.dtype.kind not in "iuf":
            raise ValueError(f"update_priorities: priorities must be numbers of shape {list(idx.shape)} (as index), "
                             f"got {pr.dtype} {list(pr.shape)}")
        pr = pr.astype(np.float64)
        if pr.size and (not np.isfinite(pr).all() or pr.min() < 0):
            raise ValueError("update_priorities: priorities must be finite and >= 0")
        shard, gen, pos = decode_index(idx)
        if pr.size and (shard != self.shard).any():
            raise ValueError(f"update_priorities: index of shard {int(shard[shard != self.shard][0])} sent to "
                             f"shard {self.shard}")
        W, C = self.rows_written, self.capacity
        ok = (gen == self.generation % 256) & (pos < W) & (pos >= W - C)
        rows = pos[ok] % C
        live = self.tree.leaves[rows] > 0
        rows, values = rows[live], pr[ok][live] + self.priority_eps
        leaf = values ** self.alpha
        if leaf.size and leaf.max() > np.finfo(np.float32).max:
            raise ValueError(f"update_priorities: priority {values.max():.3g} ** alpha overflows float32")
        self.tree.set(rows, np.maximum(leaf, np.finfo(np.float32).tiny).astype(np.float32))
        if values.size:
            self.max_priority = max(self.max_priority, float(values.max()))
        self.counters["priorities_updated"] += int(rows.size)
        self.counters["priority_updates_stale"] += int(idx.size - rows.size)
        return {"updated": int(rows.size), "stale": int(idx.size - rows.size)}

    # --- stats ------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.cols.values()) + self.tree.nbytes

    def stats(self) -> dict:
        rows_used = min(self.rows_written, self.capacity)
        return {
            "shard": self.shard, "generation": self.generation, "size": self.size, "capacity_rows": self.capacity,
            "rows_used": rows_used, "rows_written": self.rows_written, **self.counters,
            "adds_per_s": self._add_rate.update(self.counters["transitions_added"]),
            "samples_per_s": self._sample_rate.update(self.counters["transitions_sampled"]),
            "add_busy_s": self.busy_s["add"], "sample_busy_s": self.busy_s["sample"],
            "bytes": self.nbytes, "bytes_per_row": self.nbytes / self.capacity,
            "bytes_per_transition_held": (self.nbytes * rows_used / self.capacity / self.size) if self.size else None,
            "payload_bytes_per_transition": self.schema.payload_bytes(),
            "priority_total": self.tree.total(), "max_priority": self.max_priority,
            "episodes_tracked": len(self.episodes),
        }

    # --- checkpoint state -------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild this storage exactly (see checkpoint.py for the file)."""
        ids, last = self.episodes.to_arrays()
        meta = {"format": STATE_FORMAT, "capacity": self.capacity, "schema": self.schema.to_dict(),
                "alpha": self.alpha, "priority_eps": self.priority_eps, "shard": self.shard,
                "generation": self.generation, "rows_written": self.rows_written, "size": self.size,
                "max_priority": self.max_priority, "counters": self.counters,
                "max_episodes": self.episodes.max_episodes, "rng": self.rng.bit_generator.state,
                "saved_at": time.time()}
        # Only the rows ever written: the ring fills from row 0, so rows >= rows_written are still zeros and a
        # checkpoint of a big, little-used buffer costs what it holds, not its capacity.
        used = min(self.rows_written, self.capacity)
        arrays = {f"col_{f}": a[:used] for f, a in self.cols.items()}
        arrays.update(leaves=self.tree.leaves[:used], episode_ids=ids, episode_last_steps=last,
                      meta=np.array(json.dumps(meta)))
        return arrays

    def load_state(self, arrays: dict[str, np.ndarray], *, generation: int | None = None,
                   known_added: int | None = None) -> dict:
        """Replace the contents with a saved state; returns what was lost relative to ``known_added``.

        ``known_added``: transitions this shard had accepted in total before the restore (default:
        this object's own counter). Lost = known_added - the checkpoint's count, never negative.
        """
        try:
            meta = json.loads(str(arrays["meta"]))
        except (KeyError, ValueError) as e:
            raise ValueError(f"replay state: no readable 'meta' entry ({e})") from None
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"replay state: format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        for key, mine in (("capacity", self.capacity), ("schema", self.schema.to_dict()), ("alpha", self.alpha)):
            if meta[key] != mine:
                raise ValueError(f"replay state: {key} {meta[key]!r} differs from this buffer's {mine!r}")
        used = min(int(meta["rows_written"]), self.capacity)  # rows the checkpoint holds (see state_arrays)
        for f, a in self.cols.items():
            saved = arrays.get(f"col_{f}")
            want = (used,) + a.shape[1:]
            if saved is None or saved.shape != want or saved.dtype != a.dtype:
                got = None if saved is None else f"{saved.dtype} {list(saved.shape)}"
                raise ValueError(f"replay state: column {f!r}: expected {a.dtype} {list(want)}, got {got}")
        leaves = arrays.get("leaves")
        if leaves is None or leaves.shape != (used,):
            raise ValueError(f"replay state: priority leaves missing or not of shape [{used}]")
        before = self.counters["transitions_added"] if known_added is None else int(known_added)
        for f, a in self.cols.items():
            a[:used] = arrays[f"col_{f}"]
            a[used:] = 0  # never written when the checkpoint was taken
        self.tree.levels[0][:] = 0.0
        self.tree.levels[0][:used] = leaves
        self.tree.rebuild()
        self.episodes.load_arrays(arrays["episode_ids"], arrays["episode_last_steps"])
        self.rows_written, self.size = int(meta["rows_written"]), int(meta["size"])
        self.max_priority, self.priority_eps = float(meta["max_priority"]), float(meta["priority_eps"])
        self.counters = {**self.counters, **meta["counters"]}
        self.rng.bit_generator.state = meta["rng"]
        self.generation = (int(meta["generation"]) + 1) if generation is None else int(generation)
        self._add_rate.reset(self.counters["transitions_added"])
        self._sample_rate.reset(self.counters["transitions_sampled"])
        lost = max(0, before - int(meta["counters"]["transitions_added"]))
        return {"lost_since_checkpoint": lost, "size": self.size, "saved_at": meta["saved_at"],
                "checkpoint_transitions_added": int(meta["counters"]["transitions_added"])}
