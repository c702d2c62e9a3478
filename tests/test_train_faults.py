"""Faults during `genie-sima train` in imagination, with the real parts: the world server actor is killed
mid-training (Ray restarts it, the envs re-open their blocks on it, training reaches its budget), and an
EnvRunner actor is killed mid-training (RLlib restarts it; it finds the world server by name again). After
either, the shared replay holds only whole episodes, each once."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipelines.replay.saved_contents import saved_transitions
from pipelines.train_policy import TrainConfig, train
from tests.test_train_replay import check_whole_episodes

pytestmark = pytest.mark.slow

SMALL = dict(num_envs=4, rollout_steps=16, minibatch_size=32, num_epochs=1, vision_dim=32, hidden_dim=64,
             moco_queue_size=64, checkpoint_every=100, wandb="disabled", threads=1, replay_capacity=8192,
             aux_batch_size=16)


def _pid(handle, timeout=120.0) -> int:
    """The actor's process id; waits while Ray restarts it."""
    import os

    import ray
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=timeout)
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _after_first_iteration(out, action, seen: dict) -> threading.Thread:
    """Run ``action()`` in a thread once the run has logged its first iteration; record what it returns."""
    def wait_then_act():
        events = out / "logs" / "train_events.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (events.exists() and events.read_text().strip()):
            time.sleep(0.05)
        try:
            seen.update(action())
        except Exception as e:  # noqa: BLE001 - reported by the test's assertions
            seen["error"] = repr(e)

    t = threading.Thread(target=wait_then_act, daemon=True)
    t.start()
    return t


def _iterations(out) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "train_events.jsonl").read_text().splitlines()]


def test_world_server_killed_mid_training_is_restarted_and_training_continues(random_bundle, tmp_path, ray_local):
    import os
    import signal

    import ray

    from genie_world.world_server import get_world_server

    out = tmp_path / "server_dies"
    name = f"genie-sima-train-{out.name}"

    def kill_server():
        handle = get_world_server(name)
        before = _pid(handle)
        os.kill(before, signal.SIGKILL)  # a crash, as on a preempted node
        after = _pid(handle)  # answers once Ray has restarted the actor in a new process
        deadline = time.monotonic() + 120
        stats = ray.get(handle.stats.remote())
        while time.monotonic() < deadline and stats["requests"] == 0:
            time.sleep(0.1)
            stats = ray.get(handle.stats.remote())
        return {"before": before, "after": after, "requests_after_restart": stats["requests"]}

    seen: dict = {}
    killer = _after_first_iteration(out, kill_server, seen)
    logs: list[str] = []
    result = train(TrainConfig(env=f"world://{random_bundle}?prompt=go to the red ball&max_episode_steps=8",
                               out=str(out), total_timesteps=4 * 64, **SMALL), log=logs.append)
    killer.join(timeout=60)
    assert "error" not in seen, seen
    assert seen["before"] != seen["after"], "the server was not restarted in a new process"
    assert seen["requests_after_restart"] > 0, "no env re-opened its block on the restarted server"
    assert result["env_steps"] >= 4 * 64
    its = _iterations(out)
    assert [e["iteration"] for e in its] == list(range(1, len(its) + 1)) and len(its) >= 4
    steps = [e["steps"] for e in its]
    assert steps == sorted(steps) and steps[-1] >= 4 * 64
    # The episodes the kill cut short never reached the replay: every episode in it is whole and there once,
    # and it holds exactly the episodes RLlib counts as finished.
    rows = saved_transitions(out / "checkpoints" / f"iter_{its[-1]['iteration']:06d}" / "replay")
    ids = check_whole_episodes(rows)
    assert len(ids) == int(result["metrics"]["env_runners/num_episodes_lifetime"]) > 0
    assert result["metrics"].get("env_runners/replay_episodes_incomplete", 0) == 0
    assert len(rows["step"]) == int(result["metrics"]["env_runners/replay_transitions_added"])


