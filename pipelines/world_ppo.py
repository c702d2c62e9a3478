"""``WorldPPO``: PPO that owns the WorldModelServer(s) its imagined envs step.

- ``WorldPPOConfig.world_server(name, bundle, count=1, **server_kwargs)`` describes ``count`` servers
  (``count == 1``: one named ``name``, exactly as before; ``count > 1``: ``name-0`` .. ``name-{count-1}``, see
  ``world_server_names``), e.g. one per GPU. ``build_algo()`` then starts them all in ``setup()`` BEFORE PPO's
  own setup builds the EnvRunners (their envs are made and opened inside ``Algorithm.setup``, so
  ``on_algorithm_init`` would come too late). If one fails to start (or cannot load its bundle), the ones
  already started are killed and the error is raised. ``algo.world_servers`` lists the handles;
  ``algo.world_server`` / ``algo.world_server_info`` are the first one's (what single-server callers use).
- The servers' names are handed to every env through ``env_config["servers"]`` (and, with one server, also
  ``env_config["server"]``); the env looks its actor up by name (genie_world.gym_env). One config serves all
  EnvRunners, so the env creator picks (pipelines.mission_tokens.world_server_for): EnvRunner ``i`` (1..K
  remote, 0 the local one, which only samples when there are no remote ones) uses
  ``servers[(max(i, 1) - 1) % count]``, so remote runners are spread round-robin over the servers and each
  server is sized for ``ceil(runners / count)`` runners' envs (pipelines.train_policy.world_server_spec).
- RLlib 2.60 loses the EnvRunner's index on the way to a ``VECTOR_ENTRY_POINT`` creator: it registers
  ``vector_entry_point=lambda n: creator(env_ctx | {"num_envs": n})`` and ``EnvContext | dict`` is a plain
  dict, without ``worker_index``. ``world_server(...)`` therefore sets ``WorldEnvRunner`` as the EnvRunner
  class: it adds its ``worker_index`` to its own copy of the env config (``env_config["env_runner_index"]``)
  before making its envs.
- Restarted EnvRunners need nothing re-handed: Ray restarts an EnvRunner actor with its constructor arguments,
  i.e. the algorithm's config carrying the server names and the SAME ``worker_index``, so a restarted runner
  (and an env RLlib recreates in it) picks the same server again; a name outlives restarts of its server
  (``max_restarts=-1`` keeps one actor, one name). ``restore_env_runners`` / ``on_env_runners_recreated``
  would only matter for per-incarnation state (a handle or token minted after the runner started); there is none.
  tests/test_train_faults.py kills an EnvRunner and checks that its successor re-opened on the same server.
- ``cleanup()`` (``algo.stop()``) stops the EnvRunners first (their envs close their blocks) and then kills
  every server for good (no restart). A setup that fails after starting servers kills them too.
- A restored algorithm (``--resume``: a fresh build, then ``restore_from_path``) starts its servers in setup as
  any new one does; the servers hold no state worth checkpointing (envs re-open their blocks on reset).
"""

from __future__ import annotations

import numbers

from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

ENV_RUNNER_INDEX = "env_runner_index"  # env_config key WorldEnvRunner adds: its worker_index


def world_server_names(name: str, count: int = 1) -> list[str]:
    """The servers' names: ``[name]`` for one server (tools find ``genie-sima-train-RUN``), else ``name-i``."""
    return [str(name)] if count == 1 else [f"{name}-{i}" for i in range(count)]


class WorldEnvRunner(SingleAgentEnvRunner):
    """A SingleAgentEnvRunner whose env creator learns which EnvRunner it runs in (``env_runner_index``)."""

    def make_env(self) -> None:
        index = int(self.worker_index or 0)
        if self.config.env_config.get(ENV_RUNNER_INDEX) != index:
            # The config is frozen (and, for the local runner, the algorithm's own): change a copy.
            config = self.config.copy(copy_frozen=False)
            config.env_config = {**config.env_config, ENV_RUNNER_INDEX: index}
            config.freeze()
            self.config = config
        super().make_env()


