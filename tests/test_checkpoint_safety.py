"""No code runs from a data file: a pretraining stage checkpoint is read with ``weights_only=True``. A genuine
state (weights, AdamW, the warm-up/cosine schedule, generator and RNG states, data position) loads and
resumes exactly; a planted ``state.pt`` whose unpickling would run code is refused, by name, before any
Ray Train worker starts, and its code never runs."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

from pipelines.errors import CheckpointError
from pipelines.pretrain_loop import STATE_FILE, check_stage_checkpoints, load_stage_state


class Planted:
    """Unpickling this object creates ``marker``: what a hostile checkpoint would do instead."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def genuine_state():
    from pipelines.pretrain_loop import warmup_cosine

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(2, 10, 0.1))
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    gen = torch.Generator().manual_seed(3)
    return model, opt, sched, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                               "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": 1,
                               "epoch": 0, "batch_in_epoch": 1}


def test_a_genuine_stage_state_loads_and_resumes_exactly(tmp_path):
    model, opt, sched, state = genuine_state()
    torch.save(state, tmp_path / STATE_FILE)
    loaded = load_stage_state(tmp_path / STATE_FILE)
    twin = torch.nn.Linear(4, 3)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, betas=(0.9, 0.95))
    from pipelines.pretrain_loop import warmup_cosine

    twin_sched = torch.optim.lr_scheduler.LambdaLR(twin_opt, warmup_cosine(2, 10, 0.1))
    twin.load_state_dict(loaded["model"])
    twin_opt.load_state_dict(loaded["opt"])
    twin_sched.load_state_dict(loaded["sched"])
    assert twin_sched.get_last_lr() == sched.get_last_lr() and loaded["step"] == 1
    assert torch.equal(torch.Generator().set_state(loaded["generator"]).get_state(), state["generator"])
    for a, b in ((model, opt), (twin, twin_opt)):  # one more identical step on both
        a.zero_grad()
        a(torch.ones(2, 4)).sum().backward()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_a_planted_state_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    stage_dir = tmp_path / "run" / "ray_train" / "tokenizer"
    bad = stage_dir / "checkpoint_2026-12-07_10-00-00.000000" / STATE_FILE
    bad.parent.mkdir(parents=True)
    _, _, _, state = genuine_state()
    torch.save({**state, "step": Planted(marker)}, bad)
    with pytest.raises(CheckpointError, match=r"checkpoint .*state\.pt: holds objects other than tensors"):
        check_stage_checkpoints(stage_dir)
    with pytest.raises(CheckpointError):
        load_stage_state(bad)
    assert not marker.exists()
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="state.pt: "):
        check_stage_checkpoints(stage_dir)
    assert check_stage_checkpoints(tmp_path / "run" / "ray_train" / "dynamics") == 0  # nothing to resume: fine


def test_pretrain_refuses_a_planted_checkpoint_in_one_line(babyai_mixed_data, tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    bad = run / "ray_train" / "tokenizer" / "checkpoint_2026-12-07_10-00-00.000000" / STATE_FILE
    bad.parent.mkdir(parents=True)
    torch.save({"step": Planted(marker)}, bad)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "pretrain", "--data", str(babyai_mixed_data),
                           "--out", str(run), "--preset", "micro", "--wandb", "disabled"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors and errors[-1].startswith("genie-sima pretrain: error: checkpoint ") and str(bad) in errors[-1]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
