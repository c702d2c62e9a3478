"""Parse ``--source`` specs (``babyai:<level id>``, ``atari:<game>``) and build the game."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SourceError

KINDS = ("babyai", "atari")


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    name: str

    @property
    def text(self) -> str:
        return f"{self.kind}:{self.name}"


def parse_source(text: str) -> SourceSpec:
    kind, sep, name = text.partition(":")
    if not sep or not name or kind not in KINDS:
        raise SourceError(
            f"--source {text!r}: expected 'babyai:<level id>' (e.g. babyai:BabyAI-GoToLocal-v0) "
            f"or 'atari:<game>' (e.g. atari:Pong)"
        )
    return SourceSpec(kind, name)


def make_game(spec: SourceSpec, frame_size: int, max_steps: int | None = None):
    if spec.kind == "babyai":
        from .babyai_game import BabyAIGame

        return BabyAIGame(spec.name, frame_size=frame_size, max_steps=max_steps)
    from .atari_game import AtariGame

    return AtariGame(spec.name, frame_size=frame_size, max_steps=max_steps)
