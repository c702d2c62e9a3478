"""SimaRLModule: pixels + instruction in, action distribution and value out (RLlib new API stack).

Observations are a Dict ``{"image": uint8 [64, 64, 3], "mission": int64 token ids [L]}`` (tokenize the
mission text with ``InstructionTokenizer`` in an env wrapper; RLlib cannot batch gymnasium ``Text``).

    vision_arch "tile_ego" (``genie-sima bc``'s default; tile_film.py):
    image   -> TileEncoder -> cells [B, C, G, G] -> FiLM(l) convs over the room turned to the detected
               agent's heading ("room") or over the egocentric view ("egocentric") -> view centred on the agent
               -> MLP -> h [B, hidden_dim] -> policy / value heads
            -> v [B, vision_dim] (instruction-free pooled embedding: auxiliary losses)
    mission -> LanguageEncoder -> l [B, language_dim]

    vision_arch "conv" (the default; the first design):
    image   -> VisionEncoder   -> v [B, vision_dim]   --\
                                                         concat -> MLP -> h [B, hidden_dim] -> policy head
    mission -> LanguageEncoder -> l [B, language_dim] --/                                  -> value head

Forward outputs (keys are class attributes):
- every forward: ``Columns.ACTION_DIST_INPUTS`` ([B, n] logits for Discrete; [B, 2A] mean ++ log_std for Box)
- train forward also: ``Columns.EMBEDDINGS`` (h, reused by ``compute_values``), ``VISION_EMBEDDING`` (v),
  ``LANGUAGE_EMBEDDING`` (l) and, when enabled (``aux_terms``), ``CLIP_IMAGE``/``CLIP_TEXT`` [B, P]
  projections for language matching and ``MOCO_QUERY``/``MOCO_KEY`` [B, P] for the contrastive loss.
Exploration/inference forwards return only the action-distribution inputs, so EnvRunners do not store
embeddings in the episodes.

model_config keys (all optional): see ``MODEL_DEFAULTS``. ``vocab_size`` defaults to the mission space's
``high + 1``; ``image_size`` comes from the image space.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from torch import nn

from .aux_losses import SimaAuxiliary, random_shift
from .language_encoder import LanguageEncoder
from .tile_film import EgocentricFiLMFusion, TileEncoder
from .vision_encoder import VisionEncoder

VISION_ARCHS = ("conv", "tile_ego")

MODEL_DEFAULTS: dict[str, Any] = {
    "vocab_size": None,  # token ids are in [0, vocab_size); default: mission space high + 1
    # "conv" (vision_encoder.py + concat fusion) or "tile_ego" (tile_film.py; `genie-sima bc`'s default)
    "vision_arch": "conv",
    "vision_dim": 128,  # instruction-free vision embedding (auxiliary losses; "conv": also the trunk input)
    "conv_channels": (32, 64, 64),  # "conv": one stride-2 conv per entry (64 -> 32 -> 16 -> 8)
    "tile_size": 8,  # "tile_ego": pixels per grid cell (BabyAI: 8 at 64x64)
    "tile_channels": 64,  # "tile_ego": features per cell
    "film_blocks": 2,  # "tile_ego": FiLM-conditioned 3x3 conv blocks over the egocentric grid
    # "tile_ego": where those convs run: "room" (the room grid turned to the agent's heading, then re-centred;
    # `genie-sima bc`'s default) or "egocentric" (the (2G-1)^2 view; the first design: policies saved
    # without this key)
    "conv_frame": "egocentric",
    "language_dim": 128,  # LanguageEncoder output
    "token_dim": 64,  # word embedding size
    "gru_dim": 128,  # GRU hidden size
    "hidden_dim": 256,  # fused trunk width (the policy and value heads read it)
    "free_log_std": True,  # Box actions: a state-independent learned log_std (else predicted per state)
    "init_log_std": 0.0,
    "aux": True,  # build the auxiliary heads/key encoder/queue (learner side)
    "aux_proj_dim": 64,  # contrastive projection size P
    "moco_queue_size": 1024,  # default queue size (SimaPPOLearner re-sizes it from learner_config_dict)
    "clip_init_temperature": 0.07,
    "augment_pad": 4,  # random-shift pixels for the two contrastive views
}
# Keys RLlib itself may merge into model_config (DefaultModelConfig fields, PPO's auto-includes): ignored.
_RLLIB_KEYS = {f.name for f in dataclasses.fields(DefaultModelConfig)} | {"vf_share_layers"}


def resolve_model_config(model_config) -> dict[str, Any]:
    given = dict(model_config or {}) if not dataclasses.is_dataclass(model_config) else dataclasses.asdict(model_config)
    unknown = sorted(k for k in given if k not in MODEL_DEFAULTS and k not in _RLLIB_KEYS)
    if unknown:
        raise ValueError(f"SimaRLModule model_config: unknown keys {unknown}; known keys: {sorted(MODEL_DEFAULTS)}")
    return {**MODEL_DEFAULTS, **{k: v for k, v in given.items() if k in MODEL_DEFAULTS}}


def _check_spaces(obs_space, action_space) -> None:
    ok = (isinstance(obs_space, gym.spaces.Dict) and {"image", "mission"} <= set(obs_space.spaces)
          and isinstance(obs_space["image"], gym.spaces.Box) and len(obs_space["image"].shape) == 3
          and obs_space["image"].shape[-1] == 3 and isinstance(obs_space["mission"], gym.spaces.Box)
          and len(obs_space["mission"].shape) == 1 and np.issubdtype(obs_space["mission"].dtype, np.integer))
    if not ok:
        raise ValueError("SimaRLModule needs Dict observations {'image': Box uint8 [H, W, 3], 'mission': Box int [L]} "
                         f"(tokenize the mission with an env wrapper); got {obs_space}")
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) != 1:
        raise ValueError(f"SimaRLModule: Box actions must be 1-D, got shape {action_space.shape}")
    if not isinstance(action_space, (gym.spaces.Discrete, gym.spaces.Box)):
        raise ValueError(f"SimaRLModule supports Discrete and 1-D Box actions, got {action_space}")


class SimaRLModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI):
    VISION_EMBEDDING = "vision_embedding"
    LANGUAGE_EMBEDDING = "language_embedding"
    CLIP_IMAGE = "clip_image"
    CLIP_TEXT = "clip_text"
    MOCO_QUERY = "moco_query"
    MOCO_KEY = "moco_key"

    def setup(self) -> None:
        _check_spaces(self.observation_space, self.action_space)
        cfg = self.cfg = resolve_model_config(self.model_config)
        image_space, mission_space = self.observation_space["image"], self.observation_space["mission"]
        if cfg["vision_arch"] not in VISION_ARCHS:
            raise ValueError(f"SimaRLModule model_config: vision_arch {cfg['vision_arch']!r} is not one of {VISION_ARCHS}")
        self.vocab = cfg["vocab_size"] or int(np.max(mission_space.high)) + 1
        self.image_size = image_space.shape[0]
        self._build(cfg["vision_arch"])

    def _build(self, arch: str) -> None:
        """Every parameterised part; ``set_state`` calls it again to load a checkpoint of the other arch."""
        cfg = self.cfg
        self.arch = arch
        h = cfg["hidden_dim"]
        if arch == "tile_ego":
            self.vision = TileEncoder(cfg["vision_dim"], cfg["tile_channels"], cfg["tile_size"], self.image_size)
            self.trunk = EgocentricFiLMFusion(cfg["tile_channels"], cfg["language_dim"], h, self.vision.grid,
                                              cfg["film_blocks"], cfg["conv_frame"])
        else:
            self.vision = VisionEncoder(cfg["vision_dim"], tuple(cfg["conv_channels"]), self.image_size)
            self.trunk = nn.Sequential(nn.Linear(cfg["vision_dim"] + cfg["language_dim"], h), nn.SiLU(),
                                       nn.Linear(h, h), nn.SiLU())
        self.language = LanguageEncoder(self.vocab, cfg["language_dim"], cfg["token_dim"], cfg["gru_dim"])
        self.is_box = isinstance(self.action_space, gym.spaces.Box)
        if self.is_box:
            act_dim = int(self.action_space.shape[0])
            self.pi = nn.Linear(h, act_dim if cfg["free_log_std"] else 2 * act_dim)
            if cfg["free_log_std"]:
                self.log_std = nn.Parameter(torch.full((act_dim,), float(cfg["init_log_std"])))
        else:
            self.pi = nn.Linear(h, int(self.action_space.n))
        # Small initial policy outputs: a near-uniform (or unit-std) first policy, as in PPO practice.
        nn.init.orthogonal_(self.pi.weight, gain=0.01)
        nn.init.zeros_(self.pi.bias)
        self.vf = nn.Linear(h, 1)
        # Gradient steps taken by SimaPPOLearner (drives the vision freeze; a buffer, so checkpoints keep it).
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # Which auxiliary outputs the train forward computes; SimaPPOLearner switches off unused ones.
        self.aux_terms = {"language": bool(cfg["aux"]), "contrastive": bool(cfg["aux"])}
        if cfg["aux"]:
            self.aux = SimaAuxiliary(self.vision, cfg["vision_dim"], cfg["language_dim"], cfg["aux_proj_dim"],
                                     cfg["moco_queue_size"], cfg["clip_init_temperature"])

    def set_state(self, state: dict) -> None:
        """A checkpoint names its arch by its keys (``vision.conv.*``: conv, ``vision.stem.*``: tile_ego). A
        module built as the other arch (a model_config without ``vision_arch``) is rebuilt to match before
        loading, instead of RLlib's non-strict load silently skipping the mismatched layers."""
        arch = ("conv" if any(k.startswith("vision.conv.") for k in state)
                else "tile_ego" if any(k.startswith("vision.stem.") for k in state) else self.arch)
        if arch != self.arch:
            self.cfg = {**self.cfg, "vision_arch": arch}
            self._build(arch)
        super().set_state(state)

    # ---- InferenceOnlyAPI: EnvRunners neither build nor receive the auxiliary state ------------------------
    def get_non_inference_attributes(self) -> list[str]:
        return ["aux"]

    # ---- pieces (public: the BC trainer and evaluation use them too) ------------------------------------
    def encode_vision(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision(images)  # [B, vision_dim]

    def encode_language(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.language(tokens)  # [B, language_dim]

    def fuse(self, v: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """"conv" only: the trunk reads the pooled vision embedding (tile_ego needs the cell grid: ``embed``)."""
        if self.arch != "conv":
            raise ValueError("SimaRLModule.fuse: vision_arch 'tile_ego' fuses the cell grid; use embed(obs)")
        return self.trunk(torch.cat([v, lang], dim=-1))  # [B, hidden_dim]

    def embed(self, obs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """obs {"image", "mission"} -> (v [B, vision_dim], l [B, language_dim], h [B, hidden_dim])."""
        return self.embed_with_cells(obs)[:3]

    def embed_with_cells(self, obs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``embed`` plus tile_ego's cell grid [N, C, G, G] (None for "conv"), for a caller that also trains the
        agent/direction detectors on it (``genie-sima bc``) without running the vision stem twice."""
        lang = self.language(obs["mission"])
        if self.arch == "conv":
            v = self.vision(obs["image"])
            return v, lang, self.fuse(v, lang), None
        images = obs["image"]
        cells = self.vision.features(images)  # [N, C, G, G], N = prod(leading dims)
        lead = images.shape[:-3]
        v = self.vision.embed(cells).reshape(*lead, -1)  # [B, vision_dim]
        h = self.trunk(cells, lang.reshape(-1, lang.shape[-1])).reshape(*lead, -1)  # [B, hidden_dim]
        return v, lang, h, cells

    def action_dist_inputs(self, h: torch.Tensor) -> torch.Tensor:
        out = self.pi(h)
        if self.is_box:
            if self.cfg["free_log_std"]:
                log_std = self.log_std.clamp(-5.0, 2.0).expand_as(out)
            else:
                out, log_std = out.chunk(2, dim=-1)
                log_std = log_std.clamp(-5.0, 2.0)
            out = torch.cat([out, log_std], dim=-1)  # [B, 2A]: TorchDiagGaussian.from_logits splits it
        return out

    # ---- RLModule forwards -------------------------------------------------------------------------------
    def _forward(self, batch: dict, **kwargs) -> dict:
        _, _, h = self.embed(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: self.action_dist_inputs(h)}

    def _forward_train(self, batch: dict, **kwargs) -> dict:
        obs = batch[Columns.OBS]
        v, lang, h = self.embed(obs)
        out = {Columns.ACTION_DIST_INPUTS: self.action_dist_inputs(h), Columns.EMBEDDINGS: h,
               self.VISION_EMBEDDING: v, self.LANGUAGE_EMBEDDING: lang}
        # The auxiliary projections are computed here, inside forward_train, so a DDP-wrapped module
        # (num_learners > 1) sees every trainable parameter used in its forward.
        if hasattr(self, "aux"):
            if self.aux_terms["language"]:
                out[self.CLIP_IMAGE] = self.aux.clip_image(v)
                out[self.CLIP_TEXT] = self.aux.clip_text(lang)
            if self.aux_terms["contrastive"]:
                pad = int(self.cfg["augment_pad"])
                out[self.MOCO_QUERY] = self.aux.moco_query(self.vision(random_shift(obs["image"], pad)))
                out[self.MOCO_KEY] = self.aux.keys(random_shift(obs["image"], pad))
        return out

    # ---- ValueFunctionAPI ---------------------------------------------------------------------------------
    def compute_values(self, batch: dict, embeddings: Any = None) -> torch.Tensor:
        if embeddings is None:
            _, _, embeddings = self.embed(batch[Columns.OBS])
        return self.vf(embeddings).squeeze(-1)  # [B]
