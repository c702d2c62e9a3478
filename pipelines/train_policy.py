"""``genie-sima train``: PPO (+ language matching + contrastive losses) with RLlib learners, in an
imagined world served by a WorldModelServer, or in the real BabyAI game (the baseline).

    --env "world://RUN?prompt=go to the red ball&num_levels=256&max_episode_steps=64"
    --env babyai:BabyAI-GoToLocal-v0

World envs: the algorithm (``WorldPPO``, pipelines/world_ppo.py) starts ``--world-servers`` (default 1) named
WorldModelServers per run (each on a GPU if there is one) before it builds its EnvRunners, hands their names to
the envs, and kills them on ``algo.stop()``; each EnvRunner uses one server (round-robin by its index) and a
restarted EnvRunner finds the same server by name. Each EnvRunner's ``step`` is one call to its server for all
its envs.

World envs also get a shared replay (``--replay-capacity``, default 1e6 transitions; 0: off): every
finished episode's world-model tokens, actions, rewards, flags, mission ids and episode id go in, in one add
per episode (pipelines/replay_feed.py), and the Learners draw the language-matching and contrastive losses'
batches from it (pipelines/replay_aux_batches.py). It is checkpointed with each training checkpoint
(``iter_NNNNNN/replay``) and restored by ``--resume`` (pipelines/train_replay.py).

Writes OUT/config.json (resolved), OUT/tokenizer.json, OUT/checkpoints/iter_NNNNNN (RLlib checkpoints,
written to a temp dir and renamed), OUT/tensorboard and offline wandb, OUT/logs/train_events.jsonl, and for world
envs OUT/videos/rollout_iter_NNNNNN.gif (``--video-every``; also in TensorBoard's Images tab and wandb as
``rollout/imagined``; pipelines/train_videos.py).
``--resume`` continues from the newest checkpoint.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .atomic_io import check_writable_dir, commit_dir, write_json_atomic
from .config import check_fields, config_field as _f, save_config
from .errors import ConfigError


MAX_IDLE_ITERATIONS = 20  # iterations in a row without a sampled step before train gives up


@dataclass
class TrainConfig:
    env: str = _f("", 'where to train: "world://RUN?prompt=..." (imagination) or "babyai:LEVEL" (real game)')
    out: str = _f("", "run directory (checkpoints, logs, config)")
    agent: str = _f("sima", "policy architecture", choices=("sima",))
    num_envs: int = _f(16, "envs per env runner (one server call steps them all)", at_least=1)
    rollout_steps: int = _f(64, "steps per env per iteration (train batch = envs x steps x runners)", at_least=1)
    total_timesteps: int = _f(100_000, "stop after this many env steps", at_least=1)
    num_env_runners: int = _f(0, "RLlib EnvRunner actors (0: sample in the driver process)")
    num_learners: int = _f(0, "RLlib Learner actors (0: learn in the driver process)")
    world_servers: int = _f(1, "world:// envs: WorldModelServer actors the run starts (e.g. one per GPU); the "
                               "EnvRunners are spread round-robin over them; at most max(1, --num-env-runners)",
                            at_least=1)
    world_server_gpus: float = _f(-1.0, "GPUs per world server; -1: 1 when the Ray cluster has a GPU when the run "
                                        "starts, else 0 (an autoscaling cluster whose GPU nodes start at zero: pass 1)")
    world_server_resource: str = _f("", "a custom resource each world server requests one unit of, e.g. "
                                        "world_server (cluster/*.yaml advertise it on GPU nodes only); empty: none")
    learner_gpus: float = _f(0.0, "GPUs per RLlib Learner (num_gpus_per_learner; with --num-learners 0 the "
                                  "driver's own Learner)", at_least=0)
    minibatch_size: int = _f(256, "PPO minibatch size")
    num_epochs: int = _f(4, "PPO epochs per iteration", at_least=1)
    lr: float = _f(3e-4, "learning rate (0: the weights stay as they are)", at_least=0)
    gamma: float = _f(0.99, "discount", above=0, at_most=1)
    gae_lambda: float = _f(1.0, "GAE lambda of the advantages (RLlib's default 1.0: Monte-Carlo returns minus the "
                                "value; 0.95 trades a little bias for much less variance)", at_least=0, at_most=1)
    kl_coeff: float = _f(0.2, "initial weight of PPO's adaptive KL(old policy || new policy) penalty (RLlib's "
                              "default 0.2); 0 switches the penalty off (the clipped objective alone)", at_least=0)
    language_coeff: float = _f(0.1, "lambda: weight of the CLIP-style instruction/vision matching loss", at_least=0)
    contrastive_coeff: float = _f(0.1, "gamma: weight of the MoCo-style contrastive loss", at_least=0)
    moco_queue_size: int = _f(1024, "MoCo negatives queue")
    freeze_vision_steps: int = _f(0, "keep the vision encoder frozen for this many gradient steps")
    reference_kl_coeff: float = _f(0.0, "weight of KL(policy || the --init-policy it started from) in the loss: PPO "
                                        "improves on a cloned policy instead of drifting from it (0: off)", at_least=0)
    critic_warmup_steps: int = _f(0, "the first N gradient steps train the value function only (a fresh critic's "
                                     "noisy advantages otherwise move the policy)", at_least=0)
    real_eval_level: str = _f("", "a real BabyAI level the policy plays every --real-eval-every iterations and at the "
                                  "end: its success rate is logged beside imagined success (empty: none)")
    real_eval_every: int = _f(0, "iterations between real-game evaluations (0: only at the end, when "
                                 "--real-eval-level is set)", at_least=0)
    real_eval_episodes: int = _f(50, "real-game episodes per evaluation (sampled actions, fixed level seeds)",
                                 at_least=1)
    vision_dim: int = _f(128, "vision embedding size")
    hidden_dim: int = _f(256, "fused policy/value hidden size")
    compile: bool = _f(False, "torch.compile the learner's module (RLlib torch_compile_learner)")
    checkpoint_every: int = _f(10, "iterations between checkpoints (and one at the end)", at_least=1)
    replay_capacity: int = _f(1_000_000, "world:// envs: transitions the shared replay holds (world-model tokens, "
                                         "split over --replay-shards); 0 switches the replay off")
    replay_shards: int = _f(1, "replay shard actors (an episode always lives in one)", at_least=1)
    aux_batch_size: int = _f(64, "transitions drawn from the replay per gradient step for the language-matching "
                                 "and contrastive losses (the PPO minibatch is used while the replay is empty)")
    video_every: int = _f(10, "world:// envs: every N iterations (and at the last one), a rollout video of the greedy "
                              "policy in imagination to TensorBoard, wandb and OUT/videos; 0: off")
    video_steps: int = _f(32, "env steps per rollout video (one env)")
    resume: bool = _f(False, "continue from the newest checkpoint in --out")
    init_policy: str | None = _f(None, "start from this policy's weights: a `genie-sima bc --out` run (behaviour "
                                       "cloning from latent actions) or another train run / checkpoint")
    wandb: str = _f("offline", "wandb mode", choices=("offline", "online", "disabled"))
    seed: int = _f(0, "seed")
    threads: int = _f(2, "torch threads of the driver (EnvRunner and learner) and of each world server (CPU); sampling "
                         "and learning take turns, so each may use the cores (2 cores: 1.5x the env steps/s of 1)")
    address: str | None = _f(None, "Ray cluster address (default: RAY_ADDRESS or a local Ray)")


@dataclass
class EnvSpec:
    kind: str  # world | babyai
    target: str  # bundle path or level id
    params: dict


def parse_env(spec: str) -> EnvSpec:
    if spec.startswith("world://"):
        parsed = urllib.parse.urlsplit(spec)
        target = urllib.parse.unquote(parsed.netloc + parsed.path)
        params = dict(urllib.parse.parse_qsl(parsed.query, strict_parsing=False))
        known = {"prompt", "level_file", "num_levels", "max_episode_steps", "mission", "seed", "capacity"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"--env {spec!r}: unknown parameters {unknown}; expected some of {sorted(known)}")
        if ("prompt" in params) == ("level_file" in params):
            raise ConfigError(f"--env {spec!r}: give exactly one of prompt=... or level_file=...")
        if not target:
            raise ConfigError(f"--env {spec!r}: expected world://RUN?prompt=... with RUN a world bundle directory")
        return EnvSpec("world", target, params)
    if spec.startswith("babyai:"):
        return EnvSpec("babyai", spec.split(":", 1)[1], {})
    raise ConfigError(f"--env {spec!r}: expected 'world://RUN?prompt=...' or 'babyai:LEVEL'")


def check_world_inputs(spec: EnvSpec):
    """Load the bundle's vocabulary and check the prompt, mission and level file against it (raises the
    world model's own errors: BundleError, UnknownWordsError, LevelFileError); returns the bundle."""
    from genie_world.bundle import load_bundle
    from genie_world.levels import load_levels

    # Every part: the world servers load them all, and a part missing there killed the actor (ActorDiedError)
    # instead of naming the part.
    bundle = load_bundle(spec.target)
    if bundle.adapter is None:  # the world server's World (and the replay's action count) use real actions
        raise ConfigError(f"--env {spec.target}: world bundle has no action_adapter.json; train acts with real "
                          "actions (pretrain with an action adapter)")
    p = spec.params
    for what in ("prompt", "mission"):
        if what in p:
            _check_words(bundle, p[what], what)
    if "level_file" in p:
        load_levels(p["level_file"], bundle)
    for key in ("num_levels", "max_episode_steps", "seed", "capacity"):
        if key in p:
            try:
                int(p[key])
            except ValueError:
                raise ConfigError(f"--env: {key}={p[key]!r} is not an integer") from None
    return bundle


