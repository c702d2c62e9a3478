"""HDF5 episode shards: the on-disk format, an atomic writer, and a validating reader.

Layout (schema version 1)::

    /                      attrs: format, schema_version, source, frame_size, policy, epsilon,
                                  base_seed, shard_index, episode_start, episode_stop,
                                  num_episodes, num_actions, action_names, plan_fingerprint
    /episodes/ep_0000012   attrs: mission (utf-8), level_id, seed, episode_index, length,
                                  return, success
        frames      uint8   [T+1, H, W, 3]   gzip + fletcher32, chunks of 8 frames
        actions     int64   [T]              action t takes frame t -> frame t+1
        rewards     float32 [T]
        terminated  bool    [T]
        truncated   bool    [T]

A shard appears under its final name only once complete (temp file + fsync + rename), and HDF5
writes no timestamps here, so the same plan and seed give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ..atomic_io import commit_file, temp_path_for
from ..errors import ShardError
from .episode import EpisodeRecord

FORMAT = "genie-sima-episodes"
SCHEMA_VERSION = 1
FRAME_CHUNK = 8
EPISODE_FIELDS = ("frames", "actions", "rewards", "terminated", "truncated")
REQUIRED_FILE_ATTRS = (
    "format", "schema_version", "source", "frame_size", "policy", "epsilon", "base_seed",
    "shard_index", "episode_start", "episode_stop", "num_episodes", "num_actions",
    "action_names", "plan_fingerprint",
)
REQUIRED_EPISODE_ATTRS = ("mission", "level_id", "seed", "episode_index", "length", "return", "success")


def episode_key(episode_index: int) -> str:
    return f"ep_{episode_index:07d}"


def shard_name(shard_index: int) -> str:
    return f"shard_{shard_index:05d}.h5"


class ShardWriter:
    """Write episodes into a temp file; ``commit`` makes the shard appear atomically."""

    def __init__(self, final_path: Path):
        self.final_path = Path(final_path)
        self.tmp_path = temp_path_for(self.final_path)
        self._fh = h5py.File(self.tmp_path, "w")
        self._episodes = self._fh.create_group("episodes")
        self.count = 0

    def add(self, episode_index: int, ep: EpisodeRecord) -> None:
        g = self._episodes.create_group(episode_key(episode_index))
        n, h, w, c = ep.frames.shape  # [T+1, H, W, 3]
        g.create_dataset(
            "frames", data=ep.frames, chunks=(min(FRAME_CHUNK, n), h, w, c),
            compression="gzip", compression_opts=4, fletcher32=True,
        )
        for name in ("actions", "rewards", "terminated", "truncated"):
            g.create_dataset(name, data=getattr(ep, name), fletcher32=True, chunks=True)
        g.attrs["mission"] = ep.mission
        g.attrs["level_id"] = ep.level_id
        g.attrs["seed"] = np.int64(ep.seed)
        g.attrs["episode_index"] = np.int64(episode_index)
        g.attrs["length"] = np.int64(ep.length)
        g.attrs["return"] = np.float64(ep.total_return)
        g.attrs["success"] = bool(ep.success)
        self.count += 1

    def commit(self, attrs: dict) -> Path:
        for k, v in attrs.items():
            self._fh.attrs[k] = v
        self._fh.attrs["format"] = FORMAT
        self._fh.attrs["schema_version"] = np.int64(SCHEMA_VERSION)
        self._fh.attrs["num_episodes"] = np.int64(self.count)
        self._fh.close()
        commit_file(self.tmp_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        try:
            self._fh.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self.tmp_path.exists():
            self.abort()
        return False


def _attr(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def open_shard(path: Path) -> h5py.File:
    """Open a shard read-only, turning h5py's errors into one that names the file."""
    path = Path(path)
    if not path.exists():
        raise ShardError(path, "file does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        size = path.stat().st_size
        raise ShardError(path, f"cannot be opened as HDF5, the file is truncated or corrupt ({size} bytes; h5py: {e})") from e


def validate_shard(path: Path, expected_frame_size: int | None = None) -> dict:
    """Check structure and schema without reading frames; returns the file attributes."""
    path = Path(path)
    with open_shard(path) as fh:
        try:
            fmt = _attr(fh.attrs.get("format"))
            if fmt != FORMAT:
                raise ShardError(path, f"attribute 'format' is {fmt!r}, expected {FORMAT!r} (not a genie-sima episode shard)")
            version = _attr(fh.attrs.get("schema_version"))
            if version != SCHEMA_VERSION:
                raise ShardError(
                    path, f"schema_version is {version!r}, this genie-sima reads schema_version {SCHEMA_VERSION}; "
                    "re-collect this shard with this version"
                )
            missing = [a for a in REQUIRED_FILE_ATTRS if a not in fh.attrs]
            if missing:
                raise ShardError(path, f"missing file attributes {missing}")
            attrs = {k: _attr(fh.attrs[k]) for k in fh.attrs}
            if expected_frame_size is not None and attrs["frame_size"] != expected_frame_size:
                raise ShardError(path, f"frame_size is {attrs['frame_size']}, expected {expected_frame_size}")
            if "episodes" not in fh:
                raise ShardError(path, "missing group '/episodes'")
            keys = list(fh["episodes"].keys())
            if len(keys) != attrs["num_episodes"]:
                raise ShardError(path, f"holds {len(keys)} episodes but attribute num_episodes says {attrs['num_episodes']}")
            fs = attrs["frame_size"]
            for key in keys:
                g = fh["episodes"][key]
                for name in EPISODE_FIELDS:
                    if name not in g:
                        raise ShardError(path, f"episode {key}: missing dataset {name!r}")
                for a in REQUIRED_EPISODE_ATTRS:
                    if a not in g.attrs:
                        raise ShardError(path, f"episode {key}: missing attribute {a!r}")
                t = int(g.attrs["length"])
                frames = g["frames"]
                if frames.dtype != np.uint8 or frames.shape != (t + 1, fs, fs, 3):
                    raise ShardError(
                        path, f"episode {key}: frames are {frames.dtype}{list(frames.shape)}, "
                        f"expected uint8[{t + 1}, {fs}, {fs}, 3]"
                    )
                for name in ("actions", "rewards", "terminated", "truncated"):
                    if g[name].shape != (t,):
                        raise ShardError(path, f"episode {key}: {name} has shape {list(g[name].shape)}, expected [{t}]")
        except ShardError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise ShardError(path, f"corrupt HDF5 structure ({e})") from e
    attrs["action_names"] = json.loads(attrs["action_names"])
    return attrs


def episode_summaries(path: Path) -> list[dict]:
    """Per-episode attributes of a shard (no frames read)."""
    with open_shard(path) as fh:
        out = []
        for key in fh["episodes"]:
            g = fh["episodes"][key]
            row = {k: _attr(g.attrs[k]) for k in REQUIRED_EPISODE_ATTRS}
            row["episode_key"] = key
            out.append(row)
        return out


def read_episode_arrays(fh: h5py.File, key: str, start: int = 0, stop: int | None = None, path=None) -> dict:
    """Frames ``[start, stop)`` and the transitions between them from an open shard.

    Returns frames [n, H, W, 3] and actions/rewards/terminated/truncated [n-1]: entry t of those
    takes frame t to frame t+1.
    """
    try:
        g = fh["episodes"][key]
        n_frames = g["frames"].shape[0]
        stop = n_frames if stop is None else stop
        if not (0 <= start < stop <= n_frames):
            raise ShardError(path or fh.filename, f"episode {key}: frame range [{start}, {stop}) outside [0, {n_frames})")
        return {
            "frames": g["frames"][start:stop],
            "actions": g["actions"][start:stop - 1],
            "rewards": g["rewards"][start:stop - 1],
            "terminated": g["terminated"][start:stop - 1],
            "truncated": g["truncated"][start:stop - 1],
            "mission": _attr(g.attrs["mission"]),
        }
    except ShardError:
        raise
    except KeyError as e:
        raise ShardError(path or fh.filename, f"episode {key!r} is not in this shard") from e
    except OSError as e:
        # fletcher32 checksum or gzip failures land here: the bytes on disk are damaged.
        raise ShardError(path or fh.filename, f"episode {key}: data cannot be read, the file is corrupt ({e})") from e
