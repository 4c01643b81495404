"""Train state, sharded initialisation, and the jitted train / eval steps.

The state is a `TrainState` NamedTuple of plain pytrees (params as a pure dict), so it
jits, donates and checkpoints without wrappers; the model is rebuilt from the static
`graphdef` with `nnx.merge` inside the step.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lion_optax
from models import attention, partitioning
from train import dlion, optim
from train.errors import ConfigError


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # pure dict of float32 (param_dtype) arrays
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)


BATCH_SPEC = P(("data", "fsdp"))


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
        shardings = partitioning.state_shardings(state, mesh, rules)
    params = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
    return graphdef, params


def state_shardings(abstract_params, tx, mesh, vote_axis: str | None = None,
                    zero_axis: str | None = None) -> TrainState:
    """Shardings of the TrainState. With `vote_axis` (Distributed Lion) every optimizer
    state leaf has a leading per-worker axis sharded over it (see `train.dlion`); with
    `zero_axis` (ZeRO-1) the optimizer state is also split over that mesh axis."""
    replicated = NamedSharding(mesh, P())
    opt_state = lion_optax.state_shardings(tx, abstract_params, zero_axis=zero_axis)
    if vote_axis is not None:
        opt_state = dlion.worker_shardings(opt_state, vote_axis)
    return TrainState(
        step=replicated,
        params=jax.tree.map(lambda p: p.sharding, abstract_params),
        opt_state=opt_state,
        rng=replicated,
    )


def init_state(task, tx, shardings: TrainState, mesh, rules, seed: int,
               vote_axis: str | None = None) -> TrainState:
    """The TrainState created directly in `shardings` by one jitted init (with `vote_axis`,
    the optimizer state is every worker's, broadcast from one init)."""

    def init(key):
        model = task.build(nnx.Rngs(params=key))
        params = nnx.to_pure_dict(nnx.state(model))
        opt_state = tx.init(params)
        if vote_axis is not None:
            opt_state = dlion.for_every_worker(opt_state, mesh.shape[vote_axis])
        return TrainState(jnp.zeros([], jnp.int32), params, opt_state, key)

    with partitioning.sharding_context(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))


def abstract_state(abstract_params, shardings: TrainState, tx,
                   vote_axis: str | None = None) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the train state: the restore target."""
    opt_state = jax.eval_shape(tx.init, abstract_params)
    if vote_axis is not None:
        num = shardings.step.mesh.shape[vote_axis]
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


def make_train_step(task, graphdef, tx, lr_schedule, grad_accum_steps: int,
                    nan_at_step: int | None = None, vote_axis: str | None = None,
                    grad_shardings=None, apply_fn=None):
    """Pure `(state, batch) -> (state, metrics)`; jit it with donated state, and trace it
    inside `partitioning.sharding_context(mesh, rules)`.

    Gradients come from `make_grad_fn` (one optimizer update per step, also with
    gradient accumulation). `metrics["nonfinite"]` is 1.0 when the loss or a gradient was
    NaN/Inf (the optimizer, wrapped in `optax.apply_if_finite`, then leaves the state
    unchanged). `nan_at_step` poisons the gradients of that step, for fault-injection
    tests. With `vote_axis` the step runs Distributed Lion (`train.dlion`). With
    `grad_shardings` (ZeRO, `lion_optax.zero_shardings`) the gradients are
    reduce-scattered to the optimizer state's sharding (`zero_grad_fn`), each replica
    updates its shard, and the new params are all-gathered (by the step's out_shardings).
    With `apply_fn` (`optim.fused_apply`) the step calls `apply_fn(grads, opt_state,
    params) -> (params, opt_state)` instead of `tx.update` + `optax.apply_updates`.
    """
    grad_fn = make_grad_fn(task, graphdef, grad_accum_steps)
    if grad_shardings is not None:
        grad_fn = zero_grad_fn(grad_fn, grad_shardings)
    if vote_axis is not None:
        return dlion.make_train_step(grad_fn, tx, lr_schedule, vote_axis, nan_at_step)

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


def jit_train_step(config, task, graphdef, tx, lr_schedule, shardings: TrainState, abstract_params,
                   vote_axis: str | None = None, zero_axis: str | None = None,
                   nan_at_step: int | None = None):
    """`make_train_step` for `config`, jitted over `shardings` with the state donated: ZeRO
    gradient layout from `zero_axis`, the fused Lion apply when the config asks for it."""
    grad_shardings = lion_optax.zero_shardings(abstract_params, axis=zero_axis) if zero_axis else None
    apply_fn = optim.fused_apply(config.optimizer, config.num_steps,
                                 optim.decay_mask(task, config.optimizer))
    if apply_fn is not None:
        apply_fn = functools.partial(apply_fn, opt_state_shardings=shardings.opt_state)
    step = make_train_step(task, graphdef, tx, lr_schedule, config.grad_accum_steps,
                           nan_at_step=nan_at_step, vote_axis=vote_axis,
                           grad_shardings=grad_shardings, apply_fn=apply_fn)
    return jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None),
                   donate_argnums=0, compiler_options=tpu_compiler_options(config, shardings))


def tpu_compiler_options(config, shardings) -> dict | None:
    """`config.tpu_compiler_options` when the step's devices are TPUs (else None)."""
    options = dict(config.get("tpu_compiler_options") or {})
    sharding = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
    platform = next(iter(sharding.device_set)).platform
    return options if options and platform == "tpu" else None


def make_eval_step(task, graphdef):
    """Pure `(params, batch) -> sums` (loss, accuracy, count) over valid examples."""

    def eval_step(params, batch):
        return task.eval_sums(nnx.merge(graphdef, params), batch)

    return eval_step
