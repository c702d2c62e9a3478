"""KeyToLatent: which latent action a real key causes in a given state.

Keys drive the world model through this model (``ActionAdapter.real_to_latent``). A latent action
is an effect ("moved east", "the ball in front vanished"); which effect a key has depends on where
things are: ``forward`` moves the agent in the direction it faces, or nowhere when a wall is in front;
``pickup`` removes the object in front, or does nothing. Reading the state as a set of tokens cannot
tell those apart, so this model reads the token grid: token embeddings on the patch grid, 3x3
convolutions modulated by the key (FiLM), max+mean pooling, logits over latents. It is trained on
labelled transitions (key, state tokens) -> the latent the LAM infers for that transition.

Choosing argmax_a p(key | a, state) instead (what the adapter's logistic model gives) fails exactly
here: every step-direction latent explains "forward" equally well, so a forward key in imagination
moved the agent in a random direction (27% right, BENCHMARKS.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class KeyToLatent(nn.Module):
    def __init__(self, vocab_size: int, num_patches: int, num_real: int, num_latent: int, width: int = 32,
                 depth: int = 3):
        super().__init__()
        self.side = int(round(math.sqrt(num_patches)))
        if self.side * self.side != num_patches:
            raise ValueError(f"key-to-latent model: {num_patches} patches do not form a square grid")
        self.config = dict(vocab_size=vocab_size, num_patches=num_patches, num_real=num_real, num_latent=num_latent,
                           width=width, depth=depth)
        self.tok_embed = nn.Embedding(vocab_size, width)
        self.key_embed = nn.Embedding(num_real, width)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        self.films = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(depth))
        self.out = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, num_latent))

    def forward(self, tokens: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """tokens [B, P], keys [B] -> latent logits [B, A]."""
        b = tokens.shape[0]
        x = self.tok_embed(tokens).view(b, self.side, self.side, -1).permute(0, 3, 1, 2)  # [B, D, side, side]
        key = self.key_embed(keys)  # [B, D]
        for conv, film in zip(self.convs, self.films):
            gamma, beta = film(key).chunk(2, dim=-1)
            x = x + F.silu(conv(x) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])
        return self.out(torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=-1))


def fit_key_to_latent(tokens: np.ndarray, real: np.ndarray, latent: np.ndarray, vocab_size: int, num_real: int,
                      num_latent: int, steps: int = 1000, batch: int = 256, lr: float = 3e-3, seed: int = 0,
                      width: int = 32, depth: int = 3) -> tuple[KeyToLatent, dict]:
    """Train on labelled transitions: state tokens [N, P], key [N], LAM latent [N] -> (model, metrics)."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    real = torch.as_tensor(np.asarray(real), dtype=torch.long)
    latent = torch.as_tensor(np.asarray(latent), dtype=torch.long)
    if not len(tokens) == len(real) == len(latent) or len(tokens) == 0:
        raise ValueError(f"key-to-latent: {len(tokens)} states, {len(real)} keys, {len(latent)} latents; "
                         "expected the same non-zero number")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = KeyToLatent(vocab_size, tokens.shape[1], num_real, num_latent, width, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n = len(tokens)
    # Rare effects (a pickup that removes the object in front: 0.4% of BabyAI transitions) are what the
    # model must not miss; drawing each (key, latent) pair with weight 1/sqrt(its count) shows them more
    # often without drowning the common ones.
    pair = real * num_latent + latent
    counts = torch.bincount(pair, minlength=num_real * num_latent).float()
    weights = counts[pair].rsqrt()
    model.train()
    with torch.enable_grad():  # callers may evaluate under no_grad (pretraining's evaluation does)
        for _ in range(steps):
            idx = torch.multinomial(weights, min(batch, n), replacement=True, generator=g)
            loss = F.cross_entropy(model(tokens[idx], real[idx]), latent[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(tokens[i:i + 1024], real[i:i + 1024]).argmax(-1) for i in range(0, n, 1024)])
    return model, {"key_to_latent_train_accuracy": float((pred == latent).float().mean()), "key_to_latent_labels": n}
