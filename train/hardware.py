"""Per-chip figures of accelerators (dense bf16 peak, HBM size, HBM bandwidth).

Published numbers: Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/
v4, v5e, v5p, v6e: bf16 peak, HBM capacity and bandwidth per chip) and NVIDIA's H100 / H200
datasheets (dense bf16 Tensor Core peak, HBM3 / HBM3e size and bandwidth). `usable_hbm` is
what XLA lets a program use when known (v4: 30.75 G, the budget the TPU compiler reports in
its out-of-memory error when compiling for a v4 topology), else the HBM size.
"""

from __future__ import annotations

import dataclasses

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # bf16 FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    megacore: bool = False  # two TensorCores presented as one device
    usable_hbm: float | None = None

    @property
    def hbm_limit(self) -> float:
        return self.usable_hbm or self.hbm_bytes


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1200e9, megacore=True, usable_hbm=30.75 * GiB),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9),
    "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9, megacore=True),
    "v6e": Chip("TPU v6e", 918e12, 32 * GiB, 1640e9),
    "h100": Chip("NVIDIA H100", 989e12, 80e9, 3350e9),
    "h200": Chip("NVIDIA H200", 989e12, 141e9, 4800e9),
}

# jax `device_kind` substrings -> CHIPS key (most specific first).
_DEVICE_KINDS = (("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5p", "v5p"), ("TPU v5", "v5p"),
                 ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("TPU v4", "v4"),
                 ("H100", "h100"), ("H200", "h200"))


def chip_for_device_kind(device_kind: str) -> Chip | None:
    for needle, key in _DEVICE_KINDS:
        if needle.lower() in device_kind.lower():
            return CHIPS[key]
    return None
