"""What one transition is made of, and the gatekeeper that checks a batch before anything is written.

A batch is a dict of arrays, one row per transition (N rows):

    obs_tokens       int16   [N, P]   world-model tokens of o_t (P = 64 for the tiny world model)
    next_obs_tokens  int16   [N, P]   tokens of o_{t+1}; NOT stored per row (see ring_storage.py)
    action           int32   [N]      discrete action, or float32 [N, A] when action_dim = A > 0
    reward           float32 [N]      r_{t+1}, finite
    terminated       bool    [N]
    truncated        bool    [N]
    mission_id       int32   [N]
    episode_id       int64   [N]
    step             int32   [N]      t, >= 0

Accepted dtypes: any integer dtype for integer fields when every value fits the stored dtype; any
float dtype for float fields (values finite); bool fields must be bool. Anything else is refused
with a ValueError that names the field, what was expected and what came. ``validate`` and
``order_by_episode`` (repeated steps, o_{t+1} consistency inside an episode run) never change state,
so a refused batch leaves the buffer exactly as it was; the sharded client runs both before it sends
anything, so a bad batch reaches no shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Fields kept in the ring, in storage order. next_obs_tokens is input-only (derived on sampling).
STORED_FIELDS = ("obs_tokens", "action", "reward", "terminated", "truncated", "mission_id", "episode_id", "step")
INPUT_FIELDS = STORED_FIELDS[:1] + ("next_obs_tokens",) + STORED_FIELDS[1:]
MAX_STEP = int(np.iinfo(np.int32).max) - 1  # a run's final-observation row stores last step + 1


@dataclass(frozen=True)
class TransitionSchema:
    obs_tokens: int = 64  # P: tokens per observation
    action_dim: int = 0  # 0: one discrete int32 action; A > 0: a float32 action vector [A] (Box)
    num_actions: int = 0  # discrete only: actions must lie in [0, num_actions); 0 = unchecked

    def __post_init__(self):
        for name in ("obs_tokens", "action_dim", "num_actions"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"TransitionSchema.{name}: expected an int, got {type(v).__name__} {v!r}")
        if self.obs_tokens < 1:
            raise ValueError(f"TransitionSchema.obs_tokens: expected >= 1, got {self.obs_tokens}")
        if self.action_dim < 0 or self.num_actions < 0:
            raise ValueError(f"TransitionSchema: action_dim and num_actions must be >= 0, got "
                             f"{self.action_dim}, {self.num_actions}")

    def field_specs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """name -> (stored dtype, shape of one row)."""
        act = (np.dtype(np.float32), (self.action_dim,)) if self.action_dim else (np.dtype(np.int32), ())
        return {
            "obs_tokens": (np.dtype(np.int16), (self.obs_tokens,)),
            "next_obs_tokens": (np.dtype(np.int16), (self.obs_tokens,)),
            "action": act,
            "reward": (np.dtype(np.float32), ()),
            "terminated": (np.dtype(np.bool_), ()),
            "truncated": (np.dtype(np.bool_), ()),
            "mission_id": (np.dtype(np.int32), ()),
            "episode_id": (np.dtype(np.int64), ()),
            "step": (np.dtype(np.int32), ()),
        }

    def payload_bytes(self) -> int:
        """Bytes of one transition's own fields (o_t, a_t, r, flags, ids); o_{t+1} is the next row's o_t."""
        specs = self.field_specs()
        return sum(specs[f][0].itemsize * int(np.prod(specs[f][1], dtype=np.int64)) for f in STORED_FIELDS)

    def to_dict(self) -> dict:
        return {"obs_tokens": int(self.obs_tokens), "action_dim": int(self.action_dim),
                "num_actions": int(self.num_actions)}

    # --- the gatekeeper -----------------------------------------------------------------------
    def validate(self, batch) -> dict[str, np.ndarray]:
        """Check every field; return contiguous arrays in the stored dtypes. Raises ValueError."""
        if not isinstance(batch, dict):
            raise ValueError(f"add: expected a dict of arrays, got {type(batch).__name__}")
        missing = [f for f in INPUT_FIELDS if f not in batch]
        extra = sorted(str(k) for k in batch if k not in INPUT_FIELDS)
        if missing or extra:
            raise ValueError(f"add: fields missing {missing}, unknown {extra}; expected exactly {list(INPUT_FIELDS)}")
        specs = self.field_specs()
        out: dict[str, np.ndarray] = {}
        n = None
        for name in INPUT_FIELDS:
            dtype, row_shape = specs[name]
            try:
                arr = np.asarray(batch[name])
            except Exception as e:  # noqa: BLE001 - ragged lists and odd objects
                raise ValueError(f"field {name!r}: expected an array of {dtype} with rows of shape "
                                 f"{list(row_shape)}, got something numpy cannot read ({e})") from None
            if arr.ndim != 1 + len(row_shape) or tuple(arr.shape[1:]) != row_shape:
                raise ValueError(f"field {name!r}: expected shape [N{''.join(', ' + str(d) for d in row_shape)}], "
                                 f"got {list(arr.shape)}")
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise ValueError(f"field {name!r}: expected {n} rows (as {INPUT_FIELDS[0]!r}), got {arr.shape[0]}")
            out[name] = _cast(name, arr, dtype)
        n = int(n)
        if n:
            if out["step"].min() < 0 or out["step"].max() > MAX_STEP:
                raise ValueError(f"field 'step': expected values in [0, {MAX_STEP}], got "
                                 f"[{int(out['step'].min())}, {int(out['step'].max())}]")
            if self.num_actions and not self.action_dim:
                a = out["action"]
                if a.min() < 0 or a.max() >= self.num_actions:
                    raise ValueError(f"field 'action': expected values in [0, {self.num_actions}), "
                                     f"got [{int(a.min())}, {int(a.max())}]")
        return out


def _cast(name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    kind = arr.dtype.kind
    if dtype.kind == "b":
        if kind != "b":
            raise ValueError(f"field {name!r}: expected dtype bool, got {arr.dtype}")
    elif dtype.kind == "i":
        if kind not in "iu":
            raise ValueError(f"field {name!r}: expected an integer dtype (stored as {dtype}), got {arr.dtype}")
        if arr.size and arr.dtype != dtype:
            info = np.iinfo(dtype)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise ValueError(f"field {name!r}: values [{lo}, {hi}] do not fit {dtype} "
                                 f"[{info.min}, {info.max}] (got dtype {arr.dtype})")
    elif dtype.kind == "f":
        if kind != "f":
            raise ValueError(f"field {name!r}: expected a float dtype (stored as {dtype}), got {arr.dtype}")
        if arr.size:
            cast = arr.astype(dtype, copy=False)
            if not np.isfinite(cast).all():
                bad = int((~np.isfinite(cast)).sum())
                raise ValueError(f"field {name!r}: expected finite values, got {bad} non-finite "
                                 f"(NaN/inf, or too large for {dtype})")
            return np.ascontiguousarray(cast)
    return np.ascontiguousarray(arr, dtype=dtype)


def order_by_episode(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A validated batch with rows ordered by (episode_id, step), after the checks that need that order.

    Refused: a repeated (episode_id, step); inside a run of consecutive steps of one episode, a
    next_obs_tokens that differs from the next row's obs_tokens, or a step that ends the episode.
    """
    b = _sorted_by_episode_step(b)
    _check_runs(b)
    return b


