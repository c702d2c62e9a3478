"""The Parquet manifest: one row per episode, the index every reader starts from."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic_io import write_bytes_atomic
from ..errors import ManifestError

MANIFEST_NAME = "manifest.parquet"
CONFIG_NAME = "collect_config.json"
SPLITS = ("train", "val")

MANIFEST_SCHEMA = pa.schema([
    ("shard", pa.string()),          # path relative to the data directory
    ("episode_key", pa.string()),
    ("episode_index", pa.int64()),
    ("length", pa.int64()),          # transitions T; the episode has T+1 frames
    ("return", pa.float64()),
    ("success", pa.bool_()),
    ("mission", pa.string()),
    ("seed", pa.int64()),            # env seed: reset(seed) + the actions replay the episode
    ("level_id", pa.string()),
    ("source", pa.string()),
    ("frame_size", pa.int64()),
    ("split", pa.string()),
])


def episode_split(source: str, level_id: str, seed: int, val_fraction: float) -> str:
    """Deterministic by episode identity, so re-runs and added episodes never move an episode."""
    digest = hashlib.blake2b(f"{source}|{level_id}|{seed}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "val" if u < val_fraction else "train"


def write_manifest(data_dir: Path, rows: list[dict]) -> Path:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    path = Path(data_dir) / MANIFEST_NAME
    write_bytes_atomic(path, buf.getvalue())
    return path


def read_manifest(data_dir: Path, split: str | None = None, check_shards: bool = True) -> list[dict]:
    """Manifest rows (optionally one split); a missing shard is an error naming it."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(path, "does not exist; run `genie-sima collect --out "
                            f"{data_dir}` first")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ManifestError(path, f"cannot be read as Parquet ({e})") from e
    missing_cols = [c for c in MANIFEST_SCHEMA.names if c not in table.column_names]
    if missing_cols:
        raise ManifestError(path, f"missing columns {missing_cols}")
    if split is not None and split not in SPLITS:
        raise ManifestError(path, f"unknown split {split!r}; expected one of {SPLITS}")
    rows = table.select(MANIFEST_SCHEMA.names).to_pylist()
    if split is not None:
        rows = [r for r in rows if r["split"] == split]
    if check_shards:
        for shard in sorted({r["shard"] for r in rows}):
            if not (data_dir / shard).exists():
                raise ManifestError(path, f"points at shard {shard!r}, which does not exist in {data_dir}")
    return rows
