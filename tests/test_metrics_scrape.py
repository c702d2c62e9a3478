"""The head's metrics export port shows genie-sima's custom metrics while the parts that report them
run: a real `ray start --head --metrics-export-port`, a driver that starts a WorldModelServer and
steps it, a sharded replay buffer it adds to and samples from, one short `train` run in imagination
and the pretraining gauges, scraped over HTTP in Prometheus text format.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from tests.ray_head import ROOT, free_port, token_auth_head

pytestmark = pytest.mark.slow

EXPECTED = [
    "ray_genie_sima_world_env_steps_per_s",
    "ray_genie_sima_world_batch_fill",
    "ray_genie_sima_world_queue_latency_ms",
    "ray_genie_sima_pretrain_samples_per_s",
    "ray_genie_sima_pretrain_loss",
    "ray_genie_sima_replay_size",
    "ray_genie_sima_replay_adds_per_s",
    "ray_genie_sima_replay_samples_per_s",
    "ray_genie_sima_train_env_steps_per_s",
    "ray_genie_sima_train_imagined_success",
]

DRIVER = textwrap.dedent('''
    import sys, threading, time
    import numpy as np
    import ray
    ray.init(address=sys.argv[1], logging_level="ERROR")
    from genie_world.gym_env import WorldVectorEnv
    from genie_world.world_server import start_world_server
    from pipelines.replay.sharded_replay import ShardedReplay
    from pipelines.train_policy import TrainConfig, train

    @ray.remote(num_cpus=0)
    def pretrain_gauges(seconds):
        from pipelines.pretrain_loop import _ray_gauges
        g = _ray_gauges()
        for _ in range(int(seconds)):  # Ray exports gauges that are being set: keep setting them
            g["samples_per_s"].set(12.5, tags={"stage": "tokenizer"})
            g["loss"].set(0.25, tags={"stage": "tokenizer"})
            time.sleep(1)

    seconds = float(sys.argv[3])
    keep = pretrain_gauges.remote(seconds)
    server = start_world_server(sys.argv[2], name="scrape-world", num_cpus=0.5, capacity=8, threads=1)
    env = WorldVectorEnv(4, server="scrape-world", prompt="go to the red ball")
    env.reset()
    replay = ShardedReplay(name="scrape-replay", num_shards=2, capacity_per_shard=1000, obs_tokens=64)
    trainer = threading.Thread(target=lambda: train(
        TrainConfig(env="world://" + sys.argv[2] + "?prompt=go to the red ball&max_episode_steps=4",
                    out=sys.argv[4], num_envs=4, rollout_steps=16, total_timesteps=400, minibatch_size=32,
                    num_epochs=1, vision_dim=16, hidden_dim=32, moco_queue_size=32, checkpoint_every=100,
                    wandb="disabled"), log=lambda m: None), daemon=True)
    trainer.start()
    print("DRIVER-READY", flush=True)
    t0, episode = time.time(), 0
    while time.time() - t0 < seconds:  # a world server and a replay shard at work the whole time
        env.step(np.zeros(4, np.int64))
        n = 8
        replay.add({"obs_tokens": np.zeros((n, 64), np.int16), "next_obs_tokens": np.zeros((n, 64), np.int16),
                    "action": np.zeros(n, np.int32), "reward": np.zeros(n, np.float32),
                    "terminated": np.arange(n) == n - 1, "truncated": np.zeros(n, bool),
                    "mission_id": np.zeros(n, np.int32), "episode_id": np.full(n, episode, np.int64),
                    "step": np.arange(n, dtype=np.int32)})
        episode += 1
        replay.sample(16)
        time.sleep(0.05)
''')



def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_head_metrics_port_exports_every_custom_metric(random_bundle, tmp_path):
    metrics_port = free_port()
    with token_auth_head(metrics_port=metrics_port) as head:
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        log_path = tmp_path / "driver.log"
        log = open(log_path, "w")  # a file, not a pipe: a chatty driver must never block on a full pipe
        driver = subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{head['gcs_port']}", str(random_bundle),
                                   "200", str(tmp_path / "agent")], cwd=ROOT, env=head["env"], stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while "DRIVER-READY" not in log_path.read_text():
                if driver.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"driver did not start its parts:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
            text, seen, lines = "", set(), []
            deadline = time.monotonic() + 150  # Ray exports every few seconds; train's gauges start later
            while set(EXPECTED) - seen and time.monotonic() < deadline:
                time.sleep(2)
                text = _scrape(metrics_port)
                seen |= {m for m in EXPECTED if m in text}
                lines += [ln for ln in text.splitlines() if ln.startswith("ray_genie_sima_") and "{" in ln]
            missing = [m for m in EXPECTED if m not in seen]
            assert not missing, f"not exported: {missing}\n" + "\n".join(
                ln for ln in text.splitlines() if "genie_sima" in ln)[:3000]
            text = "\n".join(lines)
            size = [ln for ln in text.splitlines() if ln.startswith("ray_genie_sima_replay_size{")]
            assert any('shard="scrape-replay-' in ln and float(ln.rsplit(" ", 1)[1]) > 0 for ln in size), size
            steps = [ln for ln in text.splitlines() if ln.startswith("ray_genie_sima_world_env_steps_per_s{")]
            assert any('server="scrape-world"' in ln and float(ln.rsplit(" ", 1)[1]) > 0 for ln in steps), steps
        finally:
            driver.kill()
            driver.wait(timeout=30)
            log.close()
