"""sima_policy: tokenizer, RLModule (Discrete and Box), auxiliary losses and masks, the PPO learner, the env
wrappers, and two real PPO iterations through RLlib on a real BabyAI level."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from sima_policy.aux_losses import contrastive_loss, language_matching_loss, random_shift
from sima_policy.instruction_tokenizer import InstructionTokenizer, MissionTooLongError, UnknownWordsError
from sima_policy.rl_module import SimaRLModule

MISSIONS = ["go to the red ball", "go to a red ball", "pick up the blue key", "open the yellow door",
            "put the green box next to the grey ball"]
# A small network: the tests check mechanics, not capacity.
SMALL = {"vision_dim": 32, "conv_channels": (8, 16, 16), "tile_channels": 16, "language_dim": 32, "token_dim": 16,
         "gru_dim": 32, "hidden_dim": 64, "aux_proj_dim": 16, "moco_queue_size": 32}


@pytest.fixture(scope="module")
def tokenizer() -> InstructionTokenizer:
    return InstructionTokenizer.from_texts(MISSIONS)


def obs_space(tok: InstructionTokenizer) -> gym.spaces.Dict:
    return gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8),
                            "mission": gym.spaces.Box(0, tok.vocab_size - 1, (tok.max_len,), np.int64)})


def make_module(tok, action_space=gym.spaces.Discrete(7), inference_only=False, **cfg) -> SimaRLModule:
    return SimaRLModule(observation_space=obs_space(tok), action_space=action_space, inference_only=inference_only,
                        model_config={**SMALL, **cfg})


def make_obs(tok, batch: int, seed: int = 0, num_missions: int = 4) -> dict:
    """Frames made of random 8x8-pixel tiles (like BabyAI's grid), so a few pixels of shift keep the content."""
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, (batch, 8, 8, 3), dtype=np.uint8)
    images = tiles.repeat(8, axis=1).repeat(8, axis=2)  # [B, 64, 64, 3]
    missions = [MISSIONS[i % num_missions] for i in range(batch)]
    return {"image": torch.as_tensor(images), "mission": torch.as_tensor(tok.encode_batch(missions))}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # On a shared 2-core machine torch's 2 intra-op threads wait on each other under load (10-50x slower
    # steps measured); these tiny models are fastest on one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- tokenizer ------------------------------------------------------------------------------------------
def test_tokenizer_round_trip_unknown_words_and_length(tokenizer):
    tok = tokenizer
    assert tok.words[0] == "<pad>" and tok.max_len == 9  # "put the green box next to the grey ball"
    ids = tok.encode_batch(["Go to the RED ball.", "open the yellow door"])
    assert ids.dtype == np.int64 and ids.shape == (2, 9)
    assert tok.decode(ids[0]) == "go to the red ball" and (ids[0, 5:] == 0).all() and (ids[0, :5] > 0).all()
    assert tok.encode_batch(["pick up the blue key"], max_len=12).shape == (1, 12)

    again = InstructionTokenizer.from_json(json.loads(json.dumps(tok.to_json())))
    assert again.words == tok.words and again.max_len == tok.max_len
    assert np.array_equal(again.encode_batch(MISSIONS), tok.encode_batch(MISSIONS))

    with pytest.raises(UnknownWordsError) as err:
        tok.encode_batch(["go to the purple ball"])
    assert "purple" in str(err.value) and "the vocabulary is: a ball blue box" in str(err.value)
    with pytest.raises(MissionTooLongError):
        tok.encode("go to the red ball", max_len=3)

    lenient = InstructionTokenizer.from_texts(MISSIONS, unknown="unk")
    row = lenient.encode("go to the purple ball")
    assert row[3] == lenient.unk_id == 1 and lenient.decode(row) == "go to the <unk> ball"
    assert InstructionTokenizer.from_json(lenient.to_json()).unknown == "unk"


# ---- RLModule -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["conv", "tile_ego"])
@pytest.mark.parametrize("action_space", [gym.spaces.Discrete(7), gym.spaces.Box(-1.0, 1.0, (3,), np.float32)],
                         ids=["discrete", "box"])
