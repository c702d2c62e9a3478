"""Context every benchmark line carries, and the JSON-line printer."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys


def context(**extra) -> dict:
    import importlib.metadata as md

    ctx = {"host_cpus": os.cpu_count(), "python": platform.python_version(),
           # Other jobs on a shared machine change CPU timings: the 1-minute load average when the
           # figure was printed says how busy it was.
           "load1": round(os.getloadavg()[0], 2)}
    for name in ("ray", "torch"):
        try:
            ctx[name] = md.version(name)
        except md.PackageNotFoundError:
            ctx[name] = None
    try:
        import torch

        ctx["torch_threads"] = torch.get_num_threads()
        ctx["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        ctx["device"] = "cpu"
    small_attention = sys.modules.get("genie_world.small_attention")
    if small_attention is not None:  # world-model benches: the C++ small-head kernels (else SDPA / torch ops)
        ctx["attn_kernel"] = small_attention.kernel_available()
    ctx.update(extra)
    return ctx


def emit(bench: str, name: str, samples: list[float], unit: str, **ctx) -> dict:
    """Print one JSON line: the median of ``samples`` plus min/max and the context."""
    line = {
        "bench": bench, "name": name, "value": statistics.median(samples), "unit": unit,
        "min": min(samples), "max": max(samples), "runs": len(samples), **context(**ctx),
    }
    print(json.dumps(line), flush=True)
    return line
