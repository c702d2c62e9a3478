"""LevelConstraints: facts every real first frame obeys, learned from the data, used to reject
generated levels that break them.

The one that matters: "exactly one of these tokens". In BabyAI the agent is drawn as one of a few
tokens (one per facing) and every real level has exactly one; the prompt prior, sampling each tile
with MaskGIT, gave 70% of levels no agent at all on the tiny run (unplayable: no action changes
them). ``fit`` finds such groups without being told what an agent is: tokens that never appear twice
in a frame, greedily grouped while they never co-occur, kept when the group covers every frame.
Stored in the bundle as ``level_constraints.json``.

The same facts hold in every later frame of an episode (the agent never vanishes or doubles), so
the World can decode under them too (``constrain_logits``): each group's token goes to the one
position where the model finds it most likely, and nowhere else.
"""

from __future__ import annotations

import numpy as np
import torch

FILE = "level_constraints.json"


class LevelConstraints:
    def __init__(self, exactly_one: list[list[int]] | None = None, frames: int = 0,
                 reward_only_at_termination: bool = False):
        self.exactly_one = [sorted(int(t) for t in g) for g in (exactly_one or [])]
        self.frames = int(frames)
        # True when every nonzero reward in the data came with termination (BabyAI: reward on success
        # only). The World then pays the head's reward only on steps it predicts terminal: otherwise
        # the head's small errors on ordinary steps (MAE ~0.03) add up over an episode to more than
        # the real success reward, and PPO learns to farm them.
        self.reward_only_at_termination = bool(reward_only_at_termination)

    @classmethod
    def fit(cls, first_tokens: np.ndarray, min_frames: int = 50) -> "LevelConstraints":
        """``first_tokens`` [N, P]: token ids of real first frames."""
        tokens = np.asarray(first_tokens)
        n = len(tokens)
        if n < min_frames:
            return cls([], n)
        vocab = np.unique(tokens)
        counts = (tokens[:, :, None] == vocab[None, None, :]).sum(1)  # [N, K] occurrences per frame
        present = counts > 0
        candidates = [k for k in np.argsort(-present.sum(0)) if counts[:, k].max() == 1]
        groups = []
        while candidates:
            covered, group = np.zeros(n, bool), []
            for k in candidates:
                if not (present[:, k] & covered).any():
                    group.append(k)
                    covered |= present[:, k]
            if not covered.all():
                break
            groups.append([int(vocab[k]) for k in group])
            candidates = [k for k in candidates if k not in group]
        return cls(groups, n)

    def valid(self, first_tokens: np.ndarray) -> np.ndarray:
        """bool [N]: which frames satisfy every constraint."""
        tokens = np.asarray(first_tokens)
        ok = np.ones(len(tokens), bool)
        for group in self.exactly_one:
            ok &= np.isin(tokens, group).sum(1) == 1
        return ok

    def to_json(self) -> dict:
        return {"exactly_one": self.exactly_one, "frames": self.frames,
                "reward_only_at_termination": self.reward_only_at_termination}

    @classmethod
    def from_json(cls, d: dict) -> "LevelConstraints":
        groups = d.get("exactly_one", [])
        if not isinstance(groups, list) or not all(
                isinstance(g, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in g) for g in groups):
            raise ValueError("'exactly_one' must be a list of lists of token ids")
        if not isinstance(d.get("frames", 0), int) or not isinstance(d.get("reward_only_at_termination", False), bool):
            raise ValueError("'frames' must be an integer and 'reward_only_at_termination' a boolean")
        return cls(groups, d.get("frames", 0), d.get("reward_only_at_termination", False))


def constrain_logits(logits: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor,
                     groups: list[torch.Tensor]) -> torch.Tensor:
    """MaskGIT logits [B, P, V] -> logits under which each frame gets exactly one token of each group.

    Rows that already hold a group token in a decided (unmasked) position may not place another;
    the others must place one, at the masked position where the group is most likely relative to
    the best other token there. Works on the group's few columns plus one pass over the codebook
    (``logits`` is modified in place: MaskGIT hands over a fresh tensor each round).
    """
    neg = torch.finfo(logits.dtype).min
    rows = torch.arange(logits.shape[0], device=logits.device)
    for group in groups:
        in_group = logits.index_select(-1, group)  # [B, P, G]
        best_in = in_group.amax(-1)  # [B, P]
        logits.index_fill_(-1, group, neg)  # no group token anywhere ...
        best_out = logits.amax(-1)
        decided = ~masked & torch.isin(ids, group)
        need = ~decided.any(1)  # [B]
        margin = torch.where(masked, best_in - best_out, torch.full_like(best_in, neg))
        pos = margin.argmax(1)  # [B]
        # ... except at each needing row's chosen position, where only group tokens remain.
        chosen = torch.full_like(logits[rows, pos], neg)  # [B, V]
        chosen.index_copy_(-1, group, in_group[rows, pos])
        logits[rows[need], pos[need]] = chosen[need]
    return logits