def test_rl_module_forward_dict_obs(tokenizer, action_space, arch):
    module = make_module(tokenizer, action_space, vision_arch=arch)
    batch = {Columns.OBS: make_obs(tokenizer, 6)}
    width = action_space.n if isinstance(action_space, gym.spaces.Discrete) else 2 * action_space.shape[0]

    for forward in (module.forward_inference, module.forward_exploration):
        out = forward(batch)
        assert set(out) == {Columns.ACTION_DIST_INPUTS} and out[Columns.ACTION_DIST_INPUTS].shape == (6, width)
        dist = module.get_exploration_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
        actions = dist.sample().numpy()
        assert all(action_space.contains(a.astype(action_space.dtype)) or isinstance(action_space, gym.spaces.Box)
                   for a in actions)
        assert actions.shape == (6,) + action_space.shape

    out = module.forward_train(batch)
    assert out[Columns.ACTION_DIST_INPUTS].shape == (6, width)
    assert out[Columns.EMBEDDINGS].shape == (6, SMALL["hidden_dim"])
    assert out[SimaRLModule.VISION_EMBEDDING].shape == (6, SMALL["vision_dim"])
    assert out[SimaRLModule.LANGUAGE_EMBEDDING].shape == (6, SMALL["language_dim"])
    for key in (SimaRLModule.CLIP_IMAGE, SimaRLModule.CLIP_TEXT, SimaRLModule.MOCO_QUERY, SimaRLModule.MOCO_KEY):
        assert out[key].shape == (6, SMALL["aux_proj_dim"])
    assert not out[SimaRLModule.MOCO_KEY].requires_grad

    values = module.compute_values(batch)
    assert values.shape == (6,)
    assert torch.allclose(values, module.compute_values(batch, embeddings=out[Columns.EMBEDDINGS]))
    if isinstance(action_space, gym.spaces.Box):
        assert torch.allclose(out[Columns.ACTION_DIST_INPUTS][:, 3:], torch.zeros(6, 3))  # init_log_std 0

    # The key encoder and queue are state (buffers) but never trainable parameters.
    param_names = {n for n, _ in module.named_parameters()}
    state = module.state_dict()
    assert not any(n.startswith(("aux.key_", "aux.queue")) for n in param_names)
    assert "aux.key_vision.fc.weight" in state and "aux.queue.keys" in state and "num_updates" in state
    # EnvRunner copies drop the auxiliary part and load the learner's inference-only state exactly.
    runner = make_module(tokenizer, action_space, inference_only=True, vision_arch=arch)
    assert not hasattr(runner, "aux")
    runner.set_state(module.get_state(inference_only=True))
    assert torch.allclose(runner.forward_inference(batch)[Columns.ACTION_DIST_INPUTS],
                          module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS])


def test_padding_never_changes_the_language_embedding(tokenizer):
    module = make_module(tokenizer)
    short = torch.as_tensor(tokenizer.encode_batch(MISSIONS[:3]))
    long = torch.as_tensor(tokenizer.encode_batch(MISSIONS[:3], max_len=20))
    assert torch.allclose(module.encode_language(short), module.encode_language(long), atol=1e-6)


def test_a_batch_of_repeated_missions_encodes_and_differentiates_as_rows_one_by_one(tokenizer):
    """The encoder reads each distinct mission of a batch once; every row still gets its own mission's
    embedding, and the gradients are those of encoding every row on its own."""
    module = make_module(tokenizer)
    order = [2, 0, 2, 1, 0, 2, 2]  # repeats, out of order
    tokens = torch.as_tensor(tokenizer.encode_batch([MISSIONS[i] for i in order]))
    weights = torch.randn(len(order), module.language.out_dim)
    batched = module.encode_language(tokens)  # [7, D]
    (batched * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.language.named_parameters() if p.grad is not None}
    module.zero_grad()
    one_by_one = torch.cat([module.encode_language(tokens[i:i + 1]) for i in range(len(order))])
    (one_by_one * weights).sum().backward()
    assert torch.allclose(batched, one_by_one, atol=1e-6)
    assert grads and all(torch.allclose(grads[n], p.grad, atol=1e-5) for n, p in module.language.named_parameters()
                         if p.grad is not None)
    assert not torch.allclose(batched[0], batched[1])  # different missions stay different


# ---- auxiliary losses -----------------------------------------------------------------------------------
def aux_losses(module, obs, mask=None, seed=0):
    torch.manual_seed(seed)  # the random-shift views
    out = module.forward_train({Columns.OBS: obs})
    lang, _ = language_matching_loss(out[module.CLIP_IMAGE], out[module.CLIP_TEXT], obs["mission"],
                                     module.aux.logit_scale(), mask)
    con, _ = contrastive_loss(out[module.MOCO_QUERY], out[module.MOCO_KEY], module.aux.queue.negatives(), 0.2, mask)
    return lang, con, out


