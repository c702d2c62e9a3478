"""World (batched imagined envs), WorldBuilder, level files and counterfactuals, on a real bundle
with random weights (mechanics, not quality: quality is the pretraining evaluation's job)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genie_world.bundle import load_bundle
from genie_world.levels import LevelFileError, load_levels, save_levels
from genie_world.text_encoder import UnknownWordsError
from genie_world.world import InvalidActionError, World
from genie_world.world_builder import WorldBuilder


@pytest.fixture(scope="module")
def bundle(random_bundle):
    torch.set_num_threads(2)
    return load_bundle(random_bundle)


@pytest.fixture(scope="module")
def levels(bundle):
    return WorldBuilder(bundle).generate("go to the red ball", num_worlds=8, seed=3)


def _play(world, actions, explicit_resets=()):
    """Step ``world`` through actions [T, N]; returns stacked tokens/rewards/flags per step."""
    out = {"tokens": [], "frames": [], "rewards": [], "terminated": [], "truncated": [], "is_first": []}
    for t, a in enumerate(actions):
        for when, envs in explicit_resets:
            if when == t:
                world.reset(envs=envs)
        s = world.step(a)
        for k in out:
            out[k].append(getattr(s, k))
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_step_equals_n_single_steps(bundle, levels, temperature):
    n, steps = 4, 14
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 7, size=(steps, n))
    batch = World(bundle, n, max_episode_steps=5, temperature=temperature, seed=11)
    batch.reset(levels)
    got = _play(batch, actions)
    assert got["is_first"][:, :].any(), "episodes should end and autoreset within 14 steps"
    for i in range(n):
        # Env i of the batch plays levels i, i+4, i, ...: the single world gets exactly that pool.
        single = World(bundle, 1, max_episode_steps=5, temperature=temperature, seed=11, env_index_offset=i)
        single.reset(levels[[i, i + 4]])
        ref = _play(single, actions[:, i:i + 1])
        for key in ("tokens", "terminated", "truncated", "is_first"):
            np.testing.assert_array_equal(got[key][:, i], ref[key][:, 0], err_msg=f"env {i} {key}")
        np.testing.assert_allclose(got["rewards"][:, i], ref["rewards"][:, 0], atol=1e-4)
        assert np.abs(got["frames"][:, i].astype(int) - ref["frames"][:, 0]).max() <= 1


def test_autoreset_and_explicit_reset_leave_other_envs_untouched(bundle, levels):
    n, steps = 4, 12
    actions = np.random.default_rng(1).integers(0, 7, size=(steps, n))
    a = World(bundle, n, max_episode_steps=4, seed=5)
    a.reset(levels)
    plain = _play(a, actions)
    b = World(bundle, n, max_episode_steps=4, seed=5)
    b.reset(levels)
    poked = _play(b, actions, explicit_resets=[(3, [2]), (7, [2])])
    others = [0, 1, 3]
    np.testing.assert_array_equal(plain["tokens"][:, others], poked["tokens"][:, others])
    np.testing.assert_array_equal(plain["terminated"][:, others], poked["terminated"][:, others])
    # Next-step autoreset: the step after a done returns the next level's first frame, reward 0.
    done = plain["terminated"] | plain["truncated"]
    t, i = map(int, np.argwhere(done[:-1])[0])
    assert plain["is_first"][t + 1, i] and plain["rewards"][t + 1, i] == 0.0
    assert not plain["terminated"][t + 1, i] and not plain["truncated"][t + 1, i]
    # Truncation at the time limit: no episode runs past max_episode_steps.
    steps_taken = np.zeros(n, int)
    for t in range(steps):
        steps_taken = np.where(plain["is_first"][t], 0, steps_taken + 1)
        assert (steps_taken <= 4).all()


def test_step_on_any_subset_of_envs_matches_stepping_them_alone(bundle, levels):
    world = World(bundle, 6, seed=2)
    world.reset(levels)
    twin = World(bundle, 6, seed=2)
    twin.reset(levels)
    acts = np.array([1, 2, 0])
    s1 = world.step(acts, envs=[4, 0, 2])  # not contiguous: gather/scatter path
    for env, act in zip([4, 0, 2], acts):
        ref = twin.step([act], envs=[env])
        np.testing.assert_array_equal(s1.tokens[[4, 0, 2].index(env)], ref.tokens[0])
    s2 = world.step(np.zeros(3, np.int64), envs=[1, 2, 3])  # contiguous: view path
    s3 = twin.step(np.zeros(3, np.int64), envs=[1, 2, 3])
    np.testing.assert_array_equal(s2.tokens, s3.tokens)
    assert list(s2.envs) == [1, 2, 3]


def test_same_seed_same_levels_different_seeds_distinct(bundle):
    builder = WorldBuilder(bundle)
    a = builder.generate("go to the red ball", num_worlds=16, seed=0)
    b = builder.generate("go to the red ball", num_worlds=16, seed=0)
    c = builder.generate("go to the red ball", num_worlds=16, seed=1)
    np.testing.assert_array_equal(a.first_tokens, b.first_tokens)
    assert a.distinct() == 16
    shared = {r.tobytes() for r in a.first_tokens} & {r.tobytes() for r in c.first_tokens}
    assert not shared, "different seeds gave the same level"
    # Level i does not depend on how many were asked for.
    np.testing.assert_array_equal(builder.generate("go to the red ball", num_worlds=4, seed=0).first_tokens,
                                  a.first_tokens[:4])
    assert a.missions == ["go to the red ball"] * 16 and len(set(a.level_ids)) == 16


def test_unknown_words_and_bad_images_are_refused(bundle):
    builder = WorldBuilder(bundle)
    with pytest.raises(UnknownWordsError, match=r"unknown words \['purple'\].*vocabulary is: .*ball"):
        builder.generate("go to the purple ball", num_worlds=2)
    with pytest.raises(UnknownWordsError, match="mission"):
        builder.generate("go to the red ball", mission="fly away", num_worlds=2)
    with pytest.raises(ValueError, match=r"expects \[64, 64, 3\]"):
        builder.generate(image=np.zeros((32, 32, 3), np.uint8), mission="go to the red ball")
    with pytest.raises(ValueError, match="needs mission"):
        builder.generate(image=np.zeros((64, 64, 3), np.uint8))
    img = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    lv = builder.generate(image=img, num_worlds=5, mission="go to the blue key")
    assert len(lv) == 5 and lv.source == "image"
    np.testing.assert_array_equal(lv.first_tokens[0], lv.first_tokens[2])


def test_level_file_round_trip_and_wrong_bundle_refusal(bundle, levels, tmp_path, bundle_factory):
    path = save_levels(tmp_path / "levels.h5", levels)
    back = load_levels(path, bundle)
    np.testing.assert_array_equal(back.first_tokens, levels.first_tokens)
    assert (back.missions, back.level_ids, back.prompt, back.seed) == (levels.missions, levels.level_ids,
                                                                       levels.prompt, levels.seed)
    other = load_bundle(bundle_factory(tmp_path / "other", seed=1))
    with pytest.raises(LevelFileError, match="fingerprint") as e:
        load_levels(path, other)
    assert str(path) in str(e.value)
    with pytest.raises(LevelFileError, match="fingerprint"):
        World(other, 2).reset(levels)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(LevelFileError, match="not a readable HDF5"):
        load_levels(tmp_path / "junk.h5")
    with pytest.raises(LevelFileError, match="does not exist"):
        save_levels(tmp_path / "missing-dir" / "levels.h5", levels)


def test_counterfactual_branches_match_stepping_and_leave_the_world_alone(bundle, levels):
    world = World(bundle, 3, max_episode_steps=50, seed=4)
    world.reset(levels)
    world.step([1, 2, 3])
    before = world._state.tokens.clone()
    plans = np.array([[0, 1, 2, 3], [2, 2, 2, 2], [0, 1, 2, 3], [6, 5, 4, 3]])
    cf = world.branch(1, plans)
    assert cf.tokens.shape[:2] == (4, 5) and cf.frames.shape[:2] == (4, 5)
    assert torch.equal(world._state.tokens, before), "branching changed the world"
    np.testing.assert_array_equal(cf.tokens[0], cf.tokens[2])  # same plan, same future
    for t in range(4):
        s = world.step(np.array([0, plans[0, t], 0]))
        if s.terminated[1] or s.truncated[1]:
            break
        np.testing.assert_array_equal(s.tokens[1], cf.tokens[0, t + 1])


def test_invalid_actions_are_refused_and_step_nothing(bundle, levels):
    world = World(bundle, 2, seed=1)
    world.reset(levels)
    twin = World(bundle, 2, seed=1)
    twin.reset(levels)
    for bad, msg in [([0, 7], r"actions\[1\] = 7: expected a real action in \[0, 7\)"),
                     ([0, -1], r"actions\[1\] = -1"), ([0.5, 1.0], "dtype float64"),
                     ([1, 2, 3], r"shape \(3,\)"), ([[1, 2], [3]], r"expected an array of shape \(2,\)")]:
        with pytest.raises(InvalidActionError, match=msg):
            world.step(bad)
    np.testing.assert_array_equal(world.step([1, 2]).tokens, twin.step([1, 2]).tokens)
    latent = World(bundle, 2, action_type="latent")
    latent.reset(levels)
    with pytest.raises(InvalidActionError, match=r"latent action in \[0, 8\)"):
        latent.step([8, 0])
    with pytest.raises(ValueError, match="never reset"):
        World(bundle, 2).step([0, 0])


def test_level_constraints_are_learned_and_enforced(bundle):
    from genie_world.level_constraints import LevelConstraints

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 50, size=(200, 64))  # "floor and objects": tokens 0..49
    agent = rng.integers(0, 4, 200) + 100  # one "agent" token per frame, four facings
    frames[np.arange(200), rng.integers(0, 64, 200)] = agent
    learned = LevelConstraints.fit(frames)
    assert learned.exactly_one == [[100, 101, 102, 103]]
    assert learned.valid(frames).all()
    broken = frames.copy()
    broken[0, :] = 7  # no agent
    broken[1, :2] = [100, 101]  # two agents
    assert learned.valid(broken[:3]).tolist() == [False, False, True]
    # The builder keeps only candidates that obey the bundle's constraints, deterministically.
    builder = WorldBuilder(bundle)
    free = builder.generate("go to the red ball", num_worlds=64, seed=0).first_tokens
    common = np.bincount(free.reshape(-1), minlength=1000)
    group = [int(t) for t in np.argsort(-common)[40:48]]  # tokens that appear in some levels only
    bundle.constraints = LevelConstraints([group], 200)
    try:
        levels = builder.generate("go to the red ball", num_worlds=8, seed=0)
        assert LevelConstraints([group]).valid(levels.first_tokens).all()
        assert 0 < builder.last_acceptance < 1
        np.testing.assert_array_equal(builder.generate("go to the red ball", num_worlds=3, seed=0).first_tokens,
                                      levels.first_tokens[:3])
        bundle.constraints = LevelConstraints([[999_999]], 200)  # a token no level can contain
        with pytest.raises(ValueError, match="only 0 of .* obey the bundle's level constraints"):
            builder.generate("go to the red ball", num_worlds=2, seed=0)
    finally:
        bundle.constraints = None


def test_constrained_decoding_keeps_exactly_one_of_each_group(bundle, levels):
    from genie_world.level_constraints import LevelConstraints

    common = np.bincount(levels.first_tokens.reshape(-1), minlength=1000)
    group = [int(t) for t in np.argsort(-common)[:3]]  # tokens the random model emits everywhere
    bundle.constraints = LevelConstraints([group], 200)
    try:
        world = World(bundle, 4, max_episode_steps=50, seed=0)
        free = World(bundle, 4, max_episode_steps=50, seed=0, constrained=False)
        world.reset(levels)
        free.reset(levels)
        counts, free_counts = [], []
        for t in range(5):
            a = np.random.default_rng(t).integers(0, 7, 4)
            s, f = world.step(a), free.step(a)
            counts.append(np.isin(s.tokens[~s.is_first], group).sum(1))
            free_counts.append(np.isin(f.tokens[~f.is_first], group).sum(1))
        assert all((c == 1).all() for c in counts)
        assert any((c != 1).any() for c in free_counts), "the test's group should be violated without constraints"
    finally:
        bundle.constraints = None


def test_reward_paid_only_on_predicted_termination_when_the_data_says_so(bundle, levels):
    from genie_world.level_constraints import LevelConstraints

    dense = World(bundle, 4, max_episode_steps=6, seed=0)
    dense.reset(levels)
    bundle.constraints = LevelConstraints([], 0, reward_only_at_termination=True)
    try:
        sparse = World(bundle, 4, max_episode_steps=6, seed=0)
        sparse.reset(levels)
        for t in range(6):
            a = np.random.default_rng(t).integers(0, 7, 4)
            d, s = dense.step(a), sparse.step(a)
            np.testing.assert_array_equal(d.terminated, s.terminated)
            np.testing.assert_allclose(s.rewards, np.where(d.terminated, d.rewards, 0.0))
    finally:
        bundle.constraints = None
