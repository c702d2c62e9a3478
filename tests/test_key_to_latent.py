"""The adapter's key -> latent model: which latent a key causes depends on where things are, which a
set-of-tokens reading cannot see and the token-grid model can."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genie_world.action_adapter import ActionAdapter
from genie_world.bundle import load_bundle, save_adapter
from genie_world.key_to_latent import KeyToLatent, fit_key_to_latent

SIDE = 4
P = SIDE * SIDE
AGENT, WALL, FLOOR = 1, 2, 0
FORWARD, TURN = 0, 1
MOVED, STILL, TURNED = 0, 1, 2


def _grid_task(n: int, seed: int):
    """An agent (token 1) that faces east: ``forward`` moves it (latent MOVED) unless a wall (token 2)
    is the tile east of it (latent STILL); ``turn`` always turns it (TURNED). Every grid holds one
    agent and one wall, so the set of tokens present is the same in every state."""
    rng = np.random.default_rng(seed)
    tokens = np.full((n, P), FLOOR)
    keys = rng.integers(0, 2, n)
    latents = np.empty(n, np.int64)
    for i in range(n):
        r, c = rng.integers(0, SIDE), rng.integers(0, SIDE - 1)
        tokens[i, r * SIDE + c] = AGENT
        blocked = rng.random() < 0.5
        wall = r * SIDE + c + 1 if blocked else int(rng.choice([j for j in range(P) if j not in (r * SIDE + c, r * SIDE + c + 1)]))
        tokens[i, wall] = WALL
        latents[i] = TURNED if keys[i] == TURN else (STILL if blocked else MOVED)
    return tokens, keys, latents


@torch.no_grad()  # training must not depend on the caller's grad mode (pretraining evaluates under no_grad)
def test_grid_model_learns_what_a_key_does_where():
    tokens, keys, latents = _grid_task(1500, 0)
    model, m = fit_key_to_latent(tokens, keys, latents, vocab_size=3, num_real=2, num_latent=3, steps=400, seed=0)
    vt, vk, vl = _grid_task(400, 1)
    with torch.no_grad():
        pred = model(torch.as_tensor(vt), torch.as_tensor(vk)).argmax(-1).numpy()
    fwd = vk == FORWARD
    assert (pred[fwd] == vl[fwd]).mean() >= 0.95
    assert (pred[~fwd] == TURNED).mean() >= 0.99
    # The set-of-tokens adapter alone cannot tell a blocked forward from a free one: no better than a coin there.
    adapter = ActionAdapter.fit(keys, latents, latents != STILL, tokens, num_real=2, num_latent=3, max_transitions=1500)
    plain = adapter.real_to_latent(vk, vt)
    assert (plain[fwd] == vl[fwd]).mean() <= 0.6
    adapter.key_model = model
    assert (adapter.real_to_latent(vk, vt)[fwd] == vl[fwd]).mean() >= 0.95


def test_fit_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="same non-zero number"):
        fit_key_to_latent(np.zeros((3, P), int), np.zeros(2, int), np.zeros(3, int), 3, 2, 3, steps=1)


def test_adapter_with_key_model_round_trips_through_the_bundle(tmp_path, bundle_factory):
    run = bundle_factory(tmp_path / "run")
    bundle = load_bundle(run)
    adapter = bundle.adapter
    p = bundle.dynamics.num_patches
    adapter.key_model = KeyToLatent(bundle.tokenizer.vocab_size, p, adapter.num_real, adapter.num_latent, 8, 1)
    save_adapter(run, adapter)
    again = load_bundle(run).adapter
    tokens = np.random.default_rng(0).integers(0, bundle.tokenizer.vocab_size, (16, p))
    keys = np.arange(16) % adapter.num_real
    assert np.array_equal(again.real_to_latent(keys, tokens), adapter.real_to_latent(keys, tokens))
    (run / "action_adapter.safetensors").unlink()
    with pytest.raises(ValueError, match="action_adapter.safetensors: does not exist"):
        load_bundle(run)
