"""Held-out evaluation of a world bundle, written into the bundle and printed as a table.

PSNR here is the PSNR of the mean squared error over the evaluated frames (finite even when some
predictions are exact; per-frame PSNR would be infinite there).

- tokenizer PSNR/SSIM on val frames;
- next-frame PSNR (context frames 0..3 real, frame 4 generated with LAM-inferred actions) and the
  copy-last-frame baseline on the same transitions;
- dtPSNR at t=4 (Genie): from real frame 0, roll out 4 frames with inferred latent actions and with
  random latent actions; PSNR at frame 4, inferred minus random;
- latent -> real action mapping accuracy (state-conditioned adapter fitted on <= adapter_transitions
  labelled train transitions) on val transitions where the frame changes, the real -> latent -> real
  round trip, and the mutual information between latent and real actions;
- reward/termination head accuracy on val transitions;
- prompt prior: how many distinct first frames 8 seeds give for one mission.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from genie_world.action_adapter import ActionAdapter
from genie_world.bundle import WorldBundle
from genie_world.level_constraints import LevelConstraints
from genie_world.metrics import ssim


def psnr_agg(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR of the mean squared error over all frames: finite when some frames match exactly."""
    mse = ((pred.float().clamp(0, 1) - target.float()) ** 2).mean()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))

from .data.clip_reader import ClipReader

HORIZON = 4  # dtPSNR at t=4, as in Genie


def _clips(data_dir, clip_len: int, split: str, n: int, seed: int) -> list[dict]:
    reader = ClipReader(data_dir, clip_len=clip_len, split=split)
    if len(reader) == 0:
        reader.close()
        raise ValueError(f"{data_dir}: no {split} episodes with >= {clip_len} frames to evaluate on; "
                         "collect more episodes or raise --val-fraction")
    idx = np.random.default_rng(seed).permutation(len(reader))[:n]
    clips = [reader[int(i)] for i in idx]
    reader.close()
    return clips


def _stack(clips, key):
    return torch.from_numpy(np.stack([c[key] for c in clips]))


def _mutual_information_bits(real: np.ndarray, latent: np.ndarray) -> float:
    joint = np.zeros((real.max() + 1, latent.max() + 1))
    np.add.at(joint, (real, latent), 1)
    joint /= joint.sum()
    pr, pl = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (pr @ pl)[nz])).sum())


