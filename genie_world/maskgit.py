"""MaskGIT: training masks and confidence-based iterative decoding of a frame's tokens."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

SCHEDULES = ("cosine", "linear")


def masked_fraction(step: int, steps: int, schedule: str) -> float:
    """Fraction of tokens still masked after decoding step ``step`` (0-based) of ``steps``."""
    r = (step + 1) / steps
    if schedule == "cosine":
        return math.cos(math.pi / 2 * r)
    if schedule == "linear":
        return 1.0 - r
    raise ValueError(f"MaskGIT schedule {schedule!r}: expected one of {SCHEDULES}")


def random_mask(shape, low: float, high: float, generator=None, device=None) -> torch.Tensor:
    """Bool mask [..., P]: each leading index masks a ratio ~U[low, high) of its P positions."""
    *lead, p = shape
    ratio = low + (high - low) * torch.rand(*lead, 1, generator=generator, device=device)
    scores = torch.rand(*lead, p, generator=generator, device=device)
    n_mask = (ratio * p).ceil().clamp(1, p)  # at least one masked token per frame
    rank = scores.argsort(-1).argsort(-1).float()  # [..., P] rank of each position
    return rank < n_mask


Generators = "torch.Generator | list[torch.Generator] | None"


def seeded_generator(*keys: int, device=None) -> torch.Generator:
    """A torch generator whose stream depends only on ``keys`` (numpy's SeedSequence mixes them), so
    a level or an env step draws the same noise whatever else shares its batch."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


def uniform(shape, generator, device=None) -> torch.Tensor:
    """U[0, 1) noise of ``shape``; with a list of generators, row i comes from generator i, so a
    row's draws do not depend on which other rows share the batch (served envs, levels)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in generator])
    return torch.rand(shape, generator=generator, device=device)


def _sample(probs: torch.Tensor, generator) -> torch.Tensor:
    """One id per position from probs [B, P, V]."""
    b, p, v = probs.shape
    if isinstance(generator, (list, tuple)):
        u = uniform((b, p, 1), generator, probs.device)  # inverse CDF, one uniform per position
        return _sample_inverse_cdf(probs, u)
    return torch.multinomial(probs.reshape(-1, v), 1, generator=generator).view(b, p)


def _sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One id per row of probs [..., V] from uniforms u [..., 1] (inverse CDF): the number of
    cumulative probabilities below u, found by binary search."""
    return torch.searchsorted(probs.cumsum(-1), u.to(probs.dtype)).squeeze(-1).clamp_max(probs.shape[-1] - 1)


@torch.no_grad()
def maskgit_decode(logits_fn: Callable[..., torch.Tensor], batch: int, num_tokens: int, mask_id: int,
                   steps: int, temperature: float, schedule: str = "cosine",
                   generator: Generators = None, device=None,
                   constrain: Callable | None = None, rows: bool = False) -> torch.Tensor:
    """Fill ``num_tokens`` masked positions in ``steps`` rounds; returns ids [B, P].

    Each round samples every masked position, keeps the most confident ones and re-masks the rest;
    Gumbel noise on the confidences (annealed with the round) keeps different seeds distinct.
    ``constrain(logits, ids, masked)`` may rewrite each round's logits (level constraints).

    ``rows=True``: ``logits_fn(ids, rows)`` is given the still-masked positions rows [B, M] (None:
    all) and returns their logits [B, M, V] (every row has the same number masked), so the caller's
    codebook head runs on those rows only; nothing else reads the others. Sampling at temperature
    > 0 then draws one uniform per position (inverse CDF, the per-env generators' method) instead of
    ``torch.multinomial``'s one exponential per codebook entry: the same distribution, a different
    random stream for a single generator. At temperature 0 both modes give the same ids.
    """
    if not rows:
        return _decode_full(logits_fn, batch, num_tokens, mask_id, steps, temperature, schedule, generator, device,
                            constrain)
    ids = torch.full((batch, num_tokens), mask_id, dtype=torch.long, device=device)
    pos = None  # [B, M] positions still masked; None while all are
    for step in range(steps):
        if constrain is None:
            logits = logits_fn(ids, pos).float()  # [B, M, V]
        else:  # constraints read the whole frame
            masked = torch.ones(batch, num_tokens, dtype=torch.bool, device=device) if pos is None else \
                torch.zeros(batch, num_tokens, dtype=torch.bool, device=device).scatter_(1, pos, True)
            logits = constrain(logits_fn(ids, None).float(), ids, masked)
            if pos is not None:
                logits = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
        at = (lambda t: t) if pos is None else (lambda t: t.gather(1, pos))  # noqa: E731
        last = step == steps - 1
        if temperature > 0:
            u = uniform((batch, num_tokens, 1), generator, device)
            probs = (logits / temperature).softmax(-1)
            sampled = _sample_inverse_cdf(probs, u if pos is None else u.gather(1, pos[..., None]))
        elif last:  # greedy and nothing left to rank: the softmax over the codebook is not needed
            sampled = logits.argmax(-1)
            return sampled if pos is None else ids.scatter(1, pos, sampled)
        else:
            probs = logits.softmax(-1)
            sampled = probs.argmax(-1)
        conf = probs.gather(-1, sampled[..., None]).squeeze(-1).clamp_min(1e-20).log()
        if temperature > 0:
            u = uniform((batch, num_tokens), generator, device).clamp(1e-20, 1 - 1e-7)
            conf = conf + temperature * (1 - (step + 1) / steps) * -torch.log(-torch.log(at(u)))
        ids = sampled if pos is None else ids.scatter(1, pos, sampled)
        n_still = int(math.floor(num_tokens * masked_fraction(step, steps, schedule))) if step < steps - 1 else 0
        if n_still <= 0:
            break
        full = conf if pos is None else torch.full((batch, num_tokens), float("inf"), device=device).scatter_(1, pos, conf)
        pos = full.argsort(-1)[:, :n_still]  # lowest-confidence newly sampled positions
        ids = ids.scatter(1, pos, mask_id)
    return ids


def _decode_full(logits_fn, batch, num_tokens, mask_id, steps, temperature, schedule, generator, device, constrain):
    ids = torch.full((batch, num_tokens), mask_id, dtype=torch.long, device=device)
    masked = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
    for step in range(steps):
        logits = logits_fn(ids).float()  # [B, P, V]
        if constrain is not None:
            logits = constrain(logits, ids, masked)
        last = step == steps - 1
        if temperature > 0:
            probs = (logits / temperature).softmax(-1)
            sampled = _sample(probs, generator)
        elif last:  # greedy and nothing left to rank: the softmax over the codebook is not needed
            ids = torch.where(masked, logits.argmax(-1), ids)
            break
        else:
            probs = logits.softmax(-1)
            sampled = probs.argmax(-1)
        conf = probs.gather(-1, sampled[..., None]).squeeze(-1).clamp_min(1e-20).log()
        if temperature > 0:
            u = uniform(conf.shape, generator, device).clamp(1e-20, 1 - 1e-7)
            conf = conf + temperature * (1 - (step + 1) / steps) * -torch.log(-torch.log(u))
        ids = torch.where(masked, sampled, ids)
        n_still = int(math.floor(num_tokens * masked_fraction(step, steps, schedule))) if step < steps - 1 else 0
        if n_still <= 0:
            break
        conf = torch.where(masked, conf, torch.full_like(conf, float("inf")))
        remask_idx = conf.argsort(-1)[:, :n_still]  # lowest-confidence newly sampled positions
        masked = torch.zeros_like(masked).scatter(1, remask_idx, True)
        ids = torch.where(masked, torch.full_like(ids, mask_id), ids)
    return ids
