"""Shardings of optimizer state, derived from the parameters' shardings."""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["state_shardings", "zero_shardings"]


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _spec(sharding: NamedSharding, ndim: int) -> list:
    return list(sharding.spec) + [None] * (ndim - len(sharding.spec))


def _refit(sharding: NamedSharding, shape) -> NamedSharding:
    """`sharding` for an array of the parameter's rank but another shape (int8 momentum
    scales): each dimension keeps its mesh axes where they divide it, else replicates."""
    sizes = sharding.mesh.shape
    spec = [entry if dim % math.prod(sizes[a] for a in _axes(entry)) == 0 else None
            for entry, dim in zip(_spec(sharding, len(shape)), shape)]
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def _add_axis(sharding: NamedSharding, shape, axis: str) -> NamedSharding:
    """Also shard over `axis`, on the largest dimension it divides, preferring dimensions
    not sharded yet (unchanged if the parameter is already sharded over `axis`, or no
    dimension divides)."""
    sizes = sharding.mesh.shape
    spec = _spec(sharding, len(shape))
    if sizes[axis] == 1 or any(axis in _axes(e) for e in spec):
        return sharding
    for d in sorted(range(len(shape)), key=lambda d: (spec[d] is not None, -shape[d])):
        axes = _axes(spec[d]) + (axis,)
        if shape[d] % math.prod(sizes[a] for a in axes) == 0:
            spec[d] = _entry(axes)
            return NamedSharding(sharding.mesh, PartitionSpec(*spec))
    return sharding


def zero_shardings(params: Any, param_shardings: Any = None, axis: str = "data") -> Any:
    """Parameter shardings additionally split over the data-parallel `axis` (ZeRO-1).

    For optimizer state (and the gradients fed to the update) of parameters that are
    replicated over `axis`: each leaf's largest dimension divisible by the combined
    mesh axes gets `axis` appended, so every data-parallel replica stores and updates
    1/|axis| of it. Constrain the gradients to these shardings before `update` and XLA
    turns the gradient all-reduce into a reduce-scatter, updates the local shard, and
    all-gathers the new parameters (see `state_shardings(..., zero_axis=axis)`).

    Args:
      params: parameters or `jax.ShapeDtypeStruct`s (shapes are read).
      param_shardings: tree like `params` of `NamedSharding`s; defaults to each leaf's
        `.sharding`.
      axis: mesh axis to shard over, usually the data-parallel one.
    """
    if param_shardings is None:
        param_shardings = jax.tree.map(lambda p: p.sharding, params)

    def add(sharding, param):
        if not isinstance(sharding, NamedSharding):
            raise TypeError("zero_shardings needs NamedShardings (the mesh gives axis sizes), "
                            f"got {type(sharding).__name__}")
        if axis not in sharding.mesh.shape:
            raise ValueError(f"zero_shardings: mesh has no axis {axis!r} "
                             f"(axes: {tuple(sharding.mesh.shape)})")
        return _add_axis(sharding, param.shape, axis)

    return jax.tree.map(add, param_shardings, params)


def state_shardings(
    optimizer: optax.GradientTransformation,
    params: Any,
    param_shardings: Any = None,
    *,
    zero_axis: str | None = None,
) -> Any:
    """Shardings for `optimizer.init(params)`: each param-shaped leaf like its param.

    Works for any optax transform or chain (`lion`, `inject_hyperparams`, `MultiSteps`,
    `chain(clip_by_global_norm, ...)`, `adafactor`): state leaves that mirror the parameter
    tree with the parameter's shape (momentum, accumulated gradients, ...) take its
    sharding; leaves of the parameter's rank but another shape (int8 momentum scales)
    keep the axes that divide them; everything else (step counters, injected
    hyperparameters, Adafactor's factored row/column statistics) is replicated. Use the
    result as `out_shardings` of a jitted init so the state is born sharded:

        shardings = state_shardings(opt, abstract_params)
        opt_state = jax.jit(opt.init, out_shardings=shardings)(params)

    Args:
      optimizer: anything with an `init(params)` method.
      params: parameters or `jax.ShapeDtypeStruct`s (only shapes/dtypes are read).
      param_shardings: a tree like `params` of `NamedSharding`s (or `PartitionSpec`s);
        defaults to the `.sharding` of each leaf of `params`.
      zero_axis: also shard the state over this mesh axis (ZeRO-1, see
        `zero_shardings`); needs `NamedSharding`s.
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
    if zero_axis is not None:
        param_shardings = zero_shardings(params, param_shardings, zero_axis)
    abstract_state = jax.eval_shape(optimizer.init, params)

    def like_param(leaf, sharding, param):
        if tuple(leaf.shape) == tuple(param.shape):
            return sharding
        if len(leaf.shape) == len(param.shape) and isinstance(sharding, NamedSharding):
            return _refit(sharding, leaf.shape)
        return replicated

    return optax.tree_map_params(
        optimizer,
        like_param,
        abstract_state,
        param_shardings,
        params,
        transform_non_params=lambda _: replicated,
    )