@torch.no_grad()
def evaluate_bundle(bundle: WorldBundle, data_dir, action_names: list[str], seed: int = 0) -> tuple[dict, ActionAdapter | None]:
    cfg, parts = bundle.config, bundle.parts
    n = cfg.eval_clips
    g = torch.Generator().manual_seed(seed)
    m: dict[str, float] = {}
    clips = _clips(data_dir, HORIZON + 1, "val", n, seed)
    frames = _stack(clips, "frames")  # [N, 5, H, W, 3] uint8
    real = frames.float() / 255
    if "tokenizer" in parts:
        tok = parts["tokenizer"]
        codes, ids = tok.encode(frames)  # ids [N, 5, P] are reused by the dynamics metrics below
        recon = tok.decode_codes(codes).clamp(0, 1)
        m["tokenizer_psnr_db"] = psnr_agg(recon, real)
        m["tokenizer_ssim"] = float(ssim(recon, real).mean())
        m.update({f"tokenizer_{k}": v for k, v in tok.fsq.usage(ids).items()})
    adapter = None
    if {"tokenizer", "latent_actions"} <= set(parts):
        lam, tok = parts["latent_actions"], parts["tokenizer"]
        train = _clips(data_dir, 2, "train", 4 * cfg.adapter_transitions, seed)
        tf = _stack(train, "frames")
        t_latent = lam.infer(tf)[:, 0].numpy()
        t_real = _stack(train, "actions")[:, 0].numpy()
        t_changed = (tf[:, 0] != tf[:, 1]).flatten(1).any(1).numpy()
        t_context = tok.encode(tf)[1][:, 0].numpy()  # the state each action was taken in, as tokens
        adapter = ActionAdapter.fit(t_real, t_latent, t_changed, t_context, len(action_names),
                                    cfg.num_latent_actions, cfg.adapter_transitions, action_names)
        val = _clips(data_dir, 2, "val", 4 * n, seed + 1)
        vf = _stack(val, "frames")
        v_latent = lam.infer(vf)[:, 0].numpy()
        v_real = _stack(val, "actions")[:, 0].numpy()
        v_changed = (vf[:, 0] != vf[:, 1]).flatten(1).any(1).numpy()
        v_context = tok.encode(vf)[1][:, 0].numpy()
        m["action_mapping_accuracy"] = adapter.accuracy(v_real, v_latent, v_changed, v_context)
        back = adapter.latent_to_real(adapter.real_to_latent(v_real, v_context), v_context)
        m["real_latent_real_round_trip"] = float((back[v_changed] == v_real[v_changed]).mean()) if v_changed.any() else float("nan")
        m["action_mapping_transitions"] = int(v_changed.sum())
        m["adapter_labelled_transitions"] = adapter.num_labelled
        if v_changed.any():
            m["latent_real_mutual_info_bits"] = _mutual_information_bits(v_real[v_changed], v_latent[v_changed])
        m["latent_actions_used"] = int(len(np.unique(v_latent)))
    if {"tokenizer", "latent_actions", "dynamics"} <= set(parts):
        tok, lam = parts["tokenizer"], parts["latent_actions"]
        inferred = lam.infer(frames)  # [N, 4]
        # Next frame: real frames 0..3 as context, frame 4 generated.
        dyn = parts["dynamics"]
        cache = dyn.new_cache(cfg.context_frames)
        dyn.prime(cache, ids[:, :1], None)
        dyn.prime(cache, ids[:, 1:HORIZON], inferred[:, :HORIZON - 1])
        nxt = dyn.generate_next(cache, inferred[:, HORIZON - 1], cfg.maskgit_steps, cfg.maskgit_temperature,
                                cfg.maskgit_schedule, g)
        pred = tok.decode(torch.cat([ids[:, :HORIZON], nxt[:, None]], 1))[:, -1].clamp(0, 1)
        m["next_frame_psnr_db"] = psnr_agg(pred, real[:, HORIZON])
        m["copy_last_psnr_db"] = psnr_agg(real[:, HORIZON - 1], real[:, HORIZON])
        m["frames_changed_fraction"] = float((frames[:, HORIZON] != frames[:, HORIZON - 1]).flatten(1).any(1).float().mean())
        # dtPSNR at t=4.
        def rollout(actions):
            ids_out = dyn.rollout(ids[:, 0], actions, cfg.maskgit_steps, cfg.maskgit_temperature,
                                  cfg.maskgit_schedule, g, cfg.context_frames)
            return tok.decode(ids_out)[:, HORIZON].clamp(0, 1)

        roll_inf = rollout(inferred)
        roll_rand = rollout(torch.randint(0, cfg.num_latent_actions, inferred.shape, generator=g))
        p_inf, p_rand = psnr_agg(roll_inf, real[:, HORIZON]), psnr_agg(roll_rand, real[:, HORIZON])
        m["rollout_psnr_t4_inferred_db"] = p_inf
        m["rollout_psnr_t4_random_db"] = p_rand
        m["dt_psnr_t4_db"] = p_inf - p_rand
    if {"tokenizer", "reward_head"} <= set(parts) and bundle.vocab is not None:
        tok, head = parts["tokenizer"], parts["reward_head"]
        val = _clips(data_dir, 2, "val", 8 * n, seed + 2)
        vf = _stack(val, "frames")
        _, ids = tok.encode(vf[:, 1:2])  # as in training: the frame the action led to, alone
        text = bundle.vocab.encode_batch([c["mission"] for c in val], cfg.text_max_len)
        reward, term_logit = head(text, ids[:, 0])
        true_r = _stack(val, "rewards")[:, 0].float()
        true_t = _stack(val, "terminated")[:, 0]
        pred_t = term_logit > 0
        m["termination_accuracy"] = float((pred_t == true_t).float().mean())
        pos, neg = true_t, ~true_t
        if pos.any() and neg.any():
            m["termination_balanced_accuracy"] = float(0.5 * ((pred_t[pos]).float().mean() + (~pred_t[neg]).float().mean()))
        m["reward_mae"] = float((reward - true_r).abs().mean())
        m["termination_rate_val"] = float(true_t.float().mean())
    if {"tokenizer", "prompt_prior"} <= set(parts) and bundle.vocab is not None:
        prior = parts["prompt_prior"]
        mission = clips[0]["mission"]
        text = bundle.vocab.encode_batch([mission] * 8, cfg.text_max_len)
        gen = prior.generate(text, cfg.prior_maskgit_steps, cfg.prior_temperature, cfg.maskgit_schedule,
                             torch.Generator().manual_seed(seed))
        m["prior_distinct_levels_of_8"] = int(len({tuple(r.tolist()) for r in gen}))
    m["eval_clips"] = len(clips)
    return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in m.items()}, adapter


