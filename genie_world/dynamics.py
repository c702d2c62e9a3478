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

from .level_constraints import constrain_logits
from .maskgit import maskgit_decode, random_mask
from .slot_cache import SlotKVCache
from .small_attention import kernel_available
from .st_transformer import KVCache, STTransformer, linear


def _kernel_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.stride(-1) == 1 and kernel_available()


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

    def _cond(self, actions: torch.Tensor, first_actions: torch.Tensor | None = None) -> torch.Tensor:
        """actions [B, T-1] between the frames, ``first_actions`` [B] into frame 0 (None: "no action", the
        episode starts there) -> action conditioning [B, T, D]."""
        first = torch.full_like(actions[:, :1], self.num_actions) if first_actions is None else first_actions[:, None]
        return self.action_embed(torch.cat([first, actions], dim=1))  # [B, T, D]

    def hidden(self, ids: torch.Tensor, actions: torch.Tensor, first_actions: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T, P] (mask_id where masked), actions [B, T-1] -> final hidden states [B, T, P, D]."""
        return self.transformer(self.tok_embed(ids) + self.pos, cond=self._cond(actions, first_actions))

    def forward(self, ids: torch.Tensor, actions: torch.Tensor, first_actions: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T, P] (mask_id where masked), actions [B, T-1] -> logits [B, T, P, V]."""
        return self.head(self.hidden(ids, actions, first_actions))

    def loss(self, ids: torch.Tensor, actions: torch.Tensor, generator=None,
             first_actions: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """``first_actions`` [B]: the latent that led into each clip's first frame (``num_actions`` where the
        clip starts its episode; None: all do)."""
        b, t, p = ids.shape
        mask = random_mask((b, t, p), self.mask_low, self.mask_high, generator, ids.device)
        mask[:, 0] = False  # frame 0 is always given (the prompt / the real first frame)
        # The loss reads only masked positions: the codebook head runs on those rows alone.
        logits = self.head(self.hidden(torch.where(mask, self.mask_id, ids), actions, first_actions)[mask])  # [M, V]
        target = ids[mask]
        # Most tokens never change (floor, walls); weighting the ones that did change from the
        # previous frame spends the model's capacity on what the actions do.
        changed = torch.zeros_like(mask)
        changed[:, 1:] = ids[:, 1:] != ids[:, :-1]
        changed_m = changed[mask]
        weight = 1.0 + (self.change_weight - 1.0) * changed_m.float()
        ce = F.cross_entropy(logits, target, reduction="none")
        loss = (weight * ce).sum() / weight.sum()
        hit = logits.detach().argmax(-1) == target
        acc = hit.float().mean()
        changed_acc = hit[changed_m].float().mean() if changed_m.any() else torch.tensor(float("nan"))
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

        def logits_fn(frame_ids, rows=None):
            x = self.tok_embed(frame_ids[:, None]) + self.pos  # [B, 1, P, D]
            return self._head_rows(self.transformer.forward_cached(x, cache, cond=cond)[:, 0], rows)

        ids = maskgit_decode(logits_fn, actions.shape[0], self.num_patches, self.mask_id, steps, temperature,
                             schedule, generator, actions.device, rows=True)
        # Commit: the frame's keys/values are all the cache needs (its outputs are not).
        self.transformer.forward_cached(self.tok_embed(ids[:, None]) + self.pos, cache,
                                        cond=self.action_embed(actions[:, None]), commit=True, need_output=False)
        return ids

    def _head_rows(self, h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Codebook logits of h [B, P, D] at positions ``rows`` [B, M] (all when None) -> [B, M, V]."""
        if rows is not None:
            h = h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))
        return linear(h, self.head.weight, self.head.bias)

    @torch.no_grad()
    def rollout(self, first_ids: torch.Tensor, actions: torch.Tensor, steps: int, temperature: float,
                schedule: str = "cosine", generator: torch.Generator | None = None,
                context_frames: int | None = None, first_actions: torch.Tensor | None = None) -> torch.Tensor:
        """From frame-0 ids [B, P], generate one frame per latent action [B, H]; -> ids [B, H+1, P].
        ``first_actions`` [B]: the latent that led into the first frame (None: the episode starts there)."""
        cache = self.new_cache(context_frames)
        self.prime(cache, first_ids[:, None], None if first_actions is None else first_actions[:, None])
        out = [first_ids]
        for t in range(actions.shape[1]):
            out.append(self.generate_next(cache, actions[:, t], steps, temperature, schedule, generator))
        return torch.stack(out, 1)

    @torch.no_grad()
    def generate_next_uncached(self, context: torch.Tensor, actions: torch.Tensor, steps: int, temperature: float,
                               schedule: str = "cosine", generator: torch.Generator | None = None) -> torch.Tensor:
        """Reference path: re-run the whole history each step. context [B, t, P], actions [B, t]."""
        def logits_fn(frame_ids, rows=None):
            ids = torch.cat([context, frame_ids[:, None]], dim=1)
            return self._head_rows(self.hidden(ids, actions)[:, -1], rows)

        return maskgit_decode(logits_fn, context.shape[0], self.num_patches, self.mask_id, steps, temperature,
                              schedule, generator, context.device, rows=True)

    # --- served envs: one slot ring per env (see SlotKVCache) ----------------------------
    def new_slot_cache(self, num_envs: int, window: int, device=None, dtype=torch.float32) -> SlotKVCache:
        return self.transformer.new_slot_cache(num_envs, self.num_patches, window, device, dtype)

    @torch.no_grad()
    def commit_slots(self, cache: SlotKVCache, ids: torch.Tensor, actions: torch.Tensor) -> None:
        """Make frame ids [B, P], reached by latent ``actions`` [B] (``num_actions`` = episode start),
        each env's newest history frame."""
        x = self.tok_embed(ids[:, None]) + self.pos  # [B, 1, P, D]
        self.transformer.forward_slots(x, cache, cond=self.action_embed(actions)[:, None], need_output=False)
        cache.commit()

    @torch.no_grad()
    def greedy_slots(self, cache: SlotKVCache, actions: torch.Tensor, groups=()) -> torch.Tensor:
        """``generate_slots`` with one greedy MaskGIT step (every position decoded at once: the
        World's default) under the level constraints ``groups`` (lists of code ids, each exactly
        once per frame) -> ids [B, P]. Same result as ``maskgit_decode`` with ``constrain_logits``;
        the constraint runs on [best other code, group codes] per position instead of the codebook."""
        b, p = actions.shape[0], self.num_patches
        x = self.tok_embed.weight[self.mask_id] + self.pos  # [P, D]: every position masked
        h = self.transformer.forward_slots(x.expand(b, 1, p, -1), cache, cond=self.action_embed(actions)[:, None])
        return self.greedy_codes(h[:, 0], groups)

    @torch.no_grad()
    def greedy_codes(self, h: torch.Tensor, groups=()) -> torch.Tensor:
        """argmax of the codebook head at h [B, P, D] under the level constraints ``groups``."""
        logits = linear(h, self.head.weight, self.head.bias).float()  # [B, P, V]
        if not groups:
            return logits.argmax(-1)
        cols = torch.cat([torch.as_tensor(g, dtype=torch.long, device=h.device) for g in groups])
        if _kernel_ok(logits):
            excl = torch.zeros(logits.shape[-1], dtype=torch.bool, device=h.device)
            excl[cols] = True
            best, best_id = torch.ops.genie_sima_attn.rowmax_excl(logits, excl)
        else:
            best, best_id = logits.index_fill(-1, cols, float("-inf")).max(-1)
        # Column 0: the best code outside every group; then each group's codes.
        reduced = torch.cat([best[..., None], logits.index_select(-1, cols)], -1)
        sizes = [len(g) for g in groups]
        starts = torch.tensor([0] + sizes[:-1]).cumsum(0) + 1
        rgroups = [torch.arange(int(s0), int(s0) + n, device=h.device) for s0, n in zip(starts, sizes)]
        masked = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        pick = constrain_logits(reduced, torch.zeros_like(best_id), masked, rgroups).argmax(-1)
        return torch.where(pick == 0, best_id, cols[(pick - 1).clamp_min(0)])

    @torch.no_grad()
    def generate_slots(self, cache: SlotKVCache, actions: torch.Tensor, steps: int, temperature: float,
                       schedule: str = "cosine", generator=None, constrain=None) -> torch.Tensor:
        """Decode each env's next frame ids [B, P] under latent ``actions`` [B]; not committed."""
        cond = self.action_embed(actions)[:, None]  # [B, 1, D]

        def logits_fn(frame_ids, rows=None):
            x = self.tok_embed(frame_ids[:, None]) + self.pos  # [B, 1, P, D]
            return self._head_rows(self.transformer.forward_slots(x, cache, cond=cond)[:, 0], rows)

        return maskgit_decode(logits_fn, actions.shape[0], self.num_patches, self.mask_id, steps, temperature,
                              schedule, generator, actions.device, constrain, rows=True)
