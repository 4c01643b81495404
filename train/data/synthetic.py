"""`data.name = "synthetic"`: random examples of the configured shapes, for benchmarks and
compile checks without data."""

from __future__ import annotations

import numpy as np

from train.data import pack


class SyntheticSource:
    """Random examples of the configured shapes; item i depends only on (stream_seed, i)."""

    def __init__(self, cfg, length: int, stream_seed: int):
        self.kind, self.length, self.stream_seed = cfg.kind, int(length), int(stream_seed)
        self.image_shape = (int(cfg.image_size),) * 2 + (int(cfg.channels),)
        self.num_classes, self.seq_len = int(cfg.num_classes), int(cfg.seq_len)
        self.vocab_size = int(cfg.vocab_size)
        self.eos_id = -1 if cfg.document_mask else None  # one document per window

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        rng = np.random.default_rng([self.stream_seed, int(i)])
        if self.kind == "image":
            return {"image": rng.uniform(-1, 1, self.image_shape).astype(np.float32),
                    "label": np.int32(rng.integers(self.num_classes))}
        return pack.lm_example(rng.integers(0, self.vocab_size, self.seq_len + 1), eos_id=self.eos_id)
