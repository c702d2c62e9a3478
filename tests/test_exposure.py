"""Exposure: the local Ray every command starts (``ensure_ray``) serves no dashboard, and the dashboard
process Ray runs anyway is bound to 127.0.0.1. (The play server's loopback default is tested in
test_play.py::test_binds_loopback_by_default.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PORT = 8265  # Ray's default; ensure_ray passes no other

# Run as its own driver: a fresh local Ray exactly as `genie-sima collect/pretrain/train` start one.
PROBE = r"""
import json, os
os.environ.pop("RAY_ADDRESS", None)
import psutil, ray
from pipelines.ray_runtime import ensure_ray
assert ensure_ray(), "expected to start a private local Ray"
out = {"webui_url": ray._private.worker.global_worker.node.webui_url, "listening": [], "dashboard": None}
for p in psutil.Process().children(recursive=True):
    try:
        cmd = p.cmdline()
        if any(c.endswith(os.path.join("dashboard", "dashboard.py")) for c in cmd):
            out["dashboard"] = cmd
        out["listening"] += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                             if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
ray.shutdown()
print(json.dumps(out))
"""


def test_local_ray_serves_no_dashboard_and_binds_its_dashboard_process_to_loopback():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    assert not probe["webui_url"], f"a dashboard is served at {probe['webui_url']}"
    on_dashboard_port = [s for s in probe["listening"] if s[2] == DASHBOARD_PORT]
    assert not on_dashboard_port, on_dashboard_port
    assert probe["listening"], "the probe saw no Ray sockets at all: it is not looking at the right processes"
    if probe["dashboard"] is not None:  # Ray runs its dashboard process headless; it must still be loopback
        cmd = probe["dashboard"]
        assert "--host=127.0.0.1" in cmd and "--disable-frontend" in cmd, cmd