def _check_words(bundle, text: str, what: str) -> None:
    from genie_world.text_encoder import UnknownWordsError

    try:
        bundle.vocab.encode(text, bundle.config.text_max_len)
    except UnknownWordsError as e:
        raise UnknownWordsError(f"--env {what}={text!r}: {e}") from None


def babyai_missions(level: str, n: int = 300, seed: int = 0) -> list[str]:
    """The missions a BabyAI level generates (for the instruction vocabulary)."""
    from .data.babyai_game import BabyAIGame

    game = BabyAIGame(level)
    out = []
    for i in range(n):
        game.reset(seed + i)
        out.append(game.mission)
    game.close()
    return out


def latest_checkpoint(out: Path) -> Path | None:
    """The newest ``OUT/checkpoints/iter_*`` of a train run, or None."""
    ckpts = sorted((out / "checkpoints").glob("iter_*"))
    return ckpts[-1] if ckpts else None


def _check_world_servers(cfg: TrainConfig) -> int:
    """``--world-servers``, checked: >= 1, and no more than the EnvRunners that would use them."""
    count, runners = cfg.world_servers, max(1, cfg.num_env_runners)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"--world-servers must be an integer >= 1, got {count!r}")
    if count > runners:
        raise ConfigError(f"--world-servers {count} > {runners} env runners (--num-env-runners "
                          f"{cfg.num_env_runners}): each EnvRunner uses one server, so {count - runners} would "
                          "sit idle; use at most as many servers as EnvRunners")
    return count


