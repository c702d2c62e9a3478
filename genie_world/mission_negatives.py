"""Mission negatives: a terminal frame paired with a mission naming another goal is not terminal.

Whether an instruction-following episode ends depends on the mission: in BabyAI GoTo the frame where
the agent faces a red ball ends "go to the red ball" and no other mission. The head learns this from
data in which every terminal frame comes with the one mission it satisfies, so nothing tells it
which words matter; the demo's heads fired early on frames where the agent faced an object of the
right type in the wrong colour ("go to the green key" facing a yellow key). Pairing each terminal
frame of a batch with other transitions' missions that name a different goal, labelled not terminal,
asks that question directly.

"Names a different goal" is read from the words alone, conservatively: the same number of words, at
least one of them different once articles are ignored ("go to the red ball" / "go to the blue ball").
A mission of another length ("go to a ball", "put the red ball next to the blue key") can be satisfied
by the same frame, so it is never used.
"""

from __future__ import annotations

import numpy as np
import torch

from .text_encoder import Vocabulary

_ARTICLES = frozenset({"a", "an", "the"})


def _goal_words(mission: str) -> tuple[tuple[str, ...], int]:
    words = Vocabulary.split(mission)  # the words the head reads (lower case, punctuation dropped)
    return tuple(w for w in words if w not in _ARTICLES), len(words)


def _other_goal(a: tuple[tuple[str, ...], int], b: tuple[tuple[str, ...], int]) -> bool:
    return a[1] == b[1] and len(a[0]) == len(b[0]) and a[0] != b[0]


def names_other_goal(a: str, b: str) -> bool:
    """True when missions ``a`` and ``b`` have as many words and differ in one that is not an article."""
    return _other_goal(_goal_words(a), _goal_words(b))


def mission_negatives(missions: list[str], terminated: torch.Tensor, per_terminal: int,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame rows, mission rows), each [M]: for every terminal row, up to ``per_terminal`` other rows
    of the batch whose mission names another goal (drawn without replacement). Pair the frame of the
    first with the mission of the second, labelled not terminal."""
    term = np.flatnonzero(terminated.detach().cpu().numpy().astype(bool))
    frames, texts = [], []
    if per_terminal <= 0 or len(term) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    goals = [_goal_words(m) for m in missions]
    device = generator.device if generator is not None else "cpu"
    for i in term:
        others = [j for j in range(len(missions)) if _other_goal(goals[i], goals[j])]
        if not others:
            continue
        pick = torch.randperm(len(others), generator=generator, device=device)[:per_terminal].tolist()
        frames += [int(i)] * len(pick)
        texts += [others[k] for k in pick]
    return torch.tensor(frames, dtype=torch.long), torch.tensor(texts, dtype=torch.long)
