"""The head's metrics export port shows genie-sima's custom metrics while the parts that report them
run: a real `ray start --head --metrics-export-port`, a driver that starts a WorldModelServer and
steps it, a sharded replay buffer it adds to and samples from, and the pretraining gauges, scraped
over HTTP in Prometheus text format.
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
]

DRIVER = textwrap.dedent('''
    import sys, time
    import numpy as np
    import ray
    ray.init(address=sys.argv[1], logging_level="ERROR")
    from genie_world.gym_env import WorldVectorEnv
    from genie_world.world_server import start_world_server

    @ray.remote(num_cpus=0)
    def pretrain_gauges():
        from pipelines.pretrain_loop import _ray_gauges
        g = _ray_gauges()
        g["samples_per_s"].set(12.5, tags={"stage": "tokenizer"})
        g["loss"].set(0.25, tags={"stage": "tokenizer"})
        time.sleep(30)  # keep the worker (and its metrics) alive while the test scrapes

    keep = pretrain_gauges.remote()
    server = start_world_server(sys.argv[2], name="scrape-world", num_cpus=0.5, capacity=8, threads=1)
    env = WorldVectorEnv(4, server="scrape-world", prompt="go to the red ball")
    env.reset()
    from pipelines.replay.sharded_replay import ShardedReplay
    replay = ShardedReplay(name="scrape-replay", num_shards=2, capacity_per_shard=1000, obs_tokens=64)
    t0, episode = time.time(), 0
    while time.time() - t0 < 3:  # the rate gauges are set once a second
        obs = env.step(np.zeros(4, np.int64))[0]
        n = 8
        replay.add({"obs_tokens": np.zeros((n, 64), np.int16), "next_obs_tokens": np.zeros((n, 64), np.int16),
                    "action": np.zeros(n, np.int32), "reward": np.zeros(n, np.float32),
                    "terminated": np.arange(n) == n - 1, "truncated": np.zeros(n, bool),
                    "mission_id": np.zeros(n, np.int32), "episode_id": np.full(n, episode, np.int64),
                    "step": np.arange(n, dtype=np.int32)})
        episode += 1
        replay.sample(16)
    print("DRIVER-READY", flush=True)
    time.sleep(float(sys.argv[3]))
''')


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_head_metrics_port_exports_every_custom_metric(random_bundle, tmp_path):
    metrics_port = free_port()
    with token_auth_head(metrics_port=metrics_port) as head:
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        driver = subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{head['gcs_port']}", str(random_bundle),
                                   "40"], cwd=ROOT, env=head["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        try:
            line = ""
            deadline = time.monotonic() + 180
            while "DRIVER-READY" not in line:
                line = driver.stdout.readline()
                if (not line and driver.poll() is not None) or time.monotonic() > deadline:
                    pytest.fail(f"driver did not start the world server: {line}{driver.stdout.read()[-3000:]}")
            text, missing = "", EXPECTED
            deadline = time.monotonic() + 60  # Ray exports custom metrics every few seconds
            while missing and time.monotonic() < deadline:
                time.sleep(2)
                text = _scrape(metrics_port)
                missing = [m for m in EXPECTED if m not in text]
            assert not missing, f"not exported: {missing}\n" + "\n".join(
                ln for ln in text.splitlines() if "genie_sima" in ln)[:3000]
            size = [ln for ln in text.splitlines() if ln.startswith("ray_genie_sima_replay_size{")]
            assert any('shard="scrape-replay-' in ln and float(ln.rsplit(" ", 1)[1]) > 0 for ln in size), size
            steps = [ln for ln in text.splitlines() if ln.startswith("ray_genie_sima_world_env_steps_per_s{")]
            assert any('server="scrape-world"' in ln and float(ln.rsplit(" ", 1)[1]) > 0 for ln in steps), steps
        finally:
            driver.kill()
            driver.wait(timeout=30)
