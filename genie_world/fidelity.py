"""Fidelity: does an imagined episode stay the real one?

Held-out real episodes are replayed action for action in a World started from each episode's real
first frame, and every imagined frame is compared with the real frame at the same step:

- **cells right**: every ``cell`` x ``cell`` grid cell (BabyAI: one tile) within a mean absolute
  difference of ``tol`` of the real cell -- the frame shows the same game state;
- **token exact** / **token accuracy**: the imagined token ids equal the tokenizer's ids of the real
  frame (all of them / the share);
- **PSNR** of the imagined frame;
- **termination**: the head fires at the real episode's end (recall, over episodes the game ended)
  and never before it (false terminations, share of episodes).

Per horizon h (the frame after h actions; episodes shorter than h do not count there) and for whole
episodes. Two ways to drive the World: ``keys`` (the real keys through the action adapter, as a player
or agent would) and ``latents`` (the latent actions the LAM infers from the real frames: the
dynamics' own upper bound). ``ceiling`` is the tokenizer's: real frames through encode/decode.
``step_<key>``: one step from real states (the real history teacher-forced), per real key.

Dimension keys: N episodes, T steps (padded to the longest episode), P tokens, S frame side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .levels import LevelSet
from .patches import to_uint8

HORIZONS = (1, 2, 4, 8, 16, 32)
DEFAULT_TOL = 12 / 255  # mean absolute difference per cell, in [0, 1] pixel units
DEFAULT_CELL = 8


@dataclass
class RealEpisode:
    frames: np.ndarray  # [T+1, S, S, 3] uint8; frame t is before action t
    actions: np.ndarray  # [T] real action ids
    terminated: bool  # the game ended the episode at its last step (not a time limit)
    mission: str


def cells_right(pred: np.ndarray, real: np.ndarray, cell: int = DEFAULT_CELL, tol: float = DEFAULT_TOL) -> np.ndarray:
    """bool [...]: every cell x cell cell of frames [..., S, S, 3] (uint8) within mean |diff| <= tol."""
    *lead, s, w, c = pred.shape
    if s % cell or w % cell:
        raise ValueError(f"frames of {s}x{w} pixels do not split into {cell}x{cell} cells")
    diff = np.abs(pred.astype(np.int16) - real.astype(np.int16)).reshape(*lead, s // cell, cell, w // cell, cell, c)
    mad = diff.mean(axis=(-4, -2, -1)) / 255.0  # [..., S/cell, S/cell]
    return (mad <= tol + 1e-9).all(axis=(-2, -1))


def _psnr(pred: np.ndarray, real: np.ndarray) -> np.ndarray:
    mse = ((pred.astype(np.float64) - real.astype(np.float64)) / 255.0) ** 2
    return 10 * np.log10(1.0 / np.maximum(mse.reshape(*mse.shape[:-3], -1).mean(-1), 1e-10))


def _pad(episodes: list[RealEpisode]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> frames [N, T+1, S, S, 3], actions [N, T] (0 past the end), lengths [N]."""
    lengths = np.array([len(e.actions) for e in episodes])
    t = int(lengths.max())
    frames = np.stack([np.concatenate([e.frames, np.repeat(e.frames[-1:], t + 1 - len(e.frames), 0)]) for e in episodes])
    actions = np.stack([np.pad(np.asarray(e.actions, np.int64), (0, t - len(e.actions))) for e in episodes])
    return frames, actions, lengths


def _levels(bundle, tokens0: np.ndarray, missions: list[str]) -> LevelSet:
    ids = [f"fidelity-{i}" for i in range(len(tokens0))]
    return LevelSet(tokens0, missions, ids, bundle.fingerprint, None, None, "image", str(bundle.path))


@torch.no_grad()
def _encode_each(tok, frames: np.ndarray) -> np.ndarray:
    """Token ids [N, T, P] of frames [N, T, S, S, 3], each frame encoded alone (as a level's first frame is)."""
    n, t = frames.shape[:2]
    flat = torch.from_numpy(frames.reshape(n * t, 1, *frames.shape[2:]))
    ids = torch.cat([tok.encode(flat[i:i + 512])[1][:, 0] for i in range(0, len(flat), 512)])
    return ids.view(n, t, -1).numpy()


@torch.no_grad()
def _decode(tok, ids: np.ndarray) -> np.ndarray:
    n, t, p = ids.shape
    flat = torch.from_numpy(ids.reshape(n * t, 1, p))
    out = torch.cat([to_uint8(tok.decode(flat[i:i + 512]))[:, 0] for i in range(0, len(flat), 512)])
    return out.view(n, t, *out.shape[1:]).numpy()


def _trajectory_metrics(prefix: str, pred_frames, pred_tokens, real_frames, real_tokens, lengths, horizons,
                        cell, tol) -> dict:
    """pred/real frames [N, T, S, S, 3] and tokens [N, T, P] for steps 1..T (index 0 = step 1)."""
    n, t = pred_frames.shape[:2]
    valid = np.arange(1, t + 1)[None, :] <= lengths[:, None]  # [N, T]
    right = cells_right(pred_frames, real_frames, cell, tol)  # [N, T]
    tok_hit = pred_tokens == real_tokens  # [N, T, P]
    psnr = _psnr(pred_frames, real_frames)  # [N, T]
    m = {}
    for h in horizons:
        if h > t or not valid[:, h - 1].any():
            continue
        rows = valid[:, h - 1]
        m[f"{prefix}_cells_right_h{h}"] = float(right[rows, h - 1].mean())
        m[f"{prefix}_token_exact_h{h}"] = float(tok_hit[rows, h - 1].all(-1).mean())
        m[f"{prefix}_token_acc_h{h}"] = float(tok_hit[rows, h - 1].mean())
        m[f"{prefix}_psnr_h{h}_db"] = float(psnr[rows, h - 1].mean())
    m[f"{prefix}_episodes_right"] = float((right | ~valid).all(1).mean())
    m[f"{prefix}_frames_right"] = float(right[valid].mean())
    return m


