"""Train state, sharded initialisation, and the jitted train / eval steps.

The state is a `TrainState` NamedTuple of plain pytrees (params as a pure dict), so it
jits, donates and checkpoints without wrappers; the model is rebuilt from the static
`graphdef` with `nnx.merge` inside the step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import lion_optax
from models import partitioning


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # pure dict of float32 (param_dtype) arrays
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)


BATCH_SPEC = P(("data", "fsdp"))


def abstract_model(task, mesh, rules):
    """(graphdef, abstract params with NamedShardings) without allocating anything."""
    with partitioning.sharding_context(mesh, rules):
        model = nnx.eval_shape(lambda: task.build(nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        shardings = partitioning.state_shardings(state, mesh, rules)
    params = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
    return graphdef, params


def state_shardings(abstract_params, tx, mesh) -> TrainState:
    replicated = NamedSharding(mesh, P())
    return TrainState(
        step=replicated,
        params=jax.tree.map(lambda p: p.sharding, abstract_params),
        opt_state=lion_optax.state_shardings(tx, abstract_params),
        rng=replicated,
    )


def init_state(task, tx, shardings: TrainState, mesh, rules, seed: int) -> TrainState:
    """The TrainState created directly in `shardings` by one jitted init."""

    def init(key):
        model = task.build(nnx.Rngs(params=key))
        params = nnx.to_pure_dict(nnx.state(model))
        return TrainState(jnp.zeros([], jnp.int32), params, tx.init(params), key)

    with partitioning.sharding_context(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))


def abstract_state(abstract_params, shardings: TrainState, tx) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the train state: the restore target."""
    shapes = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32), abstract_params,
        jax.eval_shape(tx.init, abstract_params), jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _microbatches(batch, num: int):
    """[B, ...] -> [num, B/num, ...]; microbatch i is rows i::num, so each microbatch stays
    spread over every data shard without moving data between devices."""
    def split(x):
        x = x.reshape((x.shape[0] // num, num) + x.shape[1:]).swapaxes(0, 1)
        return partitioning.constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(split, batch)


def make_train_step(task, graphdef, tx, lr_schedule, grad_accum_steps: int,
                    nan_at_step: int | None = None):
    """Pure `(state, batch) -> (state, metrics)`; jit it with donated state, and trace it
    inside `partitioning.sharding_context(mesh, rules)`.

    With `grad_accum_steps > 1` the batch is split into microbatches whose float32
    gradients are summed by a `lax.scan`, then averaged: one optimizer update per step.
    `metrics["nonfinite"]` is 1.0 when the loss or a gradient was NaN/Inf (the optimizer,
    wrapped in `optax.apply_if_finite`, then leaves the state unchanged). `nan_at_step`
    poisons the gradients of that step, for fault-injection tests.
    """

    def loss_fn(params, batch, rng):
        return task.loss(nnx.merge(graphdef, params), batch, rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated_grads(params, batch, rng):
        micro = _microbatches(batch, grad_accum_steps)

        def add(carry, xs):
            one, i = xs
            out = grad_fn(params, one, jax.random.fold_in(rng, i))
            return jax.tree.map(lambda c, o: c + o.astype(jnp.float32), carry, out), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                             jax.eval_shape(grad_fn, params, first, rng))
        sums, _ = jax.lax.scan(add, zeros, (micro, jnp.arange(grad_accum_steps)))
        return jax.tree.map(lambda x: x / grad_accum_steps, sums)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if grad_accum_steps == 1:
            (loss, aux), grads = grad_fn(state.params, batch, rng)
        else:
            (loss, aux), grads = accumulated_grads(state.params, batch, rng)
        if nan_at_step is not None:
            poison = jnp.where(state.step == nan_at_step, jnp.nan, 0.0)
            grads = jax.tree.map(lambda g: g + poison.astype(g.dtype), grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state.step),
                   "nonfinite": 1.0 - finite.astype(jnp.float32), **aux}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return train_step


def make_eval_step(task, graphdef):
    """Pure `(params, batch) -> sums` (loss, accuracy, count) over valid examples."""

    def eval_step(params, batch):
        return task.eval_sums(nnx.merge(graphdef, params), batch)

    return eval_step