TARGETS = {
    "tokenizer_psnr_db": ">= 35 dB",
    "next_frame_psnr_db": "> copy_last_psnr_db",
    "dt_psnr_t4_db": "> 1 dB",
    "action_mapping_accuracy": ">= 0.90",
}


def format_metrics_table(metrics: dict) -> str:
    rows = [("metric", "value", "target (tiny)")]
    for k, v in metrics.items():
        rows.append((k, f"{v:.4g}" if isinstance(v, float) else str(v), TARGETS.get(k, "")))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"| {a:<{w0}} | {b:>{w1}} | {c} |" for a, b, c in rows]
    lines.insert(1, f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|---|")
    return "\n".join(lines)


@torch.no_grad()
def fit_level_constraints(bundle: WorldBundle, data_dir, max_frames: int = 1000) -> tuple[LevelConstraints | None, dict]:
    """Learn level constraints from real train first frames; report how often the raw prompt prior
    obeys them (generated levels are filtered by them in WorldBuilder)."""
    if "tokenizer" not in bundle.parts:
        return None, {}
    reader = ClipReader(data_dir, clip_len=2, split="train", first_only=True)
    frames = np.stack([reader[i]["frames"][0] for i in range(min(len(reader), max_frames))]) if len(reader) else None
    missions = [reader[i]["mission"] for i in range(min(len(reader), 8))]
    reader.close()
    if frames is None:
        return None, {}
    _, ids = bundle.tokenizer.encode(torch.from_numpy(frames)[:, None])
    constraints = LevelConstraints.fit(ids[:, 0].numpy())
    constraints.reward_only_at_termination = _reward_only_at_termination(data_dir, max_frames)
    m = {"level_constraint_groups": len(constraints.exactly_one)}
    if "prompt_prior" in bundle.parts and bundle.vocab is not None and constraints.exactly_one:
        cfg = bundle.config
        text = bundle.vocab.encode_batch([missions[0]] * 64, cfg.text_max_len)
        raw = bundle.prompt_prior.generate(text, cfg.prior_maskgit_steps, cfg.prior_temperature, cfg.maskgit_schedule,
                                           torch.Generator().manual_seed(cfg.seed)).numpy()
        m["prior_raw_valid_fraction"] = round(float(constraints.valid(raw).mean()), 4)
    return constraints, m


def _reward_only_at_termination(data_dir, max_clips: int) -> bool:
    """Did every nonzero reward among (up to) ``max_clips`` train transitions come with termination?"""
    reader = ClipReader(data_dir, clip_len=2, split="train")
    idx = np.random.default_rng(0).permutation(len(reader))[:max_clips]
    rewards, terminated = [], []
    for i in idx:
        c = reader[int(i)]
        rewards.append(c["rewards"][0])
        terminated.append(c["terminated"][0])
    reader.close()
    rewards, terminated = np.asarray(rewards), np.asarray(terminated, bool)
    return bool(len(rewards) and (rewards[~terminated] == 0).all())
