"""``WorldPPO``: PPO that owns the WorldModelServer its imagined envs step.

- ``WorldPPOConfig.world_server(name, bundle, **server_kwargs)`` describes the server; ``build_algo()`` then
  starts it in ``setup()`` BEFORE PPO's own setup builds the EnvRunners (their envs are made and opened
  inside ``Algorithm.setup``, so ``on_algorithm_init`` would come too late).
- The server's name is handed to every env through ``env_config["server"]``; the env looks the actor up by
  name (genie_world.gym_env).
- Restarted EnvRunners need nothing re-handed: Ray restarts an EnvRunner actor with its constructor arguments,
  i.e. the algorithm's config carrying ``env_config["server"]``, and the name outlives restarts of the server
  itself (``max_restarts=-1`` keeps one actor, one name). ``restore_env_runners`` / ``on_env_runners_recreated``
  would only matter for per-incarnation state (a handle or token minted after the runner started); there is none.
  tests/test_train_faults.py kills an EnvRunner and checks that its successor re-opened on the same server.
- ``cleanup()`` (``algo.stop()``) stops the EnvRunners first (their envs close their blocks) and then kills the
  server for good (no restart). A setup that fails after starting the server kills it too.
- A restored algorithm (``--resume``: a fresh build, then ``restore_from_path``) starts its server in setup as
  any new one does; the server holds no state worth checkpointing (envs re-open their blocks on reset).
"""

from __future__ import annotations

from ray.rllib.algorithms.ppo import PPO, PPOConfig


class WorldPPOConfig(PPOConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or WorldPPO)
        # {"name", "bundle", **start_world_server kwargs}; None: no server (e.g. the real-game baseline).
        self.world_server_spec: dict | None = None

    def world_server(self, name: str, bundle: str, **server_kwargs) -> "WorldPPOConfig":
        """The WorldModelServer this algorithm starts, hands to its envs and stops (see the module doc)."""
        if not name:
            raise ValueError("world_server: name must be a non-empty string (envs find the server by name)")
        self.world_server_spec = {"name": str(name), "bundle": str(bundle), **server_kwargs}
        return self


class WorldPPO(PPO):
    world_server = None  # the server's actor handle once setup() started it
    world_server_info: dict | None = None

    @classmethod
    def get_default_config(cls) -> WorldPPOConfig:
        return WorldPPOConfig()

    def setup(self, config) -> None:
        spec = getattr(self.config, "world_server_spec", None)
        if spec:
            self._start_world_server(dict(spec))
        try:
            super().setup(self.config)
        except BaseException:
            self._kill_world_server()
            raise

    def _start_world_server(self, spec: dict) -> None:
        import ray

        from genie_world.world_server import start_world_server

        name, bundle = spec.pop("name"), spec.pop("bundle")
        self.world_server = start_world_server(bundle, name=name, **spec)
        try:
            # Fail here, once, on a bundle the server cannot load, not in every env of every EnvRunner.
            self.world_server_info = ray.get(self.world_server.info.remote())
        except BaseException:
            self._kill_world_server()
            raise
        # The config is frozen by now; hand the name over in a copy, which PPO's setup then builds from.
        handed = self.config.copy(copy_frozen=False)
        handed.env_config = {**handed.env_config, "server": name}
        handed.freeze()
        self.config = handed

    def _kill_world_server(self) -> None:
        if self.world_server is not None:
            import ray

            ray.kill(self.world_server, no_restart=True)
            self.world_server = None

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            self._kill_world_server()
