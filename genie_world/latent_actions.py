"""LatentActionModel (Genie): infer a discrete action from frames t and t+1 without labels.

Encoder: ST transformer over the clip; its output at frame t+1 (which has seen frames <= t+1)
pooled over patches gives logits over |A| latent actions for the transition t -> t+1. Each patch
token also carries the explicit change (patch_t+1 - patch_t), and pooling is mean + max: in small
game frames the change lives in one or two patches, and with plain mean pooling a small CPU-sized
encoder never learned to see it (every sample got the same action).
Decoder: from frames <= t plus the latent action, predict frame t+1 (as a change of frame t).
Only the action passes from t+1 to the decoder, so it must encode what changed.

Guard against collapse: a bonus on the entropy of the batch-mean action distribution (use all
actions), a small penalty on per-sample entropy (be decisive), and Gumbel-noised choices during
training; usage is reported. Changed pixels get ``change_weight`` times the loss: the action is
only visible in the few pixels it changes.

``noop_latent``: the last latent is reserved for transitions whose frames are identical, and only
they get it. Without it the LAM let one latent mean both "nothing changed" and an effect that leaves
some states unchanged (on the tiny run, "now faces west" also labelled every no-op of an agent facing
north), so a no-op key made the imagined agent turn in 1 of 4 such steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .scalars import item as _item

from .patches import patchify, to_float, unpatchify
from .st_transformer import STTransformer


class LatentActionModel(nn.Module):
    def __init__(self, frame_size: int, patch: int, width: int, heads: int, enc_blocks: int, dec_blocks: int,
                 num_actions: int = 8, qk_norm: bool = False, entropy_weight: float = 0.05,
                 change_weight: float = 100.0, sample_entropy_weight: float = 0.005, gumbel: bool = True,
                 context: int = 2, noop_latent: bool = False):
        super().__init__()
        self.noop = num_actions - 1 if noop_latent else None  # the latent of unchanged transitions
        self.context = context  # frames per window the encoder is trained (and so must infer) on
        self.frame_size, self.patch, self.num_actions = frame_size, patch, num_actions
        self.entropy_weight, self.change_weight = entropy_weight, change_weight
        self.sample_entropy_weight, self.gumbel = sample_entropy_weight, gumbel
        p = (frame_size // patch) ** 2
        pdim = patch * patch * 3
        self.enc_embed = nn.Linear(2 * pdim, width)  # [patch, patch - previous patch]
        self.enc_pos = nn.Parameter(torch.randn(p, width) * 0.02)
        self.encoder = STTransformer(width, heads, enc_blocks, qk_norm)
        self.to_logits = nn.Linear(2 * width, num_actions)  # [mean-pool, max-pool]
        self.action_embed = nn.Embedding(num_actions, width)
        self.dec_embed = nn.Linear(pdim, width)
        self.dec_pos = nn.Parameter(torch.randn(p, width) * 0.02)
        self.decoder = STTransformer(width, heads, dec_blocks, qk_norm)
        self.to_pixels = nn.Linear(width, pdim)

    def action_logits(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, T, H, W, 3] -> logits [B, T-1, A] for the transitions t -> t+1."""
        x = patchify(to_float(frames) * 2 - 1, self.patch)  # [B, T, P, pdim]
        delta = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)
        h = self.encoder(self.enc_embed(torch.cat([x, delta], -1)) + self.enc_pos)  # [B, T, P, D]
        h = h[:, 1:]  # outputs at t+1 describe the transition t -> t+1
        logits = self.to_logits(torch.cat([h.mean(dim=2), h.amax(dim=2)], -1))  # [B, T-1, A]
        if self.noop is None:
            return logits
        same = (frames[:, 1:] == frames[:, :-1]).flatten(2).all(-1)  # [B, T-1] nothing changed
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        allowed[..., self.noop] = True
        allowed = torch.where(same[..., None], allowed, ~allowed)  # unchanged: only the no-op; changed: any other
        return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)

    @torch.no_grad()
    def infer(self, frames: torch.Tensor) -> torch.Tensor:
        """Latent action ids [B, T-1], each from a window of at most ``context`` frames ending at t+1.

        The encoder is causal, so on a longer clip it would see more history than in training and
        its latents would drift; windows keep inference identical to training whatever T is.
        """
        b, t = frames.shape[:2]
        if t <= self.context:
            return self.action_logits(frames).argmax(-1)
        out = [self.action_logits(frames[:, :self.context]).argmax(-1)]  # transitions 0..context-2
        starts = torch.arange(1, t - self.context + 1)
        windows = torch.stack([frames[:, s:s + self.context] for s in starts.tolist()], 1)  # [B, W, L, H, W, 3]
        logits = self.action_logits(windows.flatten(0, 1))[:, -1]  # [B*W, A]: the window's last transition
        out.append(logits.argmax(-1).view(b, -1))
        return torch.cat(out, 1)

    def predict_next(self, frames: torch.Tensor, actions_onehot: torch.Tensor) -> torch.Tensor:
        """frames [B, T, ...] (history), actions [B, T, A] -> predicted frames t+1 [B, T, H, W, 3]."""
        x01 = to_float(frames)
        x = patchify(x01 * 2 - 1, self.patch)
        cond = actions_onehot @ self.action_embed.weight  # [B, T, D]
        h = self.decoder(self.dec_embed(x) + self.dec_pos, cond=cond)
        delta = unpatchify(self.to_pixels(h), self.patch, self.frame_size, self.frame_size)
        return x01 + delta

    def loss(self, frames: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = self.action_logits(frames)  # [B, T-1, A]
        probs = logits.softmax(-1)
        # Training picks the action with Gumbel noise: a latent that merges two real actions keeps
        # being tried apart, so it can still split; inference uses the argmax.
        noisy = logits + (-torch.log(-torch.log(torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)))) if (
            self.gumbel and self.training) else logits
        hard = F.one_hot(noisy.argmax(-1), self.num_actions).to(probs.dtype)
        onehot = hard + probs - probs.detach()  # straight-through
        pred = self.predict_next(frames[:, :-1], onehot)
        target = to_float(frames[:, 1:])
        changed = (target != to_float(frames[:, :-1])).any(-1, keepdim=True).float()  # [B, T-1, H, W, 1]
        weight = 1.0 + self.change_weight * changed
        recon = (weight * (pred - target) ** 2).mean()
        mean_p = probs.reshape(-1, self.num_actions).mean(0)
        batch_entropy = -(mean_p * (mean_p + 1e-8).log()).sum()
        sample_entropy = -(probs * (probs + 1e-8).log()).sum(-1).mean()
        loss = recon - self.entropy_weight * batch_entropy + self.sample_entropy_weight * sample_entropy
        used = torch.bincount(hard.argmax(-1).flatten(), minlength=self.num_actions)
        metrics = {
            "loss": _item(loss), "recon": _item(recon), "mse": _item(F.mse_loss(pred, target)),
            "action_batch_entropy": _item(batch_entropy), "action_sample_entropy": _item(sample_entropy),
            "actions_used": int((used > 0).sum()),
        }
        return loss, metrics