def test_language_matching_loss_decreases_on_a_fixed_batch(tokenizer):
    torch.manual_seed(0)
    module = make_module(tokenizer)
    module.aux_terms = {"language": True, "contrastive": False}
    obs = make_obs(tokenizer, 16, num_missions=4)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(50):
        out = module.forward_train({Columns.OBS: obs})
        loss, acc = language_matching_loss(out[module.CLIP_IMAGE], out[module.CLIP_TEXT], obs["mission"],
                                           module.aux.logit_scale())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert acc.item() == 1.0


def test_contrastive_loss_decreases_with_momentum_encoder_and_queue(tokenizer):
    torch.manual_seed(0)
    module = make_module(tokenizer)
    module.aux_terms = {"language": False, "contrastive": True}
    obs = make_obs(tokenizer, 16)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    key_before = module.aux.key_vision.fc.weight.clone()
    losses = []
    for _ in range(50):
        out = module.forward_train({Columns.OBS: obs})
        loss, _ = contrastive_loss(out[module.MOCO_QUERY], out[module.MOCO_KEY], module.aux.queue.negatives(), 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.aux.momentum_update_(module.vision, 0.9)
        module.aux.queue.enqueue(out[module.MOCO_KEY])
        losses.append(loss.item())
    assert int(module.aux.queue.filled) == 32 and module.aux.queue.negatives().shape == (32, SMALL["aux_proj_dim"])
    assert not torch.equal(key_before, module.aux.key_vision.fc.weight)  # the EMA moved
    # The queue is full from step 2 on (chance level then: log(16 + 32) = 3.9); on a fixed batch it holds
    # two older keys of every frame, so the floor is about log(3) = 1.1.
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[2:7]), losses
    assert np.mean(losses[-5:]) < 2.0, losses


def test_masked_rows_change_neither_losses_nor_gradients(tokenizer):
    torch.manual_seed(0)
    module = make_module(tokenizer)
    module.aux.queue.enqueue(torch.randn(20, SMALL["aux_proj_dim"]))
    obs = make_obs(tokenizer, 12, num_missions=4)
    mask = torch.ones(12, dtype=torch.bool)
    mask[[2, 7, 11]] = False
    other = {k: v.clone() for k, v in obs.items()}
    other["image"][~mask] = torch.randint(0, 256, other["image"][~mask].shape, dtype=torch.uint8)
    other["mission"][~mask] = torch.as_tensor(tokenizer.encode_batch([MISSIONS[4]] * 3))

    results = []
    for o in (obs, other):
        module.zero_grad()
        lang, con, _ = aux_losses(module, o, mask)
        (lang + con).backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((lang.item(), con.item(), grads))
    (l0, c0, g0), (l1, c1, g1) = results
    assert l0 > 0 and c0 > 0
    assert l0 == pytest.approx(l1, abs=1e-6) and c0 == pytest.approx(c1, abs=1e-6)
    assert g0.keys() == g1.keys() and any(n.startswith("vision.") for n in g0)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6), n
    # ...while changing an unmasked row does change them.
    third = {k: v.clone() for k, v in obs.items()}
    third["image"][0] = 255 - third["image"][0]
    lang, con, _ = aux_losses(module, third, mask)
    assert abs(con.item() - c0) > 1e-4


def test_random_shift_keeps_pixels_and_shape():
    images = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    shifted = random_shift(images, pad=4, generator=torch.Generator().manual_seed(1))
    assert shifted.shape == (5, 64, 64, 3) and shifted.dtype == torch.float32
    assert torch.equal(random_shift(images, pad=0), images.float())
    # an interior window of each shifted frame is an exact window of the original
    assert any(torch.equal(shifted[0, 8:56, 8:56], images[0, 8 + dy:56 + dy, 8 + dx:56 + dx].float())
               for dy in range(-4, 5) for dx in range(-4, 5))


# ---- learner (no env: a hand-made PPO batch) --------------------------------------------------------------
@pytest.mark.parametrize("action_space", [gym.spaces.Discrete(7), gym.spaces.Box(-1.0, 1.0, (3,), np.float32)],
                         ids=["discrete", "box"])
