"""SlotKVCache: temporal keys/values for a batch of envs that step and reset independently.

``KVCache`` (in ``st_transformer``) serves one batch that moves in lockstep from frame 0. A served
world is different: env 3 may be at step 412 while env 4 was just reset, and a server steps any
subset of its envs per call. So each env has its own ring of ``window + 1`` slots per layer:

- frame t of an env's episode is written to slot ``t % (window + 1)`` with its keys rotated by its
  own episode position t (rotary positions are relative, so positions restart at 0 on reset);
- a new frame attends to the valid slots (the env's last ``window`` frames) plus itself, which is
  the same window ``KVCache(max_frames=window)`` gives;
- resetting an env clears its valid flags: no copy, no other env touched.

Keys/values are stored [E, S, P, D] (env, slot, patch, channels), the model's activation layout:
a contiguous range of envs is a view (``narrow``) and stepping it writes straight into the shared
buffers; writing an env's new frame is one contiguous [P, D] block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SlotKVCache:
    k: list[torch.Tensor]  # per layer [E, S, P, H*dh], S = window + 1
    v: list[torch.Tensor]
    valid: torch.Tensor  # [E, S] bool: slot holds a frame of the env's current episode, inside the window
    step: torch.Tensor  # [E] long: frames committed this episode = the next frame's position
    num_patches: int

    @classmethod
    def empty(cls, num_envs: int, num_patches: int, layers: int, heads: int, head_dim: int, window: int,
              device=None, dtype=torch.float32) -> "SlotKVCache":
        if window < 1:
            raise ValueError(f"window {window}: need at least one frame of temporal context")
        s = window + 1
        shape = (num_envs, s, num_patches, heads * head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
                   torch.zeros(num_envs, s, dtype=torch.bool, device=device),
                   torch.zeros(num_envs, dtype=torch.long, device=device), num_patches)

    @property
    def num_envs(self) -> int:
        return self.valid.shape[0]

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def narrow(self, start: int, length: int) -> "SlotKVCache":
        """Envs [start, start+length) as views: writes land in this cache."""
        return SlotKVCache([k.narrow(0, start, length) for k in self.k], [v.narrow(0, start, length) for v in self.v],
                           self.valid.narrow(0, start, length), self.step.narrow(0, start, length), self.num_patches)

    def gather(self, envs: torch.Tensor) -> "SlotKVCache":
        """A copy holding ``envs`` (any order, repeats allowed: counterfactual branches)."""
        return SlotKVCache([k.index_select(0, envs) for k in self.k], [v.index_select(0, envs) for v in self.v],
                           self.valid.index_select(0, envs), self.step.index_select(0, envs), self.num_patches)

    def scatter(self, envs: torch.Tensor, sub: "SlotKVCache") -> None:
        """Write back a ``gather``ed copy (``envs`` without repeats)."""
        for dst, src in zip(self.k + self.v, sub.k + sub.v):
            dst.index_copy_(0, envs, src)
        self.valid.index_copy_(0, envs, sub.valid)
        self.step.index_copy_(0, envs, sub.step)

    def clear(self, envs: torch.Tensor) -> None:
        """Forget the history of ``envs`` (bool [E] or indices): their next frame starts an episode."""
        self.valid[envs] = False
        self.step[envs] = 0

    def write_slot(self) -> torch.Tensor:
        return self.step % self.slots  # [E]

    def attention_mask(self) -> torch.Tensor:
        """[E, S] bool: the env's valid slots plus the slot its new frame is written to."""
        mask = self.valid.clone()
        mask[torch.arange(self.num_envs, device=mask.device), self.write_slot()] = True
        return mask

    def attention_bias(self, dtype=torch.float32) -> torch.Tensor:
        """``attention_mask`` as an additive bias [E, 1, S] (one new frame): 0 where seen, -inf elsewhere."""
        bias = torch.zeros(self.valid.shape, dtype=dtype, device=self.valid.device)
        return bias.masked_fill_(~self.attention_mask(), float("-inf"))[:, None, :]

    def commit(self) -> None:
        """The frame just written becomes history; the slot after it (the oldest frame) leaves the window."""
        e = torch.arange(self.num_envs, device=self.valid.device)
        self.valid[e, self.write_slot()] = True
        self.step += 1
        self.valid[e, self.write_slot()] = False
