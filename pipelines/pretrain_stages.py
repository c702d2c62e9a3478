"""What each pretraining stage trains, on which clips, with which frozen parts and which loss.

One shared loop (``pretrain_loop``) runs every stage; this file is the only per-stage code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genie_world.build import PART_DEPENDENCIES
from genie_world.config import WorldModelConfig
from genie_world.mission_negatives import mission_negatives

# stage -> (bundle part it produces, parts it needs frozen)
STAGE_PARTS = {stage: (part, PART_DEPENDENCIES[part]) for stage, part in (
    ("tokenizer", "tokenizer"), ("actions", "latent_actions"), ("dynamics", "dynamics"), ("heads", "reward_head"),
    ("prior", "prompt_prior"))}


@dataclass(frozen=True)
class StageData:
    clip_len: int
    first_only: bool = False


def stage_data(stage: str, cfg: WorldModelConfig) -> StageData:
    return {
        "tokenizer": StageData(cfg.tok_clip_len),
        "actions": StageData(cfg.lam_clip_len),
        "dynamics": StageData(cfg.dyn_clip_len),
        "heads": StageData(2),  # one transition: the frame arrived in, its reward and termination
        "prior": StageData(2, first_only=True),
    }[stage]


# Clip columns each stage reads (the dynamics also needs the frame before the clip and where it starts).
STAGE_COLUMNS = ["frames", "actions", "rewards", "terminated", "mission"]
DYNAMICS_COLUMNS = STAGE_COLUMNS + ["start", "previous_frame"]


def batch_to_torch(batch: dict, device) -> dict:
    out = {"frames": torch.from_numpy(np.ascontiguousarray(batch["frames"])).to(device)}
    for k in ("actions", "rewards", "terminated", "start", "previous_frame"):
        if k in batch:
            out[k] = torch.from_numpy(np.ascontiguousarray(batch[k])).to(device)
    out["mission"] = [str(m) for m in batch["mission"]]
    return out


def stage_loss(stage: str, model, frozen: dict, batch: dict, vocab, cfg: WorldModelConfig, generator=None):
    """(loss, metrics) for one batch of one stage."""
    frames = batch["frames"]  # [B, T, H, W, 3] uint8
    if stage in ("tokenizer", "actions"):
        return model.loss(frames)
    tok = frozen["tokenizer"]
    if stage == "dynamics":
        with torch.no_grad():
            _, ids = tok.encode(frames)  # [B, T, P]
            lam = frozen["latent_actions"]
            actions = lam.infer(frames)  # [B, T-1]
            first = clip_first_actions(lam, batch, model.num_actions)
        return model.loss(ids, actions, generator, first_actions=first)
    text = vocab.encode_batch(batch["mission"], cfg.text_max_len).to(frames.device)
    if stage == "heads":
        with torch.no_grad():
            _, ids = tok.encode(frames[:, 1:2])  # only the frame the action led to: [B, 1, P]
        ids, reward, term = ids[:, 0], batch["rewards"][:, 0], batch["terminated"][:, 0]
        rows, other = mission_negatives(batch["mission"], term, cfg.head_mission_negatives, generator)
        known = torch.ones(len(ids) + len(rows), dtype=torch.bool, device=ids.device)
        known[len(ids):] = False  # a negative's reward under the other mission is not in the data
        rows, other = rows.to(ids.device), other.to(ids.device)
        return model.loss(torch.cat([text, text[other]]), torch.cat([ids, ids[rows]]),
                          torch.cat([reward, torch.zeros_like(reward[rows])]),
                          torch.cat([term, torch.zeros_like(term[rows])]), reward_known=known)
    if stage == "prior":
        with torch.no_grad():
            _, ids = tok.encode(frames[:, :1])  # the first frame: [B, 1, P]
        return model.loss(text, ids[:, 0], generator)
    raise ValueError(f"unknown stage {stage!r}")


@torch.no_grad()
def clip_first_actions(lam, batch: dict, no_action: int) -> torch.Tensor | None:
    """The latent action that led into each clip's first frame [B]: the LAM's reading of (previous frame,
    first frame), or ``no_action`` where the clip starts its episode. A World's oldest frame in its
    context window carries the action that led into it; training on "no action" there instead made the
    model lose the game as soon as the window slid (frames right at step 2: 95%, step 4: 7%)."""
    if "previous_frame" not in batch or "start" not in batch:
        return None
    frames = batch["frames"]
    pair = torch.stack([batch["previous_frame"], frames[:, 0]], 1)  # [B, 2, H, W, 3]
    into = lam.infer(pair)[:, 0]
    return torch.where(batch["start"] > 0, into, torch.full_like(into, no_action))


@torch.no_grad()
def stage_images(stage: str, model, frozen: dict, batch: dict, vocab, cfg: WorldModelConfig) -> dict[str, np.ndarray]:
    """Image grids (uint8 HWC) for TensorBoard/wandb: top row real, bottom row model output."""
    frames = batch["frames"][:4]
    real = frames.float() / 255
    if stage == "tokenizer":
        codes, _ = model.encode(frames)
        out = model.decode_codes(codes)
    elif stage == "actions":
        onehot = torch.nn.functional.one_hot(model.infer(frames), model.num_actions).float()
        out = torch.cat([real[:, :1], model.predict_next(frames[:, :-1], onehot)], dim=1)
    elif stage == "dynamics":
        tok, lam = frozen["tokenizer"], frozen["latent_actions"]
        _, ids = tok.encode(frames)
        actions = lam.infer(frames)
        g = torch.Generator(device=ids.device).manual_seed(0)
        gen = model.rollout(ids[:, 0], actions, cfg.maskgit_steps, cfg.maskgit_temperature, cfg.maskgit_schedule,
                            g, cfg.context_frames)
        out = tok.decode(gen)  # predicted rollout from the real first frame
    elif stage == "prior":
        text = vocab.encode_batch(batch["mission"][:4], cfg.text_max_len).to(frames.device)
        g = torch.Generator(device=frames.device).manual_seed(0)
        ids = model.generate(text, cfg.prior_maskgit_steps, cfg.prior_temperature, cfg.maskgit_schedule, g)
        out = frozen["tokenizer"].decode(ids[:, None])
        real = real[:, :1]
    else:
        return {}
    return {f"{stage}/real_vs_model": _grid(real, out.clamp(0, 1))}


def _grid(real: torch.Tensor, out: torch.Tensor) -> np.ndarray:
    # real/out [B, T, H, W, 3] -> rows: for each clip, real frames then model frames.
    rows = []
    for b in range(real.shape[0]):
        rows.append(torch.cat(list(real[b]), dim=1))
        rows.append(torch.cat(list(out[b]), dim=1))
    width = max(r.shape[1] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[1])) for r in rows]
    return (torch.cat(rows, 0).cpu().numpy() * 255).astype(np.uint8)
