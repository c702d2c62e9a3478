"""A/B in one run: a bench script from a git ref (``base``) and from the working tree (``new``),
alternated round by round (order flipped each round) on the same machine, so drift in the machine's
speed hits both sides alike. This VM's speed drifts by up to +-20% between runs a minute apart: compare
figures only within one A/B.

    python bench/ab.py --base HEAD --rounds 3 -- bench/world_model.py --runs 7
    python bench/ab.py --base HEAD~1 --rounds 2 -- bench/serving.py --bundle $PWD/runs/world-tiny --batches 64

Each side runs the script from its own tree (``git archive`` of ``--base`` into a temp dir, which is
also its working directory: give data paths absolute), with this interpreter. One JSON line per
figure: the median over rounds of each run's value for both sides and new/base (for times lower is
better, for rates higher), with the machine context every bench line carries.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import context  # noqa: E402

KEYS = ("batch", "path", "preset", "precision")  # context that tells apart figures of the same name


def export(ref: str, dest: Path) -> None:
    out = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True)
    if out.returncode:
        raise SystemExit(f"ab: --base {ref!r}: git archive failed: {out.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=out.stdout, check=True)


def run_side(tree: Path, script: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, *script], cwd=tree, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"ab: {' '.join(script)} failed in {tree} (exit {out.returncode}):\n{out.stderr[-2000:]}")
    figures = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            figures[d["name"] + "".join(f" {k}={d[k]}" for k in KEYS if k in d)] = d["value"]
    return figures


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("ab: usage: bench/ab.py [--base REF] [--rounds N] -- BENCH_SCRIPT [ARGS...]")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="git ref of the base side (default HEAD)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv[:cut])
    script = argv[cut + 1:]
    if not script:
        raise SystemExit("ab: name a bench script after --")
    results: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"base": [], "new": []})
    with tempfile.TemporaryDirectory(prefix="genie-sima-ab-") as tmp:
        base = Path(tmp)
        export(args.base, base)
        for r in range(args.rounds):
            order = [("base", base), ("new", ROOT)] if r % 2 == 0 else [("new", ROOT), ("base", base)]
            for side, tree in order:
                for name, value in run_side(tree, script).items():
                    results[name][side].append(value)
                print(f"ab: round {r + 1}/{args.rounds} {side} done", file=sys.stderr, flush=True)
    for name, sides in results.items():
        if not (sides["base"] and sides["new"]):
            continue
        b, n = statistics.median(sides["base"]), statistics.median(sides["new"])
        print(json.dumps({"bench": "ab", "name": name, "base": b, "new": n, "new_over_base": n / b if b else None,
                          "base_runs": sides["base"], "new_runs": sides["new"], "base_ref": args.base,
                          "script": " ".join(script), **context()}))


if __name__ == "__main__":
    main()
