"""SimaPPOLearner: PPO + lambda * language matching (CLIP-style) + gamma * contrastive (MoCo-style).

Use with ``config.learners(learner_class=SimaPPOLearner, learner_config_dict={...})``; the keys of
``learner_config_dict`` are ``LEARNER_DEFAULTS`` (unknown keys are an error, to catch typos).

Per gradient step (one minibatch):
1. ``SimaRLModule._forward_train`` computes the policy outputs and the auxiliary projections.
2. ``compute_loss_for_module``: PPO's loss (RLlib's, unchanged) + the weighted auxiliary terms, each
   restricted to ``Columns.LOSS_MASK`` rows; every term is logged under the module id.
3. ``compute_gradients``: during the first ``freeze_vision_steps`` steps the vision encoder's gradients
   are dropped (its weights and Adam moments stay untouched).
4. ``apply_gradients``: the optimizer step, then the momentum (EMA) update of the key encoder and the
   enqueue of this step's (unmasked) keys. The step counter is a module buffer, so a restored checkpoint
   resumes the freeze schedule where it stopped.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns

from .aux_losses import contrastive_loss, language_matching_loss
from .rl_module import SimaRLModule

LEARNER_DEFAULTS: dict[str, Any] = {
    "language_coeff": 0.1,  # lambda: weight of the CLIP-style language-matching loss (0 switches it off)
    "contrastive_coeff": 0.1,  # gamma: weight of the MoCo-style contrastive loss (0 switches it off)
    "clip_temperature": None,  # None: learned temperature (init model_config clip_init_temperature); float: fixed
    "moco_temperature": 0.2,
    "moco_momentum": 0.99,  # key encoder EMA per gradient step
    "moco_queue_size": None,  # None: the module's model_config moco_queue_size; int: re-size the queue
    "freeze_vision_steps": 0,  # no vision-encoder updates for the first N gradient steps
}

# Metric names logged under (module_id, name).
LANGUAGE_LOSS_KEY = "language_matching_loss"
LANGUAGE_ACC_KEY = "language_matching_accuracy"
CLIP_TEMPERATURE_KEY = "clip_temperature"
CONTRASTIVE_LOSS_KEY = "contrastive_loss"
CONTRASTIVE_ACC_KEY = "contrastive_accuracy"
QUEUE_FILL_KEY = "moco_queue_fill"
VISION_FROZEN_KEY = "vision_frozen"
GRADIENT_STEPS_KEY = "sima_gradient_steps"


def resolve_learner_config(learner_config_dict: dict | None) -> dict[str, Any]:
    given = dict(learner_config_dict or {})
    unknown = sorted(set(given) - set(LEARNER_DEFAULTS))
    if unknown:
        raise ValueError(f"SimaPPOLearner learner_config_dict: unknown keys {unknown}; "
                         f"known keys: {sorted(LEARNER_DEFAULTS)}")
    cfg = {**LEARNER_DEFAULTS, **given}
    for k in ("language_coeff", "contrastive_coeff"):
        if float(cfg[k]) < 0:
            raise ValueError(f"SimaPPOLearner: {k}={cfg[k]} must be >= 0")
    if not 0.0 <= float(cfg["moco_momentum"]) <= 1.0:
        raise ValueError(f"SimaPPOLearner: moco_momentum={cfg['moco_momentum']} must be in [0, 1]")
    if cfg["clip_temperature"] is not None and float(cfg["clip_temperature"]) <= 0:
        raise ValueError(f"SimaPPOLearner: clip_temperature={cfg['clip_temperature']} must be > 0 (or None: learned)")
    if float(cfg["moco_temperature"]) <= 0:
        raise ValueError(f"SimaPPOLearner: moco_temperature={cfg['moco_temperature']} must be > 0")
    return cfg


class SimaPPOLearner(PPOTorchLearner):
    # ---- setup --------------------------------------------------------------------------------------------
    def _make_module(self):
        # Prepared before TorchLearner wraps the module in DDP (num_learners > 1), so DDP sees the final
        # buffers (a re-sized queue).
        self.sima_config = resolve_learner_config(self.config.learner_config_dict)
        self._pending_keys: dict[str, torch.Tensor] = {}
        module = super()._make_module()
        for module_id in module.keys():
            self._prepare_module(module[module_id])
        return module

    def _prepare_module(self, module) -> None:
        if not isinstance(module, SimaRLModule):
            return
        cfg = self.sima_config
        wanted = {"language": float(cfg["language_coeff"]) > 0, "contrastive": float(cfg["contrastive_coeff"]) > 0}
        if any(wanted.values()) and not hasattr(module, "aux"):
            raise ValueError("SimaPPOLearner: language_coeff/contrastive_coeff > 0 need the module's auxiliary "
                             "heads (model_config aux=True), or set both coefficients to 0")
        module.aux_terms = wanted
        if hasattr(module, "aux") and cfg["moco_queue_size"] is not None:
            module.aux.queue.resize_(int(cfg["moco_queue_size"]))

    def _sima_modules(self):
        for module_id in self.module.keys():
            module = self.module[module_id].unwrapped()
            if isinstance(module, SimaRLModule):
                yield module_id, module

    def _vision_frozen(self, module: SimaRLModule) -> bool:
        return int(module.num_updates) < int(self.sima_config["freeze_vision_steps"])

    # ---- loss ---------------------------------------------------------------------------------------------
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        total = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        module = self.module[module_id].unwrapped()
        if not isinstance(module, SimaRLModule):
            return total
        cfg = self.sima_config
        mask = batch.get(Columns.LOSS_MASK)  # bool [B] or None
        logs: dict[str, Any] = {VISION_FROZEN_KEY: float(self._vision_frozen(module)),
                                GRADIENT_STEPS_KEY: int(module.num_updates)}
        if module.aux_terms["language"]:
            scale = module.aux.logit_scale(cfg["clip_temperature"])
            lang, acc = language_matching_loss(fwd_out[SimaRLModule.CLIP_IMAGE], fwd_out[SimaRLModule.CLIP_TEXT],
                                               batch[Columns.OBS]["mission"], scale, mask)
            total = total + float(cfg["language_coeff"]) * lang
            logs.update({LANGUAGE_LOSS_KEY: lang.detach(), LANGUAGE_ACC_KEY: acc,
                         CLIP_TEMPERATURE_KEY: 1.0 / float(torch.as_tensor(scale).detach())})
        if module.aux_terms["contrastive"]:
            queue = module.aux.queue
            con, acc = contrastive_loss(fwd_out[SimaRLModule.MOCO_QUERY], fwd_out[SimaRLModule.MOCO_KEY],
                                        queue.negatives(), float(cfg["moco_temperature"]), mask)
            total = total + float(cfg["contrastive_coeff"]) * con
            keys = fwd_out[SimaRLModule.MOCO_KEY]
            self._pending_keys[module_id] = (keys if mask is None else keys[mask.bool()]).detach()
            logs.update({CONTRASTIVE_LOSS_KEY: con.detach(), CONTRASTIVE_ACC_KEY: acc,
                         QUEUE_FILL_KEY: int(queue.filled) / max(1, queue.size)})
        self.metrics.log_dict(logs, key=module_id, window=1)
        return total

    # ---- gradient step ------------------------------------------------------------------------------------
    def compute_gradients(self, loss_per_module, **kwargs):
        grads = super().compute_gradients(loss_per_module, **kwargs)
        for _, module in self._sima_modules():
            if self._vision_frozen(module):
                for p in module.vision.parameters():
                    p.grad = None  # Adam skips parameters without a gradient: no step, no moment update
                    grads.pop(self.get_param_ref(p), None)
        return grads

    def apply_gradients(self, gradients_dict) -> None:
        super().apply_gradients(gradients_dict)
        momentum = float(self.sima_config["moco_momentum"])
        for module_id, module in self._sima_modules():
            module.num_updates.add_(1)
            keys = self._pending_keys.pop(module_id, None)
            if hasattr(module, "aux") and module.aux_terms["contrastive"]:
                module.aux.momentum_update_(module.vision, momentum)
                if keys is not None:
                    module.aux.queue.enqueue(keys)
