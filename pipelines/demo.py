"""``genie-sima demo``: the whole loop on a local Ray, end to end.

    genie-sima demo [--out runs/demo] [--setting laptop|micro] [any field below]

1. collect   real BabyAI GoToLocal video with the scripted bot (+ random actions)   -> OUT/data
2. pretrain  the world model (tokenizer, latent actions, dynamics, heads, prior)     -> OUT/world
3. generate  levels from a text prompt, a level grid and an imagined-rollout GIF     -> OUT/levels
             and the imagined training worlds: real first frames of the videos, those that show
             what the prompt names with the prompt as their mission, the rest with their own   -> OUT/levels/starts.h5
4. bc        behaviour cloning from latent actions (videos labelled by the world model) -> OUT/bc
5. train     PPO in imagination on those worlds, starting from the cloned policy      -> OUT/ppo
6. baseline  PPO in the REAL game, given as many real frames as the videos hold       -> OUT/real_ppo
7. evaluate  every policy in the REAL game beside random and the bot, with GIFs, and its imagined
             success from the same real starts beside what the same actions win in the game  -> OUT/eval
8. report    OUT/report.html (tables, level grid, curves, real-vs-imagined GIFs)

The imagination-trained agent never sees a real reward: it learns from the videos (labelled by the world
model's latent actions), the adapter's <= 200 labelled transitions, and the world model's own reward
head. Re-running the same command skips finished steps and resumes unfinished ones. ``--setting laptop``
(default) is sized for 2 CPU cores in about 20 minutes; ``--setting micro`` is a smoke test (minutes).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic_io import check_writable_dir, write_json_atomic
from .config import config_field as _f, save_config
from .errors import ConfigError

FROZEN = 2**62  # freeze_vision_steps that outlasts any run

# Per-setting defaults; a field given on the command line wins.
SETTINGS: dict[str, dict] = {
    "laptop": {},
    "micro": dict(episodes=32, episodes_per_shard=8, val_fraction=0.25, preset="micro", world_overrides="", num_worlds=4,
                  num_starts=4,
                  bc_steps=20, ppo_envs=4, ppo_rollout_steps=16, ppo_minibatch=32, ppo_timesteps=128,
                  real_ppo_envs=4, real_ppo_rollout_steps=16, real_ppo_timesteps=64,
                  ppo_critic_warmup=0, ppo_real_eval_episodes=2,
                  eval_levels="BabyAI-GoToRedBall-v0", eval_episodes=2, eval_imagined=2, gifs=1),
}


@dataclass
class DemoConfig:
    out: str = _f("runs/demo", "run directory (every step writes a sub-directory; report.html at the top)")
    setting: str = _f("laptop", "defaults for the fields below", choices=tuple(SETTINGS))
    source: str = _f("babyai:BabyAI-GoToLocal-v0", "game to collect video from")
    episodes: int = _f(2500, "episodes of video to collect")
    episodes_per_shard: int = _f(100, "episodes per HDF5 shard")
    epsilon: float = _f(0.3, "random-action probability of the collecting bot")
    val_fraction: float = _f(0.1, "share of the collected episodes held out for the world model's evaluation")
    preset: str = _f("tiny", "world-model preset")
    world_overrides: str = _f("tok_steps=1000,head_steps=800,prior_steps=500,adapter_key_steps=600,"
                              "adapter_key_transitions=12000,eval_prompt_levels=64",
                              "world-model config overrides (the laptop default trims the tiny preset's steps "
                              "to fit the demo's time budget)")
    prompt: str = _f("go to the red ball", "prompt for the generated levels and the mission of the imagined training "
                                           "worlds that show what it names")
    num_worlds: int = _f(256, "levels generated from the prompt (grid, rollout GIF, prompt faithfulness)")
    ppo_levels: str = _f("starts", "imagined training worlds: 'starts' (real first frames of the videos, see "
                                   "--starts-share) or 'prompt' (the levels generated from --prompt, 3-4 named objects "
                                   "per room where the real game has 1-2: easier than the game)",
                         choices=("starts", "prompt"))
    num_starts: int = _f(1024, "real-start levels for PPO in imagination (--ppo-levels starts)", at_least=1)
    starts_share: float = _f(0.7, "share of the real-start levels that are first frames showing what --prompt names, "
                                  "with --prompt as their mission; the rest keep their episodes' own missions (so "
                                  "the agent keeps its other instructions)", at_least=0.0, at_most=1.0)
    bc_steps: int = _f(800, "behaviour-cloning gradient steps")
    ppo_envs: int = _f(128, "imagined envs stepped per server call")
    ppo_rollout_steps: int = _f(32, "steps per env per PPO iteration (train batch = envs x steps: 4,096)")
    ppo_minibatch: int = _f(512, "PPO minibatch size")
    ppo_epochs: int = _f(3, "PPO epochs per train batch (3 x 8 minibatches: 24 gradient steps per iteration; 4 "
                            "epochs learned as much per imagined step, 20% slower)", at_least=1)
    ppo_timesteps: int = _f(57344, "imagined env steps of PPO")
    ppo_lr: float = _f(3e-4, "PPO learning rate")
    ppo_aux: bool = _f(False, "the language-matching and contrastive losses during PPO in imagination (with the "
                              "vision encoder frozen they train only the language encoder; off: the same real-game "
                              "success, a tenth less learner time)")
    ppo_gae_lambda: float = _f(0.95, "GAE lambda of PPO in imagination")
    ppo_kl_coeff: float = _f(0.0, "PPO's adaptive KL(old || new policy) penalty in imagination (0: off, the "
                                  "clipped objective alone)")
    ppo_reference_kl: float = _f(0.0, "weight of KL(policy || the cloned policy) in PPO's loss (0: off; 0.05 with "
                                      "lr 1e-4 and RLlib's lambda and KL penalty: +4 points on GoToRedBall where "
                                      "these settings gave +9.5)")
    ppo_critic_warmup: int = _f(8, "gradient steps that train only the value function before PPO moves the clone")
    ppo_real_eval_every: int = _f(4, "PPO iterations between short real-game evaluations of the policy (success "
                                     "beside imagined success in the report)")
    ppo_real_eval_episodes: int = _f(30, "real-game episodes per evaluation during PPO")
    ppo_freeze_vision: bool = _f(True, "keep the clone's vision encoder frozen during PPO in imagination (its agent/"
                                       "direction detectors are trained only by BC). Real-game success frozen vs "
                                       "not: full size 85.5/86.0% vs 83.0/81.0%; a demo clone on prompt levels "
                                       "76.5/76.5% vs 74.5/74.5%")
    real_ppo_timesteps: int = _f(0, "real-game steps for the real-game PPO baseline (0: as many frames as the "
                                    "collected videos hold)")
    real_ppo_envs: int = _f(32, "real-game envs of the real-game PPO baseline (from scratch: smaller batches, more "
                                "updates on its few frames)")
    real_ppo_rollout_steps: int = _f(32, "steps per env per iteration of the real-game PPO baseline")
    eval_levels: str = _f("BabyAI-GoToRedBall-v0,BabyAI-GoToLocal-v0", "real BabyAI levels to evaluate on")
    eval_episodes: int = _f(100, "real-game episodes per level and agent")
    eval_imagined: int = _f(50, "episodes per level and policy also played in the world model from their real first "
                                 "frames, their actions replayed in the real game (imagined vs real success)")
    eval_greedy: bool = _f(False, "evaluate with each policy's most probable action (default: sample, as in "
                                  "training; greedy cloned policies loop: 43% vs 72% success on GoToRedBall)")
    gifs: int = _f(2, "real-vs-imagined GIFs per policy and level")
    seed: int = _f(0, "seed")
    threads: int = _f(2, "torch threads for in-process steps")
    wandb: str = _f("offline", "wandb mode", choices=("offline", "online", "disabled"))


def apply_setting(cfg: DemoConfig, given: set[str]) -> DemoConfig:
    """Fill the fields the user did not give from ``--setting``."""
    preset = SETTINGS[cfg.setting]
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in given})


def _parse_overrides(text: str) -> dict:
    from genie_world.config import WorldModelConfig

    types = {f.name: f.type for f in dataclasses.fields(WorldModelConfig)}
    out = {}
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise ConfigError(f"--world-overrides {text!r}: {item!r} is not FIELD=VALUE with FIELD a world-model "
                              f"config field (e.g. dyn_steps=600)")
        kind = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes")}.get(
            str(types[key]).replace("<class '", "").replace("'>", ""), str)
        try:
            out[key] = kind(value.strip())
        except ValueError:
            raise ConfigError(f"--world-overrides: {key}={value!r} is not a valid {types[key]}") from None
    return out


class _Steps:
    """Runs named steps, records each one's wall clock in OUT/timings.json, logs what it skips."""

    def __init__(self, out: Path, log):
        self.out, self.log = out, log
        self.path = out / "timings.json"
        self.timings = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, output: Path, fn):
        """Run ``fn`` unless this step finished before (timed here, and its ``output`` still exists)."""
        if name in self.timings and output.exists():
            self.log(f"demo: {name}: already done, skipped")
            return None
        self.log(f"demo: {name} ...")
        t0 = time.perf_counter()
        result = fn()
        self.timings[name] = round(time.perf_counter() - t0, 1)
        write_json_atomic(self.path, self.timings)
        self.log(f"demo: {name} done in {self.timings[name]:.0f}s")
        return result