def _world_server_gpus(cfg: TrainConfig) -> float:
    """``--world-server-gpus``, with -1 resolved against the Ray cluster this run joined (not the driver's own
    devices: on a cluster the driver runs on a CPU head node)."""
    if cfg.world_server_gpus >= 0:
        return float(cfg.world_server_gpus)
    import ray

    if not ray.is_initialized():  # a spec made outside a run: this machine's own devices
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def world_server_spec(cfg: TrainConfig, spec: EnvSpec, run: str) -> dict:
    """What ``WorldPPO`` starts for a world:// run: ``--world-servers`` servers named after the run (one:
    ``genie-sima-train-RUN``, which tests and tools find it by; several: ``genie-sima-train-RUN-i``), each on the
    GPU when there is one and sized for the envs of the EnvRunners that use it: ceil(runners / servers) *
    num_envs (the EnvRunners are spread round-robin, pipelines.mission_tokens.world_server_for). An env spec's
    ``capacity=`` overrides the size of each server."""
    count = _check_world_servers(cfg)
    runners = max(1, cfg.num_env_runners)
    capacity = int(spec.params.get("capacity", math.ceil(runners / count) * cfg.num_envs))
    return {"name": f"genie-sima-train-{run}", "bundle": spec.target, "count": count,
            "num_gpus": _world_server_gpus(cfg), "num_cpus": 0.5, "capacity": capacity,
            "resources": {cfg.world_server_resource: 1} if cfg.world_server_resource else {},
            "max_batch": capacity, "max_episode_steps": int(spec.params.get("max_episode_steps", 64)),
            "threads": cfg.threads}


