"""``ReplayAuxBatches``: what the SIMA learner's auxiliary losses train on, drawn from the shared replay.

Handed to ``SimaPPOLearner`` as ``learner_config_dict["aux_source"]`` (the learner only knows "an object
whose ``sample()`` returns images and mission tokens, or None"), so ``sima_policy`` never imports the
pipelines. Per call: one uniform sample of ``batch_size`` transitions from the replay (one call per shard),
the token observations decoded to pixels with the world bundle's video tokenizer (on CPU, one frame per
row: no temporal context, as a replay row has none), and the missions' ids mapped to text (MissionTable,
cached) and encoded with the policy's instruction tokenizer.

Returns None while the replay is still empty: the learner then falls back to the PPO train batch.
"""

from __future__ import annotations

import time

import numpy as np


class ReplayAuxBatches:
    def __init__(self, replay_config: dict, mission_table: str, bundle: str, tokenizer_json: dict,
                 batch_size: int, max_len: int = 16):
        if int(batch_size) < 2:
            raise ValueError(f"aux_batch_size: expected >= 2 (contrastive losses need pairs), got {batch_size}")
        self.replay_config, self.mission_table = dict(replay_config), mission_table
        self.bundle, self.tokenizer_json = str(bundle), tokenizer_json
        self.batch_size, self.max_len = int(batch_size), int(max_len)
        self._replay = self._table = self._video = self._tokenizer = None
        self._texts: dict[int, str] = {}
        self.decode_s = 0.0  # time spent decoding tokens to pixels (measured, logged by nobody but bench/tests)

    def __getstate__(self):  # ship the settings, not the live handles and weights
        state = dict(self.__dict__)
        state.update(_replay=None, _table=None, _video=None, _tokenizer=None, _texts={})
        return state

    def _connect(self) -> None:
        from genie_world.bundle import load_bundle
        from sima_policy.instruction_tokenizer import InstructionTokenizer

        from .replay import ReplayConfig, ShardedReplay
        from .replay.mission_table import get_mission_table

        self._replay = ShardedReplay(ReplayConfig(**self.replay_config))
        self._table = get_mission_table(self.mission_table)
        self._video = load_bundle(self.bundle, parts=("tokenizer",)).tokenizer.eval()
        self._tokenizer = InstructionTokenizer.from_json(self.tokenizer_json)

    @property
    def replay_size(self) -> int:
        return 0 if self._replay is None else self._replay.known_size

    def sample(self) -> dict | None:
        """{"image": uint8 [B, H, W, 3], "mission": int64 [B, L]} from the replay, or None while it is empty."""
        import ray
        import torch

        from genie_world.patches import to_uint8

        if self._replay is None:
            self._connect()
        try:
            rows = self._replay.sample(self.batch_size)
        except ValueError as e:
            if "no transitions" in str(e):
                return None
            raise
        t0 = time.perf_counter()
        with torch.no_grad():
            ids = torch.as_tensor(rows["obs_tokens"].astype(np.int64))[:, None]  # [B, 1, P]
            pix = self._video.decode(ids)[:, 0]  # [B, H, W, 3] in about [0, 1]
            image = to_uint8(pix).numpy()
        self.decode_s += time.perf_counter() - t0
        unknown = sorted(set(rows["mission_id"].tolist()) - set(self._texts))
        if unknown:
            self._texts.update(zip(unknown, ray.get(self._table.texts_of.remote(unknown))))
        texts = [self._texts[int(i)] for i in rows["mission_id"]]
        return {"image": image, "mission": self._tokenizer.encode_batch(texts, self.max_len)}  # [B, L]
