"""Distributed Lion in the trainer: the train step inside `jax.shard_map` over the vote axis.

    config.optimizer.lion.distributed = "majority"   # "" (off) | "majority" | "mean"
    config.optimizer.lion.vote_axis = "data"

Each worker along the vote axis (N of them) computes the loss and gradients of its own
slice of the batch (gradient accumulation runs locally), clips them by their own global
norm, and runs `lion_optax.distributed_lion`, which exchanges only 1-bit signs. The step
is manual over the vote axis only (`axis_names={axis}`); the other mesh axes stay under
GSPMD, so the model may still be sharded over `fsdp` / `tensor` (XLA then reshards the
flat sign buffer over those axes as it needs). The vote axis must be a batch axis (`data`
or `fsdp`) over which no parameter is sharded. Each worker folds its index into the step's
random key, so workers draw different dropout masks.

State layout: every optimizer state leaf (momentum, counters, the non-finite bookkeeping
of `optax.apply_if_finite`) has a leading axis of size N sharded over the vote axis, so
a checkpoint holds every worker's momentum and a resume is bitwise. Parameters, step and
rng stay replicated over the axis (identical on every worker by construction).

Non-finite steps are global: if any worker's loss or gradients are NaN/Inf, every
worker's gradients are poisoned, so all of them skip the update together.

Metrics: `loss` (and the task's aux metrics) is the mean over workers of their local
means; `grad_norm` is the mean over workers of the local (pre-clipping) gradient norms,
not the norm of the averaged gradient, which no worker ever sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train.errors import ConfigError
from train.mesh import BATCH_AXES
from train.nonfinite import count_skipped_step, poison_at



def check_mesh(mesh, axis: str, rules: Sequence[tuple[str, object]]) -> None:
    """Raises ConfigError unless `axis` is a batch axis of `mesh` that shards no parameter."""
    if axis not in mesh.axis_names:
        raise ConfigError(f"optimizer.lion.vote_axis {axis!r} is not a mesh axis; "
                          f"mesh axes are {list(mesh.axis_names)}")
    if axis not in BATCH_AXES:
        raise ConfigError(f"optimizer.lion.vote_axis must be a data-parallel axis {BATCH_AXES}, got {axis!r}")
    for name, target in rules:
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if not name.startswith("act_") and axis in targets:
            raise ConfigError(f"distributed Lion votes over {axis!r}, but sharding rule {name!r} -> "
                              f"{target!r} shards parameters over it; vote over an axis of replicas")


def worker_shardings(opt_shardings, axis: str):
    """Each leaf's NamedSharding with a leading per-worker dimension sharded over `axis`."""

    def one(sharding: NamedSharding) -> NamedSharding:
        spec = tuple(sharding.spec)
        if any(axis == s or (isinstance(s, tuple) and axis in s) for s in spec):
            raise ConfigError(f"distributed Lion: optimizer state sharded over the vote axis {axis!r}")
        return NamedSharding(sharding.mesh, P(axis, *spec))

    return jax.tree.map(one, opt_shardings)


def for_every_worker(opt_state, num: int):
    """One worker's optimizer state -> the state of all `num` workers (leading axis)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x[None], (num,) + x.shape), opt_state)


def make_voting_train_step(grad_fn, tx, lr_schedule, axis: str, nan_at_step: int | None = None):
    """Pure `(state, batch) -> (state, metrics)` like `steps.make_train_step`, with the
    loss, gradients and update of each worker inside `jax.shard_map` over `axis` (the mesh
    comes from the `sharding_context` the step is traced in); see the module doc."""
    def worker(state, batch):
        opt_state = jax.tree.map(lambda x: x[0], state.opt_state)
        # Workers draw different randomness (e.g. dropout) for their different examples.
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(axis))
        (loss, aux), grads = grad_fn(state.params, batch, rng)
        grads = poison_at(grads, state.step, nan_at_step)
        grad_norm = optax.global_norm(grads)
        bad = jax.lax.psum((~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))).astype(jnp.int32), axis) > 0
        grads = jax.tree.map(lambda g: jnp.where(bad, jnp.asarray(jnp.nan, g.dtype), g), grads)
        updates, opt_state = tx.update(grads, opt_state, state.params)
        opt_state = count_skipped_step(opt_state)
        params = optax.apply_updates(state.params, updates)
        (loss, grad_norm), aux = jax.lax.pmean(((loss, grad_norm), aux), axis)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state.step),
                   "nonfinite": bad.astype(jnp.float32), **aux}
        opt_state = jax.tree.map(lambda x: x[None], opt_state)
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def train_step(state, batch):
        specs = state._replace(step=P(), params=P(), opt_state=P(axis), rng=P())
        stepped = jax.shard_map(worker, in_specs=(specs, P(axis)), out_specs=(specs, P()),
                                axis_names={axis}, check_vma=False)
        return stepped(state, batch)

    return train_step