def build_algo_config(cfg: TrainConfig, spec: EnvSpec, tokenizer_json: dict, server: dict | None, replay=None):
    """``server``: ``world_server_spec(...)`` for world envs (the algorithm starts its ``count`` servers and hands
    their names to the envs, each EnvRunner's envs picking one; pipelines/world_ppo.py).
    ``replay``: the run's ``TrainReplay`` (world envs with the replay on): EnvRunners feed it finished
    episodes (``ReplayFeed``), Learners draw their auxiliary-loss batches from it."""
    import gymnasium as gym
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.tune.registry import register_env

    from sima_policy.learner import SimaPPOLearner
    from sima_policy.rl_module import SimaRLModule

    from .mission_tokens import babyai_env_creator, world_vector_env_creator

    runners = max(1, cfg.num_env_runners)
    batch = cfg.num_envs * cfg.rollout_steps * runners
    from .world_ppo import WorldPPOConfig

    config = WorldPPOConfig()
    if spec.kind == "world":
        register_env("genie-sima-world", world_vector_env_creator)
        config = config.world_server(**server)
        p = spec.params
        env_config = {"tokenizer": tokenizer_json, "seed": cfg.seed,
                      "num_levels": int(p.get("num_levels", 256)), "max_len": 16}
        env_config.update({k: p[k] for k in ("prompt", "level_file", "mission") if k in p})
        config = config.environment("genie-sima-world", env_config=env_config).env_runners(
            gym_env_vectorize_mode=gym.VectorizeMode.VECTOR_ENTRY_POINT)
    else:
        register_env("genie-sima-babyai", babyai_env_creator)
        config = config.environment("genie-sima-babyai", env_config={"level": spec.target, "tokenizer": tokenizer_json})
    learner_config = {"language_coeff": cfg.language_coeff, "contrastive_coeff": cfg.contrastive_coeff,
                      "moco_queue_size": cfg.moco_queue_size, "freeze_vision_steps": cfg.freeze_vision_steps,
                      "reference_kl_coeff": cfg.reference_kl_coeff, "critic_warmup_steps": cfg.critic_warmup_steps}
    if replay is not None:
        config = config.callbacks(replay.feed_callback())
        if cfg.num_learners <= 1:
            learner_config["aux_source"] = replay.aux_batches(spec.target, tokenizer_json, cfg.aux_batch_size, 16)
        # else: the aux losses stay on the PPO minibatch. Replay rows pass through the module outside its
        # DDP-wrapped forward, which multi-learner (DDP) runs have not been tested with.
    model_config = {"vision_dim": cfg.vision_dim, "hidden_dim": cfg.hidden_dim, "moco_queue_size": cfg.moco_queue_size}
    if cfg.init_policy:  # PPO continues the cloned network, so it is built with that network's design
        model_config.update(policy_architecture(cfg.init_policy))
    config = (config
              .env_runners(num_env_runners=cfg.num_env_runners, num_envs_per_env_runner=cfg.num_envs,
                           rollout_fragment_length=cfg.rollout_steps, num_cpus_per_env_runner=0.5)
              .training(train_batch_size_per_learner=batch, minibatch_size=min(cfg.minibatch_size, batch),
                        num_epochs=cfg.num_epochs, lr=cfg.lr, gamma=cfg.gamma, lambda_=cfg.gae_lambda,
                        use_kl_loss=cfg.kl_coeff > 0, kl_coeff=cfg.kl_coeff)
              .rl_module(rl_module_spec=RLModuleSpec(module_class=SimaRLModule, model_config=model_config))
              .learners(num_learners=cfg.num_learners, num_gpus_per_learner=cfg.learner_gpus,
                        learner_class=SimaPPOLearner,
                        learner_config_dict=learner_config)
              # A dead EnvRunner is restarted (and finds the world server by name again); an env whose step
              # fails -- e.g. its world server died and Ray is restarting it -- is recreated, re-opens its
              # block on the (restarted) server, and RLlib discards the episodes it cut short.
              .fault_tolerance(restart_failed_env_runners=True, restart_failed_sub_environments=True)
              .debugging(seed=cfg.seed))
    if cfg.compile:
        config = config.framework(torch_compile_learner=True)
    return config


def _flat_metrics(result: dict) -> dict:
    out = {}
    runners = result.get("env_runners", {})
    for k in ("episode_return_mean", "episode_len_mean", "num_env_steps_sampled", "num_env_steps_sampled_lifetime",
              "num_episodes_lifetime", "replay_episodes_added", "replay_transitions_added",
              "replay_episodes_incomplete", "replay_episodes_from_chunks"):
        if k in runners:
            out[f"env_runners/{k}"] = runners[k]
    for mid, m in result.get("learners", {}).items():
        if not isinstance(m, dict):
            continue
        for k in ("total_loss", "policy_loss", "vf_loss", "entropy", "language_matching_loss",
                  "language_matching_accuracy", "contrastive_loss", "contrastive_accuracy", "moco_queue_fill",
                  "aux_replay_samples", "aux_from_source", "replay_size"):
            if k in m:
                out[f"learners/{mid}/{k}"] = m[k]
    return {k: float(v) for k, v in out.items() if isinstance(v, numbers.Real)}  # numpy scalars too


