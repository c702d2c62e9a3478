"""WorldModelConfig: one flat typed config (every field a CLI flag) with named presets.

``tiny`` trains all stages on 2 CPU cores in minutes (BabyAI 64x64, patch 8: one token per tile);
``base`` is the GPU size; ``micro`` exists for tests.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

from .fsq import parse_levels
from .maskgit import SCHEDULES

STAGES = ("tokenizer", "actions", "dynamics", "heads", "prior")


def _f(default, help_text, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class WorldModelConfig:
    # data
    frame_size: int = _f(64, "frame size in pixels (must match the data)")
    patch: int = _f(8, "patch size; 8 at 64x64 is one token per BabyAI tile")
    tok_clip_len: int = _f(2, "frames per clip for tokenizer training")
    lam_clip_len: int = _f(2, "frames per clip for latent-action training")
    dyn_clip_len: int = _f(4, "frames per clip for dynamics training")
    shuffle_buffer: int = _f(256, "Ray Data local shuffle buffer (clips)")
    qk_norm: bool = _f(True, "RMSNorm on queries and keys")
    # tokenizer
    tok_width: int = _f(64, "tokenizer width")
    tok_heads: int = _f(4, "tokenizer attention heads")
    tok_enc_blocks: int = _f(2, "tokenizer encoder ST blocks")
    tok_dec_blocks: int = _f(2, "tokenizer decoder ST blocks")
    fsq_levels: str = _f("8,5,5,5", "FSQ levels per channel (codebook = product)")
    tok_per_patch: bool = _f(False, "encode and decode each patch alone (MLPs): equal patches get equal tokens, so "
                                    "in a grid game with one tile per patch the token grid is the game state")
    tok_change_weight: float = _f(10.0, "tokenizer loss weight on pixels that change between the clip's frames "
                                        "(what actions change; 1 = plain MSE)")
    # latent action model
    lam_width: int = _f(64, "latent action model width")
    lam_heads: int = _f(4, "latent action model heads")
    lam_enc_blocks: int = _f(2, "latent action encoder ST blocks")
    lam_dec_blocks: int = _f(2, "latent action decoder ST blocks")
    num_latent_actions: int = _f(8, "number of discrete latent actions |A|")
    lam_entropy_weight: float = _f(0.05, "bonus on the entropy of the batch-mean latent-action distribution")
    lam_sample_entropy_weight: float = _f(0.005, "penalty on per-sample latent-action entropy")
    lam_change_weight: float = _f(100.0, "loss weight on pixels that change between frames")
    lam_noop_latent: bool = _f(False, "reserve the last latent action for transitions whose frames are identical "
                                      "(no other latent may mean 'nothing changed')")
    lam_gumbel: bool = _f(True, "Gumbel-noised latent choices while training (lets merged actions split)")
    # dynamics
    dyn_width: int = _f(64, "dynamics width")
    dyn_heads: int = _f(4, "dynamics heads")
    dyn_blocks: int = _f(4, "dynamics ST blocks")
    dyn_change_weight: float = _f(1.0, "dynamics loss weight on tokens that differ from the previous frame (what the "
                                       "actions do; 1 = every token alike)")
    dyn_spatial_rope: bool = _f(True, "2-D rotary positions in the dynamics' spatial attention")
    maskgit_steps: int = _f(8, "MaskGIT decoding steps per generated frame")
    maskgit_temperature: float = _f(0.0, "MaskGIT sampling temperature for world steps (0 = greedy; games are near-deterministic)")
    maskgit_schedule: str = _f("cosine", "MaskGIT unmasking schedule", choices=SCHEDULES)
    context_frames: int = _f(16, "temporal context kept in the KV cache by evaluation rollouts")
    world_maskgit_steps: int = _f(1, "MaskGIT steps per World step (greedy decoding of these near-deterministic "
                                     "games gave the same next-frame PSNR at 1 step as at 8: BENCHMARKS.md)")
    # reward/termination head and prompt prior
    text_max_len: int = _f(16, "max words in a mission/prompt")
    head_width: int = _f(64, "reward/termination head width")
    head_heads: int = _f(4, "reward/termination head: mission-encoder heads")
    head_term_pos_weight: float = _f(5.0, "termination loss weight on terminal transitions (> 1 favours recall over "
                                          "false terminations)")
    head_blocks: int = _f(3, "reward/termination head: mission-conditioned 3x3 conv blocks over the token grid")
    head_mission_negatives: int = _f(2, "per terminal transition in a head batch, this many extra rows pairing its "
                                        "frame with another row's mission that names a different goal, labelled not "
                                        "terminal (genie_world/mission_negatives.py; 0 = none)")
    prior_width: int = _f(64, "prompt prior width")
    prior_heads: int = _f(4, "prompt prior heads")
    prior_blocks: int = _f(3, "prompt prior blocks")
    prior_maskgit_steps: int = _f(8, "MaskGIT steps when generating a first frame from a prompt")
    prior_text_dropout: float = _f(0.0, "share of prompt-prior training frames whose text is dropped (classifier-free "
                                        "guidance needs it)")
    prior_guidance: float = _f(0.0, "classifier-free guidance scale when generating levels from a prompt (0 = none; "
                                    "> 0 needs prior_text_dropout > 0 in training)")
    prior_guidance_rounds: int = _f(0, "MaskGIT rounds of a prompt level that are guided (0 = all); the later ones "
                                       "sample the plain conditional, so the named object is placed but does not fill "
                                       "the level (genie_world/prompt_prior.py)")
    prior_temperature: float = _f(1.0, "MaskGIT temperature for prompt levels (> 0: one prompt, many levels)")
    # optimisation
    tok_batch: int = _f(16, "tokenizer clips per step (per worker)")
    lam_batch: int = _f(32, "latent-action clips per step (per worker)")
    dyn_batch: int = _f(16, "dynamics clips per step (per worker)")
    head_batch: int = _f(64, "reward-head transitions per step (per worker)")
    prior_batch: int = _f(32, "prompt-prior first frames per step (per worker)")
    lr: float = _f(2e-3, "peak AdamW learning rate")
    dyn_lr: float = _f(0.0, "peak learning rate of the dynamics stage (0: --lr)")
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of lr")
    warmup_steps: int = _f(50, "linear warmup steps")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    grad_clip: float = _f(1.0, "gradient norm clip")
    tok_steps: int = _f(600, "tokenizer training steps")
    lam_steps: int = _f(650, "latent action model training steps")
    dyn_steps: int = _f(800, "dynamics training steps")
    head_steps: int = _f(800, "reward/termination head training steps")
    prior_steps: int = _f(300, "prompt prior training steps")
    log_every: int = _f(50, "steps between metric reports")
    checkpoint_every: int = _f(200, "steps between Ray Train checkpoints")
    image_every: int = _f(400, "steps between image grids in TensorBoard/wandb")
    # evaluation
    eval_clips: int = _f(128, "held-out clips per metric")
    eval_fidelity_episodes: int = _f(128, "held-out real episodes the fidelity report replays in a World (0: none)")
    eval_prompt_levels: int = _f(256, "levels generated per prompt to check that they show what it names (BabyAI; "
                                      "0: none)")
    adapter_transitions: int = _f(200, "labelled transitions used to fit the action adapter's latent -> key model")
    adapter_key_transitions: int = _f(0, "labelled transitions that train the adapter's key -> latent model "
                                         "(KeyToLatent, reads the token grid; 0 = none: keys take the latent under "
                                         "which they are most probable)")
    adapter_key_steps: int = _f(1000, "training steps of the adapter's key -> latent model")
    # runtime
    threads: int = _f(0, "torch CPU threads per worker (0: all cores)")
    bf16: bool = _f(True, "bf16 autocast on GPU (ignored on CPU)")
    compile: bool = _f(False, "torch.compile the model on GPU")
    seed: int = _f(0, "random seed")

    def steps_for(self, stage: str) -> int:
        return {"tokenizer": self.tok_steps, "actions": self.lam_steps, "dynamics": self.dyn_steps,
                "heads": self.head_steps, "prior": self.prior_steps}[stage]

    def lr_for(self, stage: str) -> float:
        return self.dyn_lr if stage == "dynamics" and self.dyn_lr > 0 else self.lr

    def batch_for(self, stage: str) -> int:
        return {"tokenizer": self.tok_batch, "actions": self.lam_batch, "dynamics": self.dyn_batch,
                "heads": self.head_batch, "prior": self.prior_batch}[stage]

    def validate(self) -> None:
        # Types first: the Python API and a bundle's config.json bypass argparse, and a wrong type
        # otherwise surfaced as a TypeError deep inside a Ray Train worker after files were written.
        hints = typing.get_type_hints(type(self))
        problems = [f"{f.name}: expected {hints[f.name].__name__}, got {type(v).__name__} {v!r}"
                    for f in dataclasses.fields(self) if not _has_type(v := getattr(self, f.name), hints[f.name])]
        if problems:
            raise WorldConfigError("; ".join(problems))
        for f in dataclasses.fields(self):
            low = 0 if f.name == "warmup_steps" else 1
            if f.name.endswith(("_steps", "_batch", "_every")) and getattr(self, f.name) < low:
                problems.append(f"{f.name}: expected an integer >= {low}, got {getattr(self, f.name)}")
        for name in ("head_mission_negatives", "prior_guidance_rounds"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: expected an integer >= 0, got {getattr(self, name)}")
        if self.patch < 1:
            problems.append(f"patch: expected an integer >= 1, got {self.patch}")
        elif self.frame_size % self.patch:
            problems.append(f"frame_size {self.frame_size} is not divisible by patch {self.patch}")
        try:
            parse_levels(self.fsq_levels)
        except ValueError as e:
            problems.append(str(e))
        for name in ("tok", "lam", "dyn", "head", "prior"):
            w, h = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if h < 1 or w < 1:
                problems.append(f"{name}_width and {name}_heads: expected integers >= 1, got {w} and {h}")
            elif w % h:
                problems.append(f"{name}_width {w} is not divisible by {name}_heads {h}")
        if min(self.tok_clip_len, self.lam_clip_len, self.dyn_clip_len) < 2:
            problems.append("tok_clip_len, lam_clip_len and dyn_clip_len must be >= 2")
        if self.maskgit_schedule not in SCHEDULES:
            problems.append(f"maskgit_schedule {self.maskgit_schedule!r}: expected one of {SCHEDULES}")
        if self.num_latent_actions < 2:
            problems.append("num_latent_actions must be >= 2")
        for name, (low, high, closed_low) in FLOAT_RANGES.items():
            v = getattr(self, name)
            if not math.isfinite(v) or not (v >= low if closed_low else v > low) or v > high:
                want = f"{'>=' if closed_low else '>'} {low:g}" + (f" and <= {high:g}" if high != math.inf else " (finite)")
                problems.append(f"{name}: expected a number {want}, got {v!r}")
        if problems:
            raise WorldConfigError("; ".join(problems))


# (low, high, low included). The tokenizer's change weight multiplies the changed pixels' loss
# (1 = plain MSE, 0 would ignore them); the LAM's adds to it (0 = plain). NaN and inf are refused.
FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {
    "tok_change_weight": (0.0, math.inf, False),
    "lam_change_weight": (0.0, math.inf, True),
    "dyn_change_weight": (0.0, math.inf, False),
    "lam_entropy_weight": (0.0, math.inf, True),
    "lam_sample_entropy_weight": (0.0, math.inf, True),
    "maskgit_temperature": (0.0, math.inf, True),
    "prior_temperature": (0.0, math.inf, True),
    "prior_text_dropout": (0.0, 1.0, True),
    "head_term_pos_weight": (0.0, math.inf, False),
    "prior_guidance": (0.0, math.inf, True),
    "lr": (0.0, math.inf, False),
    "dyn_lr": (0.0, math.inf, True),
    "min_lr_ratio": (0.0, 1.0, True),
    "weight_decay": (0.0, math.inf, True),
    "grad_clip": (0.0, math.inf, False),
}


class WorldConfigError(ValueError):
    pass


def _has_type(value, want: type) -> bool:
    if isinstance(value, bool):  # bool is an int to Python, never to a config
        return want is bool
    return isinstance(value, want) or (want is float and isinstance(value, int))


PRESETS: dict[str, dict] = {
    # BabyAI on 2 CPU cores. 12 latent actions: BabyAI has at least 9 distinct effects (4 facings a turn
    # can end in, 4 step directions, pick up / drop / toggle), and with 8 the LAM must merge two of them;
    # which two depended on the training run (action mapping 97% or 85%, BENCHMARKS.md). 2 dynamics
    # blocks: the World steps 1.5x faster than with 4 (BENCHMARKS.md), still well above copy-last.
    # Per-patch tokenizer: one BabyAI tile = one patch = one token, so the token grid is the game state and
    # imagined frames read back exactly (fidelity, BENCHMARKS.md); it needs more, cheaper steps than the ST
    # encoder. The no-op latent, the key -> latent model, the head's weighting and the prior's guidance
    # each fixed one measured fault of imagined episodes (genie_world/fidelity.py; BENCHMARKS.md). The
    # dynamics at lr 4e-3 reaches in 800 steps what 1,600 steps at 2e-3 did.
    "tiny": dict(num_latent_actions=12, dyn_blocks=2, dyn_lr=4e-3, tok_per_patch=True, tok_steps=1200, tok_batch=32,
                 lam_noop_latent=True, adapter_key_transitions=30_000, head_term_pos_weight=1.0, head_steps=1500,
                 prior_text_dropout=0.1, prior_guidance=16.0, prior_guidance_rounds=2, prior_steps=1000),
    "micro": dict(tok_width=32, tok_enc_blocks=1, tok_dec_blocks=1, lam_width=32, lam_enc_blocks=1,
                  lam_dec_blocks=1, dyn_width=32, dyn_blocks=2, head_width=32, head_blocks=1, prior_width=32,
                  prior_blocks=1, tok_batch=4, lam_batch=4, dyn_batch=4, head_batch=8,
                  prior_batch=8, tok_steps=20, lam_steps=20, dyn_steps=20, head_steps=10,
                  prior_steps=10, log_every=5, checkpoint_every=10, image_every=10, eval_clips=16,
                  maskgit_steps=4, prior_maskgit_steps=4, shuffle_buffer=32, warmup_steps=5, adapter_key_steps=20,
                  eval_fidelity_episodes=8, eval_prompt_levels=16),
    "base": dict(patch=4, tok_clip_len=4, lam_clip_len=4, dyn_clip_len=16, tok_width=256, tok_heads=8, tok_enc_blocks=4,
                 tok_dec_blocks=4, lam_width=256, lam_heads=8, lam_enc_blocks=4, lam_dec_blocks=4,
                 dyn_width=512, dyn_heads=8, dyn_blocks=12, head_width=128, prior_width=256, prior_heads=8,
                 prior_blocks=6, tok_batch=64, lam_batch=64, dyn_batch=32, head_batch=256, prior_batch=128, lr=3e-4, warmup_steps=500, tok_steps=20000, lam_steps=20000,
                 dyn_steps=40000, head_steps=5000, prior_steps=10000, maskgit_steps=10, log_every=100,
                 checkpoint_every=1000, image_every=2000, eval_clips=512, shuffle_buffer=2048),
}


def resolve_config(preset: str = "tiny", overrides: dict | None = None) -> WorldModelConfig:
    if preset not in PRESETS:
        raise WorldConfigError(f"preset {preset!r}: expected one of {sorted(PRESETS)}")
    values = {**PRESETS[preset], **(overrides or {})}
    known = {f.name for f in dataclasses.fields(WorldModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise WorldConfigError(f"unknown config fields {unknown}")
    cfg = WorldModelConfig(**values)
    cfg.validate()
    return cfg