def test_env_runner_killed_mid_training_is_restarted_and_finds_the_server(random_bundle, tmp_path, ray_local):
    import os
    import signal

    import psutil

    out = tmp_path / "runner_dies"

    def runners() -> list[int]:
        """EnvRunner worker processes of this test's own local Ray (Ray titles them ray::<ActorClass>)."""
        pids = []
        for p in psutil.Process().children(recursive=True):
            try:
                if "EnvRunner" in " ".join(p.cmdline()):  # ray::WorldEnvRunner (a SingleAgentEnvRunner)
                    pids.append(p.pid)
            except psutil.Error:
                pass
        return pids

    def kill_runner():
        alive = runners()
        assert len(alive) == 1, alive
        os.kill(alive[0], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not [p for p in runners() if p != alive[0]]:
            time.sleep(0.2)
        # The restarted runner re-opened its envs: the server closed the dead incarnation's block for it.
        import ray

        from genie_world.world_server import get_world_server

        server = get_world_server(f"genie-sima-train-{out.name}")
        stale = ray.get(server.stats.remote())["stale_clients_closed"]
        while time.monotonic() < deadline and stale == 0:
            time.sleep(0.2)
            stale = ray.get(server.stats.remote())["stale_clients_closed"]
        return {"killed": alive[0], "restarted": [p for p in runners() if p != alive[0]], "stale_closed": stale}

    seen: dict = {}
    killer = _after_first_iteration(out, kill_runner, seen)
    result = train(TrainConfig(env=f"world://{random_bundle}?prompt=go to the red ball&max_episode_steps=8",
                               out=str(out), total_timesteps=5 * 64, num_env_runners=1, **SMALL), log=lambda m: None)
    killer.join(timeout=60)
    assert "error" not in seen, seen
    assert seen["restarted"], "RLlib did not start a new EnvRunner"
    assert seen["stale_closed"] == 1, seen
    assert result["env_steps"] >= 5 * 64
    its = _iterations(out)
    assert its[-1]["steps"] >= 5 * 64
    # The restarted runner (a new actor) sampled from the world server again: env steps kept growing.
    assert len({e["steps"] for e in its}) >= 4
    # Episodes of the killed runner that had not finished are not in the replay; the restarted runner's
    # episode ids are new (runner identity is part of the id), so none is duplicated or half-written.
    rows = saved_transitions(out / "checkpoints" / f"iter_{its[-1]['iteration']:06d}" / "replay")
    ids = check_whole_episodes(rows)
    assert len(ids) > 0 and len(rows["step"]) == int(result["metrics"]["env_runners/replay_transitions_added"])
    # The last iteration's rollout video was played by the policy fetched from the restarted remote EnvRunner.
    assert (out / "videos" / f"rollout_iter_{its[-1]['iteration']:06d}.gif").exists()


def test_train_killed_while_saving_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    """SIGKILL `genie-sima train` (its whole process tree, a local Ray included) while a checkpoint is being
    written: the checkpoints before it are whole and `--resume` continues from the newest of them."""
    import os
    import subprocess
    import sys

    from tests.conftest import kill_process_tree

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "pipelines.cli", "train", "--env", "babyai:BabyAI-GoToRedBall-v0", "--out", str(out),
            "--num-envs", "4", "--rollout-steps", "16", "--minibatch-size", "32", "--num-epochs", "1",
            "--vision-dim", "32", "--hidden-dim", "64", "--checkpoint-every", "1", "--wandb", "disabled",
            "--threads", "1", "--video-every", "0"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(argv + ["--total-timesteps", "100000"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    ckpts = out / "checkpoints"
    saving = None
    try:
        deadline = time.monotonic() + 240
        while saving is None and time.monotonic() < deadline and proc.poll() is None:
            if ckpts.is_dir() and any(p.name.startswith("iter_") for p in ckpts.iterdir()):
                saving = next((p for p in ckpts.iterdir() if p.name.endswith(".tmp")), None)
            time.sleep(0.002)
    finally:
        kill_process_tree(proc)
    assert saving is not None, "never saw a checkpoint being written after a complete one"
    complete = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("iter_"))
    assert saving.name == f".iter_{int(complete[-1][5:]) + 1:06d}.tmp", (saving.name, complete)
    for name in complete:  # every checkpoint under its final name is whole
        assert (ckpts / name / "rllib_checkpoint.json").exists() and (ckpts / name / "learner_group").is_dir(), name
    resumed = subprocess.run(argv + ["--resume", "--total-timesteps", str(64 * (len(complete) + 1))],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"train: resumed from {ckpts / complete[-1]}" in resumed.stderr, resumed.stderr[-3000:]
    after = sorted(p.name for p in ckpts.iterdir())
    assert after == complete + [f"iter_{int(complete[-1][5:]) + 1:06d}"], after  # the half-written one is gone
