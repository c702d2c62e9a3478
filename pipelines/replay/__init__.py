"""The shared replay buffer: world-model tokens, not pixels; 1e6 transitions in numpy rings on Ray actors.

    schema.py          what a transition is; the validator every add goes through
    sum_tree.py        vectorised wide sum tree for proportional prioritised sampling
    episode_index.py   per-episode high-water marks (idempotent, retry-safe adds)
    ring_storage.py    ReplayStorage: the in-process ring (add / sample / priorities / state)
    checkpoint.py      atomic .npz checkpoints and the add journal used to count lost transitions
    routing.py         episode -> shard hashing; the sampled-index layout
    rates.py           windowed per-second rates for stats and gauges
    config.py          ReplayConfig
    shard.py           ReplayShard: the Ray actor (metrics, checkpoint, restore on restart)
    sharded_replay.py  ShardedReplay: the client over N shard actors
    mission_table.py   MissionTable: the actor mapping mission text <-> the int32 mission_id rows carry
    saved_contents.py  saved_transitions: the transitions a checkpoint holds, read from its files
"""

from .config import NAMESPACE, ReplayConfig
from .ring_storage import ReplayStorage
from .schema import INPUT_FIELDS, STORED_FIELDS, TransitionSchema
from .sharded_replay import ShardedReplay, start_shard
from .shard import ReplayShard
from .sum_tree import SumTree

__all__ = ["NAMESPACE", "INPUT_FIELDS", "STORED_FIELDS", "ReplayConfig", "ReplayShard", "ReplayStorage",
           "ShardedReplay", "SumTree", "TransitionSchema", "start_shard"]