def test_learner_freeze_momentum_queue_mask_and_state(tokenizer, action_space):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.rllib.evaluation.postprocessing import Postprocessing
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    from sima_policy.learner import SimaPPOLearner

    b = 16
    config = (PPOConfig().environment(observation_space=obs_space(tokenizer), action_space=action_space)
              .training(train_batch_size_per_learner=b, minibatch_size=b, num_epochs=1)
              .rl_module(rl_module_spec=RLModuleSpec(module_class=SimaRLModule, model_config=SMALL))
              .learners(learner_class=SimaPPOLearner,
                        learner_config_dict={"moco_queue_size": 24, "freeze_vision_steps": 2, "moco_momentum": 0.5,
                                             "language_coeff": 0.5, "contrastive_coeff": 0.5}))
    learner = config.build_learner(env=None)
    module = learner.module["default_policy"].unwrapped()
    assert module.aux.queue.size == 24  # re-sized from learner_config_dict
    optimised = {id(p) for p in learner.get_optimizer().param_groups[0]["params"]}
    assert optimised == {id(p) for p in module.parameters()}
    assert not any(id(t) in optimised for t in module.aux.key_vision.buffers())

    rng = np.random.default_rng(0)
    obs = make_obs(tokenizer, b)
    mask = np.ones(b, bool)
    mask[-3:] = False
    if isinstance(action_space, gym.spaces.Discrete):  # the batch a uniform behaviour policy would give
        actions, logp, dist_inputs = rng.integers(0, 7, b), np.full(b, -np.log(7), np.float32), np.zeros((b, 7))
    else:  # N(0, 1) per dimension
        actions = rng.normal(size=(b, 3)).astype(np.float32)
        logp, dist_inputs = (-0.5 * actions**2 - 0.5 * np.log(2 * np.pi)).sum(-1), np.zeros((b, 6))
    batch = {Columns.OBS: {k: v.numpy() for k, v in obs.items()}, Columns.ACTIONS: actions,
             Columns.ACTION_LOGP: logp.astype(np.float32), Columns.ACTION_DIST_INPUTS: dist_inputs.astype(np.float32),
             Postprocessing.ADVANTAGES: rng.normal(size=b).astype(np.float32),
             Postprocessing.VALUE_TARGETS: rng.normal(size=b).astype(np.float32), Columns.LOSS_MASK: mask}
    vision0, key0, head0 = (module.vision.fc.weight.clone(), module.aux.key_vision.fc.weight.clone(),
                            module.pi.weight.clone())
    history = []
    for _ in range(3):
        res = learner.update(batch=MultiAgentBatch({"default_policy": SampleBatch(batch)}, env_steps=b),
                             timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 0})
        history.append((torch.equal(vision0, module.vision.fc.weight), torch.equal(key0, module.aux.key_vision.fc.weight),
                        int(module.aux.queue.filled)))
    # Frozen for 2 gradient steps, with no contrastive term (it would train only the frozen encoder and its
    # own query head): no EMA, nothing enqueued. Then both encoders move and the 13 unmasked keys per step
    # are enqueued (24-slot ring). Outside an update the encoder requires grad as built.
    assert history == [(True, True, 0), (True, True, 0), (False, False, 13)]
    assert all(p.requires_grad for p in module.vision.parameters())
    assert not torch.equal(head0, module.pi.weight) and int(module.num_updates) == 3
    metrics = res["default_policy"]
    for key in ("language_matching_loss", "contrastive_loss", "clip_temperature", "moco_queue_fill", "vision_frozen"):
        assert key in metrics, key

    # Learner state carries the key encoder, the queue and the step counter (a checkpoint resumes them).
    fresh = config.build_learner(env=None)
    fresh.set_state(learner.get_state())
    restored = fresh.module["default_policy"].unwrapped()
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, restored.state_dict()[name]), name
    assert int(restored.num_updates) == 3 and int(restored.aux.queue.filled) == 13

    with pytest.raises(ValueError, match="unknown keys"):
        config.copy(copy_frozen=False).learners(learner_config_dict={"langauge_coeff": 1.0}).build_learner(env=None)


def _ppo_learner(tokenizer, **learner_config):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from sima_policy.learner import SimaPPOLearner

    config = (PPOConfig().environment(observation_space=obs_space(tokenizer), action_space=gym.spaces.Discrete(7))
              .training(train_batch_size_per_learner=16, minibatch_size=16, num_epochs=1, lr=1e-2)
              .rl_module(rl_module_spec=RLModuleSpec(module_class=SimaRLModule, model_config=SMALL))
              .learners(learner_class=SimaPPOLearner,
                        learner_config_dict={"language_coeff": 0.0, "contrastive_coeff": 0.0, **learner_config}))
    return config.build_learner(env=None)


