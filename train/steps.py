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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lion_optax
from models import attention, partitioning
from train import dlion
from train.errors import ConfigError
from train.mesh import BATCH_AXES
from train.nonfinite import count_skipped_step, poison_at
from train.optim import Layout


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # pure dict of float32 (param_dtype) arrays
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)


BATCH_SPEC = P(BATCH_AXES)


def abstract_model(task, mesh, rules):
    """(graphdef, abstract params with NamedShardings) without allocating anything.
    Stops with a ConfigError when the model's attention kernel cannot run on `mesh`."""
    try:
        attention.resolve(task.model_config.attention, mesh.devices.flat[0].platform)
    except attention.UnavailableAttention as e:
        raise ConfigError(f"model.attention: {e}") from None
    with partitioning.sharding_context(mesh, rules):
        model = nnx.eval_shape(lambda: task.build(nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        shardings = partitioning.variable_shardings(state, mesh, rules)
    params = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
    return graphdef, params


def train_state_shardings(abstract_params, tx, mesh, layout: Layout = Layout()) -> TrainState:
    """Shardings of the TrainState: the parameters' own, and the optimizer state's from
    `lion_optax.state_shardings`; with `layout.vote_axis` (Distributed Lion) every optimizer
    state leaf has a leading per-worker axis sharded over it (see `train.dlion`); with
    `layout.zero_axis` (ZeRO-1) the optimizer state is also split over that mesh axis."""
    replicated = NamedSharding(mesh, P())
    opt_state = lion_optax.state_shardings(tx, abstract_params, zero_axis=layout.zero_axis)
    if layout.vote_axis is not None:
        opt_state = dlion.worker_shardings(opt_state, layout.vote_axis)
    return TrainState(
        step=replicated,
        params=jax.tree.map(lambda p: p.sharding, abstract_params),
        opt_state=opt_state,
        rng=replicated,
    )


def init_state(task, tx, shardings: TrainState, mesh, rules, seed: int,
               layout: Layout = Layout(), params=None) -> TrainState:
    """The TrainState created directly in `shardings` by one jitted init (with
    `layout.vote_axis`, the optimizer state is every worker's, broadcast from one init).
    `params` (already in `shardings.params`, e.g. loaded from a checkpoint) are taken as
    they are (donated) instead of initialized; the optimizer state starts fresh."""

    def init(key, params):
        if params is None:
            params = nnx.to_pure_dict(nnx.state(task.build(nnx.Rngs(params=key))))
        opt_state = tx.init(params)
        if layout.vote_axis is not None:
            opt_state = dlion.for_every_worker(opt_state, mesh.shape[layout.vote_axis])
        return TrainState(jnp.zeros([], jnp.int32), params, opt_state, key)

    with partitioning.sharding_context(mesh, rules):
        init = jax.jit(init, out_shardings=shardings, donate_argnums=1)
        return init(jax.random.PRNGKey(seed), params)


def abstract_state(abstract_params, shardings: TrainState, tx, layout: Layout = Layout()) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the train state: the restore target."""
    opt_state = jax.eval_shape(tx.init, abstract_params)
    if layout.vote_axis is not None:
        num = shardings.step.mesh.shape[layout.vote_axis]
        opt_state = jax.eval_shape(lambda s: dlion.for_every_worker(s, num), opt_state)
    shapes = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32), abstract_params,
        opt_state, jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _microbatches(batch, num: int):
    """[B, ...] -> [num, B/num, ...]; microbatch i is rows i::num, so each microbatch stays
    spread over every data shard without moving data between devices."""
    def split(x):
        x = x.reshape((x.shape[0] // num, num) + x.shape[1:]).swapaxes(0, 1)
        return partitioning.constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(split, batch)


def make_grad_fn(task, graphdef, grad_accum_steps: int):
    """`(params, batch, rng) -> ((loss, aux), grads)` of `task.loss`; with
    `grad_accum_steps > 1` the batch is split into microbatches whose float32 gradients
    are summed by a `lax.scan`, then averaged."""

    def loss_fn(params, batch, rng):
        return task.loss(nnx.merge(graphdef, params), batch, rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        return grad_fn

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

    return accumulated_grads


def zero_grad_fn(grad_fn, grad_shardings, axis: str = "data"):
    """`grad_fn` whose gradients come out reduce-scattered over `axis` (ZeRO).

    The loss and gradients of each replica's slice of the batch are computed inside
    `jax.shard_map`, manual over `axis` only (other mesh axes stay under GSPMD), and
    each gradient is summed with `psum_scatter` onto the dimension that
    `grad_shardings` (from `lion_optax.zero_shardings`) splits over `axis`, or with
    `psum` if none does. Without this, XLA all-reduces the gradients inside the scanned
    backward pass and only slices them afterwards. Loss and gradients are the mean of the
    replicas' means, equal to the global mean for equal-sized slices; dropout draws
    per-replica keys, so with dropout the masks differ from the unsharded step's.
    """
    def dim_of(sharding) -> int | None:
        for d, entry in enumerate(sharding.spec):
            if entry == axis or (isinstance(entry, tuple) and axis in entry):
                return d
        return None

    dims = jax.tree.map(dim_of, grad_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    out_specs = jax.tree.map(lambda d: P() if d is None else P(*([None] * d + [axis])), dims,
                             is_leaf=lambda x: x is None or isinstance(x, int))

    def local(params, batch, rng):
        # Replicas draw different randomness (dropout) for their different examples.
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
        (loss, aux), grads = grad_fn(params, batch, rng)
        n = jax.lax.axis_size(axis)

        def reduce(g, d):
            if d is None:
                return jax.lax.psum(g, axis) / n
            return jax.lax.psum_scatter(g, axis, scatter_dimension=d, tiled=True) / n

        grads = jax.tree.map(reduce, grads, dims, is_leaf=lambda x: x is None or isinstance(x, int))
        return jax.lax.pmean((loss, aux), axis), grads

    def zero(params, batch, rng):
        return jax.shard_map(local, in_specs=(P(), P(axis), P()), out_specs=(P(), out_specs),
                             axis_names={axis}, check_vma=False)(params, batch, rng)

    return zero


def make_train_step(task, graphdef, tx, lr_schedule, *, grad_accum_steps: int = 1,
                    layout: Layout = Layout(), grad_shardings=None, apply_fn=None,
                    nan_at_step: int | None = None):
    """Pure `(state, batch) -> (state, metrics)`; jit it with donated state, and trace it
    inside `partitioning.sharding_context(mesh, rules)` (`train.setup` does both).

    Gradients come from `make_grad_fn` (one optimizer update per step, also with
    gradient accumulation). `metrics["nonfinite"]` is 1.0 when the loss or a gradient was
    NaN/Inf (the optimizer, wrapped in `optax.apply_if_finite`, then leaves the state
    unchanged). `nan_at_step` poisons the gradients of that step, for fault-injection
    tests. With `layout.vote_axis` the step runs Distributed Lion (`train.dlion`). With
    `layout.zero_axis` the gradients are reduce-scattered to `grad_shardings` (ZeRO,
    `lion_optax.zero_shardings`, `zero_grad_fn`), each replica updates its shard, and the
    new params are all-gathered (by the step's out_shardings). With `apply_fn`
    (`optim.fused_apply`) the step calls `apply_fn(grads, opt_state, params) -> (params,
    opt_state)` instead of `tx.update` + `optax.apply_updates`.
    """
    grad_fn = make_grad_fn(task, graphdef, grad_accum_steps)
    if layout.zero_axis is not None:
        grad_fn = zero_grad_fn(grad_fn, grad_shardings, layout.zero_axis)
    if layout.vote_axis is not None:
        return dlion.make_voting_train_step(grad_fn, tx, lr_schedule, layout.vote_axis, nan_at_step)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, aux), grads = grad_fn(state.params, batch, rng)
        grads = poison_at(grads, state.step, nan_at_step)
        grad_norm = optax.global_norm(grads)
        if apply_fn is None:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        else:
            params, opt_state = apply_fn(grads, state.opt_state, state.params)
        opt_state = count_skipped_step(opt_state)
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
