"""Killed collections resume with no duplicate and no missing episode, byte-identical to a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipelines.data.manifest import read_manifest
from tests.conftest import kill_process_tree, run_collect, shard_digests

# Pong with long episodes: each shard takes long enough to be caught half-written.
SLOW = dict(source="atari:Pong", episodes=4, policy="random", episodes_per_shard=1, max_steps=600)


def _pids_holding_temp(out: Path) -> list[int]:
    """Processes with a shard temp file open, i.e. workers in the middle of writing a shard. Only shard temps:
    the driver (this test process, running collect in a thread) writes its config and manifest through temp
    files in the same directory, and a scan that caught one would SIGKILL pytest itself."""
    pids = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            for f in proc.open_files():
                name = Path(f.path).name
                if f.path.startswith(str(out)) and name.startswith(".shard_") and ".tmp-" in name:
                    pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def _wait_for(cond, timeout: float, what: str, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    pytest.fail(f"timed out after {timeout}s waiting for {what}{detail()}")


def _driver_state(out: Path, log_path: Path, t0: float) -> str:
    """What a timed-out wait saw: the output directory and the driver's own output."""
    files = sorted(p.name for p in out.iterdir()) if out.exists() else "(missing)"
    return (f"\nafter {time.monotonic() - t0:.0f}s, {out}: {files}"
            f"\ndriver output:\n{log_path.read_text(errors='replace')[-4000:]}")


def _check_complete(out: Path, n: int):
    rows = read_manifest(out)
    assert [r["episode_index"] for r in rows] == list(range(n))
    assert len({r["episode_key"] for r in rows}) == n
    assert not list(out.glob(".*.tmp-*")), "temp files left behind"


@pytest.fixture(scope="module")
def clean_slow(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean_slow")
    run_collect(out, **SLOW)
    return shard_digests(out)


def test_worker_killed_mid_shard_is_retried(ray_local, tmp_path, clean_slow):
    out = tmp_path / "killed_worker"
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(run_collect(out, workers=1, **SLOW)))
    t.start()
    pids = _wait_for(lambda: _pids_holding_temp(out), 60, "a worker writing a shard")
    os.kill(pids[0], signal.SIGKILL)
    t.join(timeout=240)
    assert not t.is_alive()
    assert result["episodes"] == 4
    _check_complete(out, 4)
    assert shard_digests(out) == clean_slow


def test_driver_killed_mid_shard_resumes(ray_local, tmp_path, clean_slow):
    out = tmp_path / "killed_driver"
    cmd = [sys.executable, "-m", "pipelines.cli", "collect", "--source", SLOW["source"], "--out", str(out),
           "--episodes", "4", "--policy", "random", "--episodes-per-shard", "1", "--max-steps", "600",
           "--workers", "1", "--seed", "0"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log_path = tmp_path / "driver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()

    def running(cond):
        def check():
            if proc.poll() is not None:
                pytest.fail(f"the collect driver exited (rc {proc.returncode}) before it could be killed"
                            f"{_driver_state(out, log_path, t0)}")
            return cond()
        return check

    try:
        # Wait until one shard is complete and another is half-written, then kill everything. Two
        # waits, so a timeout says which of the two never happened.
        detail = lambda: _driver_state(out, log_path, t0)  # noqa: E731
        _wait_for(running(lambda: (out / "shard_00000.h5").exists()), 240, "the first shard", detail)
        _wait_for(running(lambda: (out / "shard_00000.h5").exists() and _pids_holding_temp(out)), 120,
                  "a worker writing the second shard", detail)
    finally:
        kill_process_tree(proc)
    assert not (out / "manifest.parquet").exists()
    assert len(list(out.glob("shard_*.h5"))) < 4
    assert list(out.glob(".*.tmp-*")), "expected the killed writer's partial temp file"

    result = run_collect(out, workers=2, **SLOW)
    assert result["shards_kept"] >= 1 and result["shards_kept"] + result["shards_collected"] == 4
    _check_complete(out, 4)
    assert shard_digests(out) == clean_slow


def test_damaged_shard_is_recollected(ray_local, tmp_path):
    out = tmp_path / "damaged"
    run_collect(out, episodes=8)
    before = shard_digests(out)
    victim = out / "shard_00001.h5"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    result = run_collect(out, episodes=8)
    assert result["shards_kept"] == 1 and result["shards_collected"] == 1
    assert shard_digests(out) == before
