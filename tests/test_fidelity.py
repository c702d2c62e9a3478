"""The fidelity measurement on a hand-made bundle: an exact lookup tokenizer (one solid colour per
8x8 cell) and a dynamics that copies the last frame. Copying is right exactly where the real game
left the frame unchanged, so the report must score those steps right and the others wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from genie_world.bundle import load_bundle
from genie_world.fidelity import RealEpisode, _termination_metrics, cells_right, measure_fidelity
from genie_world.slot_cache import SlotKVCache

PALETTE = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.float32)
SIDE, CELL = 64, 8
G = SIDE // CELL


def cell_frame(cells: np.ndarray) -> np.ndarray:
    """[G, G] palette indices -> [S, S, 3] uint8 frame of solid cells."""
    return PALETTE[torch.as_tensor(cells)].repeat_interleave(CELL, 0).repeat_interleave(CELL, 1).numpy().astype(np.uint8)


class LookupTokenizer(nn.Module):
    """Token = the palette colour of a cell; exact on cell frames."""

    num_patches = G * G

    def encode(self, frames):
        x = torch.as_tensor(frames).float()[..., ::CELL, ::CELL, :]  # [B, T, G, G, 3]
        ids = (x[..., None, :] - PALETTE).abs().sum(-1).argmin(-1)  # [B, T, G, G]
        ids = ids.flatten(-2)
        return ids[..., None].float(), ids

    def decode(self, ids):
        b, t, p = ids.shape
        cells = PALETTE[ids].view(b, t, G, G, 3) / 255
        return cells.repeat_interleave(CELL, 2).repeat_interleave(CELL, 3)

    def new_slot_cache(self, num_envs, window, device=None, dtype=torch.float32):
        return SlotKVCache.empty(num_envs, self.num_patches, 0, 1, 1, window, device, dtype)

    def decode_slots(self, ids, cache):
        cache.commit()
        return self.decode(ids[:, None])[:, 0]


class CopyDynamics(nn.Module):
    """Predicts the newest committed frame again, whatever the action."""

    def __init__(self, num_actions: int, vocab_size: int = 4):
        super().__init__()
        self.num_patches, self.num_actions, self.vocab_size = G * G, num_actions, vocab_size
        self.anchor = nn.Parameter(torch.zeros(1))  # the World reads the device off the parameters

    def new_slot_cache(self, num_envs, window, device=None, dtype=torch.float32):
        return SlotKVCache.empty(num_envs, self.num_patches, 1, 1, 1, window, device, dtype)

    def commit_slots(self, cache, ids, actions):
        cache.k[0][torch.arange(len(ids)), cache.write_slot(), :, 0] = ids.to(cache.k[0].dtype)
        cache.commit()

    def greedy_slots(self, cache, actions, groups=()):
        newest = (cache.step - 1) % cache.slots
        return cache.k[0][torch.arange(cache.num_envs), newest, :, 0].long()


@pytest.fixture(scope="module")
def copy_bundle(tmp_path_factory, bundle_factory):
    run = bundle_factory(tmp_path_factory.mktemp("fidelity") / "run")
    bundle = load_bundle(run)
    bundle.parts["tokenizer"] = LookupTokenizer()
    bundle.parts["dynamics"] = CopyDynamics(bundle.config.num_latent_actions)
    bundle.constraints = None
    return bundle


def _episode(rng, changes: list[bool], mission="go to the red ball") -> RealEpisode:
    cells = rng.integers(0, 4, (G, G))
    frames = [cell_frame(cells)]
    for change in changes:
        if change:
            i, j = rng.integers(0, G, 2)
            cells = cells.copy()
            cells[i, j] = (cells[i, j] + 1) % 4
        frames.append(cell_frame(cells))
    return RealEpisode(np.stack(frames), np.zeros(len(changes), np.int64) + 2, True, mission)


def test_cells_right_uses_the_tolerance_per_cell():
    real = cell_frame(np.zeros((G, G), int))
    off = real.copy()
    off[:CELL, :CELL] = 11  # one cell off by 11/255 everywhere
    assert cells_right(off, real, CELL, 12 / 255)
    off[:CELL, :CELL] = 13
    assert not cells_right(off, real, CELL, 12 / 255)
    with pytest.raises(ValueError, match="cells"):
        cells_right(real[:60, :60], real[:60, :60], CELL)


def test_copy_dynamics_is_right_exactly_on_unchanged_frames(copy_bundle):
    rng = np.random.default_rng(0)
    plans = [[False, True, False, True], [False, False, False], [True, False], [False] * 9]
    episodes = [_episode(rng, p) for p in plans]
    m = measure_fidelity(copy_bundle, episodes, horizons=(1, 2, 4, 8), cell=CELL)
    for mode in ("keys", "latents"):
        # Step 1: unchanged in 3 of the 4 episodes; copying is right there and only there.
        assert m[f"fidelity_{mode}_cells_right_h1"] == 0.75
        assert m[f"fidelity_{mode}_token_exact_h1"] == 0.75
        # Step 2: open loop stays right while nothing has changed yet (episodes 2 and 4).
        assert m[f"fidelity_{mode}_cells_right_h2"] == 0.5
        # Step 4: among episodes this long (1 and 4), only the one that never changes.
        assert m[f"fidelity_{mode}_cells_right_h4"] == 0.5
        assert m[f"fidelity_{mode}_cells_right_h8"] == 1.0  # only episode 4 lasts 8 steps
        assert m[f"fidelity_{mode}_episodes_right"] == 0.5
        # One step from the real history: right exactly on the 15 of 18 steps that change nothing.
        assert m[f"fidelity_{mode}_one_step_right"] == pytest.approx(15 / 18, abs=1e-4)
    assert m["fidelity_step_forward"] == pytest.approx(15 / 18, abs=1e-4)
    assert m["fidelity_step_forward_changing"] == 0.0
    assert m["fidelity_ceiling_cells_right"] == 1.0


def test_termination_recall_and_false_terminations():
    fired = np.array([[0, 0, 1], [1, 0, 1], [0, 0, 0], [0, 1, 0]], bool)
    lengths = np.array([3, 3, 3, 2])
    ended = np.array([True, True, True, False])
    m = _termination_metrics("x", fired, lengths, ended)
    assert m["x_termination_recall"] == pytest.approx(2 / 3)
    # Episode 2 fires before its end; episode 4 fires at its (time-limit) end, which is not early.
    assert m["x_false_termination"] == 0.25
