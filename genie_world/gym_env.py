"""Gymnasium adapters over imagined worlds.

- ``WorldModelEnv``: one env (a World of 1 in this process, or one env of a WorldModelServer).
- ``WorldVectorEnv``: N envs whose ``step`` is ONE call to a WorldModelServer (or one batched World
  step in this process), with gymnasium's next-step autoreset, which RLlib's EnvRunner expects.

Observations are ``{"image": uint8 [H, W, 3], "mission": str}``; the infos carry ``world_tokens``, the
world model's token ids of that frame (int16 [P]), which the shared replay stores instead of pixels.
Actions are Discrete real actions (through the bundle's action adapter) unless ``action_type="latent"``.
Both are registered as ``genie-sima/World-v0`` (``gym.make`` / ``gym.make_vec``) when ``genie_world`` is imported.
"""

from __future__ import annotations

import string
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from .bundle import WorldBundle, load_bundle
from .levels import LevelSet

MISSION_CHARSET = string.ascii_letters + string.digits + " ,.;:'-"
MISSION_MAX_LEN = 256
_BUNDLES: dict[str, WorldBundle] = {}


def cached_bundle(bundle) -> WorldBundle:
    """Load a bundle once per process (many envs of one bundle share its weights)."""
    if isinstance(bundle, WorldBundle):
        return bundle
    key = str(Path(bundle).resolve())
    if key not in _BUNDLES:
        _BUNDLES[key] = load_bundle(key)
    return _BUNDLES[key]


def observation_space(frame_shape) -> spaces.Dict:
    return spaces.Dict({"image": spaces.Box(0, 255, tuple(frame_shape), np.uint8),
                        "mission": spaces.Text(MISSION_MAX_LEN, charset=MISSION_CHARSET)})


class _Backend:
    """A block of envs: in-process World, or a client of a WorldModelServer actor."""

    def __init__(self, num_envs, bundle, server, prompt, levels, level_file, num_levels, seed, mission, world_kwargs):
        self.num_envs, self.server, self.client = num_envs, server, None
        self.seed, self.started = int(seed), False
        self.level_args = (prompt, levels, level_file, num_levels, mission)
        if server is None:
            from .world import World

            self.bundle = cached_bundle(bundle)
            self.world_kwargs = world_kwargs
            self.world = World(self.bundle, num_envs, seed=seed, **world_kwargs)  # validates the kwargs now
            self.frame_shape, self.num_actions = self.world.frame_shape, self.world.num_actions
            self.action_names = self.world.action_names
        else:
            from .world_server import get_world_server

            self.handle = get_world_server(server) if isinstance(server, str) else server
            info = _call_when_up(lambda: self.handle.info.remote(), what=f"world server {server!r}: info")
            self.server_name = info["name"]
            self.frame_shape, self.num_actions = tuple(info["frame_shape"]), info["num_actions"]
            self.action_names = info["action_names"]

    def reset(self, seed) -> dict:
        """``seed`` given: a fresh level pool (and World) from that seed; None: every env's next episode."""
        prompt, levels, level_file, num_levels, mission = self.level_args
        fresh = seed is not None or not self.started
        seed = self.seed if seed is None else int(seed)
        self.started = True
        if self.server is None:
            if not fresh:
                return self.world.reset().as_dict()
            from .world import World

            self.world = World(self.bundle, self.num_envs, seed=seed, **self.world_kwargs)
            from .world_builder import WorldBuilder

            lv = WorldBuilder(self.bundle).resolve(prompt=prompt, levels=levels, level_file=level_file,
                                                   num_worlds=num_levels, seed=seed, mission=mission)
            return self.world.reset(lv).as_dict()
        import ray

        if not fresh:
            return self._get(self.handle.step.remote(self.client, None, reset=True), "reset")
        if self.client is not None:
            self._get(self.handle.close.remote(self.client), "close")
        out = _call_when_up(lambda: self.handle.open.remote(self.num_envs, prompt=prompt, levels=levels,
                                                            level_file=level_file, seed=seed, mission=mission,
                                                            num_levels=num_levels, owner=_owner()),
                            what=f"world server {self.server_name!r}: open")
        self.client = out.pop("client")
        return out

    def step(self, actions) -> dict:
        if self.server is None:
            return self.world.step(actions).as_dict()
        return self._get(self.handle.step.remote(self.client, np.asarray(actions)), "step")

    def _get(self, ref, call: str):
        """The answer to one server call, or TimeoutError naming the server (a wedged or overloaded server
        otherwise blocked the env, and the EnvRunner with it, forever)."""
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            return ray.get(ref, timeout=SERVER_CALL_TIMEOUT_S)
        except GetTimeoutError:
            ray.cancel(ref)
            raise TimeoutError(f"world server {self.server_name!r}: no answer to {call} within "
                               f"{SERVER_CALL_TIMEOUT_S:g} s") from None

    def close(self) -> None:
        if self.server is not None and self.client is not None:
            try:
                self._get(self.handle.close.remote(self.client), "close")
            except Exception:  # noqa: BLE001 - the server may already be gone
                pass
            self.client = None


def _owner() -> tuple:
    """(this process's Ray actor id or None, pid): lets a server reclaim a restarted actor's old block."""
    import os

    import ray

    try:
        actor = ray.get_runtime_context().get_actor_id()
    except Exception:  # noqa: BLE001 - outside an actor / before ray.init
        actor = None
    return (actor, os.getpid())


