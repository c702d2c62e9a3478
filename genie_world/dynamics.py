"""DynamicsModel: MaskGIT over tokenizer ids on a space-time transformer, conditioned on latent actions.

Frame t+1 is conditioned on the latent action a_t (added to every token of frame t+1 before each
block); frame 0 gets a learned "no action". Training masks a ratio ~U[0.5, 1) of each frame
t >= 1 and predicts the masked ids. Generation decodes a new frame with MaskGIT against a temporal
KV cache of the finished frames, so each new frame costs the same whatever the history length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .scalars import item as _item

from .maskgit import maskgit_decode, random_mask
from .slot_cache import SlotKVCache
from .st_transformer import KVCache, STTransformer


class DynamicsModel(nn.Module):
    def __init__(self, vocab_size: int, num_patches: int, num_actions: int, width: int, heads: int, depth: int,
                 qk_norm: bool = False, mask_low: float = 0.5, mask_high: float = 1.0, change_weight: float = 1.0,
                 spatial_rope: bool = False):
        super().__init__()
        self.vocab_size, self.num_patches, self.num_actions = vocab_size, num_patches, num_actions
        self.mask_id = vocab_size
        self.mask_low, self.mask_high = mask_low, mask_high
        self.change_weight = change_weight
        self.tok_embed = nn.Embedding(vocab_size + 1, width)
        self.pos = nn.Parameter(torch.randn(num_patches, width) * 0.02)
        self.action_embed = nn.Embedding(num_actions + 1, width)  # index num_actions = "no action"
        self.transformer = STTransformer(width, heads, depth, qk_norm, spatial_rope)
        self.head = nn.Linear(width, vocab_size)

    def _cond(self, actions: torch.Tensor, with_first: bool) -> torch.Tensor:
        if with_first:
            none = torch.full_like(actions[:, :1], self.num_actions)
            actions = torch.cat([none, actions], dim=1)  # [B, T]
        return self.action_embed(actions)

    def forward(self, ids: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """ids [B, T, P] (mask_id where masked), actions [B, T-1] -> logits [B, T, P, V]."""
        h = self.transformer(self.tok_embed(ids) + self.pos, cond=self._cond(actions, True))
        return self.head(h)

    def loss(self, ids: torch.Tensor, actions: torch.Tensor, generator=None) -> tuple[torch.Tensor, dict]:
        b, t, p = ids.shape
        mask = random_mask((b, t, p), self.mask_low, self.mask_high, generator, ids.device)
        mask[:, 0] = False  # frame 0 is always given (the prompt / the real first frame)
        logits = self(torch.where(mask, self.mask_id, ids), actions)
        # Most tokens never change (floor, walls); weighting the ones that did change from the
        # previous frame spends the model's capacity on what the actions do.
        changed = torch.zeros_like(mask)
        changed[:, 1:] = ids[:, 1:] != ids[:, :-1]
        weight = 1.0 + (self.change_weight - 1.0) * changed[mask].float()
        ce = F.cross_entropy(logits[mask], ids[mask], reduction="none")
        loss = (weight * ce).sum() / weight.sum()
        hit = logits[mask].argmax(-1) == ids[mask]
        acc = hit.float().mean()
        changed_acc = hit[changed[mask]].float().mean() if changed[mask].any() else torch.tensor(float("nan"))
        return loss, {"loss": _item(loss), "masked_token_acc": _item(acc), "changed_token_acc": _item(changed_acc)}

    # --- generation with a KV cache -------------------------------------------------------
    def new_cache(self, max_frames: int | None = None) -> KVCache:
        return self.transformer.new_cache(max_frames)

    @torch.no_grad()
    def prime(self, cache: KVCache, ids: torch.Tensor, actions: torch.Tensor | None) -> torch.Tensor:
        """Commit finished frames ids [B, t, P] (with the actions that led into them) to the cache.

        ``actions`` [B, t] are the latent actions *into* each frame; pass None when the first frame
        is frame 0 of the episode. Returns the final hidden states [B, t, P, D].
        """
        if actions is None:
            actions = torch.full(ids.shape[:2], self.num_actions, dtype=torch.long, device=ids.device)
        return self.transformer.forward_cached(self.tok_embed(ids) + self.pos, cache, cond=self.action_embed(actions),
                                               commit=True)

    @torch.no_grad()
    def generate_next(self, cache: KVCache, actions: torch.Tensor, steps: int, temperature: float,
                      schedule: str = "cosine", generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode the next frame's ids [B, P] given latent actions [B]; the frame is then committed."""
        cond = self.action_embed(actions)[:, None]  # [B, 1, D]

        def logits_fn(frame_ids):
            x = self.tok_embed(frame_ids[:, None]) + self.pos  # [B, 1, P, D]
            return self.head(self.transformer.forward_cached(x, cache, cond=cond))[:, 0]

        ids = maskgit_decode(logits_fn, actions.shape[0], self.num_patches, self.mask_id, steps, temperature,
                             schedule, generator, actions.device)
        self.prime(cache, ids[:, None], actions[:, None])
        return ids

    @torch.no_grad()
    def rollout(self, first_ids: torch.Tensor, actions: torch.Tensor, steps: int, temperature: float,
                schedule: str = "cosine", generator: torch.Generator | None = None,
                context_frames: int | None = None) -> torch.Tensor:
        """From frame-0 ids [B, P], generate one frame per latent action [B, H]; -> ids [B, H+1, P]."""
        cache = self.new_cache(context_frames)
        self.prime(cache, first_ids[:, None], None)
        out = [first_ids]
        for t in range(actions.shape[1]):
            out.append(self.generate_next(cache, actions[:, t], steps, temperature, schedule, generator))
        return torch.stack(out, 1)

    @torch.no_grad()
    def generate_next_uncached(self, context: torch.Tensor, actions: torch.Tensor, steps: int, temperature: float,
                               schedule: str = "cosine", generator: torch.Generator | None = None) -> torch.Tensor:
        """Reference path: re-run the whole history each step. context [B, t, P], actions [B, t]."""
        def logits_fn(frame_ids):
            ids = torch.cat([context, frame_ids[:, None]], dim=1)
            return self(ids, actions)[:, -1]

        return maskgit_decode(logits_fn, context.shape[0], self.num_patches, self.mask_id, steps, temperature,
                              schedule, generator, context.device)

    # --- served envs: one slot ring per env (see SlotKVCache) ----------------------------
    def new_slot_cache(self, num_envs: int, window: int, device=None, dtype=torch.float32) -> SlotKVCache:
        return self.transformer.new_slot_cache(num_envs, self.num_patches, window, device, dtype)

    @torch.no_grad()
    def commit_slots(self, cache: SlotKVCache, ids: torch.Tensor, actions: torch.Tensor) -> None:
        """Make frame ids [B, P], reached by latent ``actions`` [B] (``num_actions`` = episode start),
        each env's newest history frame."""
        x = self.tok_embed(ids[:, None]) + self.pos  # [B, 1, P, D]
        self.transformer.forward_slots(x, cache, cond=self.action_embed(actions)[:, None])
        cache.commit()

    @torch.no_grad()
    def generate_slots(self, cache: SlotKVCache, actions: torch.Tensor, steps: int, temperature: float,
                       schedule: str = "cosine", generator=None, constrain=None) -> torch.Tensor:
        """Decode each env's next frame ids [B, P] under latent ``actions`` [B]; not committed."""
        cond = self.action_embed(actions)[:, None]  # [B, 1, D]

        def logits_fn(frame_ids):
            x = self.tok_embed(frame_ids[:, None]) + self.pos  # [B, 1, P, D]
            return self.head(self.transformer.forward_slots(x, cache, cond=cond))[:, 0]

        return maskgit_decode(logits_fn, actions.shape[0], self.num_patches, self.mask_id, steps, temperature,
                              schedule, generator, actions.device, constrain)
