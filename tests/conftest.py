"""Shared fixtures: one real local Ray per test session and a few small real collections."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # address="local" so a stale /tmp/ray/ray_current_cluster from a killed `ray start` is never joined.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def run_collect(out: Path, **overrides) -> dict:
    from pipelines.collect import CollectConfig, collect

    fields = dict(source="babyai:BabyAI-GoToLocal-v0", out=str(out), episodes=12, policy="bot",
                  episodes_per_shard=4, workers=2, seed=0)
    fields.update(overrides)
    return collect(CollectConfig(**fields), log=lambda msg: None)


def kill_process_tree(proc) -> None:
    """SIGKILL a subprocess and everything it started (a local Ray's raylet, workers, ...)."""
    import os
    import signal

    import psutil

    try:
        root = psutil.Process(proc.pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:  # it exited already; what it started may still run in its group
        family = []
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def shard_digests(data_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(data_dir).glob("shard_*.h5"))}


@pytest.fixture(scope="session")
def babyai_bot_data(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("babyai_bot")
    run_collect(out, episodes=24, policy="bot", episodes_per_shard=8)
    return out


@pytest.fixture(scope="session")
def babyai_mixed_data(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("babyai_mixed")
    run_collect(out, episodes=24, policy="mixed", epsilon=0.5, episodes_per_shard=8, val_fraction=0.25)
    return out


@pytest.fixture(scope="session")
def pong_data(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("pong")
    run_collect(out, source="atari:Pong", episodes=3, policy="random", episodes_per_shard=2, max_steps=40)
    return out


MISSIONS = ["go to the red ball", "go to the blue key", "pick up the green box", "open the yellow door"]


def make_random_bundle(run: Path, seed: int = 0, **overrides) -> Path:
    """A complete micro world bundle with random weights (and a random state-conditioned action
    adapter): enough to exercise World/server/play mechanics in seconds, without training."""
    from genie_world.config import resolve_config
    from genie_world.random_bundle import write_random_bundle

    return write_random_bundle(run, resolve_config("micro", overrides), MISSIONS, seed)


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("bundle") / "run")


@pytest.fixture(scope="session")
def bundle_factory():
    """``bundle_factory(path, seed=0, **config_overrides)`` -> a random-weight bundle directory."""
    return make_random_bundle
