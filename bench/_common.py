"""Context every benchmark line carries, and the JSON-line printer."""

from __future__ import annotations

import json
import os
import platform
import statistics


def context(**extra) -> dict:
    import importlib.metadata as md

    ctx = {"host_cpus": os.cpu_count(), "python": platform.python_version()}
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
