"""Lion (Chen et al. 2023) for optax: fused update, bfloat16 / int8 momentum, sharding helpers.

Depends only on jax, optax and numpy.
"""

from lion_optax import quantize
from lion_optax._lion import (
    ScaleByLionQuantizedState,
    ScaleByLionState,
    adamw_to_lion_hparams,
    from_adamw,
    lion,
    scale_by_lion,
    stochastic_apply_updates,
)
from lion_optax.distributed import distributed_lion
from lion_optax.fused import FusedLion, fused_lion
from lion_optax.masks import decay_mask
from lion_optax.sharding import state_shardings, zero_shardings

__all__ = [
    "FusedLion",
    "ScaleByLionQuantizedState",
    "ScaleByLionState",
    "adamw_to_lion_hparams",
    "decay_mask",
    "distributed_lion",
    "from_adamw",
    "fused_lion",
    "lion",
    "quantize",
    "scale_by_lion",
    "state_shardings",
    "stochastic_apply_updates",
    "zero_shardings",
]

__version__ = "0.1.0"