def _time_split(result: dict, train_s: float) -> dict:
    """Where this iteration's seconds went: ``time/train_s`` (``algo.train()``) = ``time/sample_s`` (EnvRunners;
    ``time/world_s``, the world servers' own stepping, is added by the caller) + ``time/learn_s`` (the PPO
    update; of it ``time/learn_make_batch_s``: the learner connector with GAE's value forward,
    ``time/learn_reference_s``: the reference policy's logits, ``time/learn_aux_draw_s``: the auxiliary losses'
    replay rows) + ``time/sync_weights_s`` + RLlib's bookkeeping. WorldPPO makes the timers per iteration."""
    from ray.rllib.core import ALL_MODULES
    from ray.rllib.utils.metrics import (ENV_RUNNER_SAMPLING_TIMER, LEARNER_UPDATE_TIMER,
                                         SYNCH_WORKER_WEIGHTS_TIMER, TIMERS)

    from sima_policy.learner import AUX_DRAW_S_KEY, MAKE_BATCH_S_KEY, REFERENCE_S_KEY

    timers, learner = result.get(TIMERS, {}), result.get("learners", {}).get(ALL_MODULES, {})
    out = {"time/train_s": train_s, "time/sample_s": timers.get(ENV_RUNNER_SAMPLING_TIMER),
           "time/learn_s": timers.get(LEARNER_UPDATE_TIMER), "time/sync_weights_s": timers.get(SYNCH_WORKER_WEIGHTS_TIMER)}
    for key in (MAKE_BATCH_S_KEY, REFERENCE_S_KEY, AUX_DRAW_S_KEY):
        out[f"time/learn_{key}"] = learner.get(key)
    return {k: float(v) for k, v in out.items() if isinstance(v, numbers.Real) and math.isfinite(v)}


def _split_text(timing: dict) -> str:
    """"sample 1.1 s (world 0.6 s), learn 9.8 s": the progress line's view of ``_time_split``."""
    parts = [f"sample {timing['time/sample_s']:.1f} s" if "time/sample_s" in timing else "",
             f"(world {timing['time/world_s']:.1f} s)" if "time/world_s" in timing else "",
             f"learn {timing['time/learn_s']:.1f} s" if "time/learn_s" in timing else ""]
    return " ".join(p for p in parts if p)


