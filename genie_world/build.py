"""Build each world-model part from a WorldModelConfig (one place that knows the constructors)."""

from __future__ import annotations

from .config import WorldModelConfig
from .dynamics import DynamicsModel
from .fsq import FSQ
from .latent_actions import LatentActionModel
from .prompt_prior import PromptPrior
from .reward_head import RewardHead
from .video_tokenizer import VideoTokenizer

PART_NAMES = ("tokenizer", "latent_actions", "dynamics", "reward_head", "prompt_prior")
# The parts each part is trained against (frozen): re-training one of these makes the part stale.
PART_DEPENDENCIES = {"tokenizer": (), "latent_actions": (), "dynamics": ("tokenizer", "latent_actions"),
                     "reward_head": ("tokenizer",), "prompt_prior": ("tokenizer",)}


def num_patches(cfg: WorldModelConfig) -> int:
    return (cfg.frame_size // cfg.patch) ** 2


def vocab_size(cfg: WorldModelConfig) -> int:
    return FSQ(cfg.fsq_levels).codebook_size


def build_part(name: str, cfg: WorldModelConfig, text_vocab: int = 0):
    if name == "tokenizer":
        return VideoTokenizer(cfg.frame_size, cfg.patch, cfg.tok_width, cfg.tok_heads, cfg.tok_enc_blocks,
                              cfg.tok_dec_blocks, cfg.fsq_levels, cfg.qk_norm, cfg.tok_change_weight,
                              cfg.tok_per_patch)
    if name == "latent_actions":
        return LatentActionModel(cfg.frame_size, cfg.patch, cfg.lam_width, cfg.lam_heads, cfg.lam_enc_blocks,
                                 cfg.lam_dec_blocks, cfg.num_latent_actions, cfg.qk_norm, cfg.lam_entropy_weight,
                                 cfg.lam_change_weight, cfg.lam_sample_entropy_weight, cfg.lam_gumbel,
                                 cfg.lam_clip_len, cfg.lam_noop_latent)
    if name == "dynamics":
        return DynamicsModel(vocab_size(cfg), num_patches(cfg), cfg.num_latent_actions, cfg.dyn_width, cfg.dyn_heads,
                             cfg.dyn_blocks, cfg.qk_norm, change_weight=cfg.dyn_change_weight,
                             spatial_rope=cfg.dyn_spatial_rope)
    if name == "reward_head":
        return RewardHead(text_vocab, cfg.text_max_len, vocab_size(cfg), num_patches(cfg), cfg.head_width,
                          cfg.head_heads, cfg.head_blocks, cfg.head_term_pos_weight)
    if name == "prompt_prior":
        return PromptPrior(text_vocab, cfg.text_max_len, vocab_size(cfg), num_patches(cfg), cfg.prior_width,
                           cfg.prior_heads, cfg.prior_blocks, cfg.prior_text_dropout, cfg.prior_guidance,
                           cfg.prior_guidance_rounds)
    raise ValueError(f"unknown world-model part {name!r}; expected one of {PART_NAMES}")
