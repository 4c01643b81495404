"""Shardings of optimizer state, derived from the parameters' shardings."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["state_shardings"]


def state_shardings(
    optimizer: optax.GradientTransformation,
    params: Any,
    param_shardings: Any = None,
) -> Any:
    """Shardings for `optimizer.init(params)`: each param-shaped leaf like its param.

    Works for any optax transform or chain (`lion`, `inject_hyperparams`, `MultiSteps`,
    `chain(clip_by_global_norm, ...)`, `adafactor`): state leaves that mirror the parameter
    tree with the parameter's shape (momentum, accumulated gradients, ...) take its
    sharding; everything else (step counters, injected hyperparameters, Adafactor's
    factored row/column statistics) is replicated. Use the result as
    `out_shardings` of a jitted init so the state is born sharded:

        shardings = state_shardings(opt, abstract_params)
        opt_state = jax.jit(opt.init, out_shardings=shardings)(params)

    Args:
      optimizer: anything with an `init(params)` method.
      params: parameters or `jax.ShapeDtypeStruct`s (only shapes/dtypes are read).
      param_shardings: a tree like `params` of `NamedSharding`s (or `PartitionSpec`s);
        defaults to the `.sharding` of each leaf of `params`.
    """
    if param_shardings is None:
        param_shardings = jax.tree.map(lambda p: p.sharding, params)
    leaves = jax.tree.leaves(param_shardings)
    if not leaves:
        raise ValueError("state_shardings: params has no leaves")
    first = leaves[0]
    if isinstance(first, NamedSharding):
        replicated = NamedSharding(first.mesh, PartitionSpec())
    elif isinstance(first, PartitionSpec):
        replicated = PartitionSpec()
    else:
        raise TypeError(
            "state_shardings: param shardings must be NamedSharding or PartitionSpec, "
            f"got {type(first).__name__}"
        )
    abstract_state = jax.eval_shape(optimizer.init, params)

    def like_param(leaf, sharding, param):
        return sharding if tuple(leaf.shape) == tuple(param.shape) else replicated

    return optax.tree_map_params(
        optimizer,
        like_param,
        abstract_state,
        param_shardings,
        params,
        transform_non_params=lambda _: replicated,
    )
