"""Non-finite steps: fault injection, and the step count of the updates the optimizer dropped.

The optimizer is wrapped in `optax.apply_if_finite`, so a step whose loss or gradients hold
NaN/Inf leaves parameters and optimizer state as they were; the trainer then skips or halts
(`on_nonfinite`). Both train steps (`train.steps`, `train.dlion`) use these two helpers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def poison_at(grads, step, nan_at_step: int | None):
    """`grads` with NaN added at `step == nan_at_step` (fault injection); else unchanged."""
    if nan_at_step is None:
        return grads
    poison = jnp.where(step == nan_at_step, jnp.nan, 0.0)
    return jax.tree.map(lambda g: g + poison.astype(g.dtype), grads)


def count_skipped_step(opt_state):
    """`opt_state` with every `count` in its inner state advanced when the optimizer just
    dropped a non-finite step (`optax.apply_if_finite` leaves them as they were), so the
    schedules inside the optimizer, which read its count, stay at the global step: the
    learning rate applied at step s is the `lr` logged for step s, skipped steps or not."""
    if not isinstance(opt_state, optax.ApplyIfFiniteState):
        return opt_state
    skipped = 1 - jnp.asarray(opt_state.last_finite, jnp.int32)

    def advance(path, x):
        name = getattr(path[-1], "name", getattr(path[-1], "key", None)) if path else None
        return x + skipped.astype(x.dtype) if name == "count" else x

    return opt_state._replace(inner_state=jax.tree_util.tree_map_with_path(advance, opt_state.inner_state))
