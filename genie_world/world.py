"""World: a batch of imagined envs over a loaded world bundle.

``reset(levels)`` starts every env on a level of a ``LevelSet``; ``step(actions)`` advances a batch of
envs at once and returns frames, tokens, the reward/termination heads' outputs, truncation at
``max_episode_steps`` and per-env info. One step of N envs is: map real actions to latent ones (the
state-conditioned adapter), MaskGIT-decode N next frames against each env's temporal KV slots,
commit them, decode pixels, score them with the reward head.

Autoreset is gymnasium's next-step mode (what RLlib's EnvRunner expects): after an env returns
terminated or truncated, its next step ignores the action and returns the first frame of its next
level, with reward 0. The reset env rides along in the same batch; no other env is touched.
``reset(levels, envs)`` gives those envs a pool of levels (different clients of one World can play
different level sets); the env at rank r of that group plays level ``(r + k * group_size) % len(levels)``
in its k-th episode, so the group cycles through the pool.

Context is capped at ``context_frames`` (default: the history length the dynamics was trained on,
``dyn_clip_len - 1``), so a step costs the same at episode step 10 and step 10,000.

Randomness (only with MaskGIT temperature > 0) is drawn per env from a generator seeded by
(world seed, env index, episode, step), so an env's trajectory depends on nothing but its own
history: a batch step equals N single-env steps.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from .bundle import WorldBundle
from .level_constraints import constrain_logits
from .levels import LevelSet, check_levels_match
from .maskgit import seeded_generator
from .patches import to_uint8
from .slot_cache import SlotKVCache

ACTION_TYPES = ("real", "latent")
PRECISIONS = ("auto", "fp32", "bf16")


class InvalidActionError(ValueError):
    """An action outside the world's action space; nothing was stepped."""


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPU, fp32 on CPU. ``bf16`` runs bf16 copies of the weights: on this project's
    CPUs (avx512_bf16) a batch-64 step was 1.16x faster with 99.99% of tokens unchanged (BENCHMARKS.md),
    too small a gain to make CPU results depend on the CPU's instruction set by default."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class WorldStep:
    """What one reset/step returns for the envs it covered (``envs``), as numpy arrays."""

    envs: np.ndarray  # [N] env indices
    frames: np.ndarray | None  # [N, H, W, 3] uint8 (None when the world does not render)
    tokens: np.ndarray  # [N, P] tokenizer ids of the frame
    rewards: np.ndarray  # [N] float32, from the reward head
    terminated: np.ndarray  # [N] bool, from the termination head
    truncated: np.ndarray  # [N] bool, time limit
    latent_actions: np.ndarray  # [N] latent action applied; -1 where this frame starts an episode
    episode_steps: np.ndarray  # [N] steps taken in the episode so far
    is_first: np.ndarray  # [N] bool: this frame starts an episode (reset or autoreset)
    missions: list[str] = field(default_factory=list)
    level_ids: list[str] = field(default_factory=list)

    def as_dict(self, lo: int = 0, hi: int | None = None) -> dict:
        """The envs [lo, hi) of this result as a plain dict (what a server sends one client)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = None if value is None else value[lo:hi]
        return out

    def info(self, i: int) -> dict:
        return {"env": int(self.envs[i]), "mission": self.missions[i], "level_id": self.level_ids[i],
                "latent_action": int(self.latent_actions[i]), "episode_step": int(self.episode_steps[i]),
                "is_first": bool(self.is_first[i])}


@dataclass
class _EnvState:
    """Per-env tensors of a World; ``narrow`` gives views, ``gather`` copies."""

    dyn: SlotKVCache
    dec: SlotKVCache | None
    tokens: torch.Tensor  # [E, P]
    mission_ids: torch.Tensor  # [E, L]
    mission_emb: torch.Tensor  # [E, D] the reward head's encoding of the mission (changes only on reset)

    def narrow(self, start: int, n: int) -> "_EnvState":
        return _EnvState(self.dyn.narrow(start, n), self.dec.narrow(start, n) if self.dec else None,
                         self.tokens.narrow(0, start, n), self.mission_ids.narrow(0, start, n),
                         self.mission_emb.narrow(0, start, n))

    def gather(self, idx: torch.Tensor) -> "_EnvState":
        return _EnvState(self.dyn.gather(idx), self.dec.gather(idx) if self.dec else None,
                         self.tokens.index_select(0, idx), self.mission_ids.index_select(0, idx),
                         self.mission_emb.index_select(0, idx))

    def scatter(self, idx: torch.Tensor, sub: "_EnvState") -> None:
        self.dyn.scatter(idx, sub.dyn)
        if self.dec:
            self.dec.scatter(idx, sub.dec)
        self.tokens.index_copy_(0, idx, sub.tokens)
        self.mission_ids.index_copy_(0, idx, sub.mission_ids)
        self.mission_emb.index_copy_(0, idx, sub.mission_emb)


@dataclass
class Counterfactual:
    """K imagined futures of one start state: frames [K, H+1, ...] (index 0 = the start frame)."""

    frames: np.ndarray | None
    tokens: np.ndarray  # [K, H+1, P]
    rewards: np.ndarray  # [K, H]
    terminated: np.ndarray  # [K, H]
    latent_actions: np.ndarray  # [K, H]


class World:
    def __init__(self, bundle: WorldBundle, num_envs: int, *, max_episode_steps: int = 64, action_type: str = "real",
                 context_frames: int | None = None, maskgit_steps: int | None = None,
                 temperature: float | None = None, precision: str = "auto", render: bool = True, seed: int = 0,
                 env_index_offset: int = 0, constrained: bool = True):
        missing = {"tokenizer", "dynamics", "reward_head"} - set(bundle.parts)
        if missing:
            raise ValueError(f"world bundle {bundle.path} lacks parts {sorted(missing)} a World needs")
        if action_type not in ACTION_TYPES:
            raise ValueError(f"action_type {action_type!r}: expected one of {ACTION_TYPES}")
        if action_type == "real" and bundle.adapter is None:
            raise ValueError(f"world bundle {bundle.path} has no action_adapter.json; use action_type='latent'")
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if not 1 <= max_episode_steps <= 100_000:
            raise ValueError(f"max_episode_steps {max_episode_steps}: expected 1..100000")
        cfg = bundle.config
        self.bundle, self.cfg, self.num_envs = bundle, cfg, int(num_envs)
        self.tok, self.dyn, self.head = bundle.tokenizer, bundle.dynamics, bundle.reward_head
        self.device = next(self.dyn.parameters()).device
        self.dtype = resolve_precision(precision, self.device)
        if self.dtype != torch.float32:
            # Low-precision copies of the weights (the bundle's own stay fp32): casting once here is
            # cheaper than autocast re-casting weights and activations at every op of every step.
            self.tok, self.dyn, self.head = (copy.deepcopy(m).to(self.dtype) for m in (self.tok, self.dyn, self.head))
        self.max_episode_steps, self.action_type, self.render = int(max_episode_steps), action_type, render
        # The dynamics saw dyn_clip_len frames in training: dyn_clip_len - 1 frames of history.
        self.context_frames = int(context_frames or max(1, cfg.dyn_clip_len - 1))
        self.maskgit_steps = int(maskgit_steps or cfg.world_maskgit_steps)
        self.temperature = float(cfg.maskgit_temperature if temperature is None else temperature)
        self.seed, self.env_index_offset = int(seed), int(env_index_offset)
        self.adapter = bundle.adapter
        # Decode every frame under the bundle's level constraints (e.g. exactly one agent): without
        # them the tiny model's agent faded out of about half of the rollouts within 8 steps.
        self._sparse_reward = bool(bundle.constraints and bundle.constraints.reward_only_at_termination)
        groups = bundle.constraints.exactly_one if (constrained and bundle.constraints) else []
        self._groups = [torch.as_tensor(g, dtype=torch.long, device=self.device) for g in groups]
        self._constrain = None
        if groups:
            tensors = [torch.as_tensor(g, dtype=torch.long, device=self.device) for g in groups]
            self._constrain = lambda logits, ids, masked: constrain_logits(logits, ids, masked, tensors)
        if action_type == "real":
            self.num_actions, self.action_names = self.adapter.num_real, list(self.adapter.real_names)
        else:
            self.num_actions = cfg.num_latent_actions
            self.action_names = [f"latent_{i}" for i in range(self.num_actions)]
        self.frame_shape = (cfg.frame_size, cfg.frame_size, 3)
        e, p = self.num_envs, self.dyn.num_patches
        dec = self.tok.new_slot_cache(e, max(1, cfg.tok_clip_len - 1), self.device, self.dtype) if render else None
        self._state = _EnvState(self.dyn.new_slot_cache(e, self.context_frames, self.device, self.dtype), dec,
                                torch.zeros(e, p, dtype=torch.long, device=self.device),
                                torch.zeros(e, cfg.text_max_len, dtype=torch.long, device=self.device),
                                torch.zeros(e, self.head.tok_embed.embedding_dim, dtype=self.dtype, device=self.device))
        self._frames = np.zeros((e, *self.frame_shape), np.uint8)
        self._episode_step = np.zeros(e, np.int64)
        self._episode = np.zeros(e, np.int64)  # episodes started per env (selects the next level)
        self._needs_reset = np.zeros(e, bool)
        self._started = np.zeros(e, bool)
        self._level_of = np.zeros(e, np.int64)
        self._pool_of = np.full(e, -1, np.int64)  # index into self._pools
        self._rank = np.zeros(e, np.int64)  # position in the group the pool was given to
        self._group = np.ones(e, np.int64)
        self._pools: list[tuple[LevelSet, torch.Tensor, torch.Tensor]] = []  # (levels, tokens, mission ids)
        self._missions, self._level_ids = [""] * e, [""] * e
        self._env_seeds = [(self.seed, self.env_index_offset + i) for i in range(e)]  # keys of each env's noise

    # --- public API -----------------------------------------------------------------------
    def reset(self, levels: LevelSet | None = None, envs=None) -> WorldStep:
        """Start ``envs`` (default all) on a new episode; with ``levels``, that set becomes their pool."""
        idx = self._env_index(envs)
        if levels is not None:
            self._pool_of[idx] = self._add_pool(levels)
            self._rank[idx] = np.arange(len(idx))
            self._group[idx] = len(idx)
            self._episode[idx] = 0
        else:
            no_pool = idx[self._pool_of[idx] < 0]
            if no_pool.size:
                raise ValueError(f"envs {no_pool[:8].tolist()} have no levels yet: World.reset(levels) needs a "
                                 "LevelSet (from WorldBuilder.generate or load_levels) the first time")
            self._episode[idx] += self._started[idx]
        self._started[idx] = True
        self._needs_reset[idx] = True
        zeros = np.zeros(len(idx), np.int64)
        return self._run(idx, zeros)

    def step(self, actions, envs=None) -> WorldStep:
        """Advance ``envs`` (default all; any index list) by one action each."""
        idx = self._env_index(envs)
        not_started = idx[~self._started[idx]]
        if not_started.size:
            raise ValueError(f"envs {not_started[:8].tolist()} were never reset; call World.reset(levels) first")
        acts = self.check_actions(actions, len(idx))
        was_done = self._needs_reset[idx]
        self._episode[idx[was_done]] += 1
        return self._run(idx, acts)

    def check_actions(self, actions, n: int) -> np.ndarray:
        a = _as_action_array(actions, f"({n},)")
        if a.ndim == 0 and n == 1:
            a = a.reshape(1)
        if a.shape != (n,):
            raise InvalidActionError(f"actions has shape {a.shape}; expected ({n},): one {self.action_type} "
                                     f"action per env")
        if a.dtype.kind not in "iu":
            raise InvalidActionError(f"actions have dtype {a.dtype}; expected integers in [0, {self.num_actions})")
        bad = np.flatnonzero((a < 0) | (a >= self.num_actions))
        if bad.size:
            i = int(bad[0])
            raise InvalidActionError(f"actions[{i}] = {a[i]}: expected a {self.action_type} action in "
                                     f"[0, {self.num_actions}) ({', '.join(self.action_names)})")
        return a.astype(np.int64)

    def observe(self, envs=None) -> dict:
        """The current frame and mission of ``envs`` without stepping."""
        idx = self._env_index(envs)
        return {"frames": self._frames[idx], "missions": [self._missions[i] for i in idx],
                "level_ids": [self._level_ids[i] for i in idx]}

    @torch.no_grad()
    def branch(self, env: int, actions) -> Counterfactual:
        """Counterfactuals: from env ``env``'s current state, K futures under actions [K, H] in one
        batched call; the world itself is not changed."""
        a = _as_action_array(actions, "[K, H] (K branches of H actions)")
        if a.ndim != 2:
            raise InvalidActionError(f"actions has shape {a.shape}; expected [K, H] (K branches of H actions)")
        idx = self._env_index([env])
        if not self._started[idx[0]]:
            raise ValueError(f"env {env} was never reset")
        k = a.shape[0]
        seeds = [(*self._env_seeds[idx[0]], j) for j in range(k)]  # branch j has its own stream
        return self._open_loop(np.repeat(idx, k), a, seeds, None)

    @torch.no_grad()
    def replay(self, actions, envs=None, teacher_tokens=None) -> Counterfactual:
        """Open loop: each of ``envs`` (default all) from its current state under its own actions
        [N, H], ignoring termination (nothing resets); the world itself is not changed.

        ``teacher_tokens`` [N, H, P]: after predicting step t, each env continues from these tokens
        instead of its own prediction (teacher forcing), so step t's prediction is one step from the
        given history -- how fidelity measures single steps from real states.
        """
        a = _as_action_array(actions, "[N, H] (H actions per env)")
        idx = self._env_index(envs)
        if a.ndim != 2 or a.shape[0] != len(idx):
            raise InvalidActionError(f"actions has shape {a.shape}; expected [{len(idx)}, H]: H actions per env")
        never = idx[~self._started[idx]]
        if never.size:
            raise ValueError(f"envs {never[:8].tolist()} were never reset")
        if teacher_tokens is not None:
            teacher_tokens = np.asarray(teacher_tokens)
            want = (*a.shape, self.dyn.num_patches)
            if teacher_tokens.shape != want:
                raise ValueError(f"teacher_tokens has shape {teacher_tokens.shape}; expected {want}")
        return self._open_loop(idx, a, [self._env_seeds[i] for i in idx], teacher_tokens)

    def _open_loop(self, idx: np.ndarray, a: np.ndarray, seeds, teacher) -> Counterfactual:
        """Steps copies of envs ``idx`` (repeats allowed) under actions [N, H]; see ``replay``."""
        n, h = a.shape
        for t in range(h):
            self.check_actions(a[:, t], n)
        sub = self._state.gather(torch.as_tensor(idx, dtype=torch.long, device=self.device))
        frames = [self._frames[idx]] if self.render else []
        tokens, rewards, terms, latents = [sub.tokens.cpu().numpy()], [], [], []
        eps, step0 = self._episode[idx].tolist(), self._episode_step[idx]
        no_reset = torch.zeros(n, dtype=torch.bool, device=self.device)
        for t in range(h):
            latent = self._to_latent(a[:, t], sub.tokens)
            forced = None if teacher is None else torch.as_tensor(teacher[:, t], dtype=torch.long, device=self.device)
            out = self._advance(sub, latent, no_reset, None, self._noise(seeds, eps, (step0 + t).tolist()), forced)
            if self.render:
                frames.append(out["frames"])
            tokens.append(out["tokens"])
            rewards.append(out["rewards"])
            terms.append(out["terminated"])
            latents.append(latent.cpu().numpy())
        return Counterfactual(np.stack(frames, 1) if self.render else None, np.stack(tokens, 1),
                              np.stack(rewards, 1), np.stack(terms, 1), np.stack(latents, 1))

    # --- internals ------------------------------------------------------------------------
    def _add_pool(self, levels: LevelSet) -> int:
        for i, (known, _, _) in enumerate(self._pools):
            if known is levels:
                return i
        check_levels_match(levels, self.bundle)
        if len(levels) == 0:
            raise ValueError("the level set is empty")
        mission_ids = self.bundle.vocab.encode_batch(levels.missions, self.cfg.text_max_len).to(self.device)
        tokens = torch.as_tensor(levels.first_tokens, dtype=torch.long, device=self.device)
        vs = self.dyn.vocab_size
        if int(tokens.min()) < 0 or int(tokens.max()) >= vs:
            raise ValueError(f"level tokens outside [0, {vs}): not made by this bundle's tokenizer")
        in_use = set(self._pool_of.tolist())
        for i in range(len(self._pools)):  # reuse a slot no env plays any more
            if i not in in_use:
                self._pools[i] = (levels, tokens, mission_ids)
                return i
        self._pools.append((levels, tokens, mission_ids))
        return len(self._pools) - 1

    def _env_index(self, envs) -> np.ndarray:
        if envs is None:
            return np.arange(self.num_envs)
        idx = np.asarray(envs, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("envs is empty")
        if idx.min() < 0 or idx.max() >= self.num_envs:
            raise ValueError(f"envs must be in [0, {self.num_envs}), got {idx.tolist()[:8]}")
        if len(np.unique(idx)) != len(idx):
            raise ValueError("envs has repeated indices")
        return idx

    def _to_latent(self, acts: np.ndarray, tokens: torch.Tensor) -> torch.Tensor:
        if self.action_type == "real":
            acts = self.adapter.real_to_latent(acts, tokens.cpu().numpy())
        return torch.as_tensor(acts, dtype=torch.long, device=self.device)

    def _noise(self, env_keys, episodes, steps):
        """Per-env generators keyed by (world seed, env, episode, step); None when decoding is greedy."""
        if self.temperature <= 0:
            return None
        return [seeded_generator(*key, int(e), int(t), device=self.device)
                for key, e, t in zip(env_keys, episodes, steps)]

    def _run(self, idx: np.ndarray, acts: np.ndarray) -> WorldStep:
        """Advance envs ``idx`` (autoresetting those that need it) and record their new state."""
        resetting = self._needs_reset[idx].copy()
        for j in np.flatnonzero(resetting):
            e = idx[j]
            self._level_of[e] = (self._rank[e] + self._episode[e] * self._group[e]) % len(self._pools[self._pool_of[e]][0])
        contiguous = bool(np.all(np.diff(idx) == 1))
        t_idx = torch.as_tensor(idx, device=self.device)
        sub = self._state.narrow(int(idx[0]), len(idx)) if contiguous else self._state.gather(t_idx)
        reset_t = torch.as_tensor(resetting, device=self.device)
        reset_tokens = sub.tokens.clone()
        for j in np.flatnonzero(resetting):
            levels, tokens, mission_ids = self._pools[self._pool_of[idx[j]]]
            reset_tokens[j] = tokens[self._level_of[idx[j]]]
            sub.mission_ids[j] = mission_ids[self._level_of[idx[j]]]
        if resetting.any():  # the head reads each env's mission encoding, recomputed only when it changes
            rows = torch.as_tensor(np.flatnonzero(resetting), device=self.device)
            with torch.no_grad():
                sub.mission_emb[rows] = self.head.encode_text(sub.mission_ids[rows])
        latent = torch.zeros(len(idx), dtype=torch.long, device=self.device)
        stepping = ~resetting
        if stepping.any():
            latent[torch.as_tensor(stepping, device=self.device)] = self._to_latent(
                acts[stepping], sub.tokens[torch.as_tensor(stepping, device=self.device)])
        noise = self._noise([self._env_seeds[i] for i in idx], self._episode[idx], self._episode_step[idx])
        out = self._advance(sub, latent, reset_t, reset_tokens, noise)
        if not contiguous:
            self._state.scatter(t_idx, sub)
        steps = np.where(resetting, 0, self._episode_step[idx] + 1)
        self._episode_step[idx] = steps
        terminated = out["terminated"] & ~resetting
        truncated = (steps >= self.max_episode_steps) & ~terminated & ~resetting
        self._needs_reset[idx] = terminated | truncated
        for j in np.flatnonzero(resetting):
            e = idx[j]
            levels = self._pools[self._pool_of[e]][0]
            self._missions[e] = levels.missions[self._level_of[e]]
            self._level_ids[e] = levels.level_ids[self._level_of[e]]
        if self.render:
            self._frames[idx] = out["frames"]
        return WorldStep(idx, out["frames"], out["tokens"], np.where(resetting, 0.0, out["rewards"]).astype(np.float32),
                         terminated, truncated, np.where(resetting, -1, latent.cpu().numpy()), steps, resetting,
                         [self._missions[i] for i in idx], [self._level_ids[i] for i in idx])

    @torch.no_grad()
    def _advance(self, sub: _EnvState, latent: torch.Tensor, resetting: torch.Tensor, reset_tokens, noise,
                 forced: torch.Tensor | None = None) -> dict:
        """One frame for every env of ``sub``: generated under ``latent``, or the level's first frame
        where ``resetting``. Updates ``sub`` in place. With ``forced`` [B, P] the generated frame is
        scored and returned, but the env continues from ``forced`` (teacher forcing)."""
        cfg = self.cfg
        if bool((~resetting).any()):
            if self.temperature <= 0 and self.maskgit_steps == 1:  # greedy, every position at once
                new = self.dyn.greedy_slots(sub.dyn, latent, self._groups)
            else:
                new = self.dyn.generate_slots(sub.dyn, latent, self.maskgit_steps, self.temperature,
                                              cfg.maskgit_schedule, noise, self._constrain)
        else:
            new = torch.zeros_like(sub.tokens)
        if bool(resetting.any()):
            new = torch.where(resetting[:, None], reset_tokens, new)
            sub.dyn.clear(resetting)
            if sub.dec is not None:
                sub.dec.clear(resetting)
        start = torch.full_like(latent, self.dyn.num_actions)  # the "no action" into frame 0
        kept = new if forced is None else forced
        self.dyn.commit_slots(sub.dyn, kept, torch.where(resetting, start, latent))
        sub.tokens.copy_(kept)
        frames = None
        if sub.dec is not None:
            if forced is None:
                pix = self.tok.decode_slots(new, sub.dec).float()  # [B, H, W, 3] in about [0, 1]
            else:  # the decoder's history must be the kept frames too: decode the prediction, then commit those
                pix = self.tok.decode_slots(new, sub.dec.gather(torch.arange(len(new), device=new.device))).float()
                self.tok.decode_slots(forced, sub.dec)
            frames = to_uint8(pix).cpu().numpy()
        reward, term_logit = self.head(sub.mission_ids, new, text=sub.mission_emb)
        terminated = term_logit > 0
        if self._sparse_reward:
            reward = torch.where(terminated, reward, torch.zeros_like(reward))
        return {"frames": frames, "tokens": new.cpu().numpy(), "rewards": reward.float().cpu().numpy(),
                "terminated": terminated.cpu().numpy()}


def _as_action_array(actions, expected: str) -> np.ndarray:
    """``np.asarray`` that turns a ragged or non-numeric input into an InvalidActionError."""
    try:
        return np.asarray(actions)
    except (ValueError, TypeError) as e:  # e.g. [[1, 2], [3]]: numpy refuses inhomogeneous lists
        raise InvalidActionError(f"actions {actions!r:.80}: expected an array of shape {expected} of integer "
                                 f"actions ({type(e).__name__}: {e})") from e
