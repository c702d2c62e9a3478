"""``genie-sima bc``: behaviour cloning from latent actions (Genie's CoinRun recipe).

    genie-sima bc --bundle RUN --data DIR --out BC_RUN [--steps 1500] [--batch 128]

The videos' own actions are never read for training. Each transition (frame t -> t+1) of the collected
videos is labelled by the bundle's latent action model, and the latent label becomes a real action
through the bundle's action adapter (fitted during pretraining on <= ``adapter_transitions`` labelled
transitions) in the state it was taken in. The SIMA policy (``SimaRLModule``, the same module
``genie-sima train`` optimises) learns to predict that action from (frame t, mission). Transitions where
the frame did not change are skipped: the latent action model gives them all one "no effect" latent, so
they say nothing about what the player meant to do.

The policy (``--vision-arch tile_ego``) sees the frame from the agent's point of view: it re-centres the
grid on the agent's cell, turned to its direction (its convs run on the room turned to that direction,
``--conv-frame room``, before the re-centring). Its agent/direction detectors learn from the frames
alone (agent_cells.py: a turn redraws only the agent's cell, a step forward swaps it with the cell
entered). On BabyAI data every frame is also rotated/mirrored at random (grid_symmetry.py; mirrors swap
left and right). With the earlier strided CNN the policy stayed at the most common action (true-action val accuracy
0.525 = the prior) for 1,000-2,500 steps, even trained on the true actions.

The true actions of the validation split are read only to report how often the latent labels (and the
cloned policy) agree with them.

Writes BC_RUN/policy (an RLlib module checkpoint: ``RLModule.from_checkpoint`` loads it; ``genie-sima
train --init-policy BC_RUN`` starts PPO from it; ``genie-sima evaluate --policy BC_RUN`` plays it),
BC_RUN/tokenizer.json, BC_RUN/config.json, BC_RUN/bc_metrics.json, BC_RUN/tensorboard and offline wandb.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic_io import check_writable_dir, commit_dir, write_json_atomic
from .config import check_fields, config_field as _f, save_config
from .errors import ConfigError

POLICY_DIR = "policy"
MISSION_LEN = 16  # the same mission length ``genie-sima train`` gives imagined worlds


@dataclass
class BCConfig:
    bundle: str = _f("", "world bundle (its latent action model labels the videos, its adapter maps the labels)")
    data: str = _f("", "collected videos (``genie-sima collect --out``); only frames and missions are used")
    out: str = _f("", "output directory")
    steps: int = _f(1500, "gradient steps", at_least=1)
    batch: int = _f(128, "minibatch size", at_least=1)
    lr: float = _f(1e-3, "learning rate (AdamW, cosine decay to a tenth)", above=0)
    weight_decay: float = _f(1e-4, "AdamW weight decay", at_least=0)
    augment_pad: int = _f(0, "random-shift augmentation in pixels (0 keeps frames tile-aligned for vision_arch "
                                "tile_ego; the conv arch used 2)")
    symmetry: str = _f("auto", "rotate/mirror frames (mirrors swap left/right labels); auto: on for BabyAI data",
                       choices=("auto", "off"))
    vision_arch: str = _f("tile_ego", "policy vision encoder (sima_policy model_config vision_arch)",
                          choices=("tile_ego", "conv"))
    conv_frame: str = _f("room", "tile_ego: where the FiLM convs run (room: the room grid turned to the agent's "
                                 "heading, 3.5x fewer cells; egocentric: the (2G-1)^2 view around the agent)",
                         choices=("room", "egocentric"))
    detector_weight: float = _f(1.0, "tile_ego: weight of the agent cell/direction detector losses (targets read "
                                     "off frames t and t+1)", at_least=0)
    max_transitions: int = _f(0, "use at most this many training transitions (0: all)")
    vision_dim: int = _f(128, "vision embedding size (must match `genie-sima train --vision-dim`)")
    hidden_dim: int = _f(256, "fused trunk width (must match `genie-sima train --hidden-dim`)")
    label_batch: int = _f(256, "transitions labelled per latent-action-model call", at_least=1)
    log_every: int = _f(100, "steps between log lines / scalars", at_least=1)
    seed: int = _f(0, "seed")
    threads: int = _f(0, "torch threads (0: torch's default)")
    wandb: str = _f("offline", "wandb mode", choices=("offline", "online", "disabled"))


@dataclass
class LabelledTransitions:
    frames: np.ndarray  # [N, H, W, 3] uint8: frame t
    missions: list[str]  # [N]
    latent: np.ndarray  # [N] latent action of t -> t+1 (the bundle's latent action model)
    label: np.ndarray  # [N] real action the adapter maps (latent, state t) to
    true: np.ndarray  # [N] the video's own action (metrics only)
    changed: np.ndarray  # [N] bool: frame t+1 differs from frame t
    agent: np.ndarray  # [N] flat cell of the agent in frame t (agent_cells.py; -1 unknown)
    entered: np.ndarray  # [N] flat cell a step forward entered (-1: no step / unknown)


def _episode_pairs(data_dir, split: str, limit: int, seed: int):
    """Yield (frames t [n, H, W, 3], frames t+1, actions [n], mission) per episode, each read once.

    Clips are gzip chunks on disk: reading whole episodes in manifest order decompresses every frame once,
    where random access to 2-frame clips would decompress each chunk many times.
    """
    from .data.clip_index import build_clip_index
    from .data.shard_format import open_shard, read_episode_arrays, validate_shard

    data_dir = Path(data_dir)
    refs = build_clip_index(data_dir, 2, split)
    episodes = list(dict.fromkeys((r.shard, r.episode_key) for r in refs))  # manifest order, no repeats
    if limit:  # a random subset of whole episodes holding about ``limit`` transitions
        episodes = [episodes[i] for i in np.random.default_rng(seed).permutation(len(episodes))]
    files, taken = {}, 0
    try:
        for shard, key in episodes:
            if shard not in files:
                validate_shard(data_dir / shard)
                files[shard] = open_shard(data_dir / shard)
            ep = read_episode_arrays(files[shard], key, path=data_dir / shard)
            yield ep["frames"][:-1], ep["frames"][1:], np.asarray(ep["actions"]), str(ep["mission"])
            taken += len(ep["actions"])
            if limit and taken >= limit:
                return
    finally:
        for fh in files.values():
            fh.close()


def label_transitions(bundle, data_dir, split: str, limit: int = 0, batch: int = 256, seed: int = 0,
                      log=None, tile: int = 8) -> LabelledTransitions:
    """Every transition of ``split`` (or whole random episodes up to ``limit`` transitions), labelled by
    the latent action model and mapped to real actions by the adapter."""
    import torch

    from .agent_cells import agent_cells

    lam, tok, adapter = bundle.parts["latent_actions"], bundle.parts["tokenizer"], bundle.adapter
    now, nxt, missions, true = [], [], [], []
    for f0, f1, acts, mission in _episode_pairs(data_dir, split, limit, seed):
        now.append(f0)
        nxt.append(f1)
        true.append(acts)
        missions += [mission] * len(acts)
    if not now:
        raise ConfigError(f"--data {data_dir}: the {split} split has no transitions")
    now, nxt, true = np.concatenate(now), np.concatenate(nxt), np.concatenate(true)
    latent, label = np.zeros(len(now), np.int64), np.zeros(len(now), np.int64)
    for lo in range(0, len(now), batch):
        pair = torch.from_numpy(np.stack([now[lo:lo + batch], nxt[lo:lo + batch]], 1))  # [B, 2, H, W, 3] uint8
        with torch.no_grad():
            z = lam.infer(pair)[:, 0].numpy()  # [B]
            context = tok.encode(pair[:, :1])[1][:, 0].numpy()  # [B, P] tokens of the state t
        latent[lo:lo + batch] = z
        label[lo:lo + batch] = adapter.latent_to_real(z, context)
        if log and (lo // batch) % 20 == 0:
            log(f"bc: labelled {min(lo + batch, len(now))}/{len(now)} {split} transitions")
    changed = (now != nxt).reshape(len(now), -1).any(1)
    agent, entered = agent_cells(now, nxt, tile)
    return LabelledTransitions(now, missions, latent, label, true, changed, agent, entered)


def policy_spaces(num_actions: int, vocab_size: int, frame_size: int):
    """The observation/action spaces ``genie-sima train`` gives the module in an imagined world."""
    import gymnasium as gym

    obs = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (frame_size, frame_size, 3), np.uint8),
                           "mission": gym.spaces.Box(0, vocab_size - 1, (MISSION_LEN,), np.int64)})
    return obs, gym.spaces.Discrete(num_actions)


def build_policy(obs_space, action_space, vision_dim: int, hidden_dim: int, vision_arch: str = "tile_ego",
                 conv_frame: str = "room"):
    from sima_policy.rl_module import SimaRLModule

    return SimaRLModule(observation_space=obs_space, action_space=action_space, inference_only=False,
                        model_config={"vision_dim": vision_dim, "hidden_dim": hidden_dim, "vision_arch": vision_arch,
                                      "conv_frame": conv_frame})


def _logits(module, images, missions):
    return _logits_and_features(module, images, missions)[0]  # [B, num_actions]


def _logits_and_features(module, images, missions):
    """(action logits [B, num_actions], tile_ego's cell features [B, C, G, G] or None)."""
    _, _, h, features = module.embed_with_cells({"image": images, "mission": missions})
    return module.action_dist_inputs(h), features


def _detector_loss(module, images, cells, features=None):
    """tile_ego: cross-entropy of the agent-cell detector (every row with a known agent cell) plus that of
    the direction detector at the agent's cell (rows that stepped forward). ``cells`` [B, 2]: (agent,
    entered) flat cell indices, -1 unknown; ``features``: the policy's own cell features of ``images`` when
    the caller has them (else computed here). Returns (loss, agent-cell accuracy)."""
    from torch.nn import functional as F

    from .agent_cells import direction_of

    if features is None:
        features = module.vision.features(images)
    agent_logits, dir_logits = module.trunk.detect(features)  # [B, G*G], [B, 4, G*G]
    agent, entered = cells[:, 0], cells[:, 1]
    known, stepped = agent >= 0, (agent >= 0) & (entered >= 0)
    zero = agent_logits.sum() * 0
    loss_agent = F.cross_entropy(agent_logits[known], agent[known]) if known.any() else zero
    at = agent.clamp(min=0).view(-1, 1, 1).expand(-1, 4, 1)
    dirs = dir_logits.gather(2, at)[:, :, 0]  # [B, 4] at the agent's cell
    target = direction_of(agent, entered, int(module.vision.grid))
    loss_dir = F.cross_entropy(dirs[stepped], target[stepped]) if stepped.any() else zero
    hit = float((agent_logits.argmax(1) == agent)[known].float().mean()) if known.any() else float("nan")
    return loss_agent + loss_dir, hit


def _agent_cell_accuracy(module, frames, agent, batch: int = 512) -> float | None:
    """tile_ego: how often the agent-cell detector finds the agent (rows whose agent cell is known)."""
    import torch

    known = agent >= 0
    if module.arch != "tile_ego" or not known.any():
        return None
    frames, agent, hits = frames[known], agent[known], 0
    with torch.no_grad():
        for lo in range(0, len(agent), batch):
            cells = module.vision.features(torch.from_numpy(frames[lo:lo + batch]))  # [B, C, G, G]
            hits += int((module.trunk.detect(cells)[0].argmax(1).numpy() == agent[lo:lo + batch]).sum())
    return hits / len(agent)


def _symmetry_actions(data_dir) -> tuple[int, int] | None:
    """(left, right) action ids when the videos come from BabyAI (full-view grid: symmetries keep labels)."""
    from .data.babyai_game import BABYAI_ACTION_NAMES

    path = Path(data_dir) / "collect_config.json"
    source = str(json.loads(path.read_text()).get("config", {}).get("source", "")) if path.exists() else ""
    if not source.startswith("babyai:"):
        return None
    return BABYAI_ACTION_NAMES.index("left"), BABYAI_ACTION_NAMES.index("right")


def _accuracy(module, frames, tokens, target, batch: int = 512) -> float:
    import torch

    if len(target) == 0:
        return float("nan")
    hits = 0
    with torch.no_grad():
        for lo in range(0, len(target), batch):
            pred = _logits(module, torch.from_numpy(frames[lo:lo + batch]),
                           torch.from_numpy(tokens[lo:lo + batch])).argmax(-1).numpy()
            hits += int((pred == target[lo:lo + batch]).sum())
    return hits / len(target)


def _check_frame_size(data_dir, bundle_dir, frame_size: int) -> None:
    """The latent action model reads frames of the bundle's size: other data failed deep inside it."""
    from .data.manifest import read_manifest
    from .data.shard_format import validate_shard

    rows = read_manifest(Path(data_dir))
    if not rows:
        raise ConfigError(f"--data {data_dir}: the manifest lists no episodes")
    size = validate_shard(Path(data_dir) / rows[0]["shard"])["frame_size"]
    if size != frame_size:
        raise ConfigError(f"--data {data_dir}: frames are {size}x{size}, but the world bundle {bundle_dir} was "
                          f"trained on {frame_size}x{frame_size} frames; clone from data of the bundle's frame size "
                          f"(collect --frame-size {frame_size})")


def behaviour_clone(cfg: BCConfig, log=None) -> dict:
    import torch

    from genie_world.bundle import load_bundle
    from sima_policy.aux_losses import random_shift
    from sima_policy.instruction_tokenizer import InstructionTokenizer

    from .grid_symmetry import grid_symmetry
    from .run_logger import RunLogger

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_fields(cfg)  # the Python API too, not only the CLI's make_config
    if not cfg.bundle or not cfg.data or not cfg.out:
        raise ConfigError("--bundle, --data and --out are required")
    out = Path(cfg.out).resolve()
    check_writable_dir(out, "--out")
    if (out / POLICY_DIR).exists():
        raise ConfigError(f"--out {out} already holds a cloned policy ({out / POLICY_DIR}); choose a new --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()

    bundle = load_bundle(cfg.bundle, parts=("tokenizer", "latent_actions"))
    if bundle.adapter is None:
        raise ConfigError(f"--bundle {cfg.bundle}: action_adapter.json is missing (pretrain the actions stage "
                          "with labelled transitions)")
    _check_frame_size(cfg.data, cfg.bundle, bundle.config.frame_size)
    tokenizer = InstructionTokenizer.from_texts(bundle.vocab.words[1:], max_len=MISSION_LEN)
    train = label_transitions(bundle, cfg.data, "train", cfg.max_transitions, cfg.label_batch, cfg.seed, log)
    val = label_transitions(bundle, cfg.data, "val", 0, cfg.label_batch, cfg.seed + 1, log)
    label_s = time.perf_counter() - t0
    keep = train.changed
    if not keep.any():
        raise ConfigError(f"--data {cfg.data}: no transition changes the frame; nothing to clone")
    frames, labels = train.frames[keep], train.label[keep]
    cells = np.stack([train.agent[keep], train.entered[keep]], 1)  # [N, 2]
    try:
        tokens = tokenizer.encode_batch([m for m, k in zip(train.missions, keep) if k], MISSION_LEN)
        v_tokens = tokenizer.encode_batch(val.missions, MISSION_LEN)
    except ValueError as e:
        raise ConfigError(f"--data {cfg.data}: a mission does not fit the bundle's vocabulary: {e}") from None
    log(f"bc: {len(labels)} training transitions that change the frame (of {len(keep)}), labelled in {label_s:.0f}s; "
        f"label agreement with the videos' own actions: train {np.mean(labels == train.true[keep]):.3f}")

    obs_space, act_space = policy_spaces(bundle.adapter.num_real, tokenizer.vocab_size, bundle.config.frame_size)
    module = build_policy(obs_space, act_space, cfg.vision_dim, cfg.hidden_dim, cfg.vision_arch, cfg.conv_frame)
    turns = _symmetry_actions(cfg.data) if cfg.symmetry == "auto" else None
    log(f"bc: vision_arch {cfg.vision_arch}, symmetry augmentation {'on' if turns else 'off'}")
    module.train()
    params = [p for n, p in module.named_parameters() if not n.startswith("aux.")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    frames_t, tokens_t, labels_t = torch.from_numpy(frames), torch.from_numpy(tokens), torch.from_numpy(labels).long()
    cells_t = torch.from_numpy(cells)
    ego = module.arch == "tile_ego"
    logger = RunLogger(out, "bc", {k: v for k, v in vars(cfg).items()}, cfg.wandb)
    try:
        run_loss, run_acc, run_det = 0.0, 0.0, 0.0
        for step in range(1, cfg.steps + 1):
            idx = torch.randint(0, len(labels_t), (cfg.batch,), generator=gen)
            images = random_shift(frames_t[idx], cfg.augment_pad, generator=gen)  # [B, H, W, 3] float
            target, where = labels_t[idx], cells_t[idx]
            if turns:
                images, target, where = grid_symmetry(images, target, *turns, generator=gen, cells=where,
                                                      grid=int(getattr(module.vision, "grid", 8)))
            logits, features = _logits_and_features(module, images, tokens_t[idx])
            loss = torch.nn.functional.cross_entropy(logits, target)
            if ego:  # the detectors read the same cell features the policy just computed
                det_loss, det_hit = _detector_loss(module, images, where, features)
                loss = loss + cfg.detector_weight * det_loss
                run_det += det_hit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            run_loss += float(loss.detach())
            run_acc += float((logits.argmax(-1) == target).float().mean())
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                logger.scalars(step, {"bc/loss": run_loss / n, "bc/train_accuracy": run_acc / n,
                                      "bc/agent_cell_accuracy": run_det / n, "bc/lr": sched.get_last_lr()[0]})
                log(f"bc: step {step}/{cfg.steps} loss {run_loss / n:.4f} accuracy {run_acc / n:.3f}"
                    + (f" agent cell {run_det / n:.3f}" if ego else ""))
                run_loss, run_acc, run_det = 0.0, 0.0, 0.0
        module.eval()
        vc = val.changed
        metrics = {
            "train_transitions": int(len(labels)),
            "train_transitions_unchanged_skipped": int((~keep).sum()),
            "adapter_labelled_transitions": int(bundle.adapter.num_labelled),
            "label_vs_true_action_train": float(np.mean(labels == train.true[keep])),
            "label_vs_true_action_val": float(np.mean(val.label[vc] == val.true[vc])) if vc.any() else float("nan"),
            "policy_vs_label_val": _accuracy(module, val.frames[vc], v_tokens[vc], val.label[vc]),
            "policy_vs_true_action_val": _accuracy(module, val.frames[vc], v_tokens[vc], val.true[vc]),
            "agent_cell_accuracy_val": _agent_cell_accuracy(module, val.frames[vc], val.agent[vc]),
            "val_transitions": int(vc.sum()),
            "label_s": round(label_s, 1),
            "wall_clock_s": round(time.perf_counter() - t0, 1),
        }
        logger.scalars(cfg.steps, {f"bc/{k}": v for k, v in metrics.items() if v is not None})
    finally:
        logger.close()
    # The policy directory is what marks a finished clone: everything it needs is written first, and it
    # appears under its final name only once complete and on disk.
    write_json_atomic(out / "tokenizer.json", tokenizer.to_json())
    save_config(cfg, out / "config.json")
    write_json_atomic(out / "bc_metrics.json", metrics)
    tmp = out / f".{POLICY_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    module.save_to_path(str(tmp))
    commit_dir(tmp, out / POLICY_DIR)
    log("bc: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return {"out": str(out), "policy": str(out / POLICY_DIR), "metrics": metrics}
