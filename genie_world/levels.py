"""LevelSet: a shareable set of playable levels (first-frame tokens plus what made them), and its file.

A level file is HDF5 (``levels.h5``):

    attrs   format, schema_version, bundle_fingerprint, bundle_path, prompt, seed, source
    first_tokens   [N, P] int16  tokenizer ids of each level's first frame (int32 for a codebook over 32,767)
    missions       [N]    utf-8  the instruction the reward head is conditioned on
    level_ids      [N]    utf-8

Token ids only mean something to the bundle whose tokenizer produced them, so loading against
another bundle (another fingerprint) is refused. A file with no levels, a missing attribute or dataset, or
more than ``MAX_LEVELS`` levels is refused at load, naming the file and what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .atomic_files import write_bytes_atomic
from .build import vocab_size

FORMAT = "genie-sima-levels"
SCHEMA_VERSION = 1
ATTRS = ("format", "schema_version", "bundle_fingerprint", "bundle_path", "prompt", "seed", "source")
# A level file is read whole into memory: refuse one that would not fit before reading it.
MAX_LEVELS = 1_000_000
MAX_TOKENS_PER_FRAME = 16_384


class LevelFileError(ValueError):
    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"level file {self.path}: {problem}")

    def __reduce__(self):
        # Ray re-raises an actor's error in the caller by pickling it; the default reduce passes only the
        # message, so without this the caller got "Failed to deserialize exception" instead of this error.
        return type(self), (self.path, self.problem)


@dataclass
class LevelSet:
    first_tokens: np.ndarray  # [N, P] int
    missions: list[str]
    level_ids: list[str]
    bundle_fingerprint: str
    prompt: str | None = None
    seed: int | None = None
    source: str = "prompt"  # prompt | image
    bundle_path: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.first_tokens = np.asarray(self.first_tokens)
        n = len(self.first_tokens)
        if self.first_tokens.ndim != 2:
            raise ValueError(f"first_tokens must be [N, P], got shape {self.first_tokens.shape}")
        if len(self.missions) != n or len(self.level_ids) != n:
            raise ValueError(f"{n} levels but {len(self.missions)} missions and {len(self.level_ids)} level ids")
        if not np.issubdtype(self.first_tokens.dtype, np.integer):
            raise ValueError(f"first_tokens must be integer token ids, got dtype {self.first_tokens.dtype}")
        if self.first_tokens.size and int(self.first_tokens.min()) < 0:
            raise ValueError(f"first_tokens must be >= 0 (token ids), got {int(self.first_tokens.min())}")

    def __len__(self) -> int:
        return len(self.first_tokens)

    def __getitem__(self, idx) -> "LevelSet":
        """A subset (int, slice or index array) as a LevelSet with the same provenance."""
        sel = np.arange(len(self))[idx]
        sel = np.atleast_1d(sel)
        return LevelSet(self.first_tokens[sel], [self.missions[i] for i in sel], [self.level_ids[i] for i in sel],
                        self.bundle_fingerprint, self.prompt, self.seed, self.source, self.bundle_path, dict(self.extra))

    def distinct(self) -> int:
        """Number of distinct first frames (as token grids)."""
        return len(np.unique(self.first_tokens, axis=0)) if len(self) else 0


def token_dtype(max_token: int) -> np.dtype:
    """The narrowest stored dtype that holds ids up to ``max_token`` (int16 wrapped 40000 to -25536)."""
    for dtype in (np.int16, np.int32):
        if max_token <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"token id {max_token} does not fit int32")


def save_levels(path, levels: LevelSet) -> Path:
    """Write atomically: an interrupted save never leaves a half-written level file under ``path``."""
    path = Path(path)
    if not path.parent.exists():
        raise LevelFileError(path, f"directory {path.parent} does not exist")
    if len(levels) == 0:
        raise LevelFileError(path, "no levels to save (a level file holds at least one level)")
    dtype = token_dtype(int(levels.first_tokens.max()))
    str_t = h5py.string_dtype("utf-8")
    # Built in memory, then written as plain bytes: HDF5 failing a write on a full disk left h5py objects
    # that crashed the interpreter when collected; a plain write fails with a clean OSError instead.
    with h5py.File(f"levels-{id(levels)}.h5", "w", driver="core", backing_store=False) as f:
        f.attrs.update({"format": FORMAT, "schema_version": SCHEMA_VERSION,
                        "bundle_fingerprint": levels.bundle_fingerprint, "bundle_path": levels.bundle_path,
                        "prompt": levels.prompt or "", "seed": -1 if levels.seed is None else int(levels.seed),
                        "source": levels.source})
        f.create_dataset("first_tokens", data=levels.first_tokens.astype(dtype))
        f.create_dataset("missions", data=np.array(levels.missions, dtype=object), dtype=str_t)
        f.create_dataset("level_ids", data=np.array(levels.level_ids, dtype=object), dtype=str_t)
        f.flush()
        image = f.id.get_file_image()
    write_bytes_atomic(path, image)
    return path


def load_levels(path, bundle=None) -> LevelSet:
    """Read a level file; with ``bundle`` (a WorldBundle), refuse levels made by another bundle."""
    path = Path(path)
    if not path.exists():
        raise LevelFileError(path, "does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise LevelFileError(path, f"is not a readable HDF5 file ({e})") from e
    with f:
        if f.attrs.get("format") != FORMAT:
            raise LevelFileError(path, f"format is {f.attrs.get('format')!r}, expected {FORMAT!r}")
        version = int(f.attrs.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            raise LevelFileError(path, f"schema_version is {version}, this genie-sima reads {SCHEMA_VERSION}")
        missing = [a for a in ATTRS if a not in f.attrs]
        if missing:
            raise LevelFileError(path, f"attributes {missing} are missing (a level file has {list(ATTRS)})")
        for name in ("first_tokens", "missions", "level_ids"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise LevelFileError(path, f"dataset {name!r} is missing")
        _check_shapes(path, f)
        try:
            seed = int(f.attrs["seed"])
            levels = LevelSet(f["first_tokens"][()],
                              [m.decode() if isinstance(m, bytes) else str(m) for m in f["missions"][()]],
                              [m.decode() if isinstance(m, bytes) else str(m) for m in f["level_ids"][()]],
                              str(f.attrs["bundle_fingerprint"]), str(f.attrs["prompt"]) or None,
                              None if seed < 0 else seed, str(f.attrs["source"]), str(f.attrs["bundle_path"]))
        except (TypeError, ValueError) as e:
            raise LevelFileError(path, str(e)) from e
    levels.first_tokens = levels.first_tokens.astype(np.int64)
    if bundle is not None:
        check_levels_match(levels, bundle, path)
    return levels


def _check_shapes(path: Path, f: h5py.File) -> None:
    """Sizes from the file's metadata, before any dataset is read."""
    shape = f["first_tokens"].shape
    if len(shape) != 2:
        raise LevelFileError(path, f"first_tokens has shape {shape}, expected [levels, tokens per frame]")
    n, p = shape
    if n == 0:
        raise LevelFileError(path, "holds no levels (generate some with `genie-sima generate`)")
    if n > MAX_LEVELS or p > MAX_TOKENS_PER_FRAME:
        raise LevelFileError(path, f"first_tokens is {n} x {p}; at most {MAX_LEVELS} levels of "
                                   f"{MAX_TOKENS_PER_FRAME} tokens are read")
    for name in ("missions", "level_ids"):
        if f[name].shape != (n,):
            raise LevelFileError(path, f"{name} has shape {f[name].shape}, expected ({n},) for {n} levels")


def check_levels_match(levels: LevelSet, bundle, where="levels") -> None:
    if levels.bundle_fingerprint != bundle.fingerprint:
        raise LevelFileError(where, f"made by world bundle {levels.bundle_path or '?'} (fingerprint "
                                    f"{levels.bundle_fingerprint}), but the loaded bundle {bundle.path} has fingerprint "
                                    f"{bundle.fingerprint}: token ids of one bundle mean nothing to another; "
                                    f"generate the levels again with `genie-sima generate --bundle {bundle.path}`")
    p = bundle.dynamics.num_patches if "dynamics" in bundle.parts else levels.first_tokens.shape[1]
    if levels.first_tokens.shape[1] != p:
        raise LevelFileError(where, f"levels have {levels.first_tokens.shape[1]} tokens per frame, the bundle {p}")
    codes = vocab_size(bundle.config)
    top = int(levels.first_tokens.max()) if len(levels) else 0
    if top >= codes:
        raise LevelFileError(where, f"token id {top} is outside the bundle's codebook of {codes} codes")
