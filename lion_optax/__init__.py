"""Lion (Chen et al. 2023) for optax: fused update, bfloat16 momentum, sharding helpers.

Depends only on jax, optax and numpy.
"""

from lion_optax._lion import (
    ScaleByLionState,
    adamw_to_lion_hparams,
    from_adamw,
    lion,
    scale_by_lion,
)
from lion_optax.masks import decay_mask
from lion_optax.sharding import state_shardings

__all__ = [
    "ScaleByLionState",
    "adamw_to_lion_hparams",
    "decay_mask",
    "from_adamw",
    "lion",
    "scale_by_lion",
    "state_shardings",
]

__version__ = "0.1.0"
