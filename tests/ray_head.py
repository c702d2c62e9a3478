"""A real `ray start --head` on 127.0.0.1 with token authentication on, isolated from every other Ray
on the machine (the session's `ray.init(address="local")`, other people's clusters): its own
--temp-dir (so its address file is written there, never to /tmp/ray/ray_current_cluster), its own
free ports, its own token file, and subprocess environments without RAY_ADDRESS. It is stopped by
signalling the `ray start --block` process and then killing whatever is left of its own process
tree, never with `ray stop`, which stops every Ray process on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM `ray start --block` (Ray then drains and stops its raylet, GCS, dashboard, workers),
    then SIGKILL anything of that tree still alive. psutil refuses to signal a reused pid."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=15)


@contextlib.contextmanager
def token_auth_head(metrics_port: int | None = None):
    # A short path under /tmp: Ray puts unix sockets under it (107-byte limit); pytest's tmp_path is long.
    temp = Path(tempfile.mkdtemp(prefix="gsray_", dir="/tmp"))
    token_file = temp / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)

    # Token mode and where the token is: the head, its workers, the job driver (all children of
    # `ray start`) and the job CLI all read these two variables.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")

    gcs_port, dash_port = free_port(), free_port()
    cmd = [RAY, "start", "--head", "--block", "--port", str(gcs_port), "--node-ip-address", "127.0.0.1",
           "--num-cpus", "2", "--num-gpus", "0", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
           # Ports whose defaults are fixed (52365, 10001) would collide with another local Ray.
           "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
           "--temp-dir", str(temp / "ray"), "--disable-usage-stats"]
    if metrics_port:
        cmd += ["--metrics-export-port", str(metrics_port)]
    url = f"http://127.0.0.1:{dash_port}"
    try:
        with open(temp / "head.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=temp)
            try:
                deadline = time.monotonic() + 120
                # /api/gcs_healthz is one of the few endpoints Ray leaves open under token auth. `ray start`
                # writes the address file after the dashboard is up; wait for both.
                while (http_status(f"{url}/api/gcs_healthz") != 200
                       or not (temp / "ray" / "ray_current_cluster").exists()):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"ray start --head did not come up:\n{(temp / 'head.log').read_text()[-4000:]}")
                    time.sleep(0.5)
                yield {"url": url, "env": env, "token": token_file.read_text(), "temp": temp, "gcs_port": gcs_port}
            finally:
                stop_head(proc)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def ray_cli(head, *args, timeout=120, check=True, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([RAY, *args], cwd=ROOT, env=env or head["env"], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check:
        assert proc.returncode == 0, f"ray {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc
