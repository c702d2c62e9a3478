"""Metrics and images to TensorBoard and Weights & Biases (offline unless a project is given)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

WANDB_MODES = ("offline", "online", "disabled")


class RunLogger:
    def __init__(self, run_dir: Path, name: str, config: dict, wandb_mode: str = "offline",
                 wandb_project: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard" / name))
        self.wandb = None
        if wandb_project and wandb_mode == "offline":
            wandb_mode = "online"  # naming a project means the user wants it synced
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=wandb_project or "genie-sima", name=name, dir=str(run_dir),
                                    mode=wandb_mode, config=config, reinit="finish_previous")

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        for k, img in images.items():
            self.tb.add_image(k, img, step, dataformats="HWC")
        if self.wandb is not None and images:
            import wandb

            self.wandb.log({k: wandb.Image(img) for k, img in images.items()}, step=step)

    def gif(self, step: int, tag: str, path) -> None:
        """An animated GIF file (a rollout video): TensorBoard shows it as an image that plays, wandb as a video.

        ``SummaryWriter.add_video`` would write the same image summary but needs moviepy to encode the GIF
        (not installed); the file is already a GIF, so its bytes go into the summary as they are."""
        from PIL import Image
        from torch.utils.tensorboard.summary import Summary

        data = Path(path).read_bytes()
        with Image.open(path) as im:
            width, height = im.size
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=data)
        self.tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Video(str(path), format="gif")}, step=step)

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