def _termination_metrics(prefix: str, fired: np.ndarray, lengths: np.ndarray, ended: np.ndarray) -> dict:
    """fired [N, T] (step index 0 = step 1): the head's termination at each step."""
    t = fired.shape[1]
    steps = np.arange(1, t + 1)[None, :]
    early = (fired & (steps < lengths[:, None])).any(1)
    at_end = fired[np.arange(len(lengths)), lengths - 1]
    m = {f"{prefix}_false_termination": float(early.mean())}
    if ended.any():
        m[f"{prefix}_termination_recall"] = float(at_end[ended].mean())
    return m


@torch.no_grad()
def measure_fidelity(bundle, episodes: list[RealEpisode], horizons=HORIZONS, cell: int = DEFAULT_CELL,
                     tol: float = DEFAULT_TOL, modes=("keys", "latents")) -> dict:
    """The fidelity report of ``bundle`` on ``episodes`` as a flat dict (see the module docstring)."""
    from .world import World

    if not episodes:
        raise ValueError("fidelity needs at least one real episode")
    frames, actions, lengths = _pad(episodes)  # [N, T+1, S, S, 3], [N, T], [N]
    n, t = actions.shape
    ended = np.array([e.terminated for e in episodes])
    missions = [e.mission for e in episodes]
    tok = bundle.tokenizer
    real_tokens = _encode_each(tok, frames)  # [N, T+1, P]
    m: dict = {"fidelity_episodes": n, "fidelity_mean_length": float(lengths.mean()),
               "fidelity_cell": cell, "fidelity_tol": round(tol, 5)}
    # The tokenizer's ceiling: real frames through encode/decode.
    recon = _decode(tok, real_tokens)
    ceiling = cells_right(recon, frames, cell, tol)  # [N, T+1]
    valid0 = np.arange(t + 1)[None, :] <= lengths[:, None]
    m["fidelity_ceiling_cells_right"] = float(ceiling[valid0].mean())
    m["fidelity_ceiling_episodes_right"] = float((ceiling | ~valid0).all(1).mean())
    m["fidelity_ceiling_psnr_db"] = float(_psnr(recon, frames)[valid0].mean())
    # The head on the real frames' tokens: its own upper bound.
    if bundle.vocab is not None:
        text = bundle.vocab.encode_batch(missions, bundle.config.text_max_len)
        _, logit = bundle.reward_head(text.repeat_interleave(t, 0), torch.from_numpy(real_tokens[:, 1:].reshape(n * t, -1)))
        m.update(_termination_metrics("fidelity_real_frames", (logit > 0).view(n, t).numpy(), lengths, ended))
    levels = _levels(bundle, real_tokens[:, 0], missions)
    latents = None
    if "latent_actions" in bundle.parts:
        lam = bundle.latent_actions
        latents = np.stack([np.pad(lam.infer(torch.from_numpy(e.frames[None]))[0].numpy(), (0, t - len(e.actions)))
                            for e in episodes])  # [N, T]
    for mode in modes:
        if mode == "keys" and bundle.adapter is None:
            continue
        if mode == "latents" and latents is None:
            continue
        world = World(bundle, n, max_episode_steps=100_000, action_type="real" if mode == "keys" else "latent")
        world.reset(levels)
        drive = actions if mode == "keys" else latents
        cf = world.replay(drive)  # frames [N, T+1, ...]; index 0 = the start frame
        m.update(_trajectory_metrics(f"fidelity_{mode}", cf.frames[:, 1:], cf.tokens[:, 1:], frames[:, 1:],
                                     real_tokens[:, 1:], lengths, horizons, cell, tol))
        m.update(_termination_metrics(f"fidelity_{mode}", cf.terminated, lengths, ended))
        # One step from real states: the real history is teacher-forced, so step t is predicted from
        # the real frames <= t (as many as the World keeps as context).
        world.reset(levels)
        one = world.replay(drive, teacher_tokens=real_tokens[:, 1:])
        right = cells_right(one.frames[:, 1:], frames[:, 1:], cell, tol)  # [N, T]
        valid = np.arange(1, t + 1)[None, :] <= lengths[:, None]
        m[f"fidelity_{mode}_one_step_right"] = float(right[valid].mean())
        if mode == "keys":
            names = bundle.adapter.real_names
            for a, name in enumerate(names):
                sel = valid & (actions == a)
                if sel.any():
                    m[f"fidelity_step_{name}"] = float(right[sel].mean())
                    m[f"fidelity_step_{name}_n"] = int(sel.sum())
            changed = (frames[:, 1:] != frames[:, :-1]).reshape(n, t, -1).any(-1)
            for a, name in enumerate(names):
                sel = valid & (actions == a) & changed
                if sel.any():
                    m[f"fidelity_step_{name}_changing"] = float(right[sel].mean())
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}
