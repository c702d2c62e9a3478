"""``genie-sima pretrain``: collected video -> a world bundle, stage by stage, with Ray Train.

Each stage is a ``TorchTrainer`` over the Ray Data clip dataset running the shared loop in
``pretrain_loop``. Its Ray Train run is named after the stage under ``RUN/ray_train``, so re-running
the same command after a crash restores the last checkpoint and continues at the same step; stages
whose part is already in the bundle are skipped. The bundle is evaluated on held-out episodes at the
end and the table is printed and saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from genie_world.bundle import (load_bundle, read_bundle_meta, save_adapter, save_json, stale_parts,
                                update_bundle_meta)
from genie_world.config import PRESETS, STAGES, WorldConfigError, WorldModelConfig, resolve_config
from genie_world.text_encoder import Vocabulary

from .atomic_io import check_writable_dir
from .data.clip_datasource import clip_dataset
from .data.clip_index import build_clip_index
from .data.manifest import MANIFEST_NAME, read_manifest
from .data.shard_format import validate_shard
from .errors import ConfigError
from .pretrain_stages import DYNAMICS_COLUMNS, STAGE_COLUMNS, STAGE_PARTS, stage_data
from .ray_runtime import ensure_ray, software_versions
from .run_logger import WANDB_MODES

STAGE_CHOICES = STAGES + ("all",)
# Config fields that may differ when resuming a run (they do not change what is learned).
RESUMABLE_FIELDS = ("threads", "log_every", "image_every", "eval_clips", "eval_fidelity_episodes", "eval_prompt_levels")


@dataclass
class PretrainArgs:
    data: str = field(metadata={"help": "a directory written by `genie-sima collect`"})
    out: str = field(metadata={"help": "run directory; becomes the world bundle"})
    stage: str = field(default="all", metadata={"help": "stage to train", "choices": STAGE_CHOICES})
    preset: str = field(default="tiny", metadata={"help": "config preset", "choices": tuple(PRESETS)})
    workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP)"})
    gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    address: Optional[str] = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS or local)"})
    wandb: str = field(default="offline", metadata={"help": "wandb mode", "choices": WANDB_MODES})
    wandb_project: Optional[str] = field(default=None, metadata={"help": "wandb project (implies online)"})

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: expected an integer >= 1")
        if self.stage not in STAGE_CHOICES:
            raise ConfigError(f"--stage {self.stage!r}: expected one of {STAGE_CHOICES}")


def _data_facts(data_dir: Path) -> dict:
    rows = read_manifest(data_dir)
    if not rows:
        raise ConfigError(f"--data {data_dir}: the manifest lists no episodes")
    attrs = validate_shard(data_dir / rows[0]["shard"])
    manifest_sha = hashlib.sha256((data_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    return {"rows": rows, "frame_size": attrs["frame_size"], "action_names": attrs["action_names"],
            "source": attrs["source"], "manifest_sha256": manifest_sha}


BATCH_FLAGS = {"tokenizer": "tok_batch", "actions": "lam_batch", "dynamics": "dyn_batch", "heads": "head_batch",
               "prior": "prior_batch"}


def _check_enough_clips(data: Path, cfg: WorldModelConfig, stages, workers: int) -> None:
    """Every worker needs one whole batch of clips per step; too little data otherwise failed inside a Ray
    Train worker, after earlier stages had run."""
    for stage in stages:
        sd = stage_data(stage, cfg)
        clips = len(build_clip_index(data, sd.clip_len, "train", 1, sd.first_only))
        need = cfg.batch_for(stage) * workers
        if clips < need:
            what = "first frames" if sd.first_only else f"clips of {sd.clip_len} frames"
            flag = "--" + BATCH_FLAGS[stage].replace("_", "-")
            raise ConfigError(f"--data {data}: stage {stage} needs at least {need} {what} in the training split "
                              f"({flag} {cfg.batch_for(stage)} x {workers} worker(s)), the data has {clips}; collect "
                              f"more episodes or lower {flag}")


def _check_resume(run: Path, cfg: WorldModelConfig, data_sha: str) -> None:
    path = run / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    # A field the old run's config lacks was added later; it reads as its default (as load_bundle reads it).
    defaults = dataclasses.asdict(WorldModelConfig())
    diffs = [f"{k}: {old['config'].get(k, defaults[k])!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
             if k not in RESUMABLE_FIELDS and old["config"].get(k, defaults[k]) != v]
    if old.get("data_manifest_sha256") not in (None, data_sha):
        diffs.append("the --data manifest changed")
    if diffs:
        raise ConfigError(f"--out {run} holds a run with another config ({'; '.join(diffs)}); "
                          "re-run with the same settings to resume, or choose a new --out")


# Ray Train's controller polls its workers this often (Ray's default: 2 s). A stage waits on those polls
# to start and to finish, and a worker's ray.train.report blocks until the controller has taken the
# previous report (a queue of one, drained at each poll). At 2 s vs 0.2 s: a no-op TorchTrainer.fit
# 11.3 vs 7.3 s, the micro preset's five stages 103 vs 69 s (BENCHMARKS.md). Ray Train passes the
# variable from the driver to its controller and workers; a value the user set wins.
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.2"


def _run_stage(stage: str, args: PretrainArgs, cfg: WorldModelConfig, run: Path, log) -> None:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .pretrain_loop import check_stage_checkpoints, pretrain_loop

    sd = stage_data(stage, cfg)
    ds = clip_dataset(args.data, sd.clip_len, split="train", first_only=sd.first_only,
                      columns=DYNAMICS_COLUMNS if stage == "dynamics" else STAGE_COLUMNS)
    # On a small CPU node whole-CPU workers starve Ray Data's read tasks and the run hangs.
    resources = {"CPU": 1, "GPU": 1} if args.gpu else {"CPU": 0.5}
    # Blocks in read order, not completion order: the batch sequence is then a function of the seed, which
    # is what lets a resumed run skip exactly the batches it trained on before the kill.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    trainer = TorchTrainer(
        pretrain_loop,
        train_loop_config={"stage": stage, "cfg": dataclasses.asdict(cfg), "run_dir": str(run),
                           "run_name": run.name, "wandb_mode": args.wandb, "wandb_project": args.wandb_project},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu, resources_per_worker=resources),
        datasets={"train": ds}, dataset_config=DataConfig(execution_options=ingest),
        run_config=RunConfig(name=stage, storage_path=str(run / "ray_train"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=2)),
    )
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, HEALTH_CHECK_INTERVAL_S)
    _drop_checkpoints_of_other_parts(run, stage, log)
    check_stage_checkpoints(run / "ray_train" / stage)  # one clean error here, not a retried worker failure
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise result.error
    log(f"pretrain: stage {stage} done in {time.perf_counter() - t0:.0f}s "
        f"(loss {(result.metrics or {}).get('loss', float('nan')):.4g})")


def _drop_checkpoints_of_other_parts(run: Path, stage: str, log) -> None:
    """A stage's Ray Train checkpoints hold a part trained against its frozen parts as they were then; once
    one of those was re-trained, resuming would save the old weights as if trained on the new ones. The
    hashes it trains against are recorded beside the checkpoints; other hashes drop the checkpoints."""
    deps = STAGE_PARTS[stage][1]
    if not deps:
        return
    parts = read_bundle_meta(run)["parts"]
    current = {d: parts[d]["sha256"] for d in deps}
    checkpoints, record = run / "ray_train" / stage, run / "ray_train" / f"{stage}.trained_on.json"
    if record.exists() and json.loads(record.read_text()) != current and checkpoints.exists():
        log(f"pretrain: stage {stage}: {' and '.join(deps)} changed since its checkpoints; training from scratch")
        shutil.rmtree(checkpoints)
    record.parent.mkdir(parents=True, exist_ok=True)
    save_json(record.parent, record.name, current)


def pretrain(args: PretrainArgs, overrides: dict | None = None, log=None) -> dict:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    args.validate()
    try:
        cfg = resolve_config(args.preset, overrides or {})
    except WorldConfigError as e:
        raise ConfigError(str(e)) from e
    data = Path(args.data)
    facts = _data_facts(data)
    if facts["frame_size"] != cfg.frame_size:
        raise ConfigError(f"--data {data}: frames are {facts['frame_size']}x{facts['frame_size']} but the "
                          f"{args.preset} config expects frame_size {cfg.frame_size}; pass --frame-size "
                          f"{facts['frame_size']} or collect with --frame-size {cfg.frame_size}")
    stages = STAGES if args.stage == "all" else (args.stage,)
    _check_enough_clips(data, cfg, stages, args.workers)
    run = Path(args.out).resolve()
    check_writable_dir(run, "--out")
    _check_resume(run, cfg, facts["manifest_sha256"])
    versions = software_versions()
    save_json(run, "config.json", {"config": dataclasses.asdict(cfg), "preset": args.preset,
                                   "data_manifest_sha256": facts["manifest_sha256"], "versions": versions})
    vocab = Vocabulary.from_texts(r["mission"] for r in facts["rows"])
    save_json(run, "vocab.json", vocab.to_json())
    update_bundle_meta(run, provenance={
        "data_dir": str(data.resolve()), "manifest_sha256": facts["manifest_sha256"], "source": facts["source"],
        "episodes": len(facts["rows"]), "action_names": facts["action_names"], "versions": versions})

    started = ensure_ray(args.address)
    t0 = time.perf_counter()
    try:
        for stage in stages:
            part, deps = STAGE_PARTS[stage]
            meta = read_bundle_meta(run)
            have = meta["parts"]
            if args.stage == "all" and part in have:
                changed = [d for _, d in stale_parts(meta, [part])]
                if not changed:
                    log(f"pretrain: stage {stage} already in the bundle ({part}); skipping")
                    continue
                log(f"pretrain: stage {stage} again: {part} was trained on another {' and '.join(changed)}")
            missing = [d for d in deps if d not in have]
            if missing:
                raise ConfigError(f"stage {stage} needs {missing} in {run}; run those stages first (or --stage all)")
            log(f"pretrain: stage {stage} ({cfg.steps_for(stage)} steps, {args.workers} worker(s))")
            _run_stage(stage, args, cfg, run, log)
        meta = read_bundle_meta(run)
        stale = stale_parts(meta)
        if stale:
            # A single re-run stage (e.g. --stage tokenizer) leaves the parts trained on its old weights stale:
            # the bundle cannot be evaluated (or loaded) until they are trained again.
            parts = ", ".join(f"{name} (trained on the previous {dep})" for name, dep in stale)
            log(f"pretrain: stage {args.stage} done; stale parts: {parts}; run `genie-sima pretrain --data {data} "
                f"--out {run} --stage all` to re-train them (load_bundle refuses the bundle until then)")
            return {"run": str(run), "metrics": {}, "table": "", "stale": [list(x) for x in stale]}
        bundle = load_bundle(run, parts=tuple(meta["parts"]))
        from .pretrain_eval import evaluate_bundle, format_metrics_table

        metrics, adapter = evaluate_bundle(bundle, data, facts["action_names"], cfg.seed)
        from .pretrain_eval import fit_level_constraints

        constraints, constraint_metrics = fit_level_constraints(bundle, data)
        metrics.update(constraint_metrics)
        if adapter is not None and {"dynamics", "reward_head"} <= set(bundle.parts):
            # The World the fidelity report replays in uses the adapter and constraints just fitted.
            bundle.adapter, bundle.constraints = adapter, constraints
            from .pretrain_eval import simulator_metrics

            metrics.update(simulator_metrics(bundle, data, facts["source"], cfg.seed))
    finally:
        if started:
            import ray

            ray.shutdown()
    metrics["wall_clock_s"] = round(time.perf_counter() - t0, 1)
    if adapter is not None:
        save_adapter(run, adapter)
    if constraints is not None:
        from genie_world.level_constraints import FILE as CONSTRAINTS_FILE

        save_json(run, CONSTRAINTS_FILE, constraints.to_json())
    save_json(run, "metrics.json", metrics)
    update_bundle_meta(run, metrics=metrics)
    table = format_metrics_table(metrics)
    log("pretrain: evaluation on held-out episodes\n" + table)
    return {"run": str(run), "metrics": metrics, "table": table}