class WorldPPOConfig(PPOConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or WorldPPO)
        # {"name", "bundle", "count", **start_world_server kwargs}; None: no server (e.g. the real-game baseline).
        self.world_server_spec: dict | None = None

    def world_server(self, name: str, bundle: str, count: int = 1, **server_kwargs) -> "WorldPPOConfig":
        """The ``count`` WorldModelServers this algorithm starts, hands to its envs and stops (see the module doc);
        ``server_kwargs`` (capacity, num_gpus, ...) apply to each of them."""
        if not name:
            raise ValueError("world_server: name must be a non-empty string (envs find the server by name)")
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
            raise ValueError(f"world_server: count must be an integer >= 1, got {count!r}")
        self.world_server_spec = {"name": str(name), "bundle": str(bundle), "count": int(count), **server_kwargs}
        if self.env_runner_cls is None:
            self.env_runners(env_runner_cls=WorldEnvRunner)
        return self


class WorldPPO(PPO):
    world_server = None  # the first server's actor handle once setup() started them
    world_servers: list = []  # every server's handle (replaced, never mutated, per instance)
    world_server_info: dict | None = None  # the first server's info()

    @classmethod
    def get_default_config(cls) -> WorldPPOConfig:
        return WorldPPOConfig()

    def setup(self, config) -> None:
        spec = getattr(self.config, "world_server_spec", None)
        if spec:
            self._start_world_servers(dict(spec))
        try:
            super().setup(self.config)
        except BaseException:
            self._kill_world_servers()
            raise
        self._per_iteration_timers()

    def _per_iteration_timers(self) -> None:
        """``result["timers"]`` reports sampling, the learner update and the weight sync as seconds spent in THIS
        iteration (RLlib's default is a moving average dominated by the first, slow iteration), so the time
        split of ``genie-sima train`` adds up to its iteration's wall clock."""
        from ray.rllib.utils.metrics import (ENV_RUNNER_SAMPLING_TIMER, LEARNER_UPDATE_TIMER,
                                             SYNCH_WORKER_WEIGHTS_TIMER, TIMERS)

        for key in (ENV_RUNNER_SAMPLING_TIMER, LEARNER_UPDATE_TIMER, SYNCH_WORKER_WEIGHTS_TIMER):
            if (TIMERS, key) not in self.metrics:
                self.metrics.log_value((TIMERS, key), 0.0, reduce="sum")

    def _start_world_servers(self, spec: dict) -> None:
        import ray

        from genie_world.world_server import start_world_server

        name, bundle, count = spec.pop("name"), spec.pop("bundle"), int(spec.pop("count", 1))
        names = world_server_names(name, count)
        self.world_servers = []
        try:
            for n in names:
                self.world_servers.append(start_world_server(bundle, name=n, **spec))
            self.world_server = self.world_servers[0]
            # Fail here, once, on a bundle a server cannot load, not in every env of every EnvRunner.
            infos = ray.get([s.info.remote() for s in self.world_servers])
        except BaseException:
            self._kill_world_servers()
            raise
        self.world_server_info = infos[0]
        # The config is frozen by now; hand the names over in a copy, which PPO's setup then builds from.
        handed = self.config.copy(copy_frozen=False)
        env_config = {k: v for k, v in handed.env_config.items() if k not in ("server", "servers")}
        env_config["servers"] = list(names)
        if count == 1:
            env_config["server"] = names[0]
        handed.env_config = env_config
        handed.freeze()
        self.config = handed

    def _kill_world_servers(self) -> None:
        import ray

        servers, self.world_servers, self.world_server = list(self.world_servers), [], None
        for server in servers:
            try:
                ray.kill(server, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone; kill the others regardless
                pass

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            self._kill_world_servers()
