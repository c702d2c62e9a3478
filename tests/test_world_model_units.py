"""Unit tests of the world-model parts (no Ray): FSQ, ST transformer, MaskGIT, heads, adapter, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genie_world.action_adapter import ActionAdapter
from genie_world.dynamics import DynamicsModel
from genie_world.fsq import FSQ
from genie_world.latent_actions import LatentActionModel
from genie_world.maskgit import maskgit_decode, random_mask
from genie_world.metrics import psnr, ssim
from genie_world.prompt_prior import PromptPrior
from genie_world.reward_head import RewardHead
from genie_world.st_transformer import STTransformer
from genie_world.text_encoder import UnknownWordsError, Vocabulary
from genie_world.video_tokenizer import VideoTokenizer

torch.set_num_threads(2)


def test_fsq_index_code_round_trip_and_gradient():
    fsq = FSQ("8,5,5,5")
    assert fsq.codebook_size == 1000
    idx = torch.arange(1000)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(idx)), idx)
    z = torch.randn(64, 4, requires_grad=True)
    codes, ids = fsq(z)
    assert codes.abs().max() <= 1.0 and ids.min() >= 0 and ids.max() < 1000
    assert torch.equal(fsq.indices_to_codes(ids), codes.detach())
    (codes ** 2).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through estimator
    usage = fsq.usage(ids)
    assert 0 < usage["codebook_used"] <= 1 and usage["codebook_perplexity"] >= 1


def test_temporal_attention_is_causal():
    torch.manual_seed(0)
    st = STTransformer(dim=32, heads=4, depth=2, qk_norm=True).eval()
    x = torch.randn(2, 5, 6, 32)
    y = st(x)
    x2 = x.clone()
    x2[:, 3] += torch.randn_like(x2[:, 3])  # change frame 3
    y2 = st(x2)
    torch.testing.assert_close(y[:, :3], y2[:, :3])  # frames before 3 are unaffected
    assert not torch.allclose(y[:, 3:], y2[:, 3:])


def test_cached_forward_equals_full_forward():
    torch.manual_seed(0)
    st = STTransformer(dim=32, heads=4, depth=3).eval()
    x = torch.randn(2, 6, 5, 32)
    cond = torch.randn(2, 6, 32)
    full = st(x, cond)
    cache = st.new_cache()
    outs = [st.forward_cached(x[:, :2], cache, cond[:, :2], commit=True)]
    for t in range(2, 6):
        st.forward_cached(x[:, t:t + 1], cache, cond[:, t:t + 1])  # an uncommitted pass changes nothing
        outs.append(st.forward_cached(x[:, t:t + 1], cache, cond[:, t:t + 1], commit=True))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.length == 6 and cache.next_pos == 6


def _dynamics():
    torch.manual_seed(0)
    return DynamicsModel(vocab_size=50, num_patches=16, num_actions=8, width=32, heads=4, depth=2).eval()


def test_kv_cached_generation_equals_uncached():
    dyn = _dynamics()
    context = torch.randint(0, 50, (3, 4, 16))
    actions = torch.randint(0, 8, (3, 4))  # a_0..a_2 into frames 1..3, then a_3 for the new frame
    cache = dyn.new_cache()
    dyn.prime(cache, context[:, :1], None)
    dyn.prime(cache, context[:, 1:], actions[:, :3])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    cached = dyn.generate_next(cache, actions[:, 3], steps=6, temperature=1.0, generator=g1)
    uncached = dyn.generate_next_uncached(context, actions, steps=6, temperature=1.0, generator=g2)
    assert torch.equal(cached, uncached)
    assert (cached != dyn.mask_id).all() and cache.length == 5


def test_maskgit_decode_fills_everything_and_is_seeded():
    logits = torch.randn(2, 16, 10)
    fn = lambda ids: logits  # noqa: E731
    a = maskgit_decode(fn, 2, 16, 10, steps=5, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = maskgit_decode(fn, 2, 16, 10, steps=5, temperature=1.0, generator=torch.Generator().manual_seed(1))
    c = maskgit_decode(fn, 2, 16, 10, steps=5, temperature=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and (a < 10).all()
    g = maskgit_decode(fn, 2, 16, 10, steps=5, temperature=0.0)
    assert torch.equal(g, logits.argmax(-1))
    m = random_mask((1000, 64), 0.5, 1.0, torch.Generator().manual_seed(0))
    frac = m.float().mean(-1)
    assert frac.min() >= 0.5 and frac.max() <= 1.0


def _frames(n=2, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Blocky frames (8x8 tiles of few colours), like BabyAI.
    tiles = torch.randint(0, 4, (n, t, 4, 4), generator=g)
    palette = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [100, 100, 100]], dtype=torch.uint8)
    img = palette[tiles]  # [n, t, 4, 4, 3]
    return img.repeat_interleave(8, 2).repeat_interleave(8, 3)  # [n, t, 32, 32, 3]


def _fit(model, loss_fn, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss, _ = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    return first, loss_fn()[0].item()


def test_tokenizer_change_weight_counts_pixels_that_differ_between_frames():
    torch.manual_seed(0)
    frames = torch.zeros(2, 3, 32, 32, 3, dtype=torch.uint8)
    frames[0, 1, 5, 7] = 255  # one pixel of frame 1 differs from frames 0 and 2 of clip 0
    plain = VideoTokenizer(32, 8, 32, 4, 1, 1, "8,5,5,5")
    weighted = VideoTokenizer(32, 8, 32, 4, 1, 1, "8,5,5,5", change_weight=50.0)
    weighted.load_state_dict(plain.state_dict())
    loss_plain, m_plain = plain.loss(frames)
    loss_w, m_w = weighted.loss(frames)
    assert loss_plain.item() == pytest.approx(m_plain["mse"]) and m_w["mse"] == pytest.approx(m_plain["mse"])
    recon = plain.decode_codes(plain.encode(frames)[0])
    se = (recon - frames.float() / 255) ** 2
    changed = torch.zeros(2, 3, 32, 32, 1)
    changed[0, :, 5, 7] = 1  # the pixel, in the changed frame and in both neighbours it differs from
    expected = ((1 + 49 * changed) * se).mean()
    assert loss_w.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss_w.item() > loss_plain.item()


def test_tiny_models_overfit_one_batch():
    torch.manual_seed(0)
    frames = _frames()
    tok = VideoTokenizer(32, 8, 32, 4, 1, 1, "8,5,5,5")
    first, last = _fit(tok, lambda: tok.loss(frames), 150)
    assert last < first * 0.1, (first, last)

    lam = LatentActionModel(32, 8, 32, 4, 1, 1, num_actions=4)
    first, last = _fit(lam, lambda: lam.loss(frames), 100)
    assert last < first * 0.5, (first, last)

    dyn = DynamicsModel(50, 16, 4, 32, 4, 2)
    ids = torch.randint(0, 50, (2, 4, 16))
    actions = torch.randint(0, 4, (2, 3))
    gen = torch.Generator().manual_seed(0)
    first, last = _fit(dyn, lambda: dyn.loss(ids, actions, gen), 150)
    assert last < first * 0.3, (first, last)

    vocab = Vocabulary.from_texts(["go to the red ball", "go to the blue key"])
    text = vocab.encode_batch(["go to the red ball", "go to the blue key"], 8)
    heads = RewardHead(len(vocab), 8, 50, 16, 32, 4, 1)
    first, last = _fit(heads, lambda: heads.loss(text, ids[:, 1], torch.tensor([0.0, 0.9]), torch.tensor([False, True])), 80)
    assert last < first * 0.3, (first, last)

    prior = PromptPrior(len(vocab), 8, 50, 16, 32, 4, 1)
    first, last = _fit(prior, lambda: prior.loss(text, ids[:, 0], gen), 150)
    assert last < first * 0.3, (first, last)
    out = prior.generate(text, steps=4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 16) and (out < 50).all()


def test_vocabulary_refuses_unknown_words():
    vocab = Vocabulary.from_texts(["go to the red ball"])
    assert vocab.encode("Go to the RED ball!", 6)[:5] == [vocab.index[w] for w in ["go", "to", "the", "red", "ball"]]
    with pytest.raises(UnknownWordsError, match=r"unknown words \['a', 'castle', 'lava'\]; the vocabulary is: ball go red the to"):
        vocab.encode("a lava castle", 6)


def test_action_adapter_maps_both_ways_conditioned_on_state():
    """Latents are effects ("face north"); which key caused one depends on the state (facing east/west)."""
    rng = np.random.default_rng(0)
    n = 600
    facing = rng.integers(0, 4, n)  # N, E, S, W; frames carry one agent token per facing: 100 + facing
    real = rng.integers(0, 4, n)  # 0 left, 1 right, 2 forward, 3 done (never changes the frame)
    new_facing = np.where(real == 0, (facing - 1) % 4, np.where(real == 1, (facing + 1) % 4, facing))
    latent = np.where(real == 2, 4 + facing, new_facing)  # latents 0-3 "now faces X", 4-7 "moved X"
    latent[real == 3] = 2
    changed = real != 3
    context = np.stack([np.full(n, 7), np.full(n, 9), 100 + facing], axis=1)  # [N, P] token ids
    adapter = ActionAdapter.fit(real, latent, changed, context, num_real=4, num_latent=8, max_transitions=200)
    assert adapter.num_labelled <= 200 and adapter.no_effect_real == [3]
    test = slice(200, None)
    assert adapter.accuracy(real[test], latent[test], changed[test], context[test]) == 1.0
    # A state-free table could not do this: the same latent means `left` or `right` by state.
    assert len(set(real[(latent == 1) & changed])) == 2
    back = adapter.latent_to_real(adapter.real_to_latent(real[test], context[test]), context[test])
    assert (back[changed[test]] == real[test][changed[test]]).all()
    assert (adapter.real_to_latent(np.array([3, 3]), context[:2]) == adapter.noop_latent).all()
    again = ActionAdapter.from_json(adapter.to_json())
    assert np.array_equal(again.latent_to_real(latent[test], context[test]), adapter.latent_to_real(latent[test], context[test]))


def test_psnr_and_ssim():
    a = torch.rand(3, 16, 16, 3)
    assert torch.all(psnr(a, a) == 100.0)
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-5)
    noisy = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    assert 15 < float(psnr(noisy, a).mean()) < 25
    # A constant shift leaves the structure terms at 1: SSIM is the luminance term alone.
    x, y = torch.full((1, 16, 16, 3), 0.4), torch.full((1, 16, 16, 3), 0.6)
    mx, my, c1 = 0.4, 0.6, 0.01 ** 2
    expected = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
    assert abs(float(ssim(y, x)) - expected) < 1e-4  # float32 variance rounding
    flat = torch.full((2, 16, 16, 3), 0.5)
    assert float(ssim((flat + 0.1 * torch.randn_like(flat)).clamp(0, 1), flat).mean()) < 0.2
    assert psnr(torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3)).item() == 0.0


def test_latent_actions_inferred_in_training_sized_windows():
    """On a long clip each transition's latent equals the one inferred from its own 2-frame window."""
    torch.manual_seed(0)
    lam = LatentActionModel(32, 8, 32, 4, 1, 1, num_actions=4, context=2).eval()
    frames = _frames(n=2, t=6)
    long = lam.infer(frames)
    pairs = torch.stack([lam.infer(frames[:, t:t + 2])[:, 0] for t in range(5)], 1)
    assert long.shape == (2, 5) and torch.equal(long, pairs)


