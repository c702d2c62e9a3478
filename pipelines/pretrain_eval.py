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
from pathlib import Path

import numpy as np
import torch

from genie_world.action_adapter import ActionAdapter
from genie_world.bundle import WorldBundle
from genie_world.key_to_latent import fit_key_to_latent
from genie_world.level_constraints import LevelConstraints
from genie_world.metrics import ssim


def psnr_agg(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR of the mean squared error over all frames: finite when some frames match exactly."""
    mse = ((pred.float().clamp(0, 1) - target.float()) ** 2).mean()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))

from .data.clip_reader import ClipReader
from .pretrain_stages import clip_first_actions

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


def _transitions(data_dir, split: str, limit: int, seed: int) -> dict:
    """Up to ``limit`` transitions of ``split`` (whole episodes, shuffled): frames t and t+1 [N, 2, H, W, 3]
    and the real action between them [N]. Reads each episode once (not one file access per clip)."""
    from .data.manifest import read_manifest
    from .data.shard_format import open_shard, read_episode_arrays

    rows = read_manifest(data_dir, split=split)
    order = np.random.default_rng(seed).permutation(len(rows))
    pairs, actions, n, files = [], [], 0, {}
    try:
        for i in order:
            if n >= limit:
                break
            row = rows[int(i)]
            if row["shard"] not in files:
                files[row["shard"]] = open_shard(Path(data_dir) / row["shard"])
            ep = read_episode_arrays(files[row["shard"]], row["episode_key"], path=Path(data_dir) / row["shard"])
            f = ep["frames"]
            pairs.append(np.stack([f[:-1], f[1:]], 1))  # [T, 2, H, W, 3]
            actions.append(ep["actions"])
            n += len(ep["actions"])
    finally:
        for fh in files.values():
            fh.close()
    if not pairs:
        return {"frames": np.zeros((0, 2, 1, 1, 3), np.uint8), "actions": np.zeros(0, np.int64)}
    return {"frames": np.concatenate(pairs)[:limit], "actions": np.concatenate(actions)[:limit].astype(np.int64)}


@torch.no_grad()
def _states_and_latents(tok, lam, frames: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Pairs [N, 2, H, W, 3] -> (tokens of frame t [N, P], LAM latent of t -> t+1 [N])."""
    tokens, latents = [], []
    for i in range(0, len(frames), batch):
        f = torch.from_numpy(frames[i:i + batch])
        tokens.append(tok.encode(f[:, :1])[1][:, 0])
        latents.append(lam.infer(f)[:, 0])
    return torch.cat(tokens).numpy(), torch.cat(latents).numpy()


def fit_key_model(bundle: WorldBundle, data_dir, adapter: ActionAdapter, seed: int = 0) -> dict:
    """Train the adapter's key -> latent model (KeyToLatent) on labelled train transitions and score
    it on val transitions; sets ``adapter.key_model``."""
    cfg = bundle.config
    tok, lam = bundle.tokenizer, bundle.latent_actions
    train = _transitions(data_dir, "train", cfg.adapter_key_transitions, seed)
    if len(train["actions"]) == 0:
        return {}
    t_tokens, t_latent = _states_and_latents(tok, lam, train["frames"])
    model, m = fit_key_to_latent(t_tokens, train["actions"], t_latent, tok.vocab_size, adapter.num_real,
                                 cfg.num_latent_actions, steps=cfg.adapter_key_steps, seed=seed)
    adapter.key_model = model
    val = _transitions(data_dir, "val", 4 * cfg.eval_clips, seed + 3)
    if len(val["actions"]):
        v_tokens, v_latent = _states_and_latents(tok, lam, val["frames"])
        pred = adapter.real_to_latent(val["actions"], v_tokens)
        m["key_to_latent_val_accuracy"] = float((pred == v_latent).mean())
    return m


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
        if cfg.adapter_key_transitions > 0:
            m.update(fit_key_model(bundle, data_dir, adapter, seed))
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
        # The latent that led into each clip's first frame ("no action" where the clip starts its episode).
        first = clip_first_actions(lam, {"frames": frames, "previous_frame": _stack(clips, "previous_frame"),
                                         "start": torch.as_tensor([c["start"] for c in clips])}, cfg.num_latent_actions)
        # Next frame: real frames 0..3 as context, frame 4 generated.
        dyn = parts["dynamics"]
        cache = dyn.new_cache(cfg.context_frames)
        dyn.prime(cache, ids[:, :1], first[:, None])
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
                                  cfg.maskgit_schedule, g, cfg.context_frames, first)
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


