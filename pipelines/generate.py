"""``genie-sima generate``: a prompt (or an image, or a collection's real first frames with their missions)
-> a level file, a PNG grid of the first frames and
a GIF of imagined rollouts (random or scripted actions) in those levels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic_io import check_writable_dir
from .config import check_fields, config_field as _f, save_config
from .errors import ConfigError
from .pictures import frame_grid, save_gif, save_png


@dataclass
class GenerateConfig:
    bundle: str = _f("", "world bundle directory (written by `genie-sima pretrain --out`)")
    out: str = _f("", "level file to write (HDF5, e.g. levels.h5)")
    prompt: str | None = _f(None, "text prompt (words from the bundle's vocabulary)")
    image: str | None = _f(None, "a PNG start frame instead of a prompt (frame-size RGB)")
    data: str | None = _f(None, "a collected video directory instead of a prompt: levels from its train episodes' "
                                "real first frames, each with its own episode's mission (drawn by --seed)")
    data_mission: str | None = _f(None, "with --data: only the episodes whose mission contains this text, e.g. \"red "
                                        "ball\" (levels as crowded as the real rooms that honour one prompt)")
    mission: str | None = _f(None, "instruction the reward head scores (default: the prompt); with --data: levels for "
                                   "this instruction from the real first frames that show what it names (BabyAI)")
    mission_share: float = _f(1.0, "with --data and --mission: share of the levels for --mission; the rest keep their "
                                   "episodes' own first frames and missions", at_least=0.0, at_most=1.0)
    num_worlds: int = _f(16, "levels to generate", at_least=1)
    seed: int = _f(0, "seed: same seed, same levels")
    grid: str | None = _f(None, "write a PNG grid of the levels' first frames here")
    rollout: str | None = _f(None, "write a GIF of imagined rollouts here")
    rollout_steps: int = _f(16, "steps per rollout in the GIF")
    rollout_envs: int = _f(16, "levels shown in the GIF (the first N)")
    policy: str = _f("random", "actions of the rollout GIF", choices=("random", "scripted"))
    script: str = _f("forward,forward,left,forward,forward,right", "comma-separated action names, repeated, for --policy scripted")
    max_episode_steps: int = _f(64, "time limit of the imagined episodes")


def _load_image(path: str, size: int) -> np.ndarray:
    from PIL import Image

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--image {p}: file does not exist")
    img = np.asarray(Image.open(p).convert("RGB"))
    if img.shape != (size, size, 3):
        raise ConfigError(f"--image {p}: is {img.shape[1]}x{img.shape[0]}, the bundle expects {size}x{size} RGB")
    return img


def _words(text: str) -> str:
    """``text`` lower-cased with single spaces: what --data-mission compares."""
    return " ".join(text.lower().split())


def _first_frames(data_dir: str, n: int, seed: int, size: int,
                  mission_text: str | None = None) -> tuple[np.ndarray, list[str]]:
    """First frames [M, S, S, 3] and missions of ``n`` train episodes of a collection (M = min(n, episodes)),
    drawn without replacement by ``seed``; with ``mission_text``, only episodes whose mission contains it."""
    from .data.clip_reader import ClipReader

    reader = ClipReader(data_dir, clip_len=2, split="train", first_only=True)
    try:
        if len(reader) == 0:
            raise ConfigError(f"--data {data_dir}: no train episodes of 2 or more frames")
        wanted = None if mission_text is None else _words(mission_text)
        clips = []
        for i in np.random.default_rng(seed).permutation(len(reader)):
            if len(clips) == n:
                break
            clip = reader[int(i)]
            if wanted is None or wanted in _words(str(clip["mission"])):
                clips.append(clip)
        if not clips:
            raise ConfigError(f"--data-mission {mission_text!r}: no train episode of {data_dir} has a mission "
                              "containing it")
    finally:
        reader.close()
    frames = np.stack([c["frames"][0] for c in clips])
    if frames.shape[1:] != (size, size, 3):
        raise ConfigError(f"--data {data_dir}: frames are {frames.shape[2]}x{frames.shape[1]}, the bundle expects "
                          f"{size}x{size} RGB")
    return frames, [str(c["mission"]) for c in clips]


def _cycled(frames: np.ndarray, n: int) -> np.ndarray:
    return frames[np.arange(n) % len(frames)]


def _frames_showing(data_dir: str, mission: str, n: int, seed: int, size: int) -> np.ndarray:
    """``n`` real first frames [n, S, S, 3] of the collection's train episodes that show the object ``mission``
    names (and one agent), whatever their own missions were: starts laid out as the real game lays out that
    instruction's rooms, where a prompt-generated level is as crowded with the object as its guidance makes
    it. Distinct frames in an order drawn by ``seed``, cycled when fewer than ``n`` show it."""
    from .data.babyai_tiles import level_contents
    from .data.clip_reader import ClipReader

    reader = ClipReader(data_dir, clip_len=2, split="train", first_only=True)
    try:
        frames = np.stack([reader[i]["frames"][0] for i in range(len(reader))]) if len(reader) else None
    finally:
        reader.close()
    if frames is None:
        raise ConfigError(f"--data {data_dir}: no train episodes of 2 or more frames")
    if frames.shape[1:] != (size, size, 3):
        raise ConfigError(f"--data {data_dir}: frames are {frames.shape[2]}x{frames.shape[1]}, the bundle expects "
                          f"{size}x{size} RGB")
    shows = np.zeros(len(frames), bool)
    for lo in range(0, len(frames), 256):  # the tile reader compares every tile with every rendering
        c = level_contents(frames[lo:lo + 256], mission)
        shows[lo:lo + 256] = c["has_object"] & c["one_agent"] & (c["unknown_tiles"] == 0)
    if not shows.any():
        raise ConfigError(f"--mission {mission!r}: none of the {len(frames)} train first frames of {data_dir} shows "
                          "what it names")
    return _cycled(frames[np.random.default_rng(seed).permutation(np.flatnonzero(shows))], n)


def generate(cfg: GenerateConfig) -> dict:
    import torch

    from genie_world.bundle import load_bundle
    from genie_world.levels import save_levels
    from genie_world.patches import to_uint8
    from genie_world.world import World
    from genie_world.world_builder import WorldBuilder

    from .prompt_faithfulness import is_babyai, prompt_faithfulness

    check_fields(cfg)
    if not cfg.bundle or not cfg.out:
        raise ConfigError("--bundle and --out are required")
    if sum(x is not None for x in (cfg.prompt, cfg.image, cfg.data)) != 1:
        raise ConfigError("give exactly one of --prompt, --image or --data")
    if cfg.data_mission is not None and cfg.data is None:
        raise ConfigError("--data-mission selects episodes of --data; give --data too")
    out = Path(cfg.out)
    for flag, target in [("--out", out), ("--grid", cfg.grid), ("--rollout", cfg.rollout)]:
        if target:
            check_writable_dir(Path(target).parent, f"{flag} directory")
    bundle = load_bundle(cfg.bundle)
    image = _load_image(cfg.image, bundle.config.frame_size) if cfg.image else None
    mission = cfg.mission
    if cfg.mission_share != 1.0 and (cfg.data is None or cfg.mission is None):
        raise ConfigError("--mission-share splits --data levels between --mission and the episodes' own missions; "
                          "give --data and --mission too")
    if cfg.data is not None and cfg.mission is None:
        image, mission = _first_frames(cfg.data, cfg.num_worlds, cfg.seed, bundle.config.frame_size,
                                       cfg.data_mission)
    elif cfg.data is not None:
        if cfg.data_mission is not None:
            raise ConfigError("--data-mission selects episodes by their own missions; with --mission the frames are "
                              "chosen by what they show: give one of the two")
        if not is_babyai(bundle):
            raise ConfigError(f"--mission with --data reads the frames' objects with BabyAI's tile renderings; the "
                              f"bundle {cfg.bundle} was not trained on BabyAI video")
        k = round(cfg.num_worlds * cfg.mission_share)
        size = bundle.config.frame_size
        image = _frames_showing(cfg.data, cfg.mission, k, cfg.seed, size) if k else np.zeros((0, size, size, 3), np.uint8)
        mission = [cfg.mission] * k
        if k < cfg.num_worlds:
            own, own_missions = _first_frames(cfg.data, cfg.num_worlds - k, cfg.seed + 1, size)
            idx = np.arange(cfg.num_worlds - k) % len(own)
            image, mission = np.concatenate([image, own[idx]]), mission + [own_missions[i] for i in idx]
    levels = WorldBuilder(bundle).generate(prompt=cfg.prompt, image=image, num_worlds=cfg.num_worlds,
                                           seed=cfg.seed, mission=mission)
    save_levels(out, levels)
    save_config(cfg, out.with_name(out.name + ".config.json"), bundle_fingerprint=bundle.fingerprint)
    result = {"levels": str(out), "num_worlds": len(levels), "distinct_levels": levels.distinct(),
              "bundle_fingerprint": bundle.fingerprint}
    if cfg.prompt is not None and is_babyai(bundle):
        # Share of these levels that show what the prompt names and exactly one agent (read tile by tile).
        r = prompt_faithfulness(bundle, cfg.prompt, levels=levels)
        result["prompt_faithful"] = round(r["faithful"], 4)
        result["prompt_named_objects_per_level"] = round(r["named_objects_per_level"], 2)
    if cfg.grid:
        with torch.no_grad():
            first = bundle.tokenizer.decode(torch.as_tensor(levels.first_tokens)[:, None])[:, 0]
        frames = to_uint8(first).numpy()
        result["grid"] = str(save_png(cfg.grid, frame_grid(frames)))
    if cfg.rollout:
        n = min(cfg.rollout_envs, len(levels))
        world = World(bundle, n, max_episode_steps=cfg.max_episode_steps, seed=cfg.seed)
        pics = [frame_grid(world.reset(levels[:n]).frames)]
        rng = np.random.default_rng(cfg.seed)
        script = [s.strip() for s in cfg.script.split(",") if s.strip()]
        unknown = [s for s in script if s not in world.action_names]
        if cfg.policy == "scripted" and (unknown or not script):
            raise ConfigError(f"--script {cfg.script!r}: unknown actions {unknown}; expected names from "
                              f"{world.action_names}")
        for t in range(cfg.rollout_steps):
            if cfg.policy == "random":
                acts = rng.integers(0, world.num_actions, n)
            else:
                acts = np.full(n, world.action_names.index(script[t % len(script)]))
            pics.append(frame_grid(world.step(acts).frames))
        result["rollout"] = str(save_gif(cfg.rollout, pics))
    return result
