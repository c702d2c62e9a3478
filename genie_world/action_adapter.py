"""Real actions <-> latent actions, fitted from a few hundred labelled transitions.

A latent action describes an *effect* ("the agent now faces north", "it moved east"), not a key:
in BabyAI, "face north" is `left` from east and `right` from west. So the adapter is conditioned on
the state the action was taken in: an L2-regularised logistic regression
``p(real | latent, tokens present in frame t)`` with one weight per (latent, token, real action),
fitted on labelled transitions where the frame changed. The tokenizer gives each tile appearance (the
agent facing each way included) its own token, so a few hundred labels suffice.

latent -> real: the most probable real action for (latent, state) -- how an agent's latent choice
becomes a key press. real -> latent, how keys drive the world model: with a ``key_model``
(``KeyToLatent``, the bundle's ``action_adapter.safetensors``), the latent the key most likely causes
in this state, read off the token grid; without one, the latent under which that real action is most
probable in that state, and real actions that never changed the frame (a no-op, e.g. ``done``) map to
the latent the LAM gives unchanged transitions.
"""

from __future__ import annotations

import numpy as np
import torch


def _presence(context: np.ndarray, tokens: np.ndarray) -> torch.Tensor:
    """Binary [N, K] presence of each known token in each frame's token ids [N, P]."""
    context = np.asarray(context)
    return torch.from_numpy((context[:, :, None] == tokens[None, None, :]).any(1).astype(np.float32))


class ActionAdapter:
    def __init__(self, num_real: int, num_latent: int, tokens=None, weights=None, bias=None,
                 noop_latent: int = 0, real_names=None, num_labelled: int = 0, no_effect_real=None):
        self.num_real, self.num_latent = num_real, num_latent
        self.tokens = np.asarray(tokens if tokens is not None else [], dtype=np.int64)  # [K]
        k = len(self.tokens)
        self.weights = torch.zeros(num_latent, k, num_real) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.bias = torch.zeros(num_latent, num_real) if bias is None else torch.as_tensor(bias, dtype=torch.float32)
        self.noop_latent = int(noop_latent)
        self.real_names = list(real_names) if real_names else [str(i) for i in range(num_real)]
        self.num_labelled = int(num_labelled)
        # Real actions never seen changing the frame: keys for them drive the no-op latent.
        self.no_effect_real = sorted(no_effect_real if no_effect_real is not None else range(num_real))
        self.key_model = None  # KeyToLatent: real -> latent from the token grid (see key_to_latent.py)

    @classmethod
    def fit(cls, real, latent, changed, context, num_real: int, num_latent: int, max_transitions: int = 200,
            real_names=None, l2: float = 1e-3, iters: int = 300) -> "ActionAdapter":
        real, latent = np.asarray(real)[:max_transitions], np.asarray(latent)[:max_transitions]
        changed, context = np.asarray(changed, bool)[:max_transitions], np.asarray(context)[:max_transitions]
        still = latent[~changed]
        noop = int(np.bincount(still, minlength=num_latent).argmax()) if still.size else 0
        r, a, ctx = real[changed], latent[changed], context[changed]
        tokens = np.unique(ctx) if ctx.size else np.zeros(0, np.int64)
        adapter = cls(num_real, num_latent, tokens, noop_latent=noop, real_names=real_names,
                      num_labelled=int(changed.sum()),
                      no_effect_real=[i for i in range(num_real) if i not in set(r.tolist())])
        if r.size == 0:
            return adapter
        x = _presence(ctx, tokens)  # [N, K]
        a_t, r_t = torch.from_numpy(a).long(), torch.from_numpy(r).long()
        w = torch.zeros(num_latent, len(tokens), num_real, requires_grad=True)
        b = torch.zeros(num_latent, num_real, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logits = torch.einsum("nk,nkr->nr", x, w[a_t]) + b[a_t]  # [N, R]
            loss = torch.nn.functional.cross_entropy(logits, r_t) + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        adapter.weights, adapter.bias = w.detach(), b.detach()
        return adapter

    def _log_probs(self, latent: np.ndarray, context: np.ndarray) -> torch.Tensor:
        a = torch.as_tensor(np.asarray(latent), dtype=torch.long)
        x = _presence(context, self.tokens)
        logits = torch.einsum("nk,nkr->nr", x, self.weights[a]) + self.bias[a]
        return logits.log_softmax(-1)  # [N, R]

    def latent_to_real(self, latent, context) -> np.ndarray:
        return self._log_probs(latent, context).argmax(-1).numpy()

    def real_to_latent(self, real, context) -> np.ndarray:
        real, context = np.asarray(real), np.asarray(context)
        if self.key_model is not None:
            with torch.no_grad():
                logits = self.key_model(torch.as_tensor(context, dtype=torch.long), torch.as_tensor(real, dtype=torch.long))
            return logits.argmax(-1).numpy()
        n = len(real)
        scores = torch.stack([self._log_probs(np.full(n, a), context)[torch.arange(n), torch.as_tensor(real)]
                              for a in range(self.num_latent)], dim=1)  # [N, A]
        out = scores.argmax(-1).numpy()
        out[np.isin(real, self.no_effect_real)] = self.noop_latent
        return out

    def accuracy(self, real, latent, changed, context) -> float:
        changed = np.asarray(changed, bool)
        if not changed.any():
            return float("nan")
        pred = self.latent_to_real(np.asarray(latent)[changed], np.asarray(context)[changed])
        return float((pred == np.asarray(real)[changed]).mean())

    def to_json(self) -> dict:
        return {**({"key_model": self.key_model.config} if self.key_model is not None else {}), "num_real": self.num_real, "num_latent": self.num_latent, "tokens": self.tokens.tolist(),
                "weights": self.weights.tolist(), "bias": self.bias.tolist(), "noop_latent": self.noop_latent,
                "real_names": self.real_names, "num_labelled": self.num_labelled,
                "no_effect_real": self.no_effect_real}

    @classmethod
    def from_json(cls, d: dict, key_model_state: dict | None = None) -> "ActionAdapter":
        """``key_model_state``: the KeyToLatent weights (``action_adapter.safetensors``) when ``d`` names one."""
        adapter = cls(d["num_real"], d["num_latent"], d["tokens"], d["weights"], d["bias"], d["noop_latent"],
                      d.get("real_names"), d.get("num_labelled", 0), d.get("no_effect_real"))
        if "key_model" in d:
            from .key_to_latent import KeyToLatent

            if key_model_state is None:
                raise ValueError("the adapter names a key model but its weights were not given")
            adapter.key_model = KeyToLatent(**d["key_model"])
            adapter.key_model.load_state_dict(key_model_state, strict=True)
            adapter.key_model.eval()
        return adapter
