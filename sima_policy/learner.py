"""SimaPPOLearner: PPO + lambda * language matching (CLIP-style) + gamma * contrastive (MoCo-style).

Use with ``config.learners(learner_class=SimaPPOLearner, learner_config_dict={...})``; the keys of
``learner_config_dict`` are ``LEARNER_DEFAULTS`` (unknown keys are an error, to catch typos).

Per gradient step (one minibatch):
0. ``_update`` (before the forward): with an ``aux_source`` (the shared replay, see LEARNER_DEFAULTS), draw
   this step's auxiliary rows from it; if it has any, the forward skips the minibatch's aux projections.
1. ``SimaRLModule._forward_train`` computes the policy outputs and (unless skipped) the aux projections.
2. ``compute_loss_for_module``: PPO's loss (RLlib's, unchanged) + the weighted auxiliary terms, computed on
   the drawn rows, or else on the minibatch restricted to ``Columns.LOSS_MASK`` rows; every term is logged
   under the module id, with ``aux_from_source``, ``aux_replay_samples`` (lifetime) and ``replay_size``.
   With a reference policy (``set_reference``, e.g. the behaviour-cloned policy PPO starts from) and
   ``reference_kl_coeff`` > 0, KL(pi || pi_ref) on the minibatch's states is added: PPO in an imperfect
   world model improves on its clone instead of drifting away from what the real videos taught it. The
   reference's logits are computed once per train batch (``_make_batch_if_necessary``), not per minibatch.
   During the first ``critic_warmup_steps`` steps the loss is the value loss alone: the critic learns
   the policy's values before its advantages move the policy (a fresh critic's noise otherwise does).
3. ``compute_gradients``: during the first ``freeze_vision_steps`` steps the vision encoder's gradients
   are dropped (its weights and Adam moments stay untouched); in a single learner they are not even
   computed (the encoder's parameters stop requiring grad for the step), and the contrastive term, which
   would train only that encoder and its own query head, is skipped.
4. ``apply_gradients``: the optimizer step, then the momentum (EMA) update of the key encoder and the
   enqueue of this step's (unmasked) keys. The step counter is a module buffer, so a restored checkpoint
   resumes the freeze schedule where it stopped.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core import ALL_MODULES
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing

from .aux_losses import contrastive_loss, language_matching_loss, random_shift
from .rl_module import SimaRLModule

LEARNER_DEFAULTS: dict[str, Any] = {
    "language_coeff": 0.1,  # lambda: weight of the CLIP-style language-matching loss (0 switches it off)
    "contrastive_coeff": 0.1,  # gamma: weight of the MoCo-style contrastive loss (0 switches it off)
    "clip_temperature": None,  # None: learned temperature (init model_config clip_init_temperature); float: fixed
    "moco_temperature": 0.2,
    "moco_momentum": 0.99,  # key encoder EMA per gradient step
    "moco_queue_size": None,  # None: the module's model_config moco_queue_size; int: re-size the queue
    "freeze_vision_steps": 0,  # no vision-encoder updates for the first N gradient steps
    "reference_kl_coeff": 0.0,  # weight of KL(pi || pi_ref) to the reference policy (set_reference); 0: off
    "critic_warmup_steps": 0,  # the first N gradient steps train the value function only
    # None: the auxiliary losses use the PPO minibatch. Else an object whose ``sample()`` returns
    # {"image": uint8 [B, H, W, 3], "mission": int [B, L]} (e.g. pipelines.replay_aux_batches, drawing from
    # the shared replay) or None when it has nothing yet (then the PPO minibatch again).
    "aux_source": None,
}

# Metric names logged under (module_id, name).
LANGUAGE_LOSS_KEY = "language_matching_loss"
LANGUAGE_ACC_KEY = "language_matching_accuracy"
CLIP_TEMPERATURE_KEY = "clip_temperature"
CONTRASTIVE_LOSS_KEY = "contrastive_loss"
CONTRASTIVE_ACC_KEY = "contrastive_accuracy"
QUEUE_FILL_KEY = "moco_queue_fill"
AUX_REPLAY_SAMPLES_KEY = "aux_replay_samples"  # lifetime count of aux rows drawn from aux_source
AUX_FROM_SOURCE_KEY = "aux_from_source"  # 1.0 when this step's aux losses used aux_source, else 0.0
REPLAY_SIZE_KEY = "replay_size"  # transitions the aux source's replay held at its last reply
VISION_FROZEN_KEY = "vision_frozen"
REFERENCE_KL_KEY = "reference_kl"  # KL(pi || pi_ref) on the minibatch
CRITIC_WARMUP_KEY = "critic_warmup"  # 1.0 while the loss is the value loss alone
GRADIENT_STEPS_KEY = "sima_gradient_steps"
# Seconds per update, logged under ALL_MODULES (genie-sima train reports them as its time split).
MAKE_BATCH_S_KEY = "make_batch_s"  # the learner connector (GAE's value forward over the train batch)
REFERENCE_S_KEY = "reference_s"  # the reference policy's logits for the train batch
AUX_DRAW_S_KEY = "aux_draw_s"  # drawing (and decoding) the auxiliary losses' rows from aux_source
REFERENCE_LOGITS = "reference_logits"  # train-batch column: the reference policy's logits per row


def resolve_learner_config(learner_config_dict: dict | None) -> dict[str, Any]:
    given = dict(learner_config_dict or {})
    unknown = sorted(set(given) - set(LEARNER_DEFAULTS))
    if unknown:
        raise ValueError(f"SimaPPOLearner learner_config_dict: unknown keys {unknown}; "
                         f"known keys: {sorted(LEARNER_DEFAULTS)}")
    cfg = {**LEARNER_DEFAULTS, **given}
    for k in ("language_coeff", "contrastive_coeff", "reference_kl_coeff", "critic_warmup_steps"):
        if float(cfg[k]) < 0:
            raise ValueError(f"SimaPPOLearner: {k}={cfg[k]} must be >= 0")
    if not 0.0 <= float(cfg["moco_momentum"]) <= 1.0:
        raise ValueError(f"SimaPPOLearner: moco_momentum={cfg['moco_momentum']} must be in [0, 1]")
    if cfg["clip_temperature"] is not None and float(cfg["clip_temperature"]) <= 0:
        raise ValueError(f"SimaPPOLearner: clip_temperature={cfg['clip_temperature']} must be > 0 (or None: learned)")
    if float(cfg["moco_temperature"]) <= 0:
        raise ValueError(f"SimaPPOLearner: moco_temperature={cfg['moco_temperature']} must be > 0")
    if cfg["aux_source"] is not None and not callable(getattr(cfg["aux_source"], "sample", None)):
        raise ValueError(f"SimaPPOLearner: aux_source={cfg['aux_source']!r} has no sample() method")
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

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        """RLlib's default (one Adam per module, lr from ``config.lr``), fused: one kernel steps every parameter
        instead of a Python loop per tensor (this policy on 2 CPU threads: 4.8 -> 0.8 ms per step)."""
        params = self.get_parameters(self._module[module_id])
        self.register_optimizer(module_id=module_id, optimizer=torch.optim.Adam(params, fused=True), params=params,
                                lr_or_lr_schedule=config.lr)

    def set_reference(self, state: dict) -> None:
        """Freeze a copy of the module with weights ``state`` (a policy's state dict) as the reference the KL
        term pulls towards. Not checkpointed: ``genie-sima train`` sets it again from --init-policy on resume."""
        import copy

        self._reference = {}
        for module_id, module in self._sima_modules():
            ref = copy.deepcopy(module)
            ref.load_state_dict({**ref.state_dict(), **{k: v.to(module.num_updates.device) for k, v in state.items()}})
            ref.eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self._reference[module_id] = ref

    def _sima_modules(self):
        for module_id in self.module.keys():
            module = self.module[module_id].unwrapped()
            if isinstance(module, SimaRLModule):
                yield module_id, module

    def _vision_frozen(self, module: SimaRLModule) -> bool:
        return int(module.num_updates) < int(self.sima_config["freeze_vision_steps"])

    # ---- one train batch ----------------------------------------------------------------------------------
    def _make_batch_if_necessary(self, training_data):
        """The learner connector's train batch (GAE runs here, without autograd: nothing is differentiated
        through a train batch), plus the reference policy's logits for every row: the reference is frozen, so its forward runs once per train batch, not once per minibatch and
        epoch (``num_epochs`` times fewer reference forwards; the KL term is unchanged)."""
        t0 = time.perf_counter()
        with torch.no_grad():  # RLlib's GAE runs the value forward over the whole batch with autograd on
            batch = super()._make_batch_if_necessary(training_data)
        _log_seconds(self.metrics, MAKE_BATCH_S_KEY, time.perf_counter() - t0)
        reference = getattr(self, "_reference", {})
        if batch is None or not reference or float(self.sima_config["reference_kl_coeff"]) <= 0:
            return batch
        t0 = time.perf_counter()
        for module_id, rows in batch.policy_batches.items():
            ref = reference.get(module_id)
            if ref is not None:
                rows[REFERENCE_LOGITS] = _reference_logits(ref, rows[Columns.OBS])
        _log_seconds(self.metrics, REFERENCE_S_KEY, time.perf_counter() - t0)
        return batch

    # ---- one minibatch ------------------------------------------------------------------------------------
    def _update(self, batch):
        # The aux rows are drawn BEFORE the forward: when aux_source has rows, the module's forward_train skips
        # its own auxiliary projections of the PPO minibatch (they would be computed and thrown away).
        self._drawn: dict[str, dict[str, torch.Tensor]] = {}
        self._wanted: dict[str, dict[str, bool]] = {}
        restore: dict[str, dict[str, bool]] = {}
        try:
            for module_id, module in self._sima_modules():
                restore[module_id] = module.aux_terms
                frozen = self._vision_frozen(module)
                # While the vision encoder is frozen the contrastive term trains nothing the policy uses (its
                # gradient reaches only that encoder, whose gradients are dropped, and its own query head): off.
                self._wanted[module_id] = terms = {**module.aux_terms,
                                                   "contrastive": module.aux_terms["contrastive"] and not frozen}
                if self.module[module_id] is module:  # not DDP-wrapped: DDP expects the parameters it was built with
                    # A frozen encoder's backward (its gradients are dropped anyway) is not computed at all.
                    module.vision.requires_grad_(not frozen)
                t0 = time.perf_counter()
                drawn = self._aux_rows(module) if any(terms.values()) else None
                _log_seconds(self.metrics, AUX_DRAW_S_KEY, time.perf_counter() - t0)
                if drawn is not None:
                    self._drawn[module_id] = drawn
                module.aux_terms = {k: False for k in terms} if drawn is not None else terms
            return super()._update(batch)
        finally:
            for module_id, module in self._sima_modules():
                module.aux_terms = restore.get(module_id, module.aux_terms)
                module.vision.requires_grad_(True)
            self._drawn, self._wanted = {}, {}  # per minibatch: nothing carries over to a direct loss call

    # ---- loss ---------------------------------------------------------------------------------------------
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        total = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        module = self.module[module_id].unwrapped()
        if not isinstance(module, SimaRLModule):
            return total
        cfg = self.sima_config
        terms = getattr(self, "_wanted", {}).get(module_id, module.aux_terms)
        warmup = int(module.num_updates) < int(cfg["critic_warmup_steps"])
        logs: dict[str, Any] = {VISION_FROZEN_KEY: float(self._vision_frozen(module)),
                                GRADIENT_STEPS_KEY: int(module.num_updates), CRITIC_WARMUP_KEY: float(warmup)}
        mask = batch.get(Columns.LOSS_MASK)
        if warmup:
            total = config.vf_loss_coeff * _masked_mean(self._value_loss(module, config, batch, fwd_out), mask)
        ref = getattr(self, "_reference", {}).get(module_id)
        if ref is not None and float(cfg["reference_kl_coeff"]) > 0:
            ref_logits = batch[REFERENCE_LOGITS] if REFERENCE_LOGITS in batch else _reference_logits(
                ref, batch[Columns.OBS])  # a direct loss call, with no train batch made by this learner
            logp = torch.log_softmax(fwd_out[Columns.ACTION_DIST_INPUTS], -1)
            kl = (logp.exp() * (logp - torch.log_softmax(ref_logits, -1))).sum(-1)  # [B] KL(pi || pi_ref)
            kl = _masked_mean(kl, mask)
            if not warmup:
                total = total + float(cfg["reference_kl_coeff"]) * kl
            logs[REFERENCE_KL_KEY] = kl.detach()
        # The auxiliary terms' rows: from aux_source (no mask: every row is a real transition) or, while it has
        # nothing, the PPO minibatch's own forward outputs under Columns.LOSS_MASK.
        drawn = getattr(self, "_drawn", {}).get(module_id)
        if drawn is not None:
            aux_out, mission, mask = self._aux_forward(module, drawn, terms), drawn["mission"], None
        else:
            aux_out, mission, mask = fwd_out, batch[Columns.OBS]["mission"], batch.get(Columns.LOSS_MASK)
        source = cfg["aux_source"]
        if source is not None:
            logs.update({AUX_FROM_SOURCE_KEY: float(drawn is not None),
                         REPLAY_SIZE_KEY: int(getattr(source, "replay_size", 0))})
            self.metrics.log_value((module_id, AUX_REPLAY_SAMPLES_KEY), 0 if drawn is None else len(mission),
                                   reduce="lifetime_sum")
        if terms["language"]:
            scale = module.aux.logit_scale(cfg["clip_temperature"])
            lang, acc = language_matching_loss(aux_out[SimaRLModule.CLIP_IMAGE], aux_out[SimaRLModule.CLIP_TEXT],
                                               mission, scale, mask)
            total = total + float(cfg["language_coeff"]) * lang
            logs.update({LANGUAGE_LOSS_KEY: lang.detach(), LANGUAGE_ACC_KEY: acc,
                         CLIP_TEMPERATURE_KEY: 1.0 / float(torch.as_tensor(scale).detach())})
        if terms["contrastive"]:
            queue = module.aux.queue
            con, acc = contrastive_loss(aux_out[SimaRLModule.MOCO_QUERY], aux_out[SimaRLModule.MOCO_KEY],
                                        queue.negatives(), float(cfg["moco_temperature"]), mask)
            total = total + float(cfg["contrastive_coeff"]) * con
            keys = aux_out[SimaRLModule.MOCO_KEY]
            self._pending_keys[module_id] = (keys if mask is None else keys[mask.bool()]).detach()
            logs.update({CONTRASTIVE_LOSS_KEY: con.detach(), CONTRASTIVE_ACC_KEY: acc,
                         QUEUE_FILL_KEY: int(queue.filled) / max(1, queue.size)})
        self.metrics.log_dict(logs, key=module_id, window=1)
        return total

    @staticmethod
    def _value_loss(module: SimaRLModule, config, batch, fwd_out) -> torch.Tensor:
        """PPO's clipped squared value error per row [B] (what RLlib's PPO loss weighs by vf_loss_coeff)."""
        values = module.compute_values(batch, embeddings=fwd_out.get(Columns.EMBEDDINGS))
        err = (values - batch[Postprocessing.VALUE_TARGETS]) ** 2
        return err.clamp(0, config.vf_clip_param)

    def _aux_rows(self, module: SimaRLModule) -> dict[str, torch.Tensor] | None:
        """A batch from aux_source as tensors on the module's device, or None (no source, or it is empty)."""
        source = self.sima_config["aux_source"]
        drawn = None if source is None else source.sample()
        if drawn is None:
            return None
        device = module.num_updates.device
        return {"image": torch.as_tensor(drawn["image"], device=device),  # uint8 [B, H, W, 3]
                "mission": torch.as_tensor(drawn["mission"], dtype=torch.long, device=device)}  # [B, L]

    @staticmethod
    def _aux_forward(module: SimaRLModule, drawn: dict[str, torch.Tensor], terms: dict[str, bool]
                     ) -> dict[str, torch.Tensor]:
        """The auxiliary projections of ``SimaRLModule._forward_train``, for rows that are not in the PPO batch."""
        images, out = drawn["image"], {}
        if terms["language"]:
            out[SimaRLModule.CLIP_IMAGE] = module.aux.clip_image(module.encode_vision(images))  # [B, P]
            out[SimaRLModule.CLIP_TEXT] = module.aux.clip_text(module.encode_language(drawn["mission"]))  # [B, P]
        if terms["contrastive"]:
            pad = int(module.cfg["augment_pad"])
            out[SimaRLModule.MOCO_QUERY] = module.aux.moco_query(module.encode_vision(random_shift(images, pad)))
            out[SimaRLModule.MOCO_KEY] = module.aux.keys(random_shift(images, pad))
        return out

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
            terms = getattr(self, "_wanted", {}).get(module_id, module.aux_terms)  # not the forward's switch
            if hasattr(module, "aux") and terms["contrastive"]:
                module.aux.momentum_update_(module.vision, momentum)
                if keys is not None:
                    module.aux.queue.enqueue(keys)


def _reference_logits(reference, obs: dict, chunk: int = 1024) -> torch.Tensor:
    """The frozen reference policy's action-distribution inputs for ``obs`` [N, ...], in chunks of ``chunk`` rows."""
    n = len(obs["image"])
    with torch.no_grad():
        return torch.cat([reference._forward({Columns.OBS: {k: v[i:i + chunk] for k, v in obs.items()}})
                          [Columns.ACTION_DIST_INPUTS] for i in range(0, n, chunk)])  # [N, A]


def _log_seconds(metrics, key: str, seconds: float) -> None:
    """Seconds summed over one ``update`` (a "sum" metric restarts at every reduce of the learner's metrics)."""
    metrics.log_value((ALL_MODULES, key), seconds, reduce="sum")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    mask = mask.bool()
    return x[mask].mean() if mask.any() else x.sum() * 0.0
