"""Auxiliary representation losses for the SIMA policy, and the state they need.

- Language matching (CLIP-style): symmetric InfoNCE between projected instruction embeddings and
  projected visual embeddings of the same timestep. Many rows of an RL batch share one mission, so every
  row with the *same token ids* is a positive (multi-positive InfoNCE); plain CLIP would push identical
  missions apart.
- Contrastive (MoCo-style): a query from the online vision encoder on one random-shift view, a key from a
  momentum (EMA) copy of the encoder + projection on another view of the same frame; negatives are the
  other keys of the batch and a FIFO queue of keys from earlier gradient steps.

Masks: every loss takes a boolean ``mask`` [B]. Masked rows are dropped *before* the similarity matrix
is built, so they are neither anchors nor negatives: their contents cannot change the loss or any
gradient (tests/test_sima_policy.py checks this). The key encoder and the queue are buffers: they are in
``state_dict()`` (checkpoints, ``RLModule.get_state``) but never in ``parameters()`` (the optimizer).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


# ---- augmentation ---------------------------------------------------------------------------------------
def random_shift(images: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ-style random shift: replicate-pad by ``pad`` then crop back at a random offset per frame.

    ``images`` [B, H, W, C] (any dtype, pixel values kept) -> float [B, H, W, C]. The offsets are drawn
    for every row regardless of its contents, so a fixed ``generator`` seed gives the same crops.
    """
    b, h, w, _ = images.shape
    x = images.float()
    if pad <= 0:
        return x
    padded = F.pad(x.permute(0, 3, 1, 2), (pad, pad, pad, pad), mode="replicate").permute(0, 2, 3, 1)  # [B, H+2p, W+2p, C]
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(images.device)  # [B]
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(images.device)  # [B]
    rows = (oy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # [B, H, 1]
    cols = (ox[:, None] + torch.arange(w, device=images.device))[:, None, :]  # [B, 1, W]
    return padded[torch.arange(b, device=images.device)[:, None, None], rows, cols]  # [B, H, W, C]


# ---- small modules ---------------------------------------------------------------------------------------
class ProjectionHead(nn.Module):
    """Linear-SiLU-Linear projection into the contrastive space (not L2-normalised here)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or max(in_dim, out_dim)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters are turned into (persistent) buffers: the copy is saved and moved with
    its owner but never seen by ``parameters()``, so no optimizer can train it."""
    twin = copy.deepcopy(module)
    for sub in twin.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, p.detach().clone())
    return twin


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, matched by name (target made by frozen_copy)."""
    buffers = dict(target.named_buffers())
    for name, p in source.named_parameters():
        buffers[name].mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)


class NegativesQueue(nn.Module):
    """FIFO ring of L2-normalised keys [size, dim] with a fill count; all state in buffers."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros(int(size), dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def resize_(self, size: int) -> None:
        """Re-allocate (emptied) for a new size; a no-op when already that size."""
        if int(size) != self.size:
            self.keys = torch.zeros(int(size), self.keys.shape[1], device=self.keys.device)
            self.ptr.zero_()
            self.filled.zero_()

    def negatives(self) -> torch.Tensor:
        """The valid keys [K, dim] (the first ``filled`` slots; order does not matter)."""
        return self.keys[: int(self.filled)]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        n, size = keys.shape[0], self.size
        if n == 0 or size == 0:
            return
        keys = F.normalize(keys.detach().float(), dim=-1)[-size:]  # the newest ones win when n > size
        n, start = keys.shape[0], int(self.ptr)
        idx = (start + torch.arange(n, device=self.keys.device)) % size  # [n]
        self.keys[idx] = keys.to(self.keys.dtype)
        self.ptr.fill_((start + n) % size)
        self.filled.fill_(min(size, int(self.filled) + n))


# ---- losses ----------------------------------------------------------------------------------------------
def _valid(mask: torch.Tensor | None, n: int, device) -> torch.Tensor:
    if mask is None:
        return torch.arange(n, device=device)
    return mask.reshape(-1).bool().nonzero(as_tuple=True)[0]  # [V]


