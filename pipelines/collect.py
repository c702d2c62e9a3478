"""``genie-sima collect``: real game video into HDF5 shards, one Ray task per shard.

Each episode's env seed and behaviour RNG derive from (``seed``, episode index) only, so a shard's
bytes depend on the plan, not on which worker ran it or when. Re-running the same command keeps
every complete shard whose plan fingerprint matches, deletes temp files of killed writers, redoes
the rest and rebuilds the manifest: no episode is duplicated or missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .atomic_io import check_writable_dir, remove_stale_temps
from .config import make_config, save_config
from .errors import ConfigError, ShardError
from .data.behaviour import POLICIES, make_behaviour
from .data.episode import episode_seeds, record_episode
from .data.game_source import make_game, parse_source
from .data.manifest import CONFIG_NAME, episode_split, write_manifest
from .data.shard_format import ShardWriter, episode_summaries, shard_name, validate_shard
from .progress import ProgressLine
from .ray_runtime import ensure_ray, software_versions

# Fields that decide what lands in the shards. Changing any of them for an existing --out is
# refused; --episodes may grow (new shards are added), --workers/--address are free.
DATA_FIELDS = ("source", "policy", "epsilon", "frame_size", "seed", "episodes_per_shard", "max_steps")


@dataclass
class CollectConfig:
    source: str = field(metadata={"help": "babyai:<level id> or atari:<game>"})
    out: str = field(metadata={"help": "output directory for shards and manifest"})
    episodes: int = field(default=64, metadata={"help": "number of episodes"})
    policy: str = field(default="mixed", metadata={"help": "behaviour policy", "choices": POLICIES})
    epsilon: float = field(default=0.2, metadata={"help": "random-action probability for --policy mixed"})
    frame_size: int = field(default=64, metadata={"help": "square frame size in pixels"})
    workers: int = field(default=2, metadata={"help": "shard tasks running at once"})
    seed: int = field(default=0, metadata={"help": "base seed; same seed -> same bytes"})
    episodes_per_shard: int = field(default=16, metadata={"help": "episodes per HDF5 shard (one Ray task each)"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "episode step limit (default: the game's own; Atari 2000)"})
    val_fraction: float = field(default=0.1, metadata={"help": "fraction of episodes in the val split"})
    address: Optional[str] = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS or a new local Ray)"})

    def validate(self) -> None:
        parse_source(self.source)
        checks = [
            (self.episodes >= 1, "--episodes", self.episodes, "an integer >= 1"),
            (self.policy in POLICIES, "--policy", self.policy, f"one of {POLICIES}"),
            (0.0 <= self.epsilon <= 1.0, "--epsilon", self.epsilon, "a number in [0, 1]"),
            (8 <= self.frame_size <= 1024, "--frame-size", self.frame_size, "an integer in [8, 1024]"),
            (self.workers >= 1, "--workers", self.workers, "an integer >= 1"),
            (self.seed >= 0, "--seed", self.seed, "an integer >= 0"),
            (self.episodes_per_shard >= 1, "--episodes-per-shard", self.episodes_per_shard, "an integer >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps", self.max_steps, "an integer >= 1"),
            (0.0 <= self.val_fraction < 1.0, "--val-fraction", self.val_fraction, "a number in [0, 1)"),
        ]
        for ok, flag, value, expected in checks:
            if not ok:
                raise ConfigError(f"{flag} {value!r}: expected {expected}")
        if self.source.startswith("atari:") and self.policy == "bot":
            raise ConfigError("--policy bot: Atari has no bundled expert; use --policy random or mixed")


@dataclass(frozen=True)
class ShardPlan:
    index: int
    start: int  # first episode index (inclusive)
    stop: int  # last episode index (exclusive)

    @property
    def name(self) -> str:
        return shard_name(self.index)


def plan_shards(cfg: CollectConfig) -> list[ShardPlan]:
    n = cfg.episodes_per_shard
    return [ShardPlan(i, s, min(s + n, cfg.episodes)) for i, s in enumerate(range(0, cfg.episodes, n))]


def plan_fingerprint(cfg: CollectConfig, plan: ShardPlan) -> str:
    data = {k: getattr(cfg, k) for k in DATA_FIELDS}
    data.update(start=plan.start, stop=plan.stop)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def write_shard(cfg_dict: dict, plan: ShardPlan, out_dir: str) -> dict:
    """Collect one shard's episodes and commit the file; safe to re-run after a crash."""
    cfg = CollectConfig(**cfg_dict)
    spec = parse_source(cfg.source)
    out = Path(out_dir)
    remove_stale_temps(out, plan.name)
    t0 = time.perf_counter()
    game = make_game(spec, cfg.frame_size, cfg.max_steps)
    frames = 0
    with ShardWriter(out / plan.name) as writer:
        for ep_index in range(plan.start, plan.stop):
            env_seed, rng = episode_seeds(cfg.seed, ep_index)
            ep = record_episode(
                game, lambda g, rng=rng: make_behaviour(spec.kind, cfg.policy, g, cfg.epsilon, rng), env_seed
            )
            writer.add(ep_index, ep)
            frames += ep.frames.shape[0]
        writer.commit({
            "source": cfg.source, "frame_size": cfg.frame_size, "policy": cfg.policy,
            "epsilon": float(cfg.epsilon), "base_seed": cfg.seed, "shard_index": plan.index,
            "episode_start": plan.start, "episode_stop": plan.stop, "num_actions": game.num_actions,
            "action_names": json.dumps(list(game.action_names)),
            "plan_fingerprint": plan_fingerprint(cfg, plan),
        })
    game.close()
    return {"shard": plan.name, "episodes": plan.stop - plan.start, "frames": frames,
            "seconds": time.perf_counter() - t0}


