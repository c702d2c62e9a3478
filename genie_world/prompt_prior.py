"""Prompt prior: text -> first-frame tokens by MaskGIT conditioned on the words.

Trained on (mission or caption, first frame) pairs, so one sentence yields many distinct plausible
levels: the seed drives sampling and the confidence noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .scalars import item as _item

from .maskgit import maskgit_decode, random_mask
from .text_frame_encoder import TextFrameEncoder


class PromptPrior(nn.Module):
    def __init__(self, text_vocab: int, max_text_len: int, vocab_size: int, num_patches: int, width: int,
                 heads: int, depth: int):
        super().__init__()
        self.vocab_size, self.num_patches = vocab_size, num_patches
        self.mask_id = vocab_size
        self.encoder = TextFrameEncoder(text_vocab, max_text_len, vocab_size, num_patches, width, heads, depth,
                                        extra_tokens=1)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, text_ids: torch.Tensor, frame_ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.encoder(text_ids, frame_ids)
        return self.head(h)  # [B, P, V]

    def loss(self, text_ids, frame_ids, generator=None) -> tuple[torch.Tensor, dict]:
        mask = random_mask(frame_ids.shape, 0.0, 1.0, generator, frame_ids.device)
        logits = self(text_ids, torch.where(mask, self.mask_id, frame_ids))
        loss = F.cross_entropy(logits[mask], frame_ids[mask])
        acc = (logits[mask].argmax(-1) == frame_ids[mask]).float().mean()
        return loss, {"loss": _item(loss), "masked_token_acc": _item(acc)}

    @torch.no_grad()
    def generate(self, text_ids: torch.Tensor, steps: int, temperature: float, schedule: str = "cosine",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return maskgit_decode(lambda ids: self(text_ids, ids), text_ids.shape[0], self.num_patches, self.mask_id,
                              steps, temperature, schedule, generator, text_ids.device)
