"""``genie-sima info``: what is installed, and what a data directory holds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .data.manifest import read_manifest
from .data.shard_format import open_shard, read_episode_arrays, validate_shard
from .ray_runtime import software_versions


def environment_info() -> dict:
    info = {"versions": software_versions()}
    try:
        import torch

        info["torch_cuda_available"] = bool(torch.cuda.is_available())
        info["torch_cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        info["torch_cuda_available"] = None
    return info


def data_info(data_dir: Path, verify: bool = False) -> dict:
    """Summary of a collection; ``verify`` also reads every frame (checksums, decompression)."""
    data_dir = Path(data_dir)
    rows = read_manifest(data_dir)
    shards = sorted({r["shard"] for r in rows})
    attrs = {}
    for shard in shards:
        attrs = validate_shard(data_dir / shard)
        if verify:
            with open_shard(data_dir / shard) as fh:
                for key in fh["episodes"]:
                    read_episode_arrays(fh, key, path=data_dir / shard)
    splits = Counter(r["split"] for r in rows)
    n = max(1, len(rows))
    return {
        "data_dir": str(data_dir),
        "sources": sorted({r["source"] for r in rows}),
        "shards": len(shards),
        "episodes": len(rows),
        "splits": dict(sorted(splits.items())),
        "transitions": sum(r["length"] for r in rows),
        "frames": sum(r["length"] + 1 for r in rows),
        "frame_size": attrs.get("frame_size"),
        "policy": attrs.get("policy"),
        "num_actions": attrs.get("num_actions"),
        "action_names": attrs.get("action_names"),
        "success_rate": sum(r["success"] for r in rows) / n,
        "mean_return": sum(r["return"] for r in rows) / n,
        "mean_length": sum(r["length"] for r in rows) / n,
        "missions": len({r["mission"] for r in rows}),
        "bytes_on_disk": sum((data_dir / s).stat().st_size for s in shards),
        "verified_frames": verify,
    }
