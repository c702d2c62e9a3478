"""Rollout videos during `genie-sima train` in imagination (real Ray, real RLlib, a random-weight bundle): with
--video-every 1, a two-iteration run leaves one animated rollout per iteration in TensorBoard (read back from the
event file), in OUT/videos and in the offline wandb run; --video-every 0 leaves none."""

from __future__ import annotations

import io
import json

import pytest

from pipelines.errors import ConfigError
from pipelines.train_policy import TrainConfig, train

pytestmark = pytest.mark.slow

SMALL = dict(num_envs=4, rollout_steps=8, minibatch_size=16, num_epochs=1, vision_dim=16, hidden_dim=32,
             moco_queue_size=32, checkpoint_every=100, threads=1, replay_capacity=0, video_steps=12)


def _tb_images(run_dir, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard" / "train"), size_guidance={IMAGES: 0})
    acc.Reload()
    assert tag in acc.Tags()[IMAGES], acc.Tags()
    return acc.Images(tag)


def test_video_every_iteration_reaches_tensorboard_files_and_wandb(random_bundle, tmp_path, ray_local):
    from PIL import Image

    out = tmp_path / "videos_on"
    env = f"world://{random_bundle}?prompt=go to the red ball&max_episode_steps=8"
    logs: list[str] = []
    result = train(TrainConfig(env=env, out=str(out), total_timesteps=64, video_every=1, wandb="offline", **SMALL),
                   log=logs.append)
    assert result["iterations"] == 2

    images = _tb_images(out, "rollout/imagined")
    events = (out / "logs" / "train_events.jsonl").read_text().splitlines()
    steps = [json.loads(line)["steps"] for line in events]
    assert [im.step for im in images] == steps  # one per iteration, at the env-step count of the scalars
    for im in images:
        gif = Image.open(io.BytesIO(im.encoded_image_string))
        # The first observation, then one per step: 13 frames of 1/8 s (GIF stores hundredths: 120 ms). Pillow
        # merges identical consecutive frames into one longer frame (random weights can repeat a frame), so
        # count time, not frames.
        total_ms = 0
        for i in range(gif.n_frames):
            gif.seek(i)
            total_ms += gif.info["duration"]
        assert gif.format == "GIF" and total_ms == (12 + 1) * 120, (gif.n_frames, total_ms)
        assert (gif.width, gif.height) == (im.width, im.height) == (128, 128)  # 64 px frames shown at 2x

    files = sorted(p.name for p in (out / "videos").iterdir())
    assert files == ["rollout_iter_000001.gif", "rollout_iter_000002.gif"]
    assert sum("rollout video" in line for line in logs) == 2
    # The offline wandb run logged the GIF as a video (wandb copies the media into its run's files).
    media = list((out / "wandb").glob("offline-run-*/files/media/videos/rollout/**/*.gif"))
    assert len(media) == 2, sorted(str(p) for p in (out / "wandb").rglob("*.gif"))


def test_video_every_zero_logs_no_video_and_bad_values_are_refused(random_bundle, tmp_path, ray_local):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    out = tmp_path / "videos_off"
    env = f"world://{random_bundle}?prompt=go to the red ball&max_episode_steps=8"
    train(TrainConfig(env=env, out=str(out), total_timesteps=32, video_every=0, wandb="disabled", **SMALL),
          log=lambda m: None)
    acc = EventAccumulator(str(out / "tensorboard" / "train"))
    acc.Reload()
    assert acc.Tags()[IMAGES] == [] and not (out / "videos").exists()
    with pytest.raises(ConfigError, match="--video-steps >= 1, got 10 and 0"):
        train(TrainConfig(env=env, out=str(tmp_path / "bad"), total_timesteps=32, **{**SMALL, "video_steps": 0}))
    with pytest.raises(ConfigError, match="--video-every must be >= 0"):
        train(TrainConfig(env=env, out=str(tmp_path / "bad"), total_timesteps=32, video_every=-1, **SMALL))
