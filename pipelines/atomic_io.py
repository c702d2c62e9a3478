"""Write-then-rename helpers so a crash never leaves a half-written file under its final name."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

TMP_MARK = ".tmp-"


def temp_path_for(final: Path) -> Path:
    """A unique sibling temp name; siblings so the final rename stays on one filesystem."""
    return final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def commit_file(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` then atomically rename it over ``final`` and fsync the directory."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes_atomic(final: Path, data: bytes) -> None:
    final = Path(final)
    tmp = temp_path_for(final)
    try:
        tmp.write_bytes(data)
        commit_file(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(final: Path, obj) -> None:
    write_bytes_atomic(Path(final), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def remove_stale_temps(directory: Path, final_name: str) -> int:
    """Delete temp files a killed writer left for ``final_name``; returns how many."""
    removed = 0
    for p in Path(directory).glob(f".{final_name}{TMP_MARK}*"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def check_writable_dir(directory: Path, what: str) -> None:
    """Create ``directory`` if needed and fail early, naming it, if we cannot write there."""
    from .errors import ConfigError

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what} {directory}: cannot create directory ({e.strerror})") from e
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {directory}: directory is not writable")
