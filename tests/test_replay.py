"""The shared replay buffer: exact round trips, ring wrap-around, prioritised sampling and importance
weights, priorities by sampled index, refused input that writes nothing (also under hypothesis),
atomic checkpoints restored bit for bit, and the sharded client over real shard actors, including a
killed shard that comes back from its checkpoint, reports what it lost and takes the retried chunk
without duplicates."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipelines.replay import ReplayConfig, ReplayStorage, ShardedReplay, TransitionSchema
from pipelines.replay.checkpoint import load_arrays, save_arrays
from pipelines.replay.routing import decode_index, shard_of
from pipelines.replay.schema import STORED_FIELDS

P = 8  # tokens per observation in these tests (64 in the tiny world model; any P works)


def episodes(ids, length, P=P, seed=0, action_dim=0, first_step=0):
    """Complete episodes (or chunks from ``first_step``) with distinct random tokens: a dict batch."""
    rng = np.random.default_rng(seed)
    ids = list(ids)
    n_eps, N = len(ids), len(ids) * length
    obs = rng.integers(0, 1000, (n_eps, length + 1, P)).astype(np.int16)
    term = np.zeros((n_eps, length), bool)
    term[:, -1:] = True
    action = (rng.standard_normal((N, action_dim)).astype(np.float32) if action_dim
              else rng.integers(0, 7, N).astype(np.int32))
    return {"obs_tokens": obs[:, :-1].reshape(N, P), "next_obs_tokens": obs[:, 1:].reshape(N, P), "action": action,
            "reward": rng.standard_normal(N).astype(np.float32), "terminated": term.ravel(),
            "truncated": np.zeros(N, bool), "mission_id": np.repeat(np.asarray(ids, np.int32) % 5, length),
            "episode_id": np.repeat(np.asarray(ids, np.int64), length),
            "step": np.tile(np.arange(first_step, first_step + length, dtype=np.int32), n_eps)}


def take(batch, sel):
    return {k: v[sel] for k, v in batch.items()}


def concat(*batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def by_key(batch) -> dict:
    """(episode_id, step) -> row of the source batch."""
    return {(int(e), int(s)): i for i, (e, s) in enumerate(zip(batch["episode_id"], batch["step"]))}


def assert_exact(sample, source) -> None:
    """Every sampled transition equals its source transition in every field, next_obs_tokens included."""
    where = by_key(source)
    rows = np.array([where[(int(e), int(s))] for e, s in zip(sample["episode_id"], sample["step"])])
    for f in STORED_FIELDS + ("next_obs_tokens",):
        np.testing.assert_array_equal(sample[f], source[f][rows], err_msg=f)
        assert sample[f].dtype == source[f].dtype, f


def snapshot(s: ReplayStorage) -> dict:
    snap = {f"col_{f}": a.copy() for f, a in s.cols.items()}
    snap.update(leaves=s.tree.leaves.copy(), rows_written=s.rows_written, size=s.size,
                added=s.counters["transitions_added"], episodes=dict(s.episodes._last))
    return snap


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


# --- in-process storage --------------------------------------------------------------------------
def test_add_sample_round_trip_exact_in_any_input_order():
    s = ReplayStorage(1000, TransitionSchema(P), seed=0)
    src = episodes(range(3), 7)
    out = s.add(take(src, np.random.default_rng(1).permutation(21)))  # interleaved, unsorted input
    assert out == {"added": 21, "duplicates": 0, "rows": 24, "size": 21, "priority_total": 21.0}
    assert s.stats()["final_obs_rows"] == 3  # one final-observation row per episode run
    batch = s.sample(3000)
    assert_exact(batch, src)
    assert {(int(e), int(t)) for e, t in zip(batch["episode_id"], batch["step"])} == set(by_key(src))
    np.testing.assert_array_equal(batch["weights"], 1.0)


def test_episode_written_in_chunks_shares_its_boundary_rows():
    s = ReplayStorage(1000, TransitionSchema(P), seed=0)
    whole = episodes([42], 20)
    for lo in range(0, 20, 5):
        assert s.add(take(whole, slice(lo, lo + 5)))["added"] == 5
    assert s.rows_written == 21 and s.size == 20  # not 4 chunks x 6 rows
    assert_exact(s.sample(2000), whole)
    assert s.add(take(whole, slice(5, 15)))["duplicates"] == 10  # a resent chunk is dropped
    assert s.size == 20


def test_ring_wraps_around_and_keeps_only_whole_recent_transitions():
    s = ReplayStorage(50, TransitionSchema(P), seed=0)
    srcs = [episodes(range(4 * i, 4 * i + 4), 3, seed=i) for i in range(10)]  # 10 x 16 rows into 50
    for b in srcs:
        s.add(b)
    allsrc = concat(*srcs)
    assert s.rows_written == 160
    pos = np.arange(s.rows_written - 50, s.rows_written)
    live = s.get_rows(pos % 50)
    expected_size = int((live["priority"] > 0).sum())
    assert s.size == expected_size == s.stats()["size"]
    assert live["episode_id"].min() >= 27  # only the newest episodes survive
    batch = s.sample(4000)
    assert_exact(batch, allsrc)  # successors are never overwritten before their transitions
    assert batch["episode_id"].min() >= 27


def test_prioritised_sampling_follows_priorities():
    s = ReplayStorage(100, TransitionSchema(P), alpha=0.7, seed=123)
    src = episodes([7], 10)
    s.add(src)
    first = s.sample(10, prioritized=True)
    order = np.argsort(first["step"])
    prios = np.array([0.0, 0.1, 0.5, 1, 2, 3, 4, 6, 8, 10.0])
    assert s.update_priorities(first["index"][order], prios) == {"updated": 10, "stale": 0}
    expected = (prios + 1e-6) ** 0.7
    expected /= expected.sum()
    counts = np.zeros(10)
    for _ in range(50):
        batch = s.sample(2000, prioritized=True)
        counts += np.bincount(batch["step"], minlength=10)
        np.testing.assert_allclose(batch["probs"], expected[batch["step"]], rtol=1e-5)
    freq = counts / counts.sum()
    np.testing.assert_allclose(freq, expected, atol=0.003)  # 100k stratified draws
    assert counts[0] == 0  # priority 0 (+eps) is ~1e-4 of the mass: never drawn here


def test_importance_weights():
    s = ReplayStorage(100, TransitionSchema(P), alpha=1.0, seed=0)
    s.add(episodes([1, 2], 5))
    first = s.sample(10, prioritized=True)
    s.update_priorities(first["index"], 1.0 + first["step"] + 10 * (first["episode_id"] == 2))
    batch = s.sample(64, prioritized=True, beta=0.5)
    w = (s.size * batch["probs"]) ** -0.5
    np.testing.assert_allclose(batch["weights"], w / w.max(), rtol=1e-6)
    assert batch["weights"].max() == 1.0 and batch["weights"].dtype == np.float32
    lowest = batch["probs"].argmin()
    assert batch["weights"][lowest] == 1.0  # rarest draws get the largest correction


def test_priority_updates_for_overwritten_rows_are_dropped():
    s = ReplayStorage(20, TransitionSchema(P), seed=0)
    s.add(episodes([1], 9))
    old = s.sample(5, prioritized=True)["index"]
    s.add(episodes([2], 9))
    s.add(episodes([3], 9))  # rows of episode 1 are overwritten
    assert s.update_priorities(old, np.ones(5)) == {"updated": 0, "stale": 5}
    with pytest.raises(ValueError, match="finite"):
        s.update_priorities(s.sample(2)["index"], np.array([1.0, np.nan]))


def test_box_actions_round_trip():
    s = ReplayStorage(100, TransitionSchema(P, action_dim=3), seed=0)
    src = episodes([5, 6], 6, action_dim=3)
    s.add(src)
    batch = s.sample(200)
    assert batch["action"].shape == (200, 3) and batch["action"].dtype == np.float32
    assert_exact(batch, src)


def _bad_batches():
    good = episodes([9], 4)
    n = 4
    yield "obs_tokens", {**good, "obs_tokens": good["obs_tokens"].astype(np.float32)}
    yield "obs_tokens", {**good, "obs_tokens": good["obs_tokens"][:, :-1]}
    yield "obs_tokens", {**good, "obs_tokens": good["obs_tokens"].astype(np.int32) + 40_000}
    yield "next_obs_tokens", {**good, "next_obs_tokens": good["next_obs_tokens"][:-1]}
    yield "reward", {**good, "reward": np.full(n, np.nan, np.float32)}
    yield "terminated", {**good, "terminated": good["terminated"].astype(np.int8)}
    yield "action", {**good, "action": good["action"].astype(np.float64)}
    yield "action", {**good, "action": np.full(n, 7, np.int32)}  # num_actions = 7
    yield "step", {**good, "step": good["step"] - 1}
    yield "step", {**good, "step": np.zeros(n, np.int32)}  # repeated (episode_id, step)
    yield "mission_id", {k: v for k, v in good.items() if k != "mission_id"}
    yield "bogus", {**good, "bogus": np.zeros(n)}
    yield "next_obs_tokens", {**good, "next_obs_tokens": good["next_obs_tokens"] + 1}  # o_{t+1} != next row's o_t
    yield "terminated", {**good, "terminated": np.ones(n, bool)}  # ends mid-run


@pytest.mark.parametrize("field,bad", list(_bad_batches()), ids=[f"{i}-{f}" for i, (f, _) in enumerate(_bad_batches())])
def test_bad_input_is_refused_and_nothing_is_written(field, bad):
    s = ReplayStorage(100, TransitionSchema(P, num_actions=7), seed=0)
    s.add(episodes([1], 5))
    before = snapshot(s)
    with pytest.raises(ValueError, match=field):
        s.add(bad)
    assert_same(snapshot(s), before)


_INT = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16]
_FLOAT = [np.float16, np.float32, np.float64]
_KIND = {"obs_tokens": _INT, "next_obs_tokens": _INT, "action": _INT, "reward": _FLOAT, "terminated": [np.bool_],
         "truncated": [np.bool_], "mission_id": _INT, "episode_id": _INT, "step": _INT}
_ALL_DTYPES = _INT + _FLOAT + [np.bool_, np.complex64]


@st.composite
def random_batches(draw):
    """A one-episode batch where each field gets a random dtype, and sometimes a wrong length or width.

    Values are small (tokens < 100, ids < 100, steps < 12), so every integer dtype holds them exactly:
    a batch is valid exactly when every dtype has the right kind and every shape is right."""
    n = draw(st.integers(0, 12))
    good = episodes([draw(st.integers(0, 99))], n, seed=draw(st.integers(0, 2**16)))
    good["obs_tokens"] %= 100
    good["next_obs_tokens"] %= 100
    if draw(st.booleans()):
        return good, True, n  # half the examples are fully valid
    batch, valid = {}, True
    for f, v in good.items():
        dtype = draw(st.sampled_from(_ALL_DTYPES))
        arr = v.astype(dtype)
        valid &= dtype in _KIND[f]
        change = draw(st.sampled_from(["none"] * 6 + ["longer", "shorter", "width"]))
        if change == "longer" or (change == "shorter" and n == 0):
            arr = np.concatenate([arr, np.zeros((1,) + arr.shape[1:], arr.dtype)])
            valid = False
        elif change == "shorter":
            arr = arr[:-1]
            valid = False
        elif change == "width":
            arr = arr[..., None] if arr.ndim == 1 else arr[:, :-1]
            valid = False
        batch[f] = arr
    return batch, valid, n


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_batches())
def test_property_add_lands_valid_batches_and_refuses_the_rest_untouched(example):
    batch, valid, n = example
    s = ReplayStorage(200, TransitionSchema(P), seed=0)
    s.add(episodes([10**6], 5))  # not empty, so "nothing changed" means something
    before = snapshot(s)
    event("valid" if valid else "refused")
    if not valid:
        with pytest.raises(ValueError):
            s.add(batch)
        assert_same(snapshot(s), before)
        return
    out = s.add(batch)
    assert out["added"] == n and out["duplicates"] == 0
    assert s.size == before["size"] + n
    if n:
        rows = s.get_rows(np.arange(before["rows_written"], s.rows_written) % s.capacity)
        assert s.rows_written - before["rows_written"] == n + 1  # n transitions + the final observation
        for f in STORED_FIELDS:
            np.testing.assert_array_equal(rows[f][:n], np.asarray(batch[f]).astype(rows[f].dtype), err_msg=f)
        np.testing.assert_array_equal(rows["obs_tokens"][n], np.asarray(batch["next_obs_tokens"])[-1])
        assert (rows["priority"][:n] > 0).all() and rows["priority"][n] == 0


def test_checkpoint_restore_is_exact_and_counts_lost_transitions(tmp_path):
    s = ReplayStorage(64, TransitionSchema(P), seed=3)
    for i in range(6):  # wraps: 6 x 11 rows into 64
        s.add(episodes([10 * i, 10 * i + 1], 5, seed=i))
    got = s.sample(16, prioritized=True)
    s.update_priorities(got["index"], np.linspace(0.1, 5, 16))
    path = tmp_path / "shard_00.npz"
    save_arrays(path, s.state_arrays())
    assert [p.name for p in tmp_path.iterdir()] == ["shard_00.npz"]  # no temp file left behind
    saved = snapshot(s)
    levels = [lv.copy() for lv in s.tree.levels]

    fresh = ReplayStorage(64, TransitionSchema(P), seed=99)
    r = fresh.load_state(load_arrays(path))
    assert r["lost_since_checkpoint"] == 0
    assert_same(snapshot(fresh), saved)
    for a, b in zip(levels, fresh.tree.levels):
        np.testing.assert_array_equal(a, b)  # inner sums rebuilt bit for bit
    assert fresh.max_priority == s.max_priority and fresh.counters == s.counters
    a, b = s.sample(32, prioritized=True), fresh.sample(32, prioritized=True)  # same rng state too
    for f in STORED_FIELDS + ("next_obs_tokens", "probs"):
        np.testing.assert_array_equal(a[f], b[f])
    assert not np.array_equal(a["index"], b["index"])  # a new generation: old indices are refused
    assert fresh.update_priorities(a["index"], np.ones(32))["stale"] == 32

    s.add(episodes([500], 7))  # after the checkpoint ...
    r = s.load_state(load_arrays(path))  # ... then the shard goes back to it
    assert r["lost_since_checkpoint"] == 7
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="shard_00.npz"):
        load_arrays(path)
    with pytest.raises(ValueError, match="capacity"):
        ReplayStorage(65, TransitionSchema(P)).load_state(s.state_arrays())


def test_checkpoint_of_a_little_used_buffer_holds_only_its_rows(tmp_path):
    s = ReplayStorage(100_000, TransitionSchema(P), seed=1)
    s.add(episodes([1, 2], 5))  # 10 transitions + 2 final-observation rows
    path = tmp_path / "shard_00.npz"
    nbytes = save_arrays(path, s.state_arrays())
    assert nbytes < 20_000, nbytes  # the full ring would be ~3 MB
    saved = snapshot(s)
    s.add(episodes([3], 9, seed=2))  # rows 12..21 written after the checkpoint ...
    s.load_state(load_arrays(path))  # ... are zero again after going back to it
    assert_same(snapshot(s), saved)
    fresh = ReplayStorage(100_000, TransitionSchema(P), seed=5)
    fresh.load_state(load_arrays(path))
    assert_same(snapshot(fresh), saved)
    bad = dict(load_arrays(path), col_reward=np.zeros(11, np.float32))
    with pytest.raises(ValueError, match=r"column 'reward': expected float32 \[12\]"):
        fresh.load_state(bad)


# --- the sharded client over real shard actors --------------------------------------------------
@pytest.fixture
def replay(ray_local, tmp_path):
    cfg = ReplayConfig(name=f"test-replay-{uuid.uuid4().hex[:6]}", num_shards=3, capacity_per_shard=4000,
                       obs_tokens=P, num_actions=7, checkpoint_dir=str(tmp_path / "ckpt"), num_cpus_per_shard=0.1,
                       seed=0)
    client = ShardedReplay(cfg)
    yield client
    client.kill()


def test_sharded_client_routes_samples_and_updates_over_actors(replay):
    src = episodes(range(60), 10, seed=1)
    assert replay.add(src) == {"added": 600, "duplicates": 0, "retries": 0}
    stats = replay.stats()
    assert stats["size"] == 600 and len(stats["shards"]) == 3
    owner = shard_of(np.arange(60), 3)
    assert [s["size"] for s in stats["shards"]] == [10 * int((owner == k).sum()) for k in range(3)]

    batch = replay.sample(1024)
    assert len(batch["step"]) == 1024
    assert_exact(batch, src)
    np.testing.assert_array_equal(decode_index(batch["index"])[0], shard_of(batch["episode_id"], 3))
    np.testing.assert_allclose(batch["probs"], 1 / 600, rtol=1e-9)
    several = replay.sample_batches(128, 3)  # a learner's minibatches from one call per shard
    assert [len(b["step"]) for b in several] == [128] * 3
    assert_exact(concat(*[{f: b[f] for f in src} for b in several]), src)

    # Priorities route back to the owning shards; prioritised draws then follow them globally.
    hot = batch["episode_id"] == 3
    prios = np.where(hot, 1000.0, 0.01)
    assert replay.update_priorities(batch["index"], prios)["updated"] == 1024
    pb = replay.sample(2048, prioritized=True)
    assert (pb["episode_id"] == 3).mean() > 0.6  # ~1.7% of the transitions, most of the mass
    w = (600 * pb["probs"]) ** -replay.config.beta
    np.testing.assert_allclose(pb["weights"], w / w.max(), rtol=1e-5)

    assert replay.add(src)["duplicates"] == 600  # resending is harmless
    bad = {**episodes([999], 3), "reward": np.array([0.0, np.inf, 0.0], np.float32)}
    with pytest.raises(ValueError, match="reward"):
        replay.add(bad)
    fresh = episodes(range(900, 912), 3, seed=5)  # lands on every shard ...
    with pytest.raises(ValueError, match="more than once"):
        replay.add(concat(fresh, take(fresh, [4])))  # ... but one step repeats: no shard takes any part
    assert [s["size"] for s in replay.stats()["shards"]] == [s["size"] for s in stats["shards"]]


def test_killed_shard_restores_checkpoint_reports_lost_and_takes_the_retry(replay):
    import ray

    before = episodes(range(30), 8, seed=2)
    replay.add(before)
    replay.checkpoint_all()
    ids = [i for i in range(100, 400) if shard_of(np.array([i]), 3)[0] == 1][:5]
    after = episodes(ids, 8, seed=3)  # 40 transitions for shard 1, after the checkpoint
    assert replay.add(after)["added"] == 40
    size1 = replay.stats()["shards"][1]["size"]

    pid = ray.get(replay.shards[1].pid.remote())
    ray.kill(replay.shards[1], no_restart=False)  # the process dies; Ray restarts the actor
    # ray.kill is asynchronous: a call made right after it may still reach the old process.
    deadline = time.monotonic() + 120
    while True:
        try:
            if ray.get(replay.shards[1].pid.remote(), timeout=30) != pid:
                break
        except ray.exceptions.RayError:
            pass  # dead or restarting
        assert time.monotonic() < deadline, "the killed shard was not restarted"
        time.sleep(0.2)
    st = replay.stats()
    s1 = st["shards"][1]
    assert s1["incarnation"] == 2
    assert s1["last_restore"]["lost_since_checkpoint"] == 40 and s1["lost_total"] == 40
    assert s1["size"] == size1 - 40

    out = replay.add(concat(before, after))  # the writer resends: only the lost part lands again
    assert out == {"added": 40, "duplicates": 240, "retries": 0}
    assert replay.stats()["shards"][1]["size"] == size1
    batch = replay.sample(6000)
    assert_exact(batch, concat(before, after))
    keys = set(zip(batch["episode_id"].tolist(), batch["step"].tolist()))
    assert len(keys) == 280  # every transition there once: 240 + 40, nothing doubled
