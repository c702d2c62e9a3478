"""Env wrappers that hand SimaRLModule its observations: {"image": uint8 [64, 64, 3], "mission": int64 [L]}.

RLlib cannot batch gymnasium ``Text`` spaces, so the mission string is tokenized in the env (single env:
``MissionTokens``; vector env: ``MissionTokensVector``) with the policy's ``InstructionTokenizer``.

- BabyAI/MiniGrid: ``FullGridFrame`` renders the whole grid exactly as the collected data does
  (``pipelines.data.babyai_game.BabyAIGame.frame``: no agent-view highlight, tile = size // grid side,
  BOX-resized to ``frame_size``), so the agent trains on the frames the world model was trained on.
  ``make_babyai_env`` composes the two; ``babyai_env_creator`` is the RLlib ``register_env`` creator.
- Imagined worlds: ``genie_world.gym_env.WorldVectorEnv`` already yields {"image": [N, 64, 64, 3],
  "mission": tuple of N str} with next-step autoreset; ``world_vector_env_creator`` wraps it with
  ``MissionTokensVector`` for ``gym_env_vectorize_mode=gym.VectorizeMode.VECTOR_ENTRY_POINT``; with several
  world servers (``env_config["servers"]``) each EnvRunner's envs step on one of them (``world_server_for``).
"""

from __future__ import annotations

import contextlib
import io

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sima_policy.instruction_tokenizer import InstructionTokenizer

from .data.frames import resize_frame


def _tokenizer(tok) -> InstructionTokenizer:
    return tok if isinstance(tok, InstructionTokenizer) else InstructionTokenizer.from_json(tok)


def tokenized_space(image_space: spaces.Box, tokenizer: InstructionTokenizer, max_len: int) -> spaces.Dict:
    return spaces.Dict({"image": image_space,
                        "mission": spaces.Box(0, tokenizer.vocab_size - 1, (int(max_len),), np.int64)})


class FullGridFrame(gym.ObservationWrapper):
    """MiniGrid/BabyAI -> {"image": full-grid RGB uint8 [S, S, 3], "mission": str}."""

    def __init__(self, env: gym.Env, frame_size: int = 64):
        super().__init__(env)
        self.frame_size = int(frame_size)
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, (self.frame_size, self.frame_size, 3), np.uint8),
            "mission": env.observation_space["mission"]})

    def observation(self, observation) -> dict:
        u = self.env.unwrapped
        tile = max(1, self.frame_size // max(u.width, u.height))
        frame = u.get_frame(highlight=False, tile_size=tile)  # [h*tile, w*tile, 3]
        return {"image": resize_frame(frame, self.frame_size), "mission": str(u.mission)}

    def reset(self, **kwargs):
        # BabyAI's level generator prints every rejected sample ("Sampling rejected: ...").
        with contextlib.redirect_stdout(io.StringIO()):
            return super().reset(**kwargs)


class MissionTokens(gym.ObservationWrapper):
    """{"image", "mission": str} -> {"image", "mission": int64 [L]} (single env)."""

    def __init__(self, env: gym.Env, tokenizer, max_len: int | None = None):
        super().__init__(env)
        self.tokenizer = _tokenizer(tokenizer)
        self.max_len = int(max_len or self.tokenizer.max_len)
        self.observation_space = tokenized_space(env.observation_space["image"], self.tokenizer, self.max_len)

    def observation(self, observation) -> dict:
        return {"image": observation["image"], "mission": self.tokenizer.encode(observation["mission"], self.max_len)}


class MissionTokensVector(gym.vector.VectorObservationWrapper):
    """{"image": [N, ...], "mission": N str} -> {"image", "mission": int64 [N, L]} (vector env)."""

    def __init__(self, env: gym.vector.VectorEnv, tokenizer, max_len: int | None = None):
        super().__init__(env)
        self.tokenizer = _tokenizer(tokenizer)
        self.max_len = int(max_len or self.tokenizer.max_len)
        self.single_observation_space = tokenized_space(env.single_observation_space["image"], self.tokenizer,
                                                        self.max_len)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)

    def observations(self, observations) -> dict:
        return {"image": observations["image"],
                "mission": self.tokenizer.encode_batch(list(observations["mission"]), self.max_len)}  # [N, L]


def make_babyai_env(level_id: str, tokenizer, max_len: int | None = None, frame_size: int = 64,
                    max_steps: int | None = None) -> gym.Env:
    import minigrid  # noqa: F401  (registers the BabyAI-* ids in this process: EnvRunners too)

    kwargs = {} if max_steps is None else {"max_steps": int(max_steps)}
    return MissionTokens(FullGridFrame(gym.make(level_id, **kwargs), frame_size), tokenizer, max_len)


def babyai_env_creator(env_config) -> gym.Env:
    """RLlib creator: ``register_env("sima-babyai", babyai_env_creator)``; env_config keys: ``level``,
    ``tokenizer`` (``InstructionTokenizer.to_json()``), optional ``max_len``, ``frame_size``, ``max_steps``."""
    return make_babyai_env(env_config["level"], env_config["tokenizer"], env_config.get("max_len"),
                           env_config.get("frame_size", 64), env_config.get("max_steps"))


def world_server_for(servers, env_runner_index: int) -> str:
    """The WorldModelServer EnvRunner ``env_runner_index`` uses: ``servers[(max(i, 1) - 1) % len(servers)]``.

    Remote EnvRunners are numbered 1..K, the local one 0 (it only samples when there are no remote ones), so
    runner 1 and the local runner take the first server and the rest go round-robin. A restarted EnvRunner keeps
    its index and so gets the same server again."""
    servers = list(servers)
    if not servers:
        raise ValueError("env_config['servers'] is empty: expected the names of one or more world servers")
    return servers[(max(int(env_runner_index), 1) - 1) % len(servers)]


def world_vector_env_creator(env_config) -> gym.vector.VectorEnv:
    """RLlib vector creator (``gym_env_vectorize_mode=VECTOR_ENTRY_POINT``): env_config has ``num_envs``
    (added by RLlib), ``tokenizer``, optional ``max_len``, and WorldVectorEnv's keyword arguments
    (``bundle``, or ``server`` / ``servers``, ``prompt``/``levels``/``level_file``, ``num_levels``, ``seed``,
    ``mission``).

    The EnvRunner's index comes from ``env_runner_index`` (added by ``pipelines.world_ppo.WorldEnvRunner``:
    RLlib 2.60 hands a vector entry point a plain dict, not its EnvContext with ``worker_index``), else from an
    EnvContext's ``worker_index``, else 0. With ``servers`` (a list of names) the env steps on
    ``world_server_for(servers, index)``; ``server`` alone names the one server. Each EnvRunner gets its own
    seed: ``seed + 1000 * index``."""
    from genie_world.gym_env import WorldVectorEnv

    from .world_ppo import ENV_RUNNER_INDEX

    cfg = dict(env_config)
    tokenizer, max_len = cfg.pop("tokenizer"), cfg.pop("max_len", None)
    num_envs = int(cfg.pop("num_envs", 1))
    index = cfg.pop(ENV_RUNNER_INDEX, None)
    index = int(getattr(env_config, "worker_index", 0) or 0) if index is None else int(index)
    servers = cfg.pop("servers", None)
    if servers:
        cfg["server"] = world_server_for(servers, index)
    cfg["seed"] = int(cfg.get("seed", 0)) + 1000 * index
    return MissionTokensVector(WorldVectorEnv(num_envs, **cfg), tokenizer, max_len)