def _uniform_batch(tokenizer, b=16, seed=0):
    from ray.rllib.evaluation.postprocessing import Postprocessing
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    rng = np.random.default_rng(seed)
    batch = {Columns.OBS: {k: v.numpy() for k, v in make_obs(tokenizer, b).items()}, Columns.ACTIONS: rng.integers(0, 7, b),
             Columns.ACTION_LOGP: np.full(b, -np.log(7), np.float32), Columns.ACTION_DIST_INPUTS: np.zeros((b, 7), np.float32),
             Postprocessing.ADVANTAGES: rng.normal(size=b).astype(np.float32) * 5,
             Postprocessing.VALUE_TARGETS: rng.normal(size=b).astype(np.float32)}
    return MultiAgentBatch({"default_policy": SampleBatch(batch)}, env_steps=b), batch[Columns.OBS]


def test_learner_reference_kl_holds_the_policy_near_its_reference(tokenizer):
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    def drift(coeff):
        torch.manual_seed(0)
        learner = _ppo_learner(tokenizer, reference_kl_coeff=coeff)
        module = learner.module["default_policy"].unwrapped()
        learner.set_reference({k: v.clone() for k, v in module.state_dict().items()})
        ma, obs = _uniform_batch(tokenizer)
        for _ in range(8):
            res = learner.update(batch=ma, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 0})
        obs_t = {k: torch.as_tensor(v) for k, v in obs.items()}
        with torch.no_grad():
            logp = torch.log_softmax(module._forward({Columns.OBS: obs_t})[Columns.ACTION_DIST_INPUTS], -1)
            ref = torch.log_softmax(learner._reference["default_policy"]._forward({Columns.OBS: obs_t})
                                    [Columns.ACTION_DIST_INPUTS], -1)
        return float((logp.exp() * (logp - ref)).sum(-1).mean()), res["default_policy"]

    free, _ = drift(0.0)
    held, metrics = drift(5.0)
    assert "reference_kl" in metrics
    assert held < 0.5 * free, (held, free)  # switched off, PPO's steps carry the policy much further


def test_learner_train_batch_carries_the_reference_logits_once(tokenizer):
    """The frozen reference runs once per train batch: the batch the learner makes holds its logits row by row,
    equal to a direct forward, and the update logs the time each part of it took."""
    from ray.rllib.core import ALL_MODULES
    from ray.rllib.core.learner.training_data import TrainingData
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    from sima_policy.learner import AUX_DRAW_S_KEY, MAKE_BATCH_S_KEY, REFERENCE_LOGITS, REFERENCE_S_KEY

    torch.manual_seed(0)
    learner = _ppo_learner(tokenizer, reference_kl_coeff=1.0)
    module = learner.module["default_policy"].unwrapped()
    learner.set_reference({k: v.clone() + 0.01 for k, v in module.state_dict().items()})
    ma, obs = _uniform_batch(tokenizer)
    made = learner._make_batch_if_necessary(TrainingData(batch=ma)).policy_batches["default_policy"]
    with torch.no_grad():
        direct = learner._reference["default_policy"]._forward(
            {Columns.OBS: {k: torch.as_tensor(v) for k, v in obs.items()}})[Columns.ACTION_DIST_INPUTS]
    torch.testing.assert_close(torch.as_tensor(made[REFERENCE_LOGITS]), direct)
    res = learner.update(batch=ma, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 0})
    for key in (MAKE_BATCH_S_KEY, REFERENCE_S_KEY, AUX_DRAW_S_KEY):
        assert res[ALL_MODULES][key] >= 0.0, key
    # Without a KL term the column is not made (no reference forward at all).
    plain = _ppo_learner(tokenizer)
    plain.set_reference({k: v.clone() for k, v in plain.module["default_policy"].unwrapped().state_dict().items()})
    assert REFERENCE_LOGITS not in plain._make_batch_if_necessary(TrainingData(batch=ma)).policy_batches["default_policy"]