def train(cfg: TrainConfig, log=None) -> dict:
    """Train a policy as ``cfg`` says; the caller's torch threads and OMP_NUM_THREADS are as they were
    afterwards (``--threads`` sets both for the run, and a caller such as the demo or a test runs other
    work after it in the same process)."""
    import torch

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        return _train(cfg, log)
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def _train(cfg: TrainConfig, log=None) -> dict:
    import ray
    import torch

    from sima_policy.instruction_tokenizer import InstructionTokenizer

    from .ray_runtime import ensure_ray
    from .run_logger import RunLogger

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_fields(cfg)  # the Python API too, not only the CLI's make_config
    if not cfg.env or not cfg.out:
        raise ConfigError("--env and --out are required")
    if cfg.reference_kl_coeff > 0 and not cfg.init_policy:
        raise ConfigError("--reference-kl-coeff needs --init-policy (the policy the KL term pulls towards)")
    if cfg.replay_capacity and cfg.replay_capacity < 2 * cfg.replay_shards:
        raise ConfigError(f"--replay-capacity {cfg.replay_capacity}: expected 0 (off) or >= 2 rows per shard "
                          f"({cfg.replay_shards} shards)")
    if cfg.video_every < 0 or cfg.video_steps < 1:
        raise ConfigError(f"--video-every must be >= 0 (0: off) and --video-steps >= 1, got {cfg.video_every} "
                          f"and {cfg.video_steps}")
    if cfg.aux_batch_size < 2:
        raise ConfigError(f"--aux-batch-size must be >= 2 (the contrastive losses need pairs), "
                          f"got {cfg.aux_batch_size}")
    if cfg.world_server_gpus < 0 and cfg.world_server_gpus != -1:
        raise ConfigError(f"--world-server-gpus must be -1 (auto) or >= 0, got {cfg.world_server_gpus}")
    if cfg.learner_gpus < 0:
        raise ConfigError(f"--learner-gpus must be >= 0, got {cfg.learner_gpus}")
    spec = parse_env(cfg.env)
    if spec.kind == "world":
        _check_world_servers(cfg)
    # Refuse bad worlds before anything is written or started: inside RLlib, an env that cannot be made
    # is recreated again and again (restart_failed_sub_environments), never refused.
    bundle = check_world_inputs(spec) if spec.kind == "world" else None
    out = Path(cfg.out).resolve()
    check_writable_dir(out, "--out")
    latest = latest_checkpoint(out)
    if latest is not None and not cfg.resume:
        raise ConfigError(f"--out {out} already has checkpoints ({latest.name}); pass --resume to continue "
                          "or choose a new --out")
    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))  # what the Ray workers this run starts inherit

    started = ensure_ray(cfg.address)
    server_spec, replay, video = None, None, None
    try:
        if spec.kind == "world":
            tokenizer = InstructionTokenizer.from_texts(bundle.vocab.words[1:], max_len=16)
            server_spec = world_server_spec(cfg, spec, out.name)
            if cfg.replay_capacity:
                replay = _start_replay(cfg, out, bundle, resume_from=latest, log=log)
        else:
            tokenizer = InstructionTokenizer.from_texts(babyai_missions(spec.target), max_len=16)
        write_json_atomic(out / "tokenizer.json", tokenizer.to_json())
        save_config(cfg, out / "config.json")
        # Made before the algorithm: a bad level file or bundle fails here, with no algorithm to stop yet.
        if spec.kind == "world" and cfg.video_every:
            from .train_videos import ImaginedRollout

            video = ImaginedRollout(spec.target, spec.params, tokenizer.to_json(), cfg.video_steps, cfg.seed)
        algo = build_algo_config(cfg, spec, tokenizer.to_json(), server_spec, replay).build_algo()
        servers = list(algo.world_servers)  # started and owned by the algorithm; none for the real game
        if servers:
            info = algo.world_server_info
            more = f" and {len(servers) - 1} more" if len(servers) > 1 else ""
            log(f"train: world server {info['name']}{more} ({info['capacity']} envs each, bundle {info['fingerprint']})")
        try:
            if latest is not None:
                algo.restore_from_path(str(latest))
                log(f"train: resumed from {latest}")
            elif cfg.init_policy:
                init_from_policy(algo, cfg.init_policy, tokenizer.to_json())
                log(f"train: starting from the weights of {cfg.init_policy}")
            if cfg.reference_kl_coeff > 0:  # also on --resume: the reference is not in the checkpoint
                set_reference_policy(algo, cfg.init_policy)
            logger = RunLogger(out, "train", {"env": cfg.env, **{k: v for k, v in vars(cfg).items()}}, cfg.wandb)
        except BaseException:
            algo.stop()  # its world server goes with it (a driver joined to a cluster lives on)
            raise
        events = out / "logs"
        events.mkdir(exist_ok=True)
        real_eval = _real_eval(cfg, tokenizer, log) if cfg.real_eval_level else None
        steps, it, t0, result, sampled_here, idle = 0, algo.iteration, time.perf_counter(), {}, 0, 0
        gauges = _train_gauges()
        ends = [(0, 0)] * len(servers)  # per server: (terminated, truncated) counters at the last iteration
        busy = [0.0] * len(servers)  # per server: seconds its World had spent stepping at the last iteration
        replay_added = replay.stats()["transitions_added"] if replay is not None else 0  # restored ones too
        try:
            while steps < cfg.total_timesteps:
                t_iter = time.perf_counter()
                result = algo.train()
                it = algo.iteration
                if "learners" not in result:  # an EnvRunner failed and was restarted; RLlib returns no update
                    log(f"train: iteration {it}: no learner update (env runner restarted?)")
                # An iteration whose EnvRunner died reports NaN counts: keep the last known ones.
                metrics = {k: v for k, v in _flat_metrics(result).items() if math.isfinite(v)}
                steps = int(metrics.get("env_runners/num_env_steps_sampled_lifetime", steps))
                this_iter = int(metrics.get("env_runners/num_env_steps_sampled", 0))  # not lifetime: right on --resume
                sampled_here += this_iter
                idle = 0 if this_iter else idle + 1
                if idle >= MAX_IDLE_ITERATIONS:
                    raise RuntimeError(f"train: no env steps sampled in {idle} consecutive iterations: the EnvRunners "
                                       "are not coming back (see the Ray worker logs)")
                gauges["steps"].set(this_iter / max(1e-9, time.perf_counter() - t_iter))
                timing = _time_split(result, time.perf_counter() - t_iter)
                stats = [_server_stats(server, log) for server in servers]
                if replay is not None:
                    rs = replay.stats()
                    added = rs["transitions_added"] - replay_added
                    replay_added = rs["transitions_added"]
                    metrics.update({"replay/size": float(rs["size"]), "replay/transitions_added": float(replay_added),
                                    "replay/adds_per_s": added / max(1e-9, time.perf_counter() - t_iter)})
                done = [0, 0]  # episodes that ended this iteration on every server: terminated, truncated
                for j, st in enumerate(stats):
                    if st is None:
                        continue
                    now = (st["episodes_terminated"], st["episodes_truncated"])
                    if now[0] < ends[j][0] or now[1] < ends[j][1] or st["step_s"] < busy[j]:
                        ends[j], busy[j] = (0, 0), 0.0  # the server was restarted: its counters started from zero
                    done = [done[0] + now[0] - ends[j][0], done[1] + now[1] - ends[j][1]]
                    timing["time/world_s"] = timing.get("time/world_s", 0.0) + st["step_s"] - busy[j]
                    ends[j], busy[j] = now, st["step_s"]
                if sum(done):
                    metrics["imagined_success"] = done[0] / sum(done)
                    gauges["success"].set(metrics["imagined_success"])
                last = steps >= cfg.total_timesteps
                if real_eval is not None and (last or (cfg.real_eval_every and it % cfg.real_eval_every == 0)):
                    t0_eval = time.perf_counter()
                    metrics["real_success"] = real_eval(algo)
                    timing["time/real_eval_s"] = time.perf_counter() - t0_eval
                elapsed = time.perf_counter() - t0
                rate = sampled_here / max(1e-9, elapsed)
                eta = max(0.0, (cfg.total_timesteps - steps) / max(rate, 1e-9))
                log(f"train: iter {it} steps {steps}/{cfg.total_timesteps} "
                    f"return {metrics.get('env_runners/episode_return_mean', float('nan')):.3f}"
                    + (f" imagined success {metrics['imagined_success']:.2f}" if "imagined_success" in metrics else "")
                    + (f" real success {metrics['real_success']:.2f}" if "real_success" in metrics else "")
                    + f" | {rate:.0f} steps/s | ETA {eta / 60:.1f} min | {_split_text(timing)}")
                if video is not None and (it % cfg.video_every == 0 or steps >= cfg.total_timesteps):
                    t0_video = time.perf_counter()
                    _rollout_video(algo, video, logger, out, it, steps, log)
                    timing["time/video_s"] = time.perf_counter() - t0_video
                if it % cfg.checkpoint_every == 0 or steps >= cfg.total_timesteps:
                    t0_ckpt = time.perf_counter()
                    _checkpoint(algo, out, it, replay)
                    timing["time/checkpoint_s"] = time.perf_counter() - t0_ckpt
                timing["time/iteration_s"] = time.perf_counter() - t_iter
                metrics.update(timing)
                logger.scalars(steps, metrics)
                with open(events / "train_events.jsonl", "a") as fh:
                    fh.write(json.dumps({"iteration": it, "steps": steps, **metrics}) + "\n")
        finally:
            logger.close()
            if video is not None:
                video.close()
            algo.stop()
        return {"out": str(out), "iterations": it, "env_steps": steps, "metrics": _flat_metrics(result),
                "checkpoint": str(latest_checkpoint(out))}
    finally:
        if replay is not None:
            replay.stop()
        if started:
            ray.shutdown()


