"""Write-then-rename, so a crash never leaves a half-written file under its final name.

Lives in ``genie_world`` (the lowest layer) so bundles and ``pipelines`` share one implementation.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

TMP_MARK = ".tmp-"


def temp_path_for(final: Path) -> Path:
    """A unique sibling temp name; siblings so the final rename stays on one filesystem."""
    return final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def commit_file(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` then atomically rename it over ``final`` and fsync the directory."""
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(final.parent)


def write_file_atomic(final: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp_path)`` produces the file; it appears as ``final`` only once complete."""
    final = Path(final)
    tmp = temp_path_for(final)
    try:
        write(tmp)
        commit_file(tmp, final)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # name the file the user asked for, not the temp
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(final)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, ``root`` included: written data and names on disk."""
    root = Path(root)
    for path in [*sorted(root.rglob("*")), root]:
        if not path.is_symlink():
            _fsync(path)


def commit_dir(tmp: Path, final: Path) -> None:
    """Make the complete directory ``tmp`` appear as ``final``: its tree is fsynced first, an existing
    ``final`` is moved aside and removed only once the new one is in place. A crash leaves ``final`` (or
    the moved-aside copy) whole, never a directory of half-written files under the final name."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    aside = None
    if final.exists():
        aside = temp_path_for(final)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _fsync(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: the names renamed into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(final: Path, data: bytes) -> None:
    write_file_atomic(final, lambda p: p.write_bytes(data))


def write_json_atomic(final: Path, obj) -> None:
    write_bytes_atomic(Path(final), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