def test_spatial_rope_sees_relative_positions():
    from genie_world.st_transformer import rotary_2d

    q = torch.randn(1, 1, 16, 8)
    k = torch.randn(1, 1, 16, 8)
    # Same content at every position: scores depend only on (dy, dx).
    q_rep, k_rep = q[:, :, :1].expand(1, 1, 16, 8), k[:, :, :1].expand(1, 1, 16, 8)
    s = rotary_2d(q_rep, 4) @ rotary_2d(k_rep, 4).transpose(-1, -2)  # [1, 1, 16, 16]
    torch.testing.assert_close(s[0, 0, 0, 5], s[0, 0, 5, 10])  # both are (dy, dx) = (1, 1)
    assert not torch.allclose(s[0, 0, 0, 5], s[0, 0, 0, 6])


def test_reward_head_learns_a_relational_termination_rule():
    """Terminated iff the tile right of the agent holds the object the mission names: the relation
    BabyAI's GoTo levels end on, which the previous transformer head never learned."""
    from genie_world.reward_head import RewardHead

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        ids = torch.zeros(n, 64, dtype=torch.long)  # token 0: floor
        objects = torch.randint(2, 6, (n, 3), generator=g)  # tokens 2..5: four object kinds
        cells = torch.stack([torch.randperm(64, generator=g)[:4] for _ in range(n)])
        cells[:, 0] = torch.randint(0, 8, (n,), generator=g) * 8 + torch.randint(0, 7, (n,), generator=g)
        front = cells[:, 0] + 1  # the agent faces right; its front cell gets an object half the time
        cells[:, 1] = torch.where(torch.rand(n, generator=g) < 0.5, front, cells[:, 1])
        cells[:, 1:] = torch.where(cells[:, 1:] == cells[:, :1], (cells[:, 1:] + 2) % 64, cells[:, 1:])
        ids.scatter_(1, cells[:, 1:], objects)
        ids[torch.arange(n), cells[:, 0]] = 1  # token 1: the agent
        target = torch.where(torch.rand(n, generator=g) < 0.5, ids[torch.arange(n), front],
                             torch.randint(2, 6, (n,), generator=g)).clamp_min(2)
        text = target[:, None] - 1  # mission word ids 1..4 name object kinds 2..5
        term = ids[torch.arange(n), front] == target
        return text, ids, term.float(), term

    head = RewardHead(6, 1, 8, 64, 32, 2, 3)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    for _ in range(400):
        text, ids, reward, term = batch(64)
        loss, _ = head.loss(text, ids, reward, term)
        opt.zero_grad()
        loss.backward()
        opt.step()
    text, ids, _, term = batch(2000)
    with torch.no_grad():
        pred = head(text, ids)[1] > 0
    balanced = 0.5 * (pred[term].float().mean() + (~pred[~term]).float().mean())
    assert term.float().mean() > 0.15 and balanced > 0.9, float(balanced)


