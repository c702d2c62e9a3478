"""Imagined reward and termination, conditioned on the mission text.

Reads the tokens of the frame an action led to plus the instruction; the agent trained in
imagination never sees ground-truth reward, only this head's prediction.

Whether a BabyAI episode ends is relational: the tile in front of the agent holds the object the
mission names. A transformer over [words; frame tokens] stayed at chance on that (balanced
termination accuracy 0.50 on the tiny run, still 0.57 after 4x the steps), so the frame is read as
what it is, a grid: token embeddings on the patch grid, 3x3 convolutions whose features are
modulated by the mission (FiLM), then max+mean pooling. On the same data that reached 0.97 balanced
accuracy in 1200 steps (BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .scalars import item as _item
from .text_encoder import TextEncoder


class RewardHead(nn.Module):
    def __init__(self, text_vocab: int, max_text_len: int, vocab_size: int, num_patches: int, width: int,
                 heads: int, depth: int, term_pos_weight: float = 5.0):
        super().__init__()
        self.side = int(round(math.sqrt(num_patches)))
        if self.side * self.side != num_patches:
            raise ValueError(f"reward head: {num_patches} patches do not form a square grid")
        self.text = TextEncoder(text_vocab, width, heads, 1, max_text_len)
        self.tok_embed = nn.Embedding(vocab_size, width)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        self.films = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(depth))
        self.out = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, 2))
        self.term_pos_weight = term_pos_weight

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """The pooled mission encoding [B, D] the head is conditioned on."""
        return self.text(text_ids)[1]

    def forward(self, text_ids: torch.Tensor, frame_ids: torch.Tensor,
                text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (reward [B], termination logit [B]) for arriving in frame ``frame_ids`` [B, P].
        ``text``: ``encode_text(text_ids)`` when the caller keeps it (a World re-encodes a mission
        only when an env resets)."""
        if text is None:
            text = self.encode_text(text_ids)  # pooled mission [B, D]
        b = frame_ids.shape[0]
        x = self.tok_embed(frame_ids).view(b, self.side, self.side, -1).permute(0, 3, 1, 2)  # [B, D, side, side]
        for conv, film in zip(self.convs, self.films):
            gamma, beta = film(text).chunk(2, dim=-1)  # [B, D] each
            x = x + F.silu(conv(x) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])
        out = self.out(torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=-1))
        return out[:, 0], out[:, 1]

    def loss(self, text_ids, frame_ids, reward, terminated, reward_known=None) -> tuple[torch.Tensor, dict]:
        """``reward_known`` [B] bool: rows whose reward is a label (default all); the rest train only
        the termination logit (mission negatives: ``mission_negatives.py``)."""
        pred_r, term_logit = self(text_ids, frame_ids)
        term = terminated.float()
        if reward_known is None:
            l_r = F.mse_loss(pred_r, reward.float())
        else:
            known = reward_known.float()
            l_r = ((pred_r - reward.float()) ** 2 * known).sum() / known.sum().clamp(min=1)
        pos_weight = torch.tensor(self.term_pos_weight, device=term.device)
        l_t = F.binary_cross_entropy_with_logits(term_logit, term, pos_weight=pos_weight)
        acc = ((term_logit > 0).float() == term).float().mean()
        return l_r + l_t, {"loss": _item(l_r + l_t), "reward_mse": _item(l_r), "term_bce": _item(l_t),
                           "term_acc": _item(acc)}
