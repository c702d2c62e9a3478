"""``TrainReplay``: the shared replay of one ``genie-sima train`` run in imagination, and its mission table.

- Starts ``ReplayShard`` actors named after the run (``genie-sima-replay-RUN-k``) and the ``MissionTable``
  (``genie-sima-missions-RUN``). The live folder ``OUT/replay`` holds each shard's add journal and newest
  checkpoint, so a shard that dies mid-run comes back with what it had at the last checkpoint, and the
  mission table's live file, so a restarted table keeps its ids.
- ``save(ckpt)``: every shard checkpoints (one call each, pipelined) into ``OUT/replay``; the files are then
  hard-linked (copied across file systems) into ``ckpt/replay`` with ``missions.json``. Shards replace
  their files by rename, so a link keeps the old contents: each train checkpoint keeps its own replay.
- ``restore(ckpt)`` (--resume): loads ``ckpt/replay`` into the shards and the mission table.
- ``feed_callback()`` / ``aux_batches(...)``: what RLlib's EnvRunners and Learners get.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .replay import ReplayConfig, ShardedReplay
from .replay.checkpoint import checkpoint_path
from .replay.mission_table import TABLE_FILE, load_mission_table, save_mission_table, start_mission_table

REPLAY_DIR = "replay"  # inside the run directory (live) and inside each train checkpoint


class TrainReplay:
    def __init__(self, run: str, out: Path, capacity: int, num_shards: int, obs_tokens: int, num_actions: int,
                 seed: int = 0, fresh: bool = True):
        live = Path(out) / REPLAY_DIR
        if fresh:
            shutil.rmtree(live, ignore_errors=True)  # a new run never restores an abandoned run's shards
        self.config = ReplayConfig(name=f"genie-sima-replay-{run}", num_shards=num_shards,
                                   capacity_per_shard=capacity // num_shards, obs_tokens=obs_tokens,
                                   num_actions=num_actions, checkpoint_dir=str(live), seed=seed)
        self.table_name = f"genie-sima-missions-{run}"
        self.replay = ShardedReplay(self.config)
        self.table = start_mission_table(self.table_name, [] if fresh else None, path=str(live / TABLE_FILE))

    def feed_callback(self) -> type:
        from .replay_feed import replay_feed_callback

        return replay_feed_callback(_as_dict(self.config), self.table_name)

    def aux_batches(self, bundle: str, tokenizer_json: dict, batch_size: int, max_len: int):
        from .replay_aux_batches import ReplayAuxBatches

        return ReplayAuxBatches(_as_dict(self.config), self.table_name, bundle, tokenizer_json, batch_size, max_len)

    def save(self, ckpt: Path) -> dict:
        saved = self.replay.checkpoint_all()
        dest = Path(ckpt) / REPLAY_DIR
        dest.mkdir(parents=True, exist_ok=True)
        for k in range(self.config.num_shards):
            src, dst = checkpoint_path(self.config.checkpoint_dir, k), checkpoint_path(dest, k)
            try:
                os.link(src, dst)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(src, dst)
        save_mission_table(self.table, dest)
        return {"size": sum(s["size"] for s in saved), "bytes": sum(s["bytes"] for s in saved),
                "seconds": max(s["seconds"] for s in saved)}

    def restore(self, ckpt: Path) -> dict | None:
        """Load ``ckpt/replay``; None when that checkpoint has no replay (written with the replay off)."""
        src = Path(ckpt) / REPLAY_DIR
        if not src.is_dir():
            return None
        import ray

        ray.get(self.table.load.remote(load_mission_table(src)))
        out = self.replay.restore(str(src))
        return {"size": sum(s["size"] for s in out["shards"])}

    def stats(self) -> dict:
        return self.replay.stats()

    def stop(self) -> None:
        import ray

        self.replay.kill()
        ray.kill(self.table, no_restart=True)


def _as_dict(cfg: ReplayConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
