"""Space-time transformer (Genie): spatial attention within a frame, causal temporal attention per
patch position, SwiGLU MLP, RMSNorm, optional QK-norm. All attention goes through SDPA.

Temporal positions use rotary embeddings, so a sliding-window KV cache keeps relative positions:
generating frame t costs the same whatever t is. Spatial attention can use 2-D rotary embeddings
(``spatial_rope``), which makes "the neighbouring tile" a relation the model sees directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .slot_cache import SlotKVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mult: float = 8 / 3):
        super().__init__()
        hidden = int(dim * mult)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def rotary_tables(positions: torch.Tensor, dh: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles for ``positions`` ([T] or [N, 1, T]) -> each [..., dh // 2]."""
    half = dh // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, device=positions.device, dtype=torch.float32) / half))
    ang = positions.float()[..., None] * freqs  # [T, half] or [N, 1, T, half]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotary(x: torch.Tensor, positions: torch.Tensor | None = None, tables=None) -> torch.Tensor:
    """Rotate pairs of channels of x [N, H, T, dh] by angles set by ``positions``: [T] (shared by all
    rows) or [N, 1, T] (one position per row, as served envs are at different steps). ``tables``
    (from ``rotary_tables``) lets layers that share positions compute cos/sin once."""
    dh = x.shape[-1]
    half = dh // 2
    cos, sin = tables if tables is not None else rotary_tables(positions, dh, x.dtype)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    if dh % 2:
        out = torch.cat([out, x[..., -1:]], dim=-1)
    return out


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads, self.dh = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.dh) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.dh) if qk_norm else nn.Identity()

    def project(self, x: torch.Tensor):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)  # 3 x [N, H, T, dh]
        return self.q_norm(q), self.k_norm(k), v

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        n, h, t, dh = y.shape
        return self.out(y.transpose(1, 2).reshape(n, t, h * dh))


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


class SpatialAttention(Attention):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False, rope: bool = False):
        super().__init__(dim, heads, qk_norm)
        self.rope = rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, p, d = x.shape
        q, k, v = self.project(x.reshape(b * t, p, d))  # [B*T, H, P, dh]
        if self.rope:
            side = int(round(p ** 0.5))
            if side * side == p:
                q, k = rotary_2d(q, side), rotary_2d(k, side)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.merge(y).view(b, t, p, d)


@dataclass
class LayerCache:
    """Keys/values of committed frames for one temporal-attention layer: [B*P, H, t, dh]."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


@dataclass
class KVCache:
    """Per-layer temporal caches plus the absolute time index of the next frame."""

    layers: list[LayerCache] = field(default_factory=list)
    next_pos: int = 0
    max_frames: int | None = None  # sliding window: committed frames kept

    @property
    def length(self) -> int:
        return 0 if not self.layers or self.layers[0].k is None else self.layers[0].k.shape[2]


class TemporalAttention(Attention):
    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None):
        """x [B, T, P, D]. With ``cache``, x holds new frames that attend to the cached ones too.

        Returns (y, (k, v)) where (k, v) are this call's keys/values for the caller to commit.
        """
        b, t, p, d = x.shape
        xt = x.permute(0, 2, 1, 3).reshape(b * p, t, d)  # [B*P, T, D]: one sequence per patch
        q, k, v = self.project(xt)
        q, k = rotary(q, positions), rotary(k, positions)
        if cache is not None and cache.k is not None:
            k_all = torch.cat([cache.k, k], dim=2)
            v_all = torch.cat([cache.v, v], dim=2)
            past = cache.k.shape[2]
            # New frame i may see every cached frame and new frames <= i.
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = self.merge(y).view(b, p, t, d).permute(0, 2, 1, 3)  # [B, T, P, D]
        return y, (k, v)

    def forward_slots(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache: SlotKVCache,
                      mask: torch.Tensor, tables) -> torch.Tensor:
        """One new frame per env, x [B, 1, P, D], against the env's slots; writes its keys/values
        into the env's write slot (overwritten until the frame is committed)."""
        b, _, p, d = x.shape
        q, k, v = self.project(x.reshape(b * p, 1, d))  # [B*P, H, 1, dh]
        q, k = rotary(q, tables=tables), rotary(k, tables=tables)
        rows = torch.arange(b * p, device=x.device)
        slot = cache.write_slot().repeat_interleave(p)
        k_cache[rows, :, slot] = k[:, :, 0].to(k_cache.dtype)
        v_cache[rows, :, slot] = v[:, :, 0].to(v_cache.dtype)
        y = F.scaled_dot_product_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype), attn_mask=mask)
        return self.merge(y).view(b, 1, p, d)  # [B*P, 1, D] -> [B, 1, P, D]


