"""WorldBuilder: a sentence (through the prompt prior) or an image (through the tokenizer) -> levels.

Candidate level i of ``generate(prompt, num_worlds, seed)`` is drawn from its own generator seeded
by (seed, i), so levels do not depend on num_worlds or the batch size: 16 levels are a prefix of 1000.
When the bundle has level constraints (e.g. "exactly one agent"), candidates that break them are
rejected and the next candidates drawn: same seed, same levels still holds.
"""

from __future__ import annotations

import numpy as np
import torch

from .bundle import WorldBundle
from .levels import LevelSet, load_levels
from .maskgit import seeded_generator
from .text_encoder import UnknownWordsError


def level_generators(seed: int, indices) -> list[torch.Generator]:
    """One torch generator per candidate level index."""
    return [seeded_generator(seed, i) for i in indices]


class WorldBuilder:
    def __init__(self, bundle: WorldBundle, device: str | torch.device = "cpu", batch_size: int = 256,
                 max_candidates_per_level: int = 50):
        self.bundle, self.device, self.batch_size = bundle, torch.device(device), batch_size
        self.cfg = bundle.config
        self.max_candidates_per_level = max_candidates_per_level
        self.last_acceptance: float | None = None  # valid fraction of the candidates of the last prompt

    def _text_ids(self, text: str, what: str) -> torch.Tensor:
        if self.bundle.vocab is None:
            raise ValueError(f"world bundle {self.bundle.path} has no vocab.json; it cannot read a {what}")
        if not isinstance(text, str):
            raise TypeError(f"{what} must be a string, got {type(text).__name__}")
        try:
            return torch.tensor([self.bundle.vocab.encode(text, self.cfg.text_max_len)], dtype=torch.long)
        except UnknownWordsError as e:
            raise UnknownWordsError(str(e) if what == "prompt" else f"{what}: {e}") from None

    @torch.no_grad()
    def generate(self, prompt: str | None = None, image=None, num_worlds: int = 16, seed: int = 0,
                 mission: str | list[str] | None = None) -> LevelSet:
        """Levels from a text ``prompt`` or an ``image`` ([H, W, 3] or [N, H, W, 3] uint8).

        ``mission`` is the instruction the reward head scores (default: the prompt); it must use the
        bundle's vocabulary too. With N images it may be a list of N missions, one per image (real first
        frames with their episodes' missions); images and missions are cycled together.
        """
        if (prompt is None) == (image is None):
            raise ValueError("give exactly one of prompt= or image=")
        if not isinstance(num_worlds, (int, np.integer)) or isinstance(num_worlds, bool) or num_worlds < 1:
            raise ValueError(f"num_worlds must be a positive integer, got {num_worlds!r}")
        if prompt is not None:
            self._text_ids(prompt, "prompt")  # refuse unknown words before any work
        mission = prompt if mission is None else mission
        if mission is None:
            raise ValueError("a level from an image needs mission= (the instruction its reward is scored against)")
        missions = [mission] if isinstance(mission, str) else list(mission)
        if not isinstance(mission, str):
            if prompt is not None:
                raise ValueError("a list of missions goes with images (one per image), not with a prompt")
            count = 1 if np.asarray(image).ndim == 3 else len(image)
            if len(missions) != count:
                raise ValueError(f"{len(missions)} missions for {count} images: a list of missions needs one per image")
        for m in missions:
            if m != prompt:
                self._text_ids(m, "mission")
        if prompt is not None:
            tokens, source = self._from_prompt(prompt, int(num_worlds), int(seed)), "prompt"
        else:
            tokens, source = self._from_image(image, int(num_worlds)), "image"
        tag = self.bundle.fingerprint[:8]
        ids = [f"{tag}-{source}-s{seed}-{i}" for i in range(len(tokens))]
        return LevelSet(tokens, [missions[i % len(missions)] for i in range(len(tokens))], ids, self.bundle.fingerprint,
                        prompt, int(seed), source, str(self.bundle.path))

    def resolve(self, prompt: str | None = None, levels: LevelSet | None = None, level_file=None,
                num_worlds: int = 16, seed: int = 0, mission: str | None = None) -> LevelSet:
        """The level set a server client, env or play page asked for: generated from ``prompt``, given
        as ``levels``, or read from ``level_file`` (refused when made by another bundle)."""
        if sum(x is not None for x in (prompt, levels, level_file)) != 1:
            raise ValueError("give exactly one of prompt=, levels= or level_file=")
        if level_file is not None:
            return load_levels(level_file, self.bundle)
        if levels is not None:
            return levels
        return self.generate(prompt, num_worlds=num_worlds, seed=seed, mission=mission)

    def _from_prompt(self, prompt: str, n: int, seed: int) -> np.ndarray:
        if "prompt_prior" not in self.bundle.parts:
            raise ValueError(f"world bundle {self.bundle.path} has no prompt_prior part; train the 'prior' stage")
        text = self._text_ids(prompt, "prompt").to(self.device)
        prior, out, kept, tried, valid = self.bundle.prompt_prior, [], 0, 0, 0
        constraints = self.bundle.constraints
        limit = n * (self.max_candidates_per_level if constraints else 1)
        while kept < n and tried < limit:
            size = min(self.batch_size, limit - tried) if constraints else min(self.batch_size, n - kept)
            gens = level_generators(seed, range(tried, tried + size))
            cand = prior.generate(text.expand(size, -1), self.cfg.prior_maskgit_steps, self.cfg.prior_temperature,
                                  self.cfg.maskgit_schedule, gens).cpu().numpy()
            tried += size
            if constraints:
                cand = cand[constraints.valid(cand)]
            valid += len(cand)
            out.append(cand[: n - kept])
            kept += len(out[-1])
        self.last_acceptance = None if not constraints else valid / tried
        if kept < n:
            raise ValueError(f"prompt {prompt!r}: only {kept} of {tried} generated levels obey the bundle's level "
                             f"constraints ({self.bundle.path}/level_constraints.json: exactly one of each token group "
                             f"{constraints.exactly_one}); the prompt prior may need more training")
        return np.concatenate(out)

    def _from_image(self, image, n: int) -> np.ndarray:
        img = torch.as_tensor(np.asarray(image))
        if img.ndim == 3:
            img = img[None]
        s = self.cfg.frame_size
        if img.ndim != 4 or tuple(img.shape[1:]) != (s, s, 3):
            raise ValueError(f"image has shape {tuple(np.asarray(image).shape)}; this bundle expects "
                             f"[{s}, {s}, 3] or [N, {s}, {s}, 3] RGB")
        if img.dtype != torch.uint8:
            raise ValueError(f"image dtype is {img.dtype}; expected uint8 RGB")
        _, ids = self.bundle.tokenizer.encode(img[:, None].to(self.device))  # [N, 1, P]
        ids = ids[:, 0].cpu().numpy()
        return ids[np.arange(n) % len(ids)]  # cycle through the given images
