"""Exposure: the local Ray every command starts (``ensure_ray``) serves no dashboard, and the dashboard
process Ray runs anyway is bound to 127.0.0.1. Every listener it opens on other interfaces is one the
README's Exposure row names, and the one that answers without Ray's token (the metrics endpoint) is
probed. (The play server's loopback default is tested in test_play.py::test_binds_loopback_by_default.)"""

from __future__ import annotations

import ipaddress
import json
import os
import re
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
import time
out = {"webui_url": ray._private.worker.global_worker.node.webui_url, "listening": [], "dashboard": None}


def name_of(p, cmd):
    # Ray's Python helpers run as "python": name them by their script (they open ports a moment after start).
    for script, name in (("monitor.py", "autoscaler monitor"), ("dashboard.py", "dashboard process")):
        if any(c.endswith(script) for c in cmd):
            return name
    return p.name()


def listening():
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
            if any(c.endswith(os.path.join("dashboard", "dashboard.py")) for c in cmd):
                out["dashboard"] = cmd
            found += [[name_of(p, cmd), c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    return sorted(found)


# Some of Ray's processes open their ports seconds after ray.init returns: list them once the set has
# stayed the same for 3 s (at most 30 s), so a late listener is never missed.
seen, stable_since, deadline = None, time.monotonic(), time.monotonic() + 30
while time.monotonic() < deadline:
    now = listening()
    if now != seen:
        seen, stable_since = now, time.monotonic()
    elif time.monotonic() - stable_since >= 3:
        break
    time.sleep(0.25)
out["listening"] = seen
import urllib.request
node = ray._private.worker.global_worker.node
out["metrics_answers"] = {}
for who, port in (("agent", node.metrics_export_port), ("autoscaler monitor", 44217), ("dashboard process", 44227)):
    try:
        with urllib.request.urlopen(f"http://{node.node_ip_address}:{port}/metrics", timeout=10) as r:
            out["metrics_answers"][who] = [r.status, r.read(2000).decode(errors="replace")]
    except Exception as e:
        out["metrics_answers"][who] = [None, repr(e)]
ray.shutdown()
print(json.dumps(out))
"""

# Ray processes that listen beyond loopback, and the words the README's Exposure row uses for each.
NON_LOOPBACK = {"gcs_server": "GCS", "raylet": "raylet", "ray::DashboardAgent": "metrics",
                "ray::RuntimeEnvAgent": "runtime-env agent", "autoscaler monitor": "autoscaler monitor",
                "dashboard process": "dashboard process"}
WORKER = re.compile(r"ray::")  # worker processes (ray::IDLE, ray::SomeActor): their gRPC servers


def _probe() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_local_ray_serves_no_dashboard_and_binds_its_dashboard_process_to_loopback():
    probe = _probe()
    assert not probe["webui_url"], f"a dashboard is served at {probe['webui_url']}"
    on_dashboard_port = [s for s in probe["listening"] if s[2] == DASHBOARD_PORT]
    assert not on_dashboard_port, on_dashboard_port
    assert probe["listening"], "the probe saw no Ray sockets at all: it is not looking at the right processes"
    if probe["dashboard"] is not None:  # Ray runs its dashboard process headless; it must still be loopback
        cmd = probe["dashboard"]
        assert "--host=127.0.0.1" in cmd and "--disable-frontend" in cmd, cmd


def test_every_non_loopback_listener_is_a_named_ray_process_and_the_readme_says_so():
    probe = _probe()
    exposed = sorted({name for name, ip, _ in probe["listening"] if not ipaddress.ip_address(ip).is_loopback})
    assert exposed, "the probe saw no listener beyond loopback: Ray binds its ports to every interface here"
    unknown = [n for n in exposed if n not in NON_LOOPBACK and not WORKER.match(n)]
    assert not unknown, f"listeners beyond loopback that the README does not name: {unknown}"
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| Exposure |"))
    for name in exposed:
        assert NON_LOOPBACK.get(name, "worker") in row, (name, row)
    # The metrics endpoints answer anyone who can reach the machine, without Ray's token: stated, not hidden.
    for who, (status, body) in probe["metrics_answers"].items():
        assert status == 200 and "# TYPE" in body, (who, status, body[:300])  # Prometheus text, to anyone
    assert "metrics endpoints" in row and "without a token" in row and "44217" in row and "44227" in row, row
