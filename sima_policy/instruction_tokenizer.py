"""Word-level instruction tokenizer built from the data's missions/prompts (no downloads).

Ids: 0 is ``<pad>``; with ``unknown="unk"`` id 1 is ``<unk>``; the words follow in sorted order.

Unknown words. The default, ``unknown="error"``, raises ``UnknownWordsError`` naming the unknown words
and listing the whole vocabulary: an agent trained on BabyAI missions cannot follow an instruction it has
never read, and silently mapping it to ``<unk>`` would hide a wrong prompt or level file. ``unknown="unk"``
maps unknown words to ``<unk>`` instead (for free-form prompts at play time).

A mission longer than ``max_len`` words is also an error (``MissionTooLongError``), never truncated,
for the same reason. Empty missions (no words) encode to all padding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

import numpy as np

PAD = "<pad>"
UNK = "<unk>"
_WORD = re.compile(r"[a-z0-9]+")


class UnknownWordsError(ValueError):
    pass


class MissionTooLongError(ValueError):
    pass


class InstructionTokenizer:
    """``InstructionTokenizer.from_texts(missions)``; ``encode_batch(texts, max_len) -> int64 [B, L]``."""

    def __init__(self, words: Iterable[str], unknown: str = "error", max_len: int | None = None):
        if unknown not in ("error", "unk"):
            raise ValueError(f"unknown={unknown!r}: expected 'error' or 'unk'")
        self.unknown = unknown
        specials = [PAD] + ([UNK] if unknown == "unk" else [])
        self.words = specials + sorted(set(words) - {PAD, UNK})
        self.index = {w: i for i, w in enumerate(self.words)}
        self.max_len = max_len  # the default L of encode_batch (the longest mission seen when built from texts)
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    # ---- building -------------------------------------------------------------------------------------
    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case words (letters and digits); punctuation is dropped."""
        return _WORD.findall(str(text).lower())

    @classmethod
    def from_texts(cls, texts: Iterable[str], unknown: str = "error", max_len: int | None = None
                   ) -> "InstructionTokenizer":
        texts = list(texts)
        if not texts:
            raise ValueError("InstructionTokenizer.from_texts: no missions/prompts given")
        longest = max(len(cls.split(t)) for t in texts)
        return cls([w for t in texts for w in cls.split(t)], unknown=unknown, max_len=max_len or max(1, longest))

    def __len__(self) -> int:
        return len(self.words)

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def unk_id(self) -> int | None:
        return self.index.get(UNK)

    # ---- encoding -------------------------------------------------------------------------------------
    def _vocab_text(self) -> str:
        return " ".join(w for w in self.words if w not in (PAD, UNK))

    def encode(self, text: str, max_len: int | None = None) -> np.ndarray:
        """One mission -> int64 [L] (right-padded with 0)."""
        length = int(max_len or self.max_len or 0)
        if length <= 0:
            raise ValueError("encode: give max_len (this tokenizer has no default max_len)")
        key = (text, length)
        hit = self._cache.get(key)
        if hit is not None:
            return hit.copy()
        words = self.split(text)
        unknown = sorted({w for w in words if w not in self.index})
        if unknown and self.unknown == "error":
            raise UnknownWordsError(f"mission {text!r}: unknown words {unknown}; the vocabulary is: {self._vocab_text()}")
        if len(words) > length:
            raise MissionTooLongError(f"mission {text!r} has {len(words)} words; the policy reads at most {length}")
        ids = np.zeros(length, np.int64)
        ids[: len(words)] = [self.index.get(w, self.unk_id or 0) for w in words]
        if len(self._cache) < 100_000:
            self._cache[key] = ids.copy()
        return ids

    def encode_batch(self, texts: Sequence[str], max_len: int | None = None) -> np.ndarray:
        """Missions -> int64 [B, L] numpy array (0 = pad); ``torch.as_tensor`` it for a module."""
        length = int(max_len or self.max_len or 0)
        out = np.zeros((len(texts), length), np.int64)  # [B, L]
        for i, t in enumerate(texts):
            out[i] = self.encode(t, length)
        return out

    def decode(self, ids) -> str:
        """int ids [L] -> the words, pads dropped (the inverse of ``encode`` up to normalisation)."""
        return " ".join(self.words[int(i)] for i in np.asarray(ids).reshape(-1) if int(i) != 0)

    # ---- saving ---------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": "sima_policy.InstructionTokenizer/1", "words": self.words, "unknown": self.unknown,
                "max_len": self.max_len}

    @classmethod
    def from_json(cls, data: dict | str) -> "InstructionTokenizer":
        if isinstance(data, str):
            data = json.loads(data)
        tok = cls(data["words"], unknown=data.get("unknown", "error"), max_len=data.get("max_len"))
        if tok.words != list(data["words"]):
            raise ValueError("tokenizer JSON: the word list is not in canonical order (was it edited by hand?)")
        return tok

    def __repr__(self) -> str:
        return f"InstructionTokenizer({self.vocab_size} ids, max_len={self.max_len}, unknown={self.unknown!r})"
