"""One place that decides how a command joins Ray.

``--address`` wins; inside ``ray job submit`` (RAY_ADDRESS set) we join that cluster; otherwise we
start a private local instance with ``address="local"`` so a stale ``/tmp/ray/ray_current_cluster``
from a killed ``ray start`` is never joined by accident.
"""

from __future__ import annotations

import logging
import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Initialise Ray if needed; returns True if this call started it (caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = {"logging_level": logging.WARNING, "configure_logging": True}
    if address:
        ray.init(address=address, **kwargs)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return True


def software_versions() -> dict:
    """Versions recorded next to every artifact and in every benchmark line."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("genie-sima", "ray", "torch", "numpy", "h5py", "pyarrow", "gymnasium", "minigrid", "ale-py"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out
