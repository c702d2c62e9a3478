"""Atomic-write helpers for pipelines: the shared write-then-rename plus temp cleanup and dir checks."""

from __future__ import annotations

import os
from pathlib import Path

from genie_world.atomic_files import (  # noqa: F401  (re-exported for pipelines)
    TMP_MARK,
    commit_dir,
    commit_file,
    temp_path_for,
    write_bytes_atomic,
    write_file_atomic,
    write_json_atomic,
)


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