# --- the CPU fast paths (genie_world/small_attention.py) must compute what the reference ops do ----
def _kernels():
    from genie_world import small_attention

    if not small_attention.kernel_available():
        pytest.skip("small-attention C++ kernel not built here (no compiler): SDPA fallback only")
    return small_attention


def test_kernels_split_work_across_torch_threads():
    """The kernels' at::parallel_for runs on torch's threads only when the extension is built with
    OpenMP (PyTorch's CPU backend); built without, every kernel ran on one core, silently."""
    _kernels()
    if not torch._C.has_openmp:
        pytest.skip("this torch build has no OpenMP backend")
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.ops.genie_sima_attn.parallel_threads() == n
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(2, 37, 3, 4), (2, 20, 2, 16), (1, 33, 2, 8), (3, 5, 2, 2)])
def test_small_attention_kernel_matches_sdpa(shape):
    sa = _kernels()
    torch.manual_seed(0)
    n, length, h, d = shape
    qkv = torch.randn(n, length, 3, h, d, requires_grad=True)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in qkv.unbind(2))).transpose(1, 2)
    grad = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, qkv, grad)
    for out in (sa.attention_packed(qkv), sa.attention(*qkv.unbind(2))):
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(out, qkv, grad)[0], g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("heads,dh", [(8, 4), (4, 16), (2, 8)])
def test_frame_attention_kernel_matches_reference(heads, dh):
    sa = _kernels()
    torch.manual_seed(0)
    d = heads * dh
    qk = torch.randn(3, 4, 5, 2 * d, requires_grad=True)
    v = torch.randn(3, 4, 5, d, requires_grad=True)
    causal = torch.zeros(4, 4).masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), float("-inf"))
    q, k = qk[..., :d], qk[..., d:]
    ref = sa.frame_attention_reference(q, k, v, heads, causal)
    out = sa.frame_attention(q, k, v, heads, causal, qk=qk)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out, (qk, v), grad), torch.autograd.grad(ref, (qk, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # One new frame per env against a ring of slots, each env seeing its own subset.
    keys, vals = torch.randn(3, 6, 5, d), torch.randn(3, 6, 5, d)
    seen = torch.rand(3, 1, 6) < 0.6
    seen[..., 0] = True
    bias = torch.zeros(3, 1, 6).masked_fill(~seen, float("-inf"))
    with torch.no_grad():
        torch.testing.assert_close(sa.frame_attention(q[:, :1], keys, vals, heads, bias),
                                   sa.frame_attention_reference(q[:, :1], keys, vals, heads, bias), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("qk_norm,rope", [(False, False), (True, True), (True, False)])
def test_inference_fast_path_matches_training_path(qk_norm, rope):
    """Under no_grad the ST transformer runs fused kernels (norm+residual, QK-norm+rotation, SwiGLU,
    oneDNN linears); with autograd it runs the differentiable ops. Same function."""
    _kernels()
    torch.manual_seed(0)
    st = STTransformer(dim=32, heads=4, depth=2, qk_norm=qk_norm, spatial_rope=rope)
    for p in st.parameters():  # non-trivial norm weights
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    x, cond = torch.randn(2, 3, 16, 32), torch.randn(2, 3, 32)
    train = st(x, cond)
    with torch.no_grad():
        fast = st(x, cond)
    torch.testing.assert_close(fast, train.detach(), atol=2e-5, rtol=1e-4)


def test_kernels_off_gives_the_same_generation(monkeypatch):
    from genie_world import small_attention

    _kernels()
    dyn = _dynamics()
    context = torch.randint(0, 50, (2, 3, 16))
    actions = torch.randint(0, 8, (2, 3))

    def run():
        cache = dyn.new_cache()
        dyn.prime(cache, context[:, :1], None)
        dyn.prime(cache, context[:, 1:], actions[:, :2])
        return dyn.generate_next(cache, actions[:, 2], steps=4, temperature=0.0)

    fast = run()
    monkeypatch.setitem(small_attention._state, "ok", False)
    assert torch.equal(run(), fast)


def test_greedy_codes_equal_constrained_maskgit():
    from genie_world.level_constraints import constrain_logits

    torch.manual_seed(0)
    dyn = _dynamics()
    h = torch.randn(5, 16, 32) * 3
    groups = [torch.tensor([3, 7, 11]), torch.tensor([20, 21])]
    ref = maskgit_decode(lambda ids: dyn.head(h), 5, 16, dyn.mask_id, steps=1, temperature=0.0,
                         constrain=lambda logits, ids, masked: constrain_logits(logits, ids, masked, groups))
    got = dyn.greedy_codes(h, groups)
    assert torch.equal(got, ref)
    for g in groups:
        assert (torch.isin(got, g).sum(1) == 1).all()
    assert torch.equal(dyn.greedy_codes(h), dyn.head(h).argmax(-1))


def test_rewound_kv_cache_regenerates_the_same_frame():
    """The cache keeps committed frames in a buffer with room for new ones; rewinding by restoring
    the layers' k/v (as bench/world_model.py does) and regenerating gives the same frame."""
    dyn = _dynamics()
    context = torch.randint(0, 50, (2, 3, 16))
    actions = torch.randint(0, 8, (2, 4))
    cache = dyn.new_cache(max_frames=2)
    dyn.prime(cache, context[:, :1], None)
    dyn.prime(cache, context[:, 1:], actions[:, :2])
    saved = [(layer.k, layer.v) for layer in cache.layers]
    first = [dyn.generate_next(cache, actions[:, t], steps=3, temperature=0.0) for t in (2, 3)]
    for layer, (k, v) in zip(cache.layers, saved):
        layer.k, layer.v = k, v
    cache.next_pos -= 2
    again = [dyn.generate_next(cache, actions[:, t], steps=3, temperature=0.0) for t in (2, 3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_per_patch_tokenizer_gives_equal_patches_equal_tokens_in_any_context():
    torch.manual_seed(0)
    tok = VideoTokenizer(32, 8, 16, 2, 1, 1, "8,5,5,5", per_patch=True).eval()
    a = torch.randint(0, 256, (1, 1, 32, 32, 3), dtype=torch.uint8)
    b = torch.randint(0, 256, (1, 1, 32, 32, 3), dtype=torch.uint8)
    b[..., :8, :8, :] = a[..., :8, :8, :]  # the same top-left patch, different everything else
    clip = torch.cat([b, a], 1)  # and a clip: no temporal context either
    with torch.no_grad():
        ia, ib, ic = tok.encode(a)[1], tok.encode(b)[1], tok.encode(clip)[1]
    assert ia[0, 0, 0] == ib[0, 0, 0] == ic[0, 1, 0] == ic[0, 0, 0]
    assert torch.equal(ic[0, 1], ia[0, 0])
    # The slot-cache decode (the World's) equals the plain decode.
    cache = tok.new_slot_cache(1, 1)
    with torch.no_grad():
        assert torch.allclose(tok.decode_slots(ia[:, 0], cache), tok.decode(ia)[:, 0])


def test_dynamics_conditions_the_first_frame_on_the_action_into_it():
    torch.manual_seed(0)
    dyn = DynamicsModel(vocab_size=16, num_patches=4, num_actions=3, width=16, heads=2, depth=1).eval()
    ids = torch.randint(0, 16, (2, 3, 4))
    actions = torch.randint(0, 3, (2, 2))
    with torch.no_grad():
        start = dyn(ids, actions)  # the clip starts an episode: "no action" into frame 0
        same = dyn(ids, actions, first_actions=torch.full((2,), 3))
        mid = dyn(ids, actions, first_actions=torch.tensor([0, 1]))
    assert torch.equal(start, same)
    assert not torch.allclose(start[:, 1:], mid[:, 1:])  # later frames see how frame 0 was reached


def test_clip_first_actions_reads_the_action_into_mid_episode_clips():
    from pipelines.pretrain_stages import clip_first_actions

    class PairLAM:  # latent = mean pixel of the second frame of each pair
        def infer(self, frames):
            return frames[:, 1:].float().mean(dim=(2, 3, 4)).long()

    frames = torch.stack([torch.full((2, 4, 4, 3), v, dtype=torch.uint8) for v in (1, 2, 3)])  # [3, 2, 4, 4, 3]
    batch = {"frames": frames, "previous_frame": frames[:, 0], "start": torch.tensor([0, 5, 1])}
    assert clip_first_actions(PairLAM(), batch, no_action=9).tolist() == [9, 2, 3]
    assert clip_first_actions(PairLAM(), {"frames": frames}, no_action=9) is None


def test_prompt_prior_guidance_and_text_dropout():
    torch.manual_seed(0)
    prior = PromptPrior(text_vocab=6, max_text_len=4, vocab_size=8, num_patches=4, width=16, heads=2, depth=1,
                        text_dropout=1.0, guidance=1.5).eval()
    text, other = torch.tensor([[1, 2, 3, 0]]), torch.tensor([[4, 5, 0, 0]])
    frame = torch.full((1, 4), 8)  # all masked
    ids = torch.randint(0, 8, (1, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cond, uncond = prior(text, frame), prior(torch.zeros_like(text), frame)
        assert torch.allclose(prior.guided_logits(text, frame), cond + 1.5 * (cond - uncond), atol=1e-5)
        # Every text dropped: the loss cannot depend on it ...
        a = prior.loss(text, ids, torch.Generator().manual_seed(3))[0]
        b = prior.loss(other, ids, torch.Generator().manual_seed(3))[0]
        assert torch.equal(a, b)
        prior.text_dropout = 0.0  # ... and without dropout it does.
        a = prior.loss(text, ids, torch.Generator().manual_seed(3))[0]
        b = prior.loss(other, ids, torch.Generator().manual_seed(3))[0]
        assert not torch.equal(a, b)
        prior.guidance = 0.0
        assert torch.equal(prior.guided_logits(text, frame), cond)


def test_prompt_prior_guides_only_its_first_rounds():
    """guidance_rounds=1: the first MaskGIT round (which places the named object) is guided, the rest
    sample the plain conditional; 0 guides every round."""
    prior = PromptPrior(text_vocab=6, max_text_len=4, vocab_size=8, num_patches=16, width=16, heads=2, depth=1,
                        guidance=3.0).eval()
    text = torch.tensor([[1, 2, 3, 0]])
    seen = []
    guided = prior.guided_logits
    prior.guided_logits = lambda t, ids, guide=True: (seen.append(guide), guided(t, ids, guide))[1]
    for rounds, want in ((1, [True, False, False, False]), (0, [True] * 4), (2, [True, True, False, False])):
        seen.clear()
        prior.guidance_rounds = rounds
        prior.generate(text, steps=4, temperature=1.0, generator=torch.Generator().manual_seed(0))
        assert seen == want, (rounds, seen)
    with torch.no_grad():
        frame = torch.full((1, 16), 8)
        assert torch.equal(guided(text, frame, guide=False), prior(text, frame))


def test_noop_latent_is_exactly_the_unchanged_transitions():
    torch.manual_seed(0)
    lam = LatentActionModel(16, 8, 16, 2, 1, 1, num_actions=4, noop_latent=True)
    frames = torch.randint(0, 256, (6, 3, 16, 16, 3), dtype=torch.uint8)
    frames[:3, 1] = frames[:3, 0]  # transition 0 unchanged in the first three clips
    frames[1:4, 2] = frames[1:4, 1]  # transition 1 unchanged in clips 1-3
    same = (frames[:, 1:] == frames[:, :-1]).flatten(2).all(-1)
    with torch.no_grad():
        got = lam.infer(frames)
    assert torch.equal(got == 3, same)
    loss, metrics = lam.loss(frames)  # trains with the same rule (finite, no -inf leaking into the loss)
    assert torch.isfinite(loss)


def test_dynamics_learning_rate_is_its_own_when_set():
    from genie_world.config import resolve_config

    cfg = resolve_config("tiny")
    assert cfg.lr_for("dynamics") == cfg.dyn_lr == 4e-3
    assert cfg.lr_for("tokenizer") == cfg.lr_for("heads") == cfg.lr
    assert resolve_config("tiny", {"dyn_lr": 0.0}).lr_for("dynamics") == cfg.lr  # 0: the shared --lr
