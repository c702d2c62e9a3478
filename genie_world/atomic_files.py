"""Write-then-rename, so a crash never leaves a half-written file under its final name.

Lives in ``genie_world`` (the lowest layer) so bundles and ``pipelines`` share one implementation.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable

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


def write_file_atomic(final: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp_path)`` produces the file; it appears as ``final`` only once complete."""
    final = Path(final)
    tmp = temp_path_for(final)
    try:
        write(tmp)
        commit_file(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(final: Path, data: bytes) -> None:
    write_file_atomic(final, lambda p: p.write_bytes(data))


def write_json_atomic(final: Path, obj) -> None:
    write_bytes_atomic(Path(final), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
