"""Word vocabulary built from the data's missions/captions, and a small transformer text encoder.

No downloads: the vocabulary is the words seen in collection. Unknown words are an error that lists
the vocabulary, never silent garbage.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .st_transformer import RMSNorm, SwiGLU

PAD = "<pad>"
_WORD = re.compile(r"[a-z0-9]+")


class UnknownWordsError(ValueError):
    pass


class Vocabulary:
    def __init__(self, words: list[str]):
        self.words = [PAD] + sorted(set(words) - {PAD})
        self.index = {w: i for i, w in enumerate(self.words)}

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    @classmethod
    def from_texts(cls, texts) -> "Vocabulary":
        return cls([w for t in texts for w in cls.split(t)])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, max_len: int) -> list[int]:
        words = self.split(text)
        unknown = sorted({w for w in words if w not in self.index})
        if unknown:
            raise UnknownWordsError(
                f"prompt {text!r}: unknown words {unknown}; the vocabulary is: {' '.join(self.words[1:])}"
            )
        if not words:
            raise UnknownWordsError(f"prompt {text!r}: no words; the vocabulary is: {' '.join(self.words[1:])}")
        ids = [self.index[w] for w in words][:max_len]
        return ids + [0] * (max_len - len(ids))

    def encode_batch(self, texts, max_len: int) -> torch.Tensor:
        return torch.tensor([self.encode(t, max_len) for t in texts], dtype=torch.long)

    def to_json(self) -> dict:
        return {"words": self.words}

    @classmethod
    def from_json(cls, data: dict) -> "Vocabulary":
        words = data["words"]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"'words' must be a list of strings, got {type(words).__name__}")
        return cls(words)


class TextBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp = SwiGLU(dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])  # [B, H, L, dh]
        x = x + self.out(y.transpose(1, 2).reshape(b, l, d))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """token ids [B, L] -> (per-word states [B, L, D], pooled [B, D], pad mask [B, L])."""

    def __init__(self, vocab_size: int, width: int, heads: int, depth: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.blocks = nn.ModuleList(TextBlock(width, heads) for _ in range(depth))
        self.norm = RMSNorm(width)

    def forward(self, ids: torch.Tensor):
        valid = ids != 0
        valid = valid | ~valid.any(-1, keepdim=True)  # an all-pad row must still attend somewhere
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, valid)
        x = self.norm(x)
        pooled = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        return x, pooled, valid
