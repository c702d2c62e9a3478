"""Faults survived: a pretraining driver SIGKILLed mid-epoch resumes and ends where an uninterrupted run
with the same seed ends. (Collection, replay-shard and world-server faults have their own tests: see
the README's Reliability table.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from safetensors.torch import load_file

from pipelines.pretrain import PretrainArgs, pretrain
from tests.conftest import kill_process_tree

pytestmark = pytest.mark.slow

# 30 tokenizer steps of 4 clips stay inside the first epoch of the collection (67 batches): the kill is
# mid-epoch, which is what a resumed run must get right (the same batches after the checkpoint).
STEPS, EVERY = 30, 10
OVERRIDES = {"tok_steps": STEPS, "checkpoint_every": EVERY, "log_every": EVERY}
# Measured: identical weights (max |diff| 0.0) and metrics. The bounds leave room for nothing but
# float noise; before the data position was checkpointed the weights differed by up to 6.4e-3.
WEIGHT_ATOL, METRIC_ATOL = 1e-6, 1e-4
METRICS = ("tokenizer_psnr_db", "tokenizer_ssim", "tokenizer_codebook_used", "tokenizer_codebook_perplexity")


def _events(run):
    path = run / "logs" / "pretrain_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _args(data, run) -> PretrainArgs:
    return PretrainArgs(data=str(data), out=str(run), stage="tokenizer", preset="micro", wandb="disabled")


def _start_and_kill_after_first_checkpoint(data, run) -> threading.Thread:
    """Run `genie-sima pretrain` as a user would, in its own process and Ray, and SIGKILL its whole process
    tree once Ray Train has committed a checkpoint (listed in checkpoint_manager_snapshot.json). Returns
    the watching thread; its ``problem`` is set if the kill did not happen as planned."""
    cmd = [sys.executable, "-m", "pipelines.cli", "pretrain", "--data", str(data), "--out", str(run),
           "--stage", "tokenizer", "--preset", "micro", "--tok-steps", str(STEPS), "--checkpoint-every", str(EVERY),
           "--log-every", str(EVERY), "--wandb", "disabled"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    snapshot = run / "ray_train" / "tokenizer" / "checkpoint_manager_snapshot.json"

    def watch():
        deadline = time.monotonic() + 240
        try:
            while time.monotonic() < deadline and not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
                if proc.poll() is not None:
                    watcher.problem = f"pretraining exited (rc {proc.returncode}) before its first checkpoint"
                    return
                time.sleep(0.05)
            if not snapshot.exists():
                watcher.problem = "no checkpoint was committed in 240 s"
        finally:
            kill_process_tree(proc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.problem = None
    watcher.start()
    return watcher


def test_killed_pretraining_resumes_and_matches_the_uninterrupted_run(babyai_mixed_data, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # The run to be killed starts first and runs beside the uninterrupted one (most of either is waiting
    # for Ray to start): this halves the test's time.
    watcher = _start_and_kill_after_first_checkpoint(babyai_mixed_data, killed)
    pretrain(_args(babyai_mixed_data, whole), OVERRIDES, log=lambda m: None)
    watcher.join(timeout=300)
    assert not watcher.is_alive() and watcher.problem is None, watcher.problem
    assert not (killed / "tokenizer.safetensors").exists(), "the run finished before it was killed"
    assert [e["event"] for e in _events(killed)] == ["started"]
    pretrain(_args(babyai_mixed_data, killed), OVERRIDES, log=lambda m: None)  # the same command again

    events = _events(killed)
    assert [e["event"] for e in events] == ["started", "resumed", "finished"], events
    assert events[1]["step"] in range(EVERY, STEPS, EVERY), events[1]  # at a checkpoint, not from scratch
    assert events[2]["step"] == STEPS
    a, b = load_file(str(whole / "tokenizer.safetensors")), load_file(str(killed / "tokenizer.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= WEIGHT_ATOL, f"resumed weights differ from the uninterrupted run's by up to {worst:.3g}"
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (whole, killed))
    for key in METRICS:
        assert abs(ma[key] - mb[key]) <= METRIC_ATOL, (key, ma[key], mb[key])
