"""Space-time transformer (Genie): spatial attention within a frame, causal temporal attention per
patch position, SwiGLU MLP, RMSNorm, optional QK-norm.

Temporal positions use rotary embeddings, so a sliding-window KV cache keeps relative positions:
generating frame t costs the same whatever t is. Spatial attention can use 2-D rotary embeddings
(``spatial_rope``), which makes "the neighbouring tile" a relation the model sees directly.

How it runs (the maths is the textbook one above; at this project's CPU sizes, width 32-64 and
head dim 4-16, the cost is in the number and size of small ops, not in FLOPs):

- Activations stay [B, T, P, D] throughout: no permuted copies. Spatial attention reads a packed
  projection through strides (``small_attention``: a C++ kernel for small head dims, SDPA
  otherwise); temporal attention over the few frames of a clip or a KV window is a handful of
  broadcast ops over [B, T, S, P, D] instead of B*P*H tiny SDPA problems.
- A pre-norm's weight is folded into the projection after it (x/rms(x) * w) W^T = (x/rms(x)) (W w)^T.
- Rotary embeddings: out = x * C + swap(x) * S, where swap (rotate-half) is a signed permutation of
  each head's channels. The permutation is folded into the projection (extra output rows W[perm]),
  the signs, QK-norm weights and the attention scale into cached cos/sin tables: rotating q and k is
  two elementwise ops. QK-norm normalises q, k and their swaps in one pass (a permutation keeps the
  RMS).
- Under ``torch.no_grad`` the folded weights are cached (keyed on the parameters' versions, so an
  optimizer step or ``load_state_dict`` refreshes them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .slot_cache import SlotKVCache
from .small_attention import attention, attention_packed, frame_attention, kernel_available


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class _RMSScale(torch.autograd.Function):
    """x / rms(x) over the last dim, no weight (callers fold it into the next projection): one fused
    kernel forward and four ops backward, where autograd through ``F.rms_norm`` takes about a dozen."""

    @staticmethod
    def forward(ctx, x, eps):
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], None, eps)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        y, rstd = ctx.saved_tensors
        dot = (g * y).mean(-1, keepdim=True)
        return torch.addcmul(g, y, dot, value=-1).mul_(rstd), None


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu":
        return _RMSScale.apply(x, eps)
    return F.rms_norm(x, (x.shape[-1],), None, eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mult: float = 8 / 3):
        super().__init__()
        hidden = int(dim * mult)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_folded(x, self.gate_up.weight)

    def forward_folded(self, x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, gate_up_weight).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return linear(F.silu(gate) * up, self.down.weight)
        return linear(F.silu(gate, inplace=True).mul_(up), self.down.weight)  # in place in the fresh projection


# --- rotary embeddings ------------------------------------------------------------------------
def rotary_tables(positions: torch.Tensor, dh: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles for ``positions`` ([T] or [N, 1, T]) -> each [..., dh // 2]."""
    half = dh // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, device=positions.device, dtype=torch.float32) / half))
    ang = positions.float()[..., None] * freqs  # [T, half] or [N, 1, T, half]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotary(x: torch.Tensor, positions: torch.Tensor | None = None, tables=None) -> torch.Tensor:
    """Rotate pairs of channels of x [N, H, T, dh] by angles set by ``positions``: [T] (shared by all
    rows) or [N, 1, T] (one position per row). Reference implementation: the model itself applies
    the same rotation through ``_rope_channels`` tables."""
    dh = x.shape[-1]
    half = dh // 2
    cos, sin = tables if tables is not None else rotary_tables(positions, dh, x.dtype)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    if dh % 2:
        out = torch.cat([out, x[..., -1:]], dim=-1)
    return out


