"""The genie-sima console script as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "genie-sima"


def run(*args, timeout=180):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_console_script_installed_with_subcommands():
    assert BIN.exists(), "genie-sima console script missing: is the package installed (pip install -e .)?"
    proc = run("--help")
    assert proc.returncode == 0 and "collect" in proc.stdout and "info" in proc.stdout
    proc = run("collect", "--help")
    for flag in ("--source", "--episodes", "--out", "--policy", "--epsilon", "--frame-size", "--workers", "--seed"):
        assert flag in proc.stdout


def test_every_subcommand_has_help():
    # In-process (argparse, no Ray): a "%" in a config field's help once crashed `bc --help` and `demo --help`.
    import contextlib
    import io

    from pipelines.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"collect", "pretrain", "generate", "bc", "train", "evaluate", "play", "demo", "info"} <= set(commands)
    for name in commands:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            parser.parse_args([name, "--help"])
        assert e.value.code == 0 and "usage:" in out.getvalue(), name


def test_info_json():
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["versions"]["ray"] == "2.60.0" and info["versions"]["torch"]


def test_collect_small_babyai_via_cli(tmp_path):
    proc = run("collect", "--source", "babyai:BabyAI-GoToLocal-v0", "--episodes", "6", "--out", str(tmp_path / "d"),
               "--policy", "bot", "--workers", "2", "--episodes-per-shard", "3")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 6 and summary["success_rate"] == 1.0
    assert "collect: 2/2 shards" in proc.stderr  # progress line
    info = run("info", "--data", str(tmp_path / "d"), "--verify", "--json")
    assert json.loads(info.stdout)["data"]["episodes"] == 6


@pytest.mark.parametrize("args, message", [
    (["--epsilon", "abc"], "argument --epsilon: invalid float value: 'abc'"),
    (["--epsilon", "1.5"], "--epsilon 1.5: expected a number in [0, 1]"),
    (["--episodes", "0"], "--episodes 0: expected an integer >= 1"),
    (["--policy", "smart"], "argument --policy: invalid choice: 'smart'"),
    (["--source", "doom:E1M1"], "--source 'doom:E1M1': expected 'babyai:<level id>'"),
    (["--source", "atari:Pong", "--policy", "bot"], "--policy bot: Atari has no bundled expert"),
])
def test_bad_collect_arguments(tmp_path, args, message):
    base = {"--source": "babyai:BabyAI-GoToLocal-v0", "--out": str(tmp_path / "x")}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    proc = run("collect", *[x for kv in base.items() for x in kv])
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    proc = run("collect", "--source", "babyai:BabyAI-GoToLocal-v0", "--out", str(blocker / "sub"))
    assert proc.returncode == 2
    assert f"--out {blocker / 'sub'}: cannot create directory" in proc.stderr
    assert blocker.read_text() == "not a directory"