def _existing_shard_ok(cfg: CollectConfig, plan: ShardPlan, out: Path, log) -> bool:
    path = out / plan.name
    if not path.exists():
        return False
    try:
        attrs = validate_shard(path, expected_frame_size=cfg.frame_size)
    except ShardError as e:
        log(f"collect: re-collecting {plan.name}: {e.problem}")
        return False
    if attrs["plan_fingerprint"] != plan_fingerprint(cfg, plan):
        log(f"collect: re-collecting {plan.name}: it was written for another episode range or config")
        return False
    return True


def _check_compatible(cfg: CollectConfig, out: Path) -> None:
    path = out / CONFIG_NAME
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: unreadable collect config ({e}); use a new --out") from e
    diffs = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in DATA_FIELDS if old.get(k) != getattr(cfg, k)]
    if diffs:
        raise ConfigError(
            f"--out {out} already holds a collection made with other settings ({'; '.join(diffs)}); "
            "re-run with the same settings to resume, or choose a new --out"
        )


def build_manifest(cfg: CollectConfig, out: Path, plans: list[ShardPlan]) -> list[dict]:
    rows = []
    for plan in plans:
        for ep in episode_summaries(out / plan.name):
            rows.append({
                "shard": plan.name, "episode_key": ep["episode_key"], "episode_index": ep["episode_index"],
                "length": ep["length"], "return": ep["return"], "success": ep["success"],
                "mission": ep["mission"], "seed": ep["seed"], "level_id": ep["level_id"],
                "source": cfg.source, "frame_size": cfg.frame_size,
                "split": episode_split(cfg.source, ep["level_id"], ep["seed"], cfg.val_fraction),
            })
    rows.sort(key=lambda r: r["episode_index"])
    return rows


def collect(cfg: CollectConfig, log=None) -> dict:
    """Run (or resume) a collection; returns a summary dict."""
    import ray

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg = make_config(CollectConfig, dataclasses.asdict(cfg))  # re-validate
    spec = parse_source(cfg.source)
    make_game(spec, cfg.frame_size, cfg.max_steps).close()  # unknown level/game fails here, early
    out = Path(cfg.out)
    check_writable_dir(out, "--out")
    _check_compatible(cfg, out)
    save_config(cfg, out / CONFIG_NAME, versions=software_versions())

    plans = plan_shards(cfg)
    todo = [p for p in plans if not _existing_shard_ok(cfg, p, out, log)]
    for p in plans:
        remove_stale_temps(out, p.name)
    kept = len(plans) - len(todo)
    if kept:
        log(f"collect: resuming, {kept} complete shard(s) kept, {len(todo)} to collect")

    t0 = time.perf_counter()
    frames = 0
    started_ray = False
    if todo:
        started_ray = ensure_ray(cfg.address)
        task = ray.remote(num_cpus=1, max_retries=3)(write_shard)
        cfg_dict = dataclasses.asdict(cfg)
        progress = ProgressLine("collect", len(todo), "shards")
        pending, queue, done = [], list(todo), 0
        try:
            while queue or pending:
                while queue and len(pending) < cfg.workers:
                    pending.append(task.remote(cfg_dict, queue.pop(0), str(out)))
                ready, pending = ray.wait(pending, num_returns=1)
                for summary in ray.get(ready):
                    done += 1
                    frames += summary["frames"]
                    progress.update(done, frames / (time.perf_counter() - t0), "frames/s")
        finally:
            if started_ray:
                ray.shutdown()
    seconds = time.perf_counter() - t0
    rows = build_manifest(cfg, out, plans)
    write_manifest(out, rows)
    result = {
        "out": str(out), "episodes": len(rows), "shards": len(plans), "shards_kept": kept,
        "shards_collected": len(todo), "frames_collected": frames, "seconds": seconds,
        "frames_per_s": frames / seconds if frames else 0.0,
        "success_rate": sum(r["success"] for r in rows) / max(1, len(rows)),
        "splits": {s: sum(r["split"] == s for r in rows) for s in ("train", "val")},
    }
    log(f"collect: {result['episodes']} episodes in {len(plans)} shards at {out} "
        f"({len(todo)} collected, {kept} kept; {frames} frames in {seconds:.1f}s; "
        f"success {result['success_rate']:.0%})")
    return result