def language_matching_loss(image_z: torch.Tensor, text_z: torch.Tensor, text_ids: torch.Tensor,
                           logit_scale: torch.Tensor | float, mask: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric multi-positive InfoNCE (CLIP-style) -> (loss, image->text top-1 accuracy).

    image_z, text_z: [B, P] projections; text_ids: [B, L] token ids (equal rows are positives of each
    other); logit_scale: 1 / temperature (a tensor for a learned temperature); mask: bool [B] or None.
    Returns zeros when fewer than 2 rows are valid (nothing to contrast).
    """
    keep = _valid(mask, image_z.shape[0], image_z.device)
    if keep.numel() < 2:
        zero = image_z.sum() * 0.0 + text_z.sum() * 0.0  # keeps the graph (and the device) without a signal
        return zero, zero.detach()
    img = F.normalize(image_z[keep], dim=-1)  # [V, P]
    txt = F.normalize(text_z[keep], dim=-1)  # [V, P]
    ids = text_ids.reshape(text_ids.shape[0], -1)[keep]  # [V, L]
    positive = (ids[:, None, :] == ids[None, :, :]).all(-1)  # [V, V], diagonal always True
    logits = logit_scale * img @ txt.t()  # [V, V]: rows images, columns texts
    neg_inf = torch.finfo(logits.dtype).min
    i2t = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positive, neg_inf), 1)  # [V]
    t2i = torch.logsumexp(logits, 0) - torch.logsumexp(logits.masked_fill(~positive, neg_inf), 0)  # [V]
    loss = 0.5 * (i2t.mean() + t2i.mean())
    accuracy = positive[torch.arange(keep.numel(), device=logits.device), logits.argmax(1)].float().mean()
    return loss, accuracy.detach()


def contrastive_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None, temperature: float,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo-style InfoNCE -> (loss, top-1 accuracy of finding the own key).

    query: [B, P] online projections of view 1; key: [B, P] momentum projections of view 2 (no grad);
    queue: [K, P] earlier keys (or None). Row i's positive is key i; negatives are the other valid keys of
    the batch and the queue.
    """
    keep = _valid(mask, query.shape[0], query.device)
    if keep.numel() == 0:
        zero = query.sum() * 0.0
        return zero, zero.detach()
    q = F.normalize(query[keep], dim=-1)  # [V, P]
    k = F.normalize(key[keep].detach(), dim=-1)  # [V, P]
    candidates = k if queue is None or queue.shape[0] == 0 else torch.cat([k, F.normalize(queue.detach(), dim=-1)])
    logits = q @ candidates.t() / temperature  # [V, V + K]
    target = torch.arange(keep.numel(), device=q.device)  # [V]
    loss = F.cross_entropy(logits, target)
    accuracy = (logits.argmax(1) == target).float().mean()
    return loss, accuracy.detach()


# ---- the auxiliary state an RLModule carries -------------------------------------------------------------
class SimaAuxiliary(nn.Module):
    """Projection heads, the CLIP temperature, the momentum key encoder and the negatives queue.

    Lives in ``SimaRLModule.aux`` (learner side only: EnvRunner copies drop it, see
    ``get_non_inference_attributes``). Trainable: ``clip_image``, ``clip_text``, ``log_logit_scale``,
    ``moco_query``. Buffers: ``key_vision`` and ``key_proj`` (EMA copies of the vision encoder and of
    ``moco_query``) and ``queue``.
    """

    def __init__(self, vision_encoder: nn.Module, vision_dim: int, language_dim: int, proj_dim: int = 64,
                 queue_size: int = 1024, init_temperature: float = 0.07):
        super().__init__()
        self.clip_image = ProjectionHead(vision_dim, proj_dim)
        self.clip_text = ProjectionHead(language_dim, proj_dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.moco_query = ProjectionHead(vision_dim, proj_dim)
        self.key_vision = frozen_copy(vision_encoder)  # the online encoder itself is NOT registered here
        self.key_proj = frozen_copy(self.moco_query)
        self.queue = NegativesQueue(queue_size, proj_dim)

    def logit_scale(self, fixed_temperature: float | None = None) -> torch.Tensor | float:
        """1 / temperature: fixed if given, else the learned one (clamped to <= 100, as in CLIP)."""
        if fixed_temperature is not None:
            return 1.0 / float(fixed_temperature)
        return self.log_logit_scale.clamp(max=math.log(100.0)).exp()

    @torch.no_grad()
    def keys(self, view: torch.Tensor) -> torch.Tensor:
        return self.key_proj(self.key_vision(view))  # [B, P]

    @torch.no_grad()
    def momentum_update_(self, vision_encoder: nn.Module, momentum: float) -> None:
        ema_update_(self.key_vision, vision_encoder, momentum)
        ema_update_(self.key_proj, self.moco_query, momentum)
