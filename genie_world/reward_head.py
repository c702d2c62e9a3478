"""Imagined reward and termination, conditioned on the mission text.

Reads the tokens of the frame an action led to plus the instruction; the agent trained in
imagination never sees ground-truth reward, only this head's prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .scalars import item as _item

from .text_frame_encoder import TextFrameEncoder


class RewardHead(nn.Module):
    def __init__(self, text_vocab: int, max_text_len: int, vocab_size: int, num_patches: int, width: int,
                 heads: int, depth: int, term_pos_weight: float = 5.0):
        super().__init__()
        self.encoder = TextFrameEncoder(text_vocab, max_text_len, vocab_size, num_patches, width, heads, depth)
        self.out = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, 2))
        self.term_pos_weight = term_pos_weight

    def forward(self, text_ids: torch.Tensor, frame_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (reward [B], termination logit [B]) for arriving in frame ``frame_ids`` [B, P]."""
        h, pooled = self.encoder(text_ids, frame_ids)
        out = self.out(torch.cat([h.max(dim=1).values, pooled], dim=-1))
        return out[:, 0], out[:, 1]

    def loss(self, text_ids, frame_ids, reward, terminated) -> tuple[torch.Tensor, dict]:
        pred_r, term_logit = self(text_ids, frame_ids)
        term = terminated.float()
        l_r = F.mse_loss(pred_r, reward.float())
        pos_weight = torch.tensor(self.term_pos_weight, device=term.device)
        l_t = F.binary_cross_entropy_with_logits(term_logit, term, pos_weight=pos_weight)
        acc = ((term_logit > 0).float() == term).float().mean()
        return l_r + l_t, {"loss": _item(l_r + l_t), "reward_mse": _item(l_r), "term_bce": _item(l_t),
                           "term_acc": _item(acc)}
