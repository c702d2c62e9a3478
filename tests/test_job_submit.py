"""`ray job submit` end to end, as a user runs it against a cluster: a real `ray start --head` on
127.0.0.1 with token authentication on (see tests/ray_head.py for its isolation), a real genie-sima
job shipped with cluster/runtime_env.yaml, its status and logs read back through the job CLI, then
the head shut down.
"""

from __future__ import annotations

import json
import secrets
import urllib.request

import pytest

from tests import ray_head
from tests.ray_head import http_status, ray_cli


@pytest.fixture
def token_auth_head():
    with ray_head.token_auth_head() as head:
        yield head


def test_job_submit_with_runtime_env_and_token_auth(token_auth_head):
    head = token_auth_head
    url, temp = head["url"], head["temp"]

    # Auth is really on: the jobs API refuses a request without the token and accepts it with it.
    assert http_status(f"{url}/api/jobs/") == 401
    assert http_status(f"{url}/api/jobs/", token=head["token"]) == 200
    # The head's address went to its own temp dir, so nothing else on the machine can pick it up.
    # (Ray writes the GCS address with the machine's own IP even with --node-ip-address 127.0.0.1.)
    assert (temp / "ray" / "ray_current_cluster").read_text().strip().endswith(f":{head['gcs_port']}")

    out = temp / "data"
    job_id = f"genie-sima-test-{secrets.token_hex(4)}"
    submit = ray_cli(head, "job", "submit", "--address", url, "--runtime-env", "cluster/runtime_env.yaml",
                     "--submission-id", job_id, "--",
                     "genie-sima", "collect", "--source", "babyai:BabyAI-GoToLocal-v0", "--episodes", "4",
                     "--episodes-per-shard", "2", "--workers", "2", "--policy", "bot", "--out", str(out),
                     timeout=300)
    # The runtime env was used: the working directory was packaged and uploaded to the cluster.
    assert "Uploading package gcs://" in submit.stdout + submit.stderr

    # `ray job submit` (without --no-wait) follows the job and exits 0 only if it succeeded.
    assert f"Job '{job_id}' succeeded" in submit.stdout + submit.stderr
    status = ray_cli(head, "job", "status", "--address", url, job_id)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr
    with urllib.request.urlopen(urllib.request.Request(
            f"{url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {head['token']}"}), timeout=10) as resp:
        assert json.load(resp)["status"] == "SUCCEEDED"

    logs = ray_cli(head, "job", "logs", "--address", url, job_id).stdout
    assert "collect: 4 episodes in 2 shards" in logs, logs[-3000:]
    assert '"episodes": 4' in logs
    assert (out / "manifest.parquet").exists() and len(list(out.glob("shard_*.h5"))) == 2

    # A client with the wrong token is turned away.
    bad = temp / "bad_token"
    bad.write_text(secrets.token_hex(32))
    refused = ray_cli(head, "job", "status", "--address", url, job_id, check=False,
                      env={**head["env"], "RAY_AUTH_TOKEN_PATH": str(bad)})
    assert refused.returncode != 0 and "SUCCEEDED" not in refused.stdout