def test_learner_critic_warmup_trains_only_the_value_function(tokenizer):
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    torch.manual_seed(0)
    learner = _ppo_learner(tokenizer, critic_warmup_steps=2)
    module = learner.module["default_policy"].unwrapped()
    pi0, vf0 = module.pi.weight.clone(), module.vf.weight.clone()
    ma, _ = _uniform_batch(tokenizer)
    warm = []
    for _ in range(3):
        res = learner.update(batch=ma, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 0})
        warm.append((torch.equal(pi0, module.pi.weight), torch.equal(vf0, module.vf.weight),
                     res["default_policy"]["critic_warmup"]))
    # Two warm-up steps move the critic only; the third is a full PPO step.
    assert [w[0] for w in warm] == [True, True, False]
    assert [w[1] for w in warm] == [False, False, False]
    assert [w[2] for w in warm] == [1.0, 1.0, 0.0]


# ---- env wrappers -----------------------------------------------------------------------------------------
def test_babyai_wrapper_matches_collected_frames():
    from pipelines.data.babyai_game import BabyAIGame
    from pipelines.mission_tokens import make_babyai_env

    tok = InstructionTokenizer.from_texts(["go to the red ball", "go to a red ball"])
    env = make_babyai_env("BabyAI-GoToRedBall-v0", tok.to_json())
    game = BabyAIGame("BabyAI-GoToRedBall-v0")
    for seed in (0, 1):
        obs, _ = env.reset(seed=seed)
        assert env.observation_space.contains(obs)
        assert np.array_equal(obs["image"], game.reset(seed))  # the world model's training frames
        assert tok.decode(obs["mission"]) == game.mission
        obs, *_ = env.step(2)
        assert np.array_equal(obs["image"], game.step(2)[0])


def test_world_vector_env_tokenized(random_bundle):
    from pipelines.mission_tokens import world_vector_env_creator

    tok = InstructionTokenizer.from_texts(["go to the red ball"])
    env = world_vector_env_creator({"num_envs": 2, "tokenizer": tok.to_json(), "bundle": str(random_bundle),
                                    "prompt": "go to the red ball", "max_episode_steps": 3})
    assert env.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs) and obs["mission"].shape == (2, tok.max_len)
    obs, *_ = env.step(np.zeros(2, np.int64))
    assert env.single_observation_space["mission"].contains(obs["mission"][1])
    assert [tok.decode(m) for m in obs["mission"]] == ["go to the red ball"] * 2
    env.close()


# ---- two real PPO iterations through RLlib ------------------------------------------------------------------
def test_ppo_two_iterations_babyai(ray_local):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.tune.registry import register_env

    from pipelines.mission_tokens import babyai_env_creator
    from sima_policy.learner import SimaPPOLearner

    tok = InstructionTokenizer.from_texts(["go to the red ball", "go to a red ball"])
    register_env("sima-babyai-test", babyai_env_creator)
    config = (PPOConfig()
              .environment("sima-babyai-test", env_config={"level": "BabyAI-GoToRedBall-v0", "tokenizer": tok.to_json()})
              .env_runners(num_env_runners=0, num_envs_per_env_runner=2, rollout_fragment_length=32)
              .training(train_batch_size_per_learner=64, minibatch_size=32, num_epochs=2, lr=3e-4)
              .rl_module(rl_module_spec=RLModuleSpec(module_class=SimaRLModule, model_config=SMALL))
              .learners(num_learners=0, learner_class=SimaPPOLearner,
                        learner_config_dict={"language_coeff": 0.1, "contrastive_coeff": 0.1, "moco_queue_size": 64,
                                             "freeze_vision_steps": 1})
              .debugging(seed=0))
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        # An exception inside an env restarts the EnvRunner and the result silently lacks "learners".
        assert "learners" in result, sorted(result)
        metrics = result["learners"]["default_policy"]
        for key in ("policy_loss", "vf_loss", "total_loss", "language_matching_loss", "contrastive_loss",
                    "contrastive_accuracy", "clip_temperature", "moco_queue_fill", "vision_frozen",
                    "sima_gradient_steps"):
            assert key in metrics, (key, sorted(metrics))
            assert np.isfinite(float(metrics[key])), key
        assert float(metrics["vision_frozen"]) == 0.0 and float(metrics["sima_gradient_steps"]) >= 4
        assert float(metrics["moco_queue_fill"]) > 0
        module = algo.learner_group._learner.module["default_policy"].unwrapped()
        assert int(module.num_updates) >= 5 and int(module.aux.queue.filled) > 0
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] >= 128
    finally:
        algo.stop()