def format_metrics_table(metrics: dict) -> str:
    """The evaluation table (each figure with its target, met or missed), then the fidelity report and
    the prompt levels' faithfulness when measured."""
    from .fidelity_report import fidelity_table
    from .world_targets import NAMED_PREFIX, PROMPT_PREFIX, target_text, verdict

    rows = [("metric", "value", "target", "")]
    for k, v in metrics.items():
        if k.startswith(("fidelity_", PROMPT_PREFIX, NAMED_PREFIX)):
            continue
        rows.append((k, f"{v:.4g}" if isinstance(v, float) else str(v), target_text(k), verdict(k, metrics)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"| {a:<{widths[0]}} | {b:>{widths[1]}} | {c:<{widths[2]}} | {d} |" for a, b, c, d in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|---|")
    if any(k.startswith("fidelity_") for k in metrics):
        lines += ["", fidelity_table(metrics)]
    prompts = [k for k in metrics if k.startswith(PROMPT_PREFIX)]
    if prompts:
        lines += ["", "Levels from a prompt that show what it names and exactly one agent (and how many tiles show "
                  "the named object: real rooms about one):", "",
                  "| prompt | levels right | named objects per level | target | |", "|---|---|---|---|---|"]
        for k in prompts:
            named = metrics.get(NAMED_PREFIX + k.removeprefix(PROMPT_PREFIX))
            lines.append(f"| {k.removeprefix(PROMPT_PREFIX)} | {100 * metrics[k]:.1f}% | "
                         f"{'-' if named is None else f'{named:.1f}'} | {target_text(k)} | {verdict(k, metrics)} |")
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


def simulator_metrics(bundle: WorldBundle, data_dir, source: str, seed: int = 0) -> dict:
    """The world model as a training ground: the fidelity report on held-out real episodes of ``source``
    (genie_world/fidelity.py) and, for BabyAI, whether prompt levels show what their prompt names."""
    from genie_world.fidelity import measure_fidelity
    from genie_world.text_encoder import UnknownWordsError

    from .data.heldout import heldout_episodes
    from .prompt_faithfulness import PROMPTS, is_babyai, prompt_faithfulness
    from .world_targets import NAMED_PREFIX, PROMPT_PREFIX

    cfg, m = bundle.config, {}
    if cfg.eval_fidelity_episodes > 0:
        episodes = heldout_episodes(source, cfg.eval_fidelity_episodes, cfg.frame_size, data_dir=data_dir)
        m.update(measure_fidelity(bundle, episodes))
    if cfg.eval_prompt_levels > 0 and is_babyai(bundle) and "prompt_prior" in bundle.parts and bundle.vocab:
        for prompt in PROMPTS:
            try:
                bundle.vocab.encode(prompt, cfg.text_max_len)
            except UnknownWordsError:
                continue  # not a mission of this data
            try:
                r = prompt_faithfulness(bundle, prompt, cfg.eval_prompt_levels, seed)
            except ValueError:  # too few candidates obey the level constraints: none of its levels exist
                r = {"faithful": 0.0}
            m[PROMPT_PREFIX + prompt] = round(r["faithful"], 4)
            if "named_objects_per_level" in r:
                m[NAMED_PREFIX + prompt] = round(r["named_objects_per_level"], 2)
    return m