# The SimaRLModule model_config keys that shape its weights (sima_policy/rl_module.py MODEL_DEFAULTS).
ARCHITECTURE_KEYS = ("vision_arch", "vision_dim", "conv_channels", "tile_size", "tile_channels", "film_blocks",
                     "conv_frame", "language_dim", "token_dim", "gru_dim", "hidden_dim")


def policy_architecture(policy: str) -> dict:
    """The architecture part of a saved policy's model_config (e.g. `genie-sima bc`'s tile_ego design)."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    from .evaluate import resolve_policy

    module_dir, _ = resolve_policy(policy)
    saved = RLModule.from_checkpoint(str(module_dir)).model_config or {}
    return {k: saved[k] for k in ARCHITECTURE_KEYS if k in saved}


def init_from_policy(algo, policy: str, tokenizer_json: dict) -> None:
    """Copy a saved policy's weights into every Learner's module, then push them to the EnvRunners.

    The auxiliary state (MoCo key encoder, queue, CLIP projections) is not copied: the key encoder restarts
    as a copy of the loaded vision encoder, so the momentum encoder tracks the weights PPO starts from.
    """
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.rl_module.rl_module import RLModule

    from .evaluate import resolve_policy

    module_dir, tokenizer_path = resolve_policy(policy)
    theirs = json.loads(tokenizer_path.read_text()) if tokenizer_path.exists() else None
    if theirs != tokenizer_json:
        raise ConfigError(f"--init-policy {policy}: its instruction tokenizer ({tokenizer_path}) differs from this "
                          "run's; clone from the same world bundle (or the same real level)")
    state = {k: v for k, v in RLModule.from_checkpoint(str(module_dir)).state_dict().items()
             if not k.startswith("aux.") and k != "num_updates"}

    def load(learner):
        import torch

        module = learner.module[DEFAULT_MODULE_ID]
        own = module.state_dict()
        bad = sorted(k for k, v in state.items() if k not in own or tuple(own[k].shape) != tuple(v.shape))
        missing = sorted(k for k in own if k not in state and not k.startswith("aux.") and k != "num_updates")
        if bad or missing:
            raise ValueError(f"--init-policy {policy}: weights do not fit this run's policy (mismatched {bad[:5]}, "
                             f"missing {missing[:5]}); use the same --vision-dim/--hidden-dim as the cloned policy")
        module.load_state_dict({k: v.to(own[k].device) for k, v in state.items()}, strict=False)
        if hasattr(module, "aux"):
            with torch.no_grad():
                module.aux.key_vision.load_state_dict(module.vision.state_dict())
        return len(state)

    algo.learner_group.foreach_learner(load)
    algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True)


def _state_of(policy: str) -> dict:
    from ray.rllib.core.rl_module.rl_module import RLModule

    from .evaluate import resolve_policy

    module_dir, _ = resolve_policy(policy)
    return {k: v for k, v in RLModule.from_checkpoint(str(module_dir)).state_dict().items()
            if not k.startswith("aux.") and k != "num_updates"}


def set_reference_policy(algo, policy: str) -> None:
    """Every Learner keeps a frozen copy of ``policy`` for the KL term (SimaPPOLearner.set_reference)."""
    state = _state_of(policy)
    algo.learner_group.foreach_learner(lambda learner: learner.set_reference(state))


def _real_eval(cfg: TrainConfig, tokenizer, log):
    """A function: the algorithm's current policy (sampled actions) -> its success rate in ``--real-eval-level``
    over ``--real-eval-episodes`` episodes on fixed level seeds (the same at every evaluation)."""
    from .evaluate import PolicyAgent, run_episodes

    def evaluate(algo) -> float | None:
        from ray.exceptions import RayError

        try:
            module = algo.get_module()
        except (IndexError, RayError):
            log("train: no real-game evaluation this iteration (the EnvRunner holding the policy is restarting)")
            return None
        agent = PolicyAgent.of_module(module, tokenizer, greedy=False, seed=cfg.seed)
        return float(run_episodes(cfg.real_eval_level, agent, cfg.real_eval_episodes, seed=20_000, max_steps=64)
                     ["success_rate"])

    return evaluate


def _server_stats(server, log, timeout_s: float = 60.0) -> dict | None:
    """The world server's counters; None (logged) when it is down and not back within ``timeout_s``."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        return ray.get(server.stats.remote(), timeout=timeout_s)
    except (RayActorError, GetTimeoutError) as e:
        log(f"train: world server unavailable ({type(e).__name__}); Ray restarts it, envs re-open on it")
        return None