def _video_frames(data: Path) -> int:
    from .data.manifest import read_manifest

    return int(sum(row["length"] + 1 for row in read_manifest(data, split=None)))


def run_demo(cfg: DemoConfig, log=None) -> dict:
    import ray

    from .bc_latent import BCConfig, behaviour_clone
    from .collect import CollectConfig, collect
    from .evaluate import EvaluateConfig, evaluate
    from .generate import GenerateConfig, generate
    from .pretrain import PretrainArgs, pretrain
    from .ray_runtime import ensure_ray
    from .report import write_report
    from .train_policy import TrainConfig, latest_checkpoint, train

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(cfg.out).resolve()
    check_writable_dir(out, "--out")
    overrides = _parse_overrides(cfg.world_overrides)
    save_config(cfg, out / "demo.config.json")
    data, world, levels, bc, ppo, real_ppo, ev = (out / n for n in ("data", "world", "levels", "bc", "ppo",
                                                                    "real_ppo", "eval"))
    steps = _Steps(out, log)
    t0 = time.perf_counter()
    started = ensure_ray()  # one local Ray for every step
    try:
        steps.run("collect", data / "manifest.parquet", lambda: collect(CollectConfig(
            source=cfg.source, out=str(data), episodes=cfg.episodes, policy="mixed", epsilon=cfg.epsilon,
            episodes_per_shard=cfg.episodes_per_shard, val_fraction=cfg.val_fraction, seed=cfg.seed, workers=2),
            log=log))
        steps.run("pretrain", world / "metrics.json", lambda: pretrain(
            PretrainArgs(data=str(data), out=str(world), preset=cfg.preset, wandb=cfg.wandb),
            {**overrides, "seed": cfg.seed}, log=log))
        steps.run("generate", levels / "grid.png", lambda: write_json_atomic(levels / "generate.json", generate(
            GenerateConfig(bundle=str(world), out=str(levels / "levels.h5"), prompt=cfg.prompt, num_worlds=cfg.num_worlds,
                           seed=cfg.seed, grid=str(levels / "grid.png"), rollout=str(levels / "rollout.gif"),
                           rollout_envs=min(16, cfg.num_worlds)))))
        steps.run("bc", bc / "bc_metrics.json", lambda: behaviour_clone(BCConfig(
            bundle=str(world), data=str(data), out=str(bc), steps=cfg.bc_steps, seed=cfg.seed, threads=cfg.threads,
            wandb=cfg.wandb), log=log))
        level_file = levels / ("starts.h5" if cfg.ppo_levels == "starts" else "levels.h5")
        if cfg.ppo_levels == "starts":
            steps.run("starts", level_file, lambda: write_json_atomic(levels / "starts.json", generate(GenerateConfig(
                bundle=str(world), out=str(level_file), data=str(data), mission=cfg.prompt,
                mission_share=cfg.starts_share, num_worlds=cfg.num_starts, seed=cfg.seed))))
        level = cfg.eval_levels.split(",")[0].strip()  # the real level imagination's prompt stands for
        steps.run("ppo_in_imagination", ppo / "checkpoints", lambda: train(TrainConfig(
            env=f"world://{world}?level_file={level_file}", out=str(ppo), num_envs=cfg.ppo_envs,
            rollout_steps=cfg.ppo_rollout_steps, minibatch_size=cfg.ppo_minibatch, num_epochs=cfg.ppo_epochs,
            total_timesteps=cfg.ppo_timesteps, lr=cfg.ppo_lr, gae_lambda=cfg.ppo_gae_lambda, kl_coeff=cfg.ppo_kl_coeff,
            init_policy=str(bc), resume=latest_checkpoint(ppo) is not None, seed=cfg.seed, wandb=cfg.wandb,
            threads=cfg.threads, freeze_vision_steps=FROZEN if cfg.ppo_freeze_vision else 0,
            reference_kl_coeff=cfg.ppo_reference_kl, critic_warmup_steps=cfg.ppo_critic_warmup,
            **({} if cfg.ppo_aux else {"language_coeff": 0.0, "contrastive_coeff": 0.0}),
            real_eval_level=level, real_eval_every=cfg.ppo_real_eval_every,
            real_eval_episodes=cfg.ppo_real_eval_episodes), log=log))
        real_frames = cfg.real_ppo_timesteps or _video_frames(data)
        steps.run("real_game_ppo", real_ppo / "checkpoints", lambda: train(TrainConfig(
            env=f"babyai:{level}", out=str(real_ppo), num_envs=cfg.real_ppo_envs,
            rollout_steps=cfg.real_ppo_rollout_steps,
            total_timesteps=real_frames, resume=latest_checkpoint(real_ppo) is not None, seed=cfg.seed,
            wandb=cfg.wandb, threads=cfg.threads), log=log))
        steps.run("evaluate", ev / "evaluation.json", lambda: evaluate(EvaluateConfig(
            policy=f"bc={bc},imagination_ppo={ppo},real_game_ppo={real_ppo}", levels=cfg.eval_levels,
            episodes=cfg.eval_episodes, out=str(ev), bundle=str(world), gifs=cfg.gifs, threads=cfg.threads,
            greedy=cfg.eval_greedy, imagined=min(cfg.eval_imagined, cfg.eval_episodes)),
            log=log))
    finally:
        if started:
            ray.shutdown()
    steps.timings["total"] = round(sum(v for k, v in steps.timings.items() if k != "total"), 1)
    write_json_atomic(steps.path, steps.timings)
    report = write_report(out)
    log(f"demo: finished in {time.perf_counter() - t0:.0f}s this run; open {report}")
    return {"out": str(out), "report": str(report), "timings": steps.timings,
            "evaluation": json.loads((ev / "evaluation.json").read_text())["rows"]}