def rotary_2d(x: torch.Tensor, side: int) -> torch.Tensor:
    """2-D rotary embedding for a row-major side x side patch grid: half the channels rotate with the
    row, half with the column, so attention scores depend on relative (dy, dx)."""
    p = x.shape[-2]
    half = (x.shape[-1] // 4) * 2  # an even number of channels per axis
    row_t, col_t = _grid_tables(p, side, half, x.dtype, x.device)
    rows = rotary(x[..., :half], tables=row_t)
    cols = rotary(x[..., half:2 * half], tables=col_t)
    return torch.cat([rows, cols, x[..., 2 * half:]], dim=-1)


@functools.lru_cache(maxsize=64)
def _grid_tables(p: int, side: int, half: int, dtype, device):
    """The 2-D rotary tables of a patch grid depend only on its shape: computed once."""
    idx = torch.arange(p, device=device)
    return rotary_tables(idx // side, half, dtype), rotary_tables(idx % side, half, dtype)


@functools.lru_cache(maxsize=None)
def _swap_partner(dh: int, kind: str) -> tuple[int, ...]:
    """rotate-half as a permutation of one head's channels: channel c of swap(x) is +-x[partner[c]]."""
    groups = [(0, dh // 2 * 2)] if kind == "1d" else [(0, dh // 4 * 2), (dh // 4 * 2, dh // 4 * 2)]  # (start, size)
    partner = list(range(dh))
    for start, size in groups:
        h = size // 2
        for i in range(h):
            partner[start + i], partner[start + h + i] = start + h + i, start + i
    return tuple(partner)


def _rope_channels(cos: torch.Tensor, sin: torch.Tensor, dh: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel tables of a 1-D rotation (cos/sin [..., dh//2]): out = x * C + x[partner] * S."""
    parts_c, parts_s = [cos, cos], [-sin, sin]
    if dh % 2:
        parts_c.append(torch.ones_like(cos[..., :1]))
        parts_s.append(torch.zeros_like(sin[..., :1]))
    return torch.cat(parts_c, -1), torch.cat(parts_s, -1)


def _rope_channels_2d(p: int, side: int, dh: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    half = (dh // 4) * 2
    (rc, rs), (cc, cs) = _grid_tables(p, side, half, dtype, device)
    rest = dh - 2 * half
    ones, zeros = torch.ones(p, rest, dtype=dtype, device=device), torch.zeros(p, rest, dtype=dtype, device=device)
    return torch.cat([rc, rc, cc, cc, ones], -1), torch.cat([-rs, rs, -cs, cs, zeros], -1)  # [P, dh]


@functools.lru_cache(maxsize=256)
def _temporal_channels(start: int, t: int, dh: int, dtype, device):
    """C/S [t, dh] for clip positions start..start+t-1 (training clips, KV-cached generation)."""
    return _rope_channels(*rotary_tables(torch.arange(start, start + t, device=device), dh, dtype), dh)


@functools.lru_cache(maxsize=64)
def _spatial_channels(p: int, dh: int, dtype, device):
    side = int(round(p ** 0.5))
    if side * side != p:
        return None
    return _rope_channels_2d(p, side, dh, dtype, device)


@functools.lru_cache(maxsize=64)
def _causal_bias(t: int, s: int, dtype, device) -> torch.Tensor | None:
    """[t, s] additive mask: new frame i (the last t of s) sees every earlier frame and itself."""
    if t == 1:
        return None
    keep = torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)
    return torch.zeros(t, s, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))


# --- attention ---------------------------------------------------------------------------------
def _fold_cached(module: nn.Module, name, fn, *deps: torch.Tensor):
    """``fn()`` (weights derived from parameters): per call while training, cached under no_grad,
    keyed on the parameters' storage and version counters (an optimizer step or ``load_state_dict``
    bumps them)."""
    if (torch.is_grad_enabled() and any(t.requires_grad for t in deps)) or torch.compiler.is_compiling():
        return fn()
    cache = module.__dict__.setdefault("_folded", {})
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in deps)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, fn())
        cache[name] = hit
    return hit[1]


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T (+ b) with the forward through oneDNN and the usual two GEMMs backward."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ w).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = g2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; on CPU fp32 with >= 1024 rows the forward goes through oneDNN, which at these
    skinny shapes (32-64 inputs, 170 or 340 outputs) ran 1.3-3x faster than the default BLAS path."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and _MKLDNN
            and x.numel() // max(1, x.shape[-1]) >= 1024 and not torch.compiler.is_compiling()):
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
            return _OneDNNLinear.apply(x if x.stride(-1) == 1 else x.contiguous(), w, b)
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


_MKLDNN = torch.backends.mkldnn.is_available()


def _fast(x: torch.Tensor) -> bool:
    """Inference path with the fused C++ helpers (``small_attention``): no autograd, fp32 CPU,
    a width the 16-lane kernels take."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and x.shape[-1] % 16 == 0 and kernel_available())


def _add_rms(x: torch.Tensor, y: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, (x + y) / rms) in one pass (inference)."""
    s, h = torch.ops.genie_sima_attn.add_rms(x, y, eps)
    return (x if y is None else s), h


class Attention(nn.Module):
    """Projections of one attention sublayer (state-dict keys ``qkv``, ``out``, ``q_norm``,
    ``k_norm``). ``rope`` None, "1d" (temporal) or "2d" (spatial grid)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, rope: str | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads, self.dh, self.rope_kind = heads, dim // heads, rope
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.dh) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.dh) if qk_norm else nn.Identity()
        self.qk_norm = qk_norm
        d, dh = dim, self.dh
        part = torch.tensor(_swap_partner(dh, rope or "1d"))
        swap = (torch.arange(heads)[:, None] * dh + part[None, :]).reshape(-1)
        # Training projection rows [q, k, swap(q), swap(k), v]: the swaps (rotate-half) come out of the GEMM.
        order = torch.cat([torch.arange(2 * d), swap, d + swap, torch.arange(2 * d, 3 * d)]) if rope else torch.arange(3 * d)
        self.register_buffer("_partner", part, persistent=False)
        self.register_buffer("_order", order, persistent=False)
        # Inference (``_fast``): the qk_prep kernel swaps lanes itself (XOR ``_lane_swap`` within a head).
        self._lane_swap = 0 if not rope else (dh // 2 if rope == "1d" else dh // 4) if dh & (dh - 1) == 0 else -1
        self._fast_ok = dh in (1, 2, 4, 8, 16) and self._lane_swap >= 0

    def _deps(self):
        return (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (self.qkv.weight,)

    def projection(self, norm_weight: torch.Tensor, rows: str = "train") -> torch.Tensor:
        """The projection times the input norm's weight: rows [q, k, (swap q, swap k,) v] ("train")
        or [q, k, v] ("fast")."""
        w = self.qkv.weight
        if rows == "fast" or self.rope_kind is None:
            return _fold_cached(self, "proj3", lambda: w * norm_weight, w, norm_weight)
        return _fold_cached(self, "proj5", lambda: w.index_select(0, self._order) * norm_weight, w, norm_weight)

    def qk_tables(self, cos_sin: tuple[torch.Tensor, torch.Tensor] | None, key=None) -> tuple:
        """[..., 2D] multipliers for [q, k] and for their swaps (rotation, QK-norm weights, the
        attention scale on q) from per-channel rotation tables C/S [..., dh]. ``key`` names fixed
        tables (a clip's positions, a patch grid) so they are cached under no_grad."""
        if key is not None:
            return _fold_cached(self, ("tables", key), lambda: self.qk_tables(cos_sin), *self._deps())
        h, dh = self.heads, self.dh
        scale = dh ** -0.5
        if self.qk_norm:
            wq, wk = self.q_norm.weight, self.k_norm.weight
        else:
            wq = wk = torch.ones(dh, dtype=self.qkv.weight.dtype, device=self.qkv.weight.device)
        if cos_sin is None:
            mul = torch.cat([(wq * scale).repeat(h), wk.repeat(h)])
            return mul, torch.zeros_like(mul)
        c, s = cos_sin
        p = self._partner
        cq, ck = c * (wq * scale), c * wk
        sq, sk = s * (wq.index_select(0, p) * scale), s * wk.index_select(0, p)
        rep = [1] * (c.dim() - 1) + [h]
        return torch.cat([cq.repeat(rep), ck.repeat(rep)], -1), torch.cat([sq.repeat(rep), sk.repeat(rep)], -1)

    def project_rotated(self, h: torch.Tensor, norm_weight: torch.Tensor, tables) -> tuple:
        """h [..., D] (the block input over its RMS) -> (q|k [..., 2D] with q scaled, v [..., D]).
        ``tables`` from ``qk_tables``; None only without rotation and QK-norm (q|k|v then come back
        as one [..., 3D] tensor and None: the caller scales)."""
        d, nh, dh = h.shape[-1], self.heads, self.dh
        x = linear(h, self.projection(norm_weight))
        lead = x.shape[:-1]
        if self.rope_kind is None:
            if tables is None:
                return x, None
            qk, v = x.split([2 * d, d], -1)
            qk = rms_scale(qk.reshape(*lead, 2 * nh, dh), self.q_norm.eps).view(*lead, 2 * d) * tables[0]
            return qk, v
        qk4, v = x.split([4 * d, d], -1)
        if self.qk_norm:  # q, k and their swaps share each head's RMS
            qk4 = rms_scale(qk4.reshape(*lead, 4 * nh, dh), self.q_norm.eps).view(*lead, 4 * d)
        qk, qks = qk4.split([2 * d, 2 * d], -1)
        return torch.addcmul(qk * tables[0], qks, tables[1]), v

    def project_fast(self, h: torch.Tensor, norm_weight: torch.Tensor, tables4) -> tuple:
        """Inference twin of ``project_rotated`` for h [N0, N1, N2, D]: one [q, k, v] GEMM, then
        QK-norm and rotation in one kernel pass (``tables4``: [T0, T1, T2, 2D] pairs, T_i in {1, N_i})."""
        d = h.shape[-1]
        x = linear(h, self.projection(norm_weight, "fast"))
        if tables4 is None:
            return x, None
        eps = self.q_norm.eps if self.qk_norm else -1.0
        qk = torch.ops.genie_sima_attn.qk_prep(x, tables4[0], tables4[1], self.dh, self._lane_swap, eps)
        return qk, x[..., 2 * d:]

    def fast_tables(self, tables, shape4, key=None):
        """``qk_tables`` output as contiguous [T0, T1, T2, 2D] pairs for ``project_fast``."""
        fn = lambda: tuple((t.reshape(shape4) if t.dim() > 1 else t.reshape(1, 1, 1, -1)).contiguous()  # noqa: E731
                           for t in tables)
        return _fold_cached(self, ("fast", key), fn, *self._deps()) if key is not None else fn()


class SpatialAttention(Attention):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False, rope: bool = False):
        super().__init__(dim, heads, qk_norm, "2d" if rope else None)
        self.rope = rope

    def _tables(self, p: int, dtype, device):
        if self.rope:  # a grid that is not square is not rotated (identity tables)
            cs = _spatial_channels(p, self.dh, dtype, device) or (
                torch.ones(p, self.dh, dtype=dtype, device=device), torch.zeros(p, self.dh, dtype=dtype, device=device))
            return self.qk_tables(cs, key=("grid", p))
        if self.qk_norm:
            return self.qk_tables(None, key="scale")
        return None

    def forward(self, x: torch.Tensor, norm_weight: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, P, D] already divided by its RMS (``norm_weight`` = the pre-norm's weight)."""
        b, t, p, d = x.shape
        if norm_weight is None:
            norm_weight = torch.ones(d, dtype=x.dtype, device=x.device)
        tables = self._tables(p, x.dtype, x.device)
        if self._fast_ok and _fast(x):
            t4 = None if tables is None else self.fast_tables(tables, (1, 1, p, 2 * d), key=("grid", p))
            qk, v = self.project_fast(x.reshape(1, b * t, p, d), norm_weight, t4)
        else:
            qk, v = self.project_rotated(x.reshape(b * t, p, d), norm_weight, tables)
        if v is None:  # plain attention: the kernel reads the packed projection
            y = attention_packed(qk.view(b * t, p, 3, self.heads, self.dh))
        else:
            q, k = qk.view(b * t, p, 2, self.heads, self.dh).unbind(2)
            y = attention(q, k, v.view(b * t, p, self.heads, self.dh), scale=1.0)
        return linear(y.reshape(b, t, p, d), self.out.weight)


@dataclass
class LayerCache:
    """Keys/values of committed frames for one temporal-attention layer: [B, t, P, D] (keys
    rotated and QK-normed). They are views into a buffer with room for the frames being generated,
    so attending to [cache, new frames] needs no concatenation."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    _buf: tuple | None = None  # (k_buf, v_buf) [B, capacity, P, D]
    _views: tuple | None = None  # (k, v, offset) as last set here

    def _set(self, off: int, n: int) -> None:
        kb, vb = self._buf
        self.k, self.v = kb[:, off:off + n], vb[:, off:off + n]
        self._views = (self.k, self.v, off)

    def _offset(self) -> int | None:
        """Frame offset of ``k``/``v`` in the buffer, None when they are not views into it (the
        caller replaced them with something else)."""
        if self._buf is None or self.k is None:
            return None
        if self._views is not None and self.k is self._views[0] and self.v is self._views[1]:
            return self._views[2]
        kb, vb = self._buf
        for t, b in ((self.k, kb), (self.v, vb)):
            if (t.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() or t.stride() != b.stride()
                    or t.shape[0] != b.shape[0] or t.shape[2:] != b.shape[2:]):
                return None
        off, rem = divmod(self.k.storage_offset() - kb.storage_offset(), kb.stride(1))
        if rem or (self.v.storage_offset() - vb.storage_offset()) != off * vb.stride(1):
            return None
        return off

    def with_new(self, k: torch.Tensor, v: torch.Tensor, keep: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """[committed frames, new frames k/v [B, t, P, D]] as views of the buffer (writing the new
        frames past the committed ones; nothing committed is touched)."""
        t = k.shape[1]
        if torch.compiler.is_compiling():
            return torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)
        n = 0 if self.k is None else self.k.shape[1]
        off = self._offset() if n else 0
        if off is None or self._buf is None or off + n + t > self._buf[0].shape[1]:
            cap = max(n, keep or 0) + t + 8
            kb = k.new_empty((k.shape[0], cap, *k.shape[2:]))
            vb = v.new_empty((v.shape[0], cap, *v.shape[2:]))
            if n:
                kb[:, :n] = self.k
                vb[:, :n] = self.v
            self._buf, off = (kb, vb), 0
            if n:
                self._set(0, n)
        kb, vb = self._buf
        kb[:, off + n:off + n + t] = k
        vb[:, off + n:off + n + t] = v
        return kb[:, off:off + n + t], vb[:, off:off + n + t]

    def commit(self, k: torch.Tensor, v: torch.Tensor, keep: int | None) -> None:
        """Append this pass's new frames k/v [B, t, P, D] (already written by ``with_new`` when
        the cache held frames) and keep the last ``keep``."""
        t = k.shape[1]
        if self.k is None:
            self.k, self.v = k, v
        elif torch.compiler.is_compiling():
            self.k, self.v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)
        else:
            off, n = self._offset(), self.k.shape[1]
            start = max(0, n + t - keep) if keep is not None else 0
            self._set(off + start, n + t - start)
            return
        if keep is not None and self.k.shape[1] > keep:
            self.k, self.v = self.k[:, -keep:], self.v[:, -keep:]


@dataclass
class KVCache:
    """Per-layer temporal caches plus the absolute time index of the next frame."""

    layers: list[LayerCache] = field(default_factory=list)
    next_pos: int = 0
    max_frames: int | None = None  # sliding window: committed frames kept

    @property
    def length(self) -> int:
        return 0 if not self.layers or self.layers[0].k is None else self.layers[0].k.shape[1]


class TemporalAttention(Attention):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__(dim, heads, qk_norm, "1d")

    def clip_tables(self, start: int, t: int, dtype, device):
        """``qk_tables`` for clip positions start..start+t-1, shaped [T, 1, 2D]."""
        cs = _temporal_channels(start, t, self.dh, dtype, device)
        return _fold_cached(self, ("clip", start, t), lambda: tuple(z[:, None, :] for z in self.qk_tables(cs)),
                            *self._deps())

    def project_clip(self, x: torch.Tensor, norm_weight: torch.Tensor, start: int) -> tuple:
        """x [B, T, P, D] (over its RMS) at positions start.. -> (q|k [B, T, P, 2D], v [B, T, P, D])."""
        t, d = x.shape[1], x.shape[-1]
        tables = self.clip_tables(start, t, x.dtype, x.device)
        if self._fast_ok and _fast(x):
            return self.project_fast(x, norm_weight, self.fast_tables(tables, (1, t, 1, 2 * d), key=("clip", start, t)))
        return self.project_rotated(x, norm_weight, tables)

    def forward(self, x: torch.Tensor, norm_weight: torch.Tensor, start: int = 0, cache: LayerCache | None = None,
                keep: int | None = None):
        """x [B, T, P, D] (over its RMS) at clip positions start..start+T-1. With ``cache``, x holds
        new frames that attend to the cached ones too (``keep``: the cache's window). Returns
        (y, (k, v)) where (k, v) [B, T, P, D] are this call's keys/values for the caller to commit."""
        t, d = x.shape[1], x.shape[-1]
        qk, v = self.project_clip(x, norm_weight, start)
        q, k = qk[..., :d], qk[..., d:]  # [B, T, P, D]
        if cache is not None and cache.k is not None:
            k_all, v_all = cache.with_new(k, v, keep)
            y = frame_attention(q, k_all, v_all, self.heads, _causal_bias(t, k_all.shape[1], x.dtype, x.device))
        else:
            y = frame_attention(q, k, v, self.heads, _causal_bias(t, t, x.dtype, x.device), qk=qk)
        return linear(y, self.out.weight), (k, v)

    def forward_slots(self, x: torch.Tensor, norm_weight: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot: torch.Tensor, bias: torch.Tensor, cs,
                      need_output: bool = True) -> torch.Tensor | None:
        """One new frame per env, x [B, 1, P, D] (over its RMS), against the env's slots
        (``k_cache``/``v_cache`` [B, S, P, D]); writes its keys/values into the env's write slot
        ``slot`` [B] (overwritten until the frame is committed). ``bias`` [B, 1, S]: 0 for the
        slots the frame may see, -inf for the others; ``cs``: rotation tables of the envs'
        positions [B, 1, 1, dh]."""
        b, _, p, d = x.shape
        tables = self.qk_tables(cs)  # [B, 1, 1, 2D]
        if self._fast_ok and _fast(x):
            qk, v = self.project_fast(x, norm_weight, self.fast_tables(tables, (b, 1, 1, 2 * d)))
        else:
            qk, v = self.project_rotated(x, norm_weight, tables)  # [B, 1, P, 2D], [B, 1, P, D]
        s = k_cache.shape[1]
        rows = torch.arange(b, device=x.device) * s + slot
        k_cache.view(b * s, p, d).index_copy_(0, rows, qk[:, 0, :, d:].to(k_cache.dtype))
        v_cache.view(b * s, p, d).index_copy_(0, rows, v[:, 0].to(v_cache.dtype))
        if not need_output:
            return None
        y = frame_attention(qk[..., :d], k_cache.to(qk.dtype), v_cache.to(qk.dtype), self.heads, bias)
        return linear(y, self.out.weight)


class STBlock(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False, spatial_rope: bool = False):
        super().__init__()
        self.norm_s, self.norm_t, self.norm_m = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)
        self.spatial = SpatialAttention(dim, heads, qk_norm, spatial_rope)
        self.temporal = TemporalAttention(dim, heads, qk_norm)
        self.mlp = SwiGLU(dim)

    def _mlp_weight(self):
        return _fold_cached(self, "mlp", lambda: self.mlp.gate_up.weight * self.norm_m.weight,
                            self.mlp.gate_up.weight, self.norm_m.weight)

    def _mlp_fast(self, h):
        gu = linear(h, self._mlp_weight())
        return linear(torch.ops.genie_sima_attn.swiglu(gu), self.mlp.down.weight)

    def _spatial(self, x):
        if _fast(x):
            _, h = _add_rms(x, None, self.norm_s.eps)
            return x + self.spatial(h, self.norm_s.weight)
        return x + self.spatial(rms_scale(x, self.norm_s.eps), self.norm_s.weight)

    def _temporal_in(self, x):
        """(x after the spatial sublayer, its temporal-norm input)."""
        if _fast(x):
            _, h = _add_rms(x, None, self.norm_s.eps)
            x, h = _add_rms(x, self.spatial(h, self.norm_s.weight), self.norm_t.eps)
            return x, h
        x = self._spatial(x)
        return x, rms_scale(x, self.norm_t.eps)

    def _mlp_out(self, x, y):
        """The block output from x and the temporal sublayer's output y."""
        if _fast(x):
            x, h = _add_rms(x, y, self.norm_m.eps)
            return x + self._mlp_fast(h)
        x = x + y
        return x + self.mlp.forward_folded(rms_scale(x, self.norm_m.eps), self._mlp_weight())

    def forward(self, x, start: int = 0, cache: LayerCache | None = None, keep: int | None = None):
        x, h = self._temporal_in(x)
        y, kv = self.temporal(h, self.norm_t.weight, start, cache, keep)
        return self._mlp_out(x, y), kv

    def forward_slots(self, x, k_cache, v_cache, slot, bias, cs, need_output: bool = True):
        x, h = self._temporal_in(x)
        y = self.temporal.forward_slots(h, self.norm_t.weight, k_cache, v_cache, slot, bias, cs, need_output)
        return self._mlp_out(x, y) if need_output else None


class STTransformer(nn.Module):
    """A stack of STBlocks over [B, T, P, D]; ``cond`` [B, T, D] is added before every block."""

    def __init__(self, dim: int, heads: int, depth: int, qk_norm: bool = False, spatial_rope: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(STBlock(dim, heads, qk_norm, spatial_rope) for _ in range(depth))
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        cond = None if cond is None else cond[:, :, None, :]
        for block in self.blocks:
            if cond is not None:
                x = x + cond
            x, _ = block(x)
        return self.norm(x)

    def new_cache(self, max_frames: int | None = None) -> KVCache:
        return KVCache([LayerCache() for _ in self.blocks], 0, max_frames)

    def new_slot_cache(self, num_envs: int, num_patches: int, window: int, device=None,
                       dtype=torch.float32) -> SlotKVCache:
        att = self.blocks[0].temporal
        return SlotKVCache.empty(num_envs, num_patches, len(self.blocks), att.heads, att.dh, window, device, dtype)

    def forward_slots(self, x: torch.Tensor, cache: SlotKVCache, cond: torch.Tensor | None = None,
                      need_output: bool = True) -> torch.Tensor | None:
        """One new frame per env x [B, 1, P, D] against ``cache`` (see ``SlotKVCache``). The caller
        commits with ``cache.commit()`` after the pass that carries the frame's final tokens; that
        pass only needs the keys/values (``need_output=False`` skips what only feeds the output)."""
        bias = cache.attention_bias(x.dtype)  # [B, 1, S]
        slot = cache.write_slot()
        # Every layer rotates by the same per-env positions: one cos/sin table per pass.
        dh = self.blocks[0].temporal.dh
        cs = _rope_channels(*rotary_tables(cache.step[:, None, None], dh, x.dtype), dh)  # [B, 1, 1, dh]
        cond = None if cond is None else cond[:, :, None, :]
        last = len(self.blocks) - 1
        for i, (block, k, v) in enumerate(zip(self.blocks, cache.k, cache.v)):
            if cond is not None:
                x = x + cond
            x = block.forward_slots(x, k, v, slot, bias, cs, need_output or i < last)
        return self.norm(x) if need_output else None

    def forward_cached(self, x: torch.Tensor, cache: KVCache, cond: torch.Tensor | None = None,
                       commit: bool = False, need_output: bool = True) -> torch.Tensor | None:
        """Run new frames x [B, t, P, D] against ``cache``; with ``commit`` append them to it.

        MaskGIT calls this several times for the same new frame (commit=False) and once more with
        the final tokens (commit=True), so the cache only ever holds finished frames.
        """
        t = x.shape[1]
        cond = None if cond is None else cond[:, :, None, :]
        new_kv = []
        last = len(self.blocks) - 1
        for i, (block, layer) in enumerate(zip(self.blocks, cache.layers)):
            if cond is not None:
                x = x + cond
            if i == last and not need_output:  # only this layer's keys/values are still needed
                x, h = block._temporal_in(x)
                qk, v = block.temporal.project_clip(h, block.norm_t.weight, cache.next_pos)
                new_kv.append((qk[..., x.shape[-1]:], v))
                if layer.k is not None:
                    layer.with_new(*new_kv[-1], cache.max_frames)
                break
            x, kv = block(x, cache.next_pos, layer, cache.max_frames)
            new_kv.append(kv)
        if commit:
            for layer, (k, v) in zip(cache.layers, new_kv):
                layer.commit(k, v, cache.max_frames)
            cache.next_pos += t
        return self.norm(x) if need_output else None
