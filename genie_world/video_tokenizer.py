"""VideoTokenizer: patchify -> ST encoder -> FSQ -> ST decoder -> pixels.

BabyAI default: patch 8 at 64x64, one token per tile, so the dynamics model reasons about tiles.

``per_patch``: encoder and decoder are MLPs applied to each patch alone, so a token is a function of
its patch's pixels and nothing else. In a grid game whose tiles are patches, equal tiles then always
get equal tokens: the token grid *is* the game state, the dynamics never has to guess which of
several codes the tokenizer would give a tile in this context, and what it generates reads back
exactly as what the tokenizer makes of a real frame. (With the ST encoder, 41% of the tiny model's
one-step frames that were right in every tile still differed from the real frame's tokens.)
"""

from __future__ import annotations

import torch
from torch import nn

from .scalars import item as _item

from .fsq import FSQ
from .patches import patchify, to_float, unpatchify
from .slot_cache import SlotKVCache
from .st_transformer import KVCache, STTransformer


class VideoTokenizer(nn.Module):
    def __init__(self, frame_size: int, patch: int, width: int, heads: int, enc_blocks: int, dec_blocks: int,
                 fsq_levels, qk_norm: bool = False, change_weight: float = 1.0, per_patch: bool = False):
        super().__init__()
        self.frame_size, self.patch = frame_size, patch
        self.change_weight = change_weight
        self.per_patch = per_patch
        self.num_patches = (frame_size // patch) ** 2
        pdim = patch * patch * 3
        self.fsq = FSQ(fsq_levels)
        self.vocab_size = self.fsq.codebook_size
        self.embed = nn.Linear(pdim, width)
        self.to_code = nn.Linear(width, self.fsq.dim)
        self.from_code = nn.Linear(self.fsq.dim, width)
        self.to_pixels = nn.Linear(width, pdim)
        if per_patch:
            self.encoder = _PatchMLP(width, enc_blocks)
            self.decoder = _PatchMLP(width, dec_blocks)
        else:
            self.enc_pos = nn.Parameter(torch.randn(self.num_patches, width) * 0.02)
            self.encoder = STTransformer(width, heads, enc_blocks, qk_norm)
            self.dec_pos = nn.Parameter(torch.randn(self.num_patches, width) * 0.02)
            self.decoder = STTransformer(width, heads, dec_blocks, qk_norm)

    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames [B, T, H, W, 3] (uint8 or [0,1]) -> (codes [B, T, P, c], token ids [B, T, P])."""
        x = patchify(to_float(frames) * 2 - 1, self.patch)  # [B, T, P, patch*patch*3]
        h = self.encoder(self.embed(x)) if self.per_patch else self.encoder(self.embed(x) + self.enc_pos)
        return self.fsq(self.to_code(h))

    def _pixels(self, h: torch.Tensor) -> torch.Tensor:
        x = self.to_pixels(h)  # [B, T, P, patch*patch*3]
        x = unpatchify(x, self.patch, self.frame_size, self.frame_size)
        return (x + 1) / 2  # [B, T, H, W, 3], about [0, 1]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if self.per_patch:
            return self._pixels(self.decoder(self.from_code(codes)))
        return self._pixels(self.decoder(self.from_code(codes) + self.dec_pos))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """token ids [B, T, P] -> frames [B, T, H, W, 3] in [0, 1]."""
        return self.decode_codes(self.fsq.indices_to_codes(ids))

    def decode_next(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Decode one new frame of ids [B, 1, P] against the decoder's KV cache (and commit it)."""
        if self.per_patch:
            return self.decode(ids)
        h = self.decoder.forward_cached(self.from_code(self.fsq.indices_to_codes(ids)) + self.dec_pos, cache, commit=True)
        return self._pixels(h)

    def new_slot_cache(self, num_envs: int, window: int, device=None, dtype=torch.float32) -> SlotKVCache:
        if self.per_patch:  # no history to keep: only the episode position
            return SlotKVCache.empty(num_envs, self.num_patches, 0, 1, 1, window, device, dtype)
        return self.decoder.new_slot_cache(num_envs, self.num_patches, window, device, dtype)

    def decode_slots(self, ids: torch.Tensor, cache: SlotKVCache) -> torch.Tensor:
        """Decode each env's new frame ids [B, P] against its decoder history, commit it -> [B, H, W, 3]."""
        codes = self.fsq.indices_to_codes(ids[:, None]).to(self.from_code.weight.dtype)
        if self.per_patch:
            cache.commit()
            return self._pixels(self.decoder(self.from_code(codes)))[:, 0]
        x = self.from_code(codes) + self.dec_pos  # [B, 1, P, D]
        h = self.decoder.forward_slots(x, cache)
        cache.commit()
        return self._pixels(h)[:, 0]

    def loss(self, frames: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """frames [B, T, H, W, 3]. Pixels that differ between consecutive frames of the clip weigh
        ``change_weight`` times more: what an action changes (in BabyAI the agent's few pixels, its
        facing) is a tiny share of the MSE, and without the weight the tokenizer could give two
        facings one code, which the action adapter then cannot tell apart."""
        target = to_float(frames)
        codes, ids = self.encode(frames)
        recon = self.decode_codes(codes)
        se = (recon - target) ** 2
        mse = se.mean()
        loss = mse
        if self.change_weight != 1.0 and frames.shape[1] > 1:
            diff = (frames[:, 1:] != frames[:, :-1]).any(-1, keepdim=True)  # [B, T-1, H, W, 1]
            changed = torch.zeros_like(target[..., :1], dtype=torch.bool)  # [B, T, H, W, 1]
            changed[:, 1:] |= diff
            changed[:, :-1] |= diff
            loss = ((1.0 + (self.change_weight - 1.0) * changed.to(se.dtype)) * se).mean()
        metrics = {"loss": _item(loss), "mse": _item(mse), **self.fsq.usage(ids)}
        return loss, metrics


class _PatchMLP(nn.Module):
    """Residual SiLU MLP blocks applied to each patch's features alone: [..., D] -> [..., D]."""

    def __init__(self, width: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.SiLU(),
                                                  nn.Linear(2 * width, width)) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x)