SERVER_CALL_TIMEOUT_S = 300.0  # one step of a full server batch takes well under a second on a laptop


def _call_when_up(submit, timeout_s: float = 180.0, what: str = "world server call"):
    """``ray.get(submit())``, retried while the server actor is restarting (Ray restarts a dead one).

    Only calls that are safe to repeat go through here (``info``; ``open`` on a fresh env, whose block
    on a dead server died with it). Steps are not retried: a step cut short by a server death fails,
    and RLlib recreates the env and discards the episodes it cut short.
    """
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError

    deadline, wait = time.monotonic() + timeout_s, 0.1
    while True:
        try:
            return ray.get(submit(), timeout=SERVER_CALL_TIMEOUT_S)
        except GetTimeoutError:
            raise TimeoutError(f"{what}: no answer within {SERVER_CALL_TIMEOUT_S:g} s") from None
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(wait)
            wait = min(2.0, wait * 2)


def world_tokens(tokens) -> np.ndarray:
    """The world model's token ids of each env's frame, [N, P], in int16 when they fit (every bundle so far:
    FSQ vocabularies are far below 32768), else int32. What the shared replay stores instead of pixels."""
    t = np.asarray(tokens)
    small = t.size == 0 or (int(t.min()) >= np.iinfo(np.int16).min and int(t.max()) <= np.iinfo(np.int16).max)
    return t.astype(np.int16 if small else np.int32, copy=False)


def _infos(out: dict) -> dict:
    n = len(out["rewards"])
    infos = {"mission": np.array(out["missions"], dtype=object), "level_id": np.array(out["level_ids"], dtype=object),
             "latent_action": np.asarray(out["latent_actions"]), "episode_step": np.asarray(out["episode_steps"]),
             "is_first": np.asarray(out["is_first"]), "world_tokens": world_tokens(out["tokens"])}  # tokens [N, P]
    infos.update({f"_{k}": np.ones(n, bool) for k in list(infos)})
    return infos


class WorldVectorEnv(gym.vector.VectorEnv):
    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP, "render_modes": ["rgb_array"]}

    def __init__(self, num_envs: int = 1, bundle=None, prompt: str | None = None, levels: LevelSet | None = None,
                 level_file: str | None = None, num_levels: int | None = None, seed: int = 0,
                 mission: str | None = None, server=None, render_mode: str | None = None, **world_kwargs):
        if bundle is None and server is None:
            raise ValueError("give bundle= (a world bundle directory) or server= (a WorldModelServer name or handle)")
        self.num_envs = int(num_envs)
        self.render_mode = render_mode
        self._backend = _Backend(self.num_envs, bundle, server, prompt, levels, level_file,
                                 int(num_levels or max(16, num_envs)), seed, mission, world_kwargs)
        self.single_observation_space = observation_space(self._backend.frame_shape)
        self.single_action_space = spaces.Discrete(self._backend.num_actions)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.action_names = self._backend.action_names
        self._last = None

    def _obs(self, out: dict) -> dict:
        self._last = out
        return {"image": np.asarray(out["frames"]), "mission": tuple(out["missions"])}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        out = self._backend.reset(seed)
        return self._obs(out), _infos(out)

    def step(self, actions):
        out = self._backend.step(np.asarray(actions, dtype=np.int64))
        return (self._obs(out), np.asarray(out["rewards"], np.float32), np.asarray(out["terminated"], bool),
                np.asarray(out["truncated"], bool), _infos(out))

    def render(self):
        return None if self._last is None else np.asarray(self._last["frames"])

    def close_extras(self, **kwargs):
        self._backend.close()


class WorldModelEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(self, bundle=None, prompt: str | None = None, levels: LevelSet | None = None,
                 level_file: str | None = None, num_levels: int = 16, seed: int = 0, mission: str | None = None,
                 server=None, render_mode: str | None = None, **world_kwargs):
        self._vec = WorldVectorEnv(1, bundle, prompt, levels, level_file, num_levels, seed, mission, server,
                                   **world_kwargs)
        self.observation_space = self._vec.single_observation_space
        self.action_space = self._vec.single_action_space
        self.render_mode = render_mode
        self.action_names = self._vec.action_names

    @staticmethod
    def _one(obs) -> dict:
        return {"image": obs["image"][0], "mission": obs["mission"][0]}

    @staticmethod
    def _info(infos) -> dict:
        # Scalars become Python numbers; per-env arrays (world_tokens [P]) stay arrays.
        return {k: (v[0].item() if np.ndim(v[0]) == 0 and hasattr(v[0], "item") else v[0])
                for k, v in infos.items() if not k.startswith("_")}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs, infos = self._vec.reset(seed=seed)
        return self._one(obs), self._info(infos)

    def step(self, action):
        if not self.action_space.contains(action):
            from .world import InvalidActionError

            raise InvalidActionError(f"action {action!r}: expected an integer in [0, {self.action_space.n}) "
                                     f"({', '.join(self.action_names)})")
        obs, r, term, trunc, infos = self._vec.step(np.array([int(action)]))
        return self._one(obs), float(r[0]), bool(term[0]), bool(trunc[0]), self._info(infos)

    def render(self):
        frames = self._vec.render()
        return None if frames is None else frames[0]

    def close(self):
        self._vec.close()
