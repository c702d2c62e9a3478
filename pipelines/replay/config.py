"""The shared replay's one typed config (every field a CLI flag via pipelines.config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .routing import MAX_SHARDS
from .schema import TransitionSchema

NAMESPACE = "genie-sima"  # same Ray namespace as the world servers


@dataclass
class ReplayConfig:
    name: str = field(default="replay", metadata={"help": "shard actors are named NAME-0 .. NAME-{K-1}"})
    num_shards: int = field(default=4, metadata={"help": "shard actors; an episode always lives in one"})
    capacity_per_shard: int = field(default=250_000, metadata={"help": "ring rows per shard (1e6 in all by default)"})
    obs_tokens: int = field(default=64, metadata={"help": "P: world-model tokens per observation (int16)"})
    action_dim: int = field(default=0, metadata={"help": "0: discrete int32 action; A > 0: float32 action vector [A]"})
    num_actions: int = field(default=0, metadata={"help": "discrete actions must lie in [0, N); 0 = unchecked"})
    alpha: float = field(default=0.6, metadata={"help": "prioritisation exponent (0 = uniform)"})
    beta: float = field(default=0.4, metadata={"help": "default importance-weight exponent"})
    priority_eps: float = field(default=1e-6, metadata={"help": "added to priorities so none is exactly 0"})
    max_episodes: int = field(default=65_536, metadata={"help": "episodes per shard remembered for dedup of retries"})
    checkpoint_dir: str | None = field(default=None, metadata={"help": "shard checkpoints + add journals; a "
                                                                       "restarted shard restores from here"})
    num_cpus_per_shard: float = field(default=0.25, metadata={"help": "Ray CPUs reserved per shard actor"})
    retries: int = field(default=20, metadata={"help": "client retries of a call to a dead/restarting shard"})
    seed: int = field(default=0, metadata={"help": "sampling seed (shard k uses seed + k)"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"ReplayConfig.{name}: expected {what}, got {getattr(self, name)!r}")

        need(1 <= self.num_shards <= MAX_SHARDS, "num_shards", f"1..{MAX_SHARDS}")
        need(self.capacity_per_shard >= 2, "capacity_per_shard", ">= 2")
        need(self.obs_tokens >= 1, "obs_tokens", ">= 1")
        need(self.action_dim >= 0, "action_dim", ">= 0")
        need(self.num_actions >= 0, "num_actions", ">= 0")
        need(self.alpha >= 0, "alpha", ">= 0")
        need(self.beta >= 0, "beta", ">= 0")
        need(self.priority_eps > 0, "priority_eps", "> 0")
        need(self.max_episodes >= 1, "max_episodes", ">= 1")
        need(self.num_cpus_per_shard >= 0, "num_cpus_per_shard", ">= 0")
        need(self.retries >= 0, "retries", ">= 0")
        need(bool(self.name) and "/" not in self.name, "name", "a non-empty name without '/'")

    @property
    def schema(self) -> TransitionSchema:
        return TransitionSchema(self.obs_tokens, self.action_dim, self.num_actions)

    @property
    def capacity(self) -> int:
        return self.num_shards * self.capacity_per_shard