class STBlock(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False, spatial_rope: bool = False):
        super().__init__()
        self.norm_s, self.norm_t, self.norm_m = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)
        self.spatial = SpatialAttention(dim, heads, qk_norm, spatial_rope)
        self.temporal = TemporalAttention(dim, heads, qk_norm)
        self.mlp = SwiGLU(dim)

    def forward(self, x, positions, cache: LayerCache | None = None):
        x = x + self.spatial(self.norm_s(x))
        y, kv = self.temporal(self.norm_t(x), positions, cache)
        x = x + y
        x = x + self.mlp(self.norm_m(x))
        return x, kv

    def forward_slots(self, x, k_cache, v_cache, cache: SlotKVCache, mask, tables):
        x = x + self.spatial(self.norm_s(x))
        x = x + self.temporal.forward_slots(self.norm_t(x), k_cache, v_cache, cache, mask, tables)
        return x + self.mlp(self.norm_m(x))


class STTransformer(nn.Module):
    """A stack of STBlocks over [B, T, P, D]; ``cond`` [B, T, D] is added before every block."""

    def __init__(self, dim: int, heads: int, depth: int, qk_norm: bool = False, spatial_rope: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(STBlock(dim, heads, qk_norm, spatial_rope) for _ in range(depth))
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        for block in self.blocks:
            if cond is not None:
                x = x + cond[:, :, None, :]
            x, _ = block(x, positions)
        return self.norm(x)

    def new_cache(self, max_frames: int | None = None) -> KVCache:
        return KVCache([LayerCache() for _ in self.blocks], 0, max_frames)

    def new_slot_cache(self, num_envs: int, num_patches: int, window: int, device=None,
                       dtype=torch.float32) -> SlotKVCache:
        att = self.blocks[0].temporal
        return SlotKVCache.empty(num_envs, num_patches, len(self.blocks), att.heads, att.dh, window, device, dtype)

    def forward_slots(self, x: torch.Tensor, cache: SlotKVCache, cond: torch.Tensor | None = None) -> torch.Tensor:
        """One new frame per env x [B, 1, P, D] against ``cache`` (see ``SlotKVCache``). The caller
        commits with ``cache.commit()`` after the pass that carries the frame's final tokens."""
        mask = cache.attention_mask()
        # Every layer rotates by the same per-env positions: one cos/sin table per pass.
        pos = cache.step.repeat_interleave(cache.num_patches)[:, None, None]  # [B*P, 1, 1]
        tables = rotary_tables(pos, self.blocks[0].temporal.dh, x.dtype)
        for block, k, v in zip(self.blocks, cache.k, cache.v):
            if cond is not None:
                x = x + cond[:, :, None, :]
            x = block.forward_slots(x, k, v, cache, mask, tables)
        return self.norm(x)

    def forward_cached(self, x: torch.Tensor, cache: KVCache, cond: torch.Tensor | None = None,
                       commit: bool = False) -> torch.Tensor:
        """Run new frames x [B, t, P, D] against ``cache``; with ``commit`` append them to it.

        MaskGIT calls this several times for the same new frame (commit=False) and once more with
        the final tokens (commit=True), so the cache only ever holds finished frames.
        """
        t = x.shape[1]
        positions = torch.arange(cache.next_pos, cache.next_pos + t, device=x.device)
        new_kv = []
        for block, layer in zip(self.blocks, cache.layers):
            if cond is not None:
                x = x + cond[:, :, None, :]
            x, kv = block(x, positions, layer)
            new_kv.append(kv)
        if commit:
            for layer, (k, v) in zip(cache.layers, new_kv):
                layer.k = k if layer.k is None else torch.cat([layer.k, k], dim=2)
                layer.v = v if layer.v is None else torch.cat([layer.v, v], dim=2)
                if cache.max_frames is not None and layer.k.shape[2] > cache.max_frames:
                    layer.k = layer.k[:, :, -cache.max_frames:]
                    layer.v = layer.v[:, :, -cache.max_frames:]
            cache.next_pos += t
        return self.norm(x)
