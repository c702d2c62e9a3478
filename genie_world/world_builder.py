"""WorldBuilder: a sentence (through the prompt prior) or an image (through the tokenizer) -> levels.

Level i of ``generate(prompt, num_worlds, seed)`` is drawn from its own generator seeded by
(seed, i), so it does not depend on num_worlds or the batch size: 16 levels are a prefix of 1000.
"""

from __future__ import annotations

import numpy as np
import torch

from .bundle import WorldBundle
from .levels import LevelSet
from .text_encoder import UnknownWordsError


def level_generators(seed: int, indices) -> list[torch.Generator]:
    """One torch generator per index, seeded from numpy's SeedSequence([seed, index])."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0]))
            for i in indices]


class WorldBuilder:
    def __init__(self, bundle: WorldBundle, device: str | torch.device = "cpu", batch_size: int = 256):
        self.bundle, self.device, self.batch_size = bundle, torch.device(device), batch_size
        self.cfg = bundle.config

    def _text_ids(self, text: str, what: str) -> torch.Tensor:
        if self.bundle.vocab is None:
            raise ValueError(f"world bundle {self.bundle.path} has no vocab.json; it cannot read a {what}")
        if not isinstance(text, str):
            raise TypeError(f"{what} must be a string, got {type(text).__name__}")
        try:
            return torch.tensor([self.bundle.vocab.encode(text, self.cfg.text_max_len)], dtype=torch.long)
        except UnknownWordsError as e:
            raise UnknownWordsError(f"{what}: {e}") from None

    @torch.no_grad()
    def generate(self, prompt: str | None = None, image=None, num_worlds: int = 16, seed: int = 0,
                 mission: str | None = None) -> LevelSet:
        """Levels from a text ``prompt`` or an ``image`` ([H, W, 3] or [N, H, W, 3] uint8).

        ``mission`` is the instruction the reward head scores (default: the prompt); it must use the
        bundle's vocabulary too.
        """
        if (prompt is None) == (image is None):
            raise ValueError("give exactly one of prompt= or image=")
        if not isinstance(num_worlds, (int, np.integer)) or isinstance(num_worlds, bool) or num_worlds < 1:
            raise ValueError(f"num_worlds must be a positive integer, got {num_worlds!r}")
        mission = prompt if mission is None else mission
        if mission is None:
            raise ValueError("a level from an image needs mission= (the instruction its reward is scored against)")
        self._text_ids(mission, "mission")  # refuse unknown words before any work
        if prompt is not None:
            tokens, source = self._from_prompt(prompt, int(num_worlds), int(seed)), "prompt"
        else:
            tokens, source = self._from_image(image, int(num_worlds)), "image"
        tag = self.bundle.fingerprint[:8]
        ids = [f"{tag}-{source}-s{seed}-{i}" for i in range(len(tokens))]
        return LevelSet(tokens, [mission] * len(tokens), ids, self.bundle.fingerprint, prompt, int(seed), source,
                        str(self.bundle.path))

    def _from_prompt(self, prompt: str, n: int, seed: int) -> np.ndarray:
        if "prompt_prior" not in self.bundle.parts:
            raise ValueError(f"world bundle {self.bundle.path} has no prompt_prior part; train the 'prior' stage")
        text = self._text_ids(prompt, "prompt").to(self.device)
        prior, out = self.bundle.prompt_prior, []
        for lo in range(0, n, self.batch_size):
            idx = range(lo, min(n, lo + self.batch_size))
            gens = level_generators(seed, idx)
            out.append(prior.generate(text.expand(len(idx), -1), self.cfg.prior_maskgit_steps,
                                      self.cfg.prior_temperature, self.cfg.maskgit_schedule, gens).cpu())
        return torch.cat(out).numpy()

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
