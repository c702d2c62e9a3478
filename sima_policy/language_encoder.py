"""Small GRU over instruction token ids -> one embedding per instruction.

Missions are right-padded with id 0. The GRU runs left to right, so its output at the last real token
has read exactly the real words: padding (whatever its length) never changes the embedding. An
all-padding row (an empty mission) gets the embedding of an empty sequence (a learned vector).
"""

from __future__ import annotations

import torch
from torch import nn


class LanguageEncoder(nn.Module):
    """``tokens``: int [B, L] (0 = pad) -> [B, out_dim]."""

    def __init__(self, vocab_size: int, out_dim: int = 128, token_dim: int = 64, hidden_dim: int = 128):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"LanguageEncoder: vocab_size={vocab_size}; build it from the tokenizer's vocab_size")
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, token_dim, padding_idx=0)
        self.gru = nn.GRU(token_dim, hidden_dim, batch_first=True)
        self.empty = nn.Parameter(torch.zeros(hidden_dim))
        self.out = nn.Sequential(nn.Linear(hidden_dim, out_dim), nn.LayerNorm(out_dim))
        self.out_dim = out_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lead = tokens.shape[:-1]
        ids = tokens.reshape(-1, tokens.shape[-1]).long()  # [N, L]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"LanguageEncoder: token ids must be in [0, {self.vocab_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}] (tokenizer and model_config vocab_size differ?)")
        # A batch holds few distinct missions (every env of a prompt's levels has the same one): the GRU, which
        # steps through the tokens one at a time, reads each distinct mission once; rows are encoded
        # independently, so the result is the same.
        ids, rows = torch.unique(ids, dim=0, return_inverse=True)  # [U, L], [N]
        # length = position of the last real token + 1 (robust to a stray pad inside the mission)
        positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)  # [L]
        lengths = (positions * (ids != 0)).amax(dim=1) if ids.shape[1] else ids.new_zeros(ids.shape[0])  # [U]
        h, _ = self.gru(self.embed(ids))  # [U, L, Hd]
        last = h.gather(1, (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, h.shape[-1])).squeeze(1)  # [U, Hd]
        last = torch.where((lengths > 0).unsqueeze(-1), last, self.empty.expand_as(last))
        return self.out(last)[rows].reshape(*lead, self.out_dim)  # [U, D] -> [B, D]