def _rollout_video(algo, video, logger, out: Path, iteration: int, steps: int, log) -> None:
    """The current policy (its EnvRunner copy, synced after every update) plays one imagined env greedily."""
    from ray.exceptions import RayError

    from .train_videos import log_video

    try:
        module = algo.get_module()  # the local EnvRunner's module, or a copy from remote EnvRunner 1
    except (IndexError, RayError):  # remote EnvRunner 1 is down (IndexError: marked unhealthy) or dies mid-call
        log(f"train: iteration {iteration}: no rollout video (the EnvRunner holding the policy is restarting)")
        return
    path = log_video(logger, steps, "rollout/imagined", video.record(module),
                     out / "videos" / f"rollout_iter_{iteration:06d}.gif")
    log(f"train: rollout video {path}")


def _train_gauges() -> dict:
    from ray.util.metrics import Gauge

    return {"steps": Gauge("genie_sima_train_env_steps_per_s", "env steps sampled per second (last iteration)"),
            "success": Gauge("genie_sima_train_imagined_success",
                             "share of imagined episodes that ended by predicted termination (success)")}


def _start_replay(cfg: TrainConfig, out: Path, bundle, resume_from: Path | None, log):
    """The run's shared replay (world-model tokens of every finished episode); restored on --resume."""
    from genie_world.build import num_patches

    from .train_replay import TrainReplay

    # The server is not started yet (the algorithm starts it): the action count comes from the bundle's adapter,
    # exactly what the server's World reports.
    replay = TrainReplay(out.name, out, cfg.replay_capacity, cfg.replay_shards, num_patches(bundle.config),
                         int(bundle.adapter.num_real), seed=cfg.seed, fresh=resume_from is None)
    restored = replay.restore(resume_from) if resume_from is not None else None
    log(f"train: replay {replay.config.name} ({replay.config.capacity} transitions in {cfg.replay_shards} shards)"
        + (f", restored {restored['size']} transitions from {resume_from.name}" if restored else ""))
    return replay


def _checkpoint(algo, out: Path, iteration: int, replay=None) -> Path:
    """RLlib writes a directory (with the replay's checkpoint in ``replay/``); it appears under its final name
    only once complete."""
    final = out / "checkpoints" / f"iter_{iteration:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    algo.save_to_path(str(tmp))
    if replay is not None:
        replay.save(tmp)
    commit_dir(tmp, final)
    return final