def _sorted_by_episode_step(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows ordered by (episode_id, step); a repeated (episode_id, step) is refused."""
    ep, st = b["episode_id"], b["step"]
    if ep.size < 2:
        return b
    ordered = (ep[1:] > ep[:-1]) | ((ep[1:] == ep[:-1]) & (st[1:] > st[:-1]))
    if ordered.all():
        return b
    order = np.lexsort((st, ep))
    b = {k: v[order] for k, v in b.items()}
    ep, st = b["episode_id"], b["step"]
    same = (ep[1:] == ep[:-1]) & (st[1:] == st[:-1])
    if same.any():
        i = int(np.argmax(same))
        raise ValueError(f"add: episode {int(ep[i])} step {int(st[i])} appears more than once in one batch")
    return b


def _check_runs(b: dict[str, np.ndarray]) -> None:
    """Inside a run of consecutive steps, o_{t+1} must be the next row's o_t and no step may end the episode."""
    ep, st = b["episode_id"], b["step"]
    k = np.flatnonzero((ep[1:] == ep[:-1]) & (st[1:] == st[:-1] + 1))
    if k.size == 0:
        return
    differs = (b["next_obs_tokens"][k] != b["obs_tokens"][k + 1]).any(axis=1)
    if differs.any():
        j = int(k[np.argmax(differs)])
        raise ValueError(f"field 'next_obs_tokens': episode {int(ep[j])} step {int(st[j])} differs from "
                         f"obs_tokens of step {int(st[j]) + 1} in the same batch")
    ended = b["terminated"][k] | b["truncated"][k]
    if ended.any():
        j = int(k[np.argmax(ended)])
        raise ValueError(f"fields 'terminated'/'truncated': episode {int(ep[j])} ends at step {int(st[j])} but step "
                         f"{int(st[j]) + 1} follows in the same batch")
