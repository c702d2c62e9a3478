"""Joint attention over [mission words ; frame tokens], used by the prompt prior."""

from __future__ import annotations

import torch
from torch import nn

from .st_transformer import RMSNorm
from .text_encoder import TextBlock, TextEncoder


class TextFrameEncoder(nn.Module):
    """(text ids [B, L], frame ids [B, P]) -> frame-token states [B, P, D] and text pooled [B, D]."""

    def __init__(self, text_vocab: int, max_text_len: int, vocab_size: int, num_patches: int, width: int,
                 heads: int, depth: int, extra_tokens: int = 0):
        super().__init__()
        self.text = TextEncoder(text_vocab, width, heads, 1, max_text_len)
        self.tok_embed = nn.Embedding(vocab_size + extra_tokens, width)
        self.pos = nn.Parameter(torch.randn(num_patches, width) * 0.02)
        self.blocks = nn.ModuleList(TextBlock(width, heads) for _ in range(depth))
        self.norm = RMSNorm(width)

    def forward(self, text_ids: torch.Tensor, frame_ids: torch.Tensor):
        words, pooled, valid = self.text(text_ids)
        x = torch.cat([words, self.tok_embed(frame_ids) + self.pos], dim=1)  # [B, L+P, D]
        key_mask = torch.cat([valid, torch.ones_like(frame_ids, dtype=torch.bool)], dim=1)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x[:, text_ids.shape[1]:]), pooled
