"""Truncated, corrupt, wrong-schema and missing shards give errors naming the file and the problem."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import pyarrow.parquet as pq
import pytest

from pipelines.data.clip_reader import ClipReader
from pipelines.data.manifest import read_manifest
from pipelines.data.shard_format import validate_shard
from pipelines.errors import ManifestError, ShardError
from pipelines.info import data_info


@pytest.fixture
def data_copy(babyai_bot_data, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(babyai_bot_data, dst)
    return dst


def test_truncated_shard(data_copy):
    shard = data_copy / "shard_00001.h5"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError, match=r"shard .*shard_00001\.h5: cannot be opened as HDF5, the file is truncated or corrupt"):
        validate_shard(shard)
    with pytest.raises(ShardError, match=r"shard_00001\.h5"):
        ClipReader(data_copy, clip_len=4, split=None)


def test_wrong_schema_version(data_copy):
    shard = data_copy / "shard_00002.h5"
    with h5py.File(shard, "a") as fh:
        fh.attrs["schema_version"] = 99
    with pytest.raises(ShardError, match=r"shard_00002\.h5: schema_version is 99, this genie-sima reads schema_version 1"):
        validate_shard(shard)
    with pytest.raises(ShardError, match="schema_version is 99"):
        data_info(data_copy)


def test_not_a_genie_sima_shard(data_copy):
    shard = data_copy / "shard_00000.h5"
    with h5py.File(shard, "w") as fh:
        fh["x"] = [1, 2, 3]
    with pytest.raises(ShardError, match=r"attribute 'format' is None, expected 'genie-sima-episodes'"):
        validate_shard(shard)


def test_corrupt_frame_bytes_are_detected_on_read(data_copy):
    shard = data_copy / "shard_00000.h5"
    with h5py.File(shard, "r") as fh:
        key = sorted(fh["episodes"])[3]
        chunk = fh["episodes"][key]["frames"].id.get_chunk_info(0)  # where the bytes of frames 0..7 live
    raw = bytearray(shard.read_bytes())
    for i in range(chunk.byte_offset + chunk.size // 2, chunk.byte_offset + chunk.size // 2 + 16):
        raw[i] ^= 0xFF
    shard.write_bytes(bytes(raw))
    validate_shard(shard)  # the structure is intact; only the frame data is damaged
    with pytest.raises(ShardError, match=rf"shard_00000\.h5: episode {key}: data cannot be read, the file is corrupt"):
        data_info(data_copy, verify=True)


def test_manifest_pointing_at_missing_shard(data_copy):
    (data_copy / "shard_00001.h5").unlink()
    with pytest.raises(ManifestError, match=r"points at shard 'shard_00001\.h5', which does not exist"):
        read_manifest(data_copy)


def test_manifest_missing_or_wrong(data_copy, tmp_path):
    with pytest.raises(ManifestError, match=r"manifest .*manifest\.parquet: does not exist"):
        read_manifest(tmp_path / "nowhere")
    table = pq.read_table(data_copy / "manifest.parquet").drop_columns(["split"])
    pq.write_table(table, data_copy / "manifest.parquet")
    with pytest.raises(ManifestError, match=r"missing columns \['split'\]"):
        read_manifest(data_copy)


def test_cli_reports_bad_shard_cleanly(data_copy):
    shard = data_copy / "shard_00001.h5"
    shard.write_bytes(shard.read_bytes()[:5000])
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "info", "--data", str(data_copy)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "shard_00001.h5: cannot be opened as HDF5" in proc.stderr
    assert "Traceback" not in proc.stderr
