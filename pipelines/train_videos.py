"""Rollout videos of the policy being trained, in imagination, for ``genie-sima train --video-every N``.

``ImaginedRollout`` keeps one env of the run's world (same bundle, prompt or level file, mission, level count and
episode length as the training envs) in the driver process, on a World of its own: the training server's
capacity is exactly its EnvRunners' envs, and a video must not take one of their blocks. Each ``record`` starts
from the same seed, so successive videos show the same levels played by successive policies. Actions are the
policy's greedy ones (the deterministic version of its action distribution), observations go through the same
mission tokenizer as in training.

Encoding: moviepy (which ``SummaryWriter.add_video`` needs) is not installed, so the frames are encoded as an
animated GIF with PIL and written to TensorBoard as an image summary holding that GIF (what ``add_video``
itself writes; TensorBoard's Images tab plays it), to OUT/videos/rollout_iter_NNNNNN.gif and to wandb as a
``wandb.Video`` of that file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .pictures import save_gif


class ImaginedRollout:
    def __init__(self, bundle_path: str, params: dict, tokenizer_json: dict, steps: int = 32, seed: int = 0,
                 max_len: int = 16):
        from genie_world.bundle import load_bundle
        from genie_world.gym_env import WorldVectorEnv

        from .mission_tokens import MissionTokensVector

        if steps < 1:
            raise ValueError(f"rollout video: steps must be >= 1, got {steps}")
        self.steps, self.seed = int(steps), int(seed)
        level_args = {k: params[k] for k in ("prompt", "level_file", "mission") if k in params}
        env = WorldVectorEnv(1, bundle=load_bundle(bundle_path), num_levels=int(params.get("num_levels", 256)),
                             seed=self.seed, max_episode_steps=int(params.get("max_episode_steps", 64)),
                             **level_args)
        self.env = MissionTokensVector(env, tokenizer_json, max_len)

    def record(self, module) -> np.ndarray:
        """Frames [steps + 1, H, W, 3] uint8 of the env played greedily by ``module`` (an RLlib RLModule);
        episodes that end are continued by the next one (next-step autoreset), as in training."""
        import torch
        from ray.rllib.core.columns import Columns

        obs, _ = self.env.reset(seed=self.seed)
        frames = [np.array(obs["image"][0])]
        dist_cls = module.get_inference_action_dist_cls()
        with torch.no_grad():
            for _ in range(self.steps):
                batch = {Columns.OBS: {k: torch.as_tensor(np.asarray(v)) for k, v in obs.items()}}
                logits = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
                action = dist_cls.from_logits(logits).to_deterministic().sample()
                obs, *_ = self.env.step(action.cpu().numpy())
                frames.append(np.array(obs["image"][0]))
        return np.stack(frames)

    def close(self) -> None:
        self.env.close()


def log_video(logger, step: int, tag: str, frames: np.ndarray, gif_path, fps: int = 8, scale: int = 2) -> Path:
    """``frames`` [T, H, W, 3] uint8 -> a GIF file at ``gif_path``, logged to TensorBoard and wandb (``RunLogger``)."""
    big = np.asarray(frames, np.uint8).repeat(scale, 1).repeat(scale, 2)  # 64 px frames are tiny on screen
    Path(gif_path).parent.mkdir(parents=True, exist_ok=True)
    path = save_gif(gif_path, list(big), fps=fps)
    logger.gif(step, tag, path)
    return path
