"""The Lion optimizer as one fused optax transform with low-precision momentum.

Lion (Chen et al. 2023, arXiv 2302.06675, Algorithm 2), per parameter and step t:

    c_t     = b1 * m_{t-1} + (1 - b1) * g_t
    theta_t = theta_{t-1} - lr_t * (sign(c_t) + wd_t * theta_{t-1})
    m_t     = b2 * m_{t-1} + (1 - b2) * g_t

`lion` computes the whole step (interpolation, sign, decoupled decay, learning rate and
the momentum update) in one `jax.tree.map`, so under `jax.jit` XLA fuses it into a
single elementwise pass per parameter: it reads g, m and theta and writes the update and
the new momentum. Arithmetic happens in at least float32 whatever the storage dtypes; the
momentum is rounded to `mu_dtype` once per step. Every state leaf keeps its parameter's
sharding. The bf16 / fp32 update is elementwise and compiles without collectives; int8
momentum needs each row's (or block's) absmax and Cautious Lion a per-tensor rescale, which
become collectives where the reduced axis is sharded (all-reduces for split rows; blocks
inside one shard need none).

Options beyond the paper: int8 blockwise momentum (`mu_dtype=jnp.int8`), stochastic
rounding of the stored momentum, and Cautious Lion (`cautious=True`, one reduction per
tensor). Distributed Lion lives in `lion_optax.distributed`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lion_optax import quantize

__all__ = [
    "ScaleByLionQuantizedState",
    "ScaleByLionState",
    "scale_by_lion",
    "lion",
    "adamw_to_lion_hparams",
    "from_adamw",
    "stochastic_apply_updates",
]

MaskOrFn = Any | Callable[[optax.Params], Any] | None


class ScaleByLionState(NamedTuple):
    """State of `scale_by_lion` and `lion` with floating-point momentum.

    Attributes:
      count: int32 scalar, number of updates applied so far (drives schedules).
      mu: momentum, a tree like the parameters stored in `mu_dtype`.
    """

    count: jax.Array
    mu: optax.Updates


class ScaleByLionQuantizedState(NamedTuple):
    """State of `scale_by_lion` and `lion` with `mu_dtype=jnp.int8`.

    Attributes:
      count: int32 scalar, number of updates applied so far.
      mu: int8 momentum, a tree like the parameters (same shapes).
      mu_scale: float32 per-block scales, a tree like the parameters with shapes
        `lion_optax.quantize.scale_shape(param.shape, block_size)`.
    """

    count: jax.Array
    mu: optax.Updates
    mu_scale: optax.Updates


def _is_int8(mu_dtype) -> bool:
    return mu_dtype is not None and jnp.dtype(mu_dtype) == jnp.int8


def _momentum_dtype(mu_dtype, param):
    return jnp.asarray(param).dtype if mu_dtype is None else jnp.dtype(mu_dtype)


def _compute_dtype(*arrays) -> jnp.dtype:
    """float32 unless some input is wider (e.g. float64 under x64)."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def _init_momentum(params, mu_dtype, block_size: int | None):
    count = jnp.zeros([], jnp.int32)
    if _is_int8(mu_dtype):
        mu = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.int8), params)
        scale = jax.tree.map(
            lambda p: jnp.zeros(quantize.scale_shape(jnp.shape(p), block_size), jnp.float32), params)
        return ScaleByLionQuantizedState(count, mu, scale)
    mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=_momentum_dtype(mu_dtype, p)), params)
    return ScaleByLionState(count, mu)


def _check_options(mu_dtype, block_size, stochastic_rounding: bool, seed):
    """Validated (mu_dtype, block_size, seed). The defaults (None) are not numbers, so
    `optax.inject_hyperparams` leaves them static."""
    if mu_dtype is not None:  # inject_hyperparams hands dtypes over as 0-d arrays
        mu_dtype = jnp.dtype(getattr(mu_dtype, "dtype", mu_dtype))
    if isinstance(block_size, jax.Array) or isinstance(seed, jax.Array):
        raise ValueError("block_size and seed must be Python ints; with optax.inject_hyperparams "
                         "pass static_args=('block_size', 'seed')")
    if block_size is not None and not (isinstance(block_size, (int, np.integer)) and block_size > 0):
        raise ValueError(f"block_size must be a positive int or None (whole rows), got {block_size!r}")
    if mu_dtype is not None and not (_is_int8(mu_dtype) or jnp.issubdtype(mu_dtype, jnp.floating)):
        raise ValueError(f"mu_dtype must be a float dtype, jnp.int8 or None, got {mu_dtype!r}")
    if stochastic_rounding and mu_dtype is not None and not (
            _is_int8(mu_dtype) or jnp.dtype(mu_dtype) == jnp.bfloat16):
        raise ValueError("stochastic_rounding needs mu_dtype bfloat16, int8 or None "
                         f"(bfloat16 params), got {jnp.dtype(mu_dtype).name}")
    return mu_dtype, None if block_size is None else int(block_size), 0 if seed is None else int(seed)


class _Momentum:
    """Reads and writes one momentum leaf in its storage format, computing in fp32+."""

    def __init__(self, block_size: int | None, stochastic_rounding: bool, seed: int, count,
                 stream=None):
        self.block_size = block_size
        self.base_key = None
        if stochastic_rounding:  # one stream per step (and per worker, for distributed_lion)
            key = jax.random.fold_in(jax.random.key(seed), count)
            self.base_key = key if stream is None else jax.random.fold_in(key, stream)

    def key(self, index: int):
        return None if self.base_key is None else jax.random.fold_in(self.base_key, index)

    def step(self, g, m, scale, index: int, b1, b2, cautious: bool):
        """(direction, new momentum, new scale) of one leaf; scale is None unless int8."""
        dt = _compute_dtype(g, m)
        g = g.astype(dt)
        if scale is None:
            m32 = m.astype(dt)
        else:
            m32 = quantize.dequantize_blockwise(m, scale, self.block_size, dt)
        direction = jnp.sign((1.0 - b1) * g + b1 * m32)
        if cautious:  # Liang et al. 2024: zero coordinates that disagree with the gradient
            agree = (direction * g > 0).astype(dt)
            direction = direction * agree * (agree.size / (jnp.sum(agree) + 1.0))
        new_m = (1.0 - b2) * g + b2 * m32
        key = self.key(index)
        if scale is not None:
            new_m, scale = quantize.quantize_blockwise(new_m, self.block_size, key)
        elif key is not None and m.dtype == jnp.bfloat16 and new_m.dtype == jnp.float32:
            new_m = quantize.stochastic_round_to_bf16(new_m, key)
        else:
            new_m = new_m.astype(m.dtype)
        return direction, new_m, scale


def _leaves(state, treedef):
    mus = treedef.flatten_up_to(state.mu)
    if isinstance(state, ScaleByLionQuantizedState):
        return mus, treedef.flatten_up_to(state.mu_scale)
    return mus, [None] * len(mus)


def _new_state(state, treedef, mus, scales):
    count = optax.safe_increment(state.count)
    if isinstance(state, ScaleByLionQuantizedState):
        return ScaleByLionQuantizedState(count, treedef.unflatten(mus), treedef.unflatten(scales))
    return ScaleByLionState(count, treedef.unflatten(mus))


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = jnp.bfloat16,
    *,
    block_size: int | None = None,
    cautious: bool = False,
    stochastic_rounding: bool = False,
    seed: int | None = None,
) -> optax.GradientTransformation:
    """Rescale updates to the Lion direction `sign(b1*m + (1-b1)*g)`.

    The building block of `lion` for custom chains (add decay and a learning rate
    after it yourself). Same state and momentum options as `lion`.

    Args:
      b1: interpolation factor between momentum and gradient for the sign.
      b2: decay rate of the momentum.
      mu_dtype: storage dtype of the momentum (bfloat16, float32, int8 blockwise, or
        `None` for each parameter's dtype).
      block_size, cautious, stochastic_rounding, seed: as in `lion`.
    """
    mu_dtype, block_size, seed = _check_options(mu_dtype, block_size, stochastic_rounding, seed)

    def init_fn(params):
        return _init_momentum(params, mu_dtype, block_size)

    def update_fn(updates, state, params=None):
        del params
        treedef = jax.tree.structure(updates)
        mus, scales = _leaves(state, treedef)
        momentum = _Momentum(block_size, stochastic_rounding, seed, state.count)
        out = [momentum.step(g, m, s, i, b1, b2, cautious)
               for i, (g, m, s) in enumerate(zip(treedef.flatten_up_to(updates), mus, scales))]
        directions, mus, scales = zip(*out) if out else ((), (), ())
        return treedef.unflatten(directions), _new_state(state, treedef, mus, scales)

    return optax.GradientTransformation(init_fn, update_fn)


def _decays(weight_decay: optax.ScalarOrSchedule) -> bool:
    """False only for a weight decay that is the constant 0 (then params are not needed)."""
    return not (isinstance(weight_decay, (int, float)) and weight_decay == 0)


def _at(value: optax.ScalarOrSchedule, count):
    """A scalar, or a schedule evaluated at `count`."""
    return value(count) if callable(value) else value


def _decay_flags(name: str, decays: bool, mask: MaskOrFn, params, treedef) -> tuple[list, list]:
    """(per-leaf decay flags from `_resolve_mask`, param leaves); all False without decay.
    ValueError naming `name` when decay is on and `params` were not passed."""
    if not decays:
        return [False] * treedef.num_leaves, [None] * treedef.num_leaves
    if params is None:
        raise ValueError(f"{name}: weight decay needs the current params: call update(grads, state, params)")
    return _resolve_mask(mask, params, treedef), treedef.flatten_up_to(params)


def _with_decay(u, p, wd, flag):
    """`u + wd * p` where `flag` (True, False, or a boolean array) says to decay."""
    if flag is False:
        return u
    decayed = u + wd * p.astype(u.dtype)
    return decayed if flag is True else jnp.where(flag, decayed, u)


def _resolve_mask(mask: MaskOrFn, params, treedef) -> list:
    """One entry per parameter leaf: True (decay), False, or a boolean array."""
    if mask is None:
        return [True] * treedef.num_leaves
    tree = mask(params) if callable(mask) else mask
    # `tree` may be a prefix of `params`: broadcast each flag over its subtree.
    full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: flag, sub), tree, params)
    flags = treedef.flatten_up_to(full)
    return [bool(f) if isinstance(f, (bool, np.bool_)) else f for f in flags]


def lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = jnp.bfloat16,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask: MaskOrFn = None,
    *,
    block_size: int | None = None,
    cautious: bool = False,
    stochastic_rounding: bool = False,
    seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The Lion optimizer, fused, with bfloat16 momentum by default.

    A drop-in for `optax.lion` (same arguments, positions and meaning) except that
    `mu_dtype` defaults to bfloat16, halving optimizer memory versus float32 momentum.
    With `mu_dtype=jnp.float32` (or `None` and float32 params) it reproduces
    `optax.lion` bit for bit. Compared with `optax.lion`, one step counter drives both
    schedules and the momentum is upcast before any arithmetic, so it is rounded once
    per step instead of after every multiply.

    Lion wants a 3-10x smaller learning rate and a 3-10x larger weight decay than
    AdamW (see `from_adamw`); for language models the paper uses b1=0.95, b2=0.98.

    Args:
      learning_rate: scalar or optax schedule `count -> lr`.
      b1: interpolation factor between momentum and gradient for the sign.
      b2: decay rate of the momentum.
      mu_dtype: storage dtype of the momentum: bfloat16 (default), float32, `None`
        (each parameter's dtype), or `jnp.int8` for blockwise-quantized momentum
        (`lion_optax.quantize`; 1 byte per parameter plus one float32 scale per block of
        the last axis; state `ScaleByLionQuantizedState`).
      weight_decay: decoupled decay, multiplied by the learning rate as in
        `optax.adamw`; scalar or schedule.
      mask: tree of bools (or a prefix of the params tree), or a callable
        `params -> tree`, selecting which parameters are decayed (True = decay),
        e.g. `lion_optax.decay_mask`. None decays everything, as `optax.lion` does.
      block_size: entries per int8 block along the last axis; None (default): one
        block per row, the layout XLA fuses into two passes on TPU and
        `lion_optax.fused_lion` into one (smaller blocks split the minor axis and cost
        relayout copies there).
      cautious: Cautious Lion (Liang et al. 2024, arXiv 2411.16085): zero the update
        where its sign disagrees with the gradient's and rescale the rest of each
        tensor by `size / (number kept + 1)`. Needs one reduction per tensor, so the
        update is no longer a single elementwise pass.
      stochastic_rounding: write bfloat16 / int8 momentum with stochastic rounding
        (unbiased, see `lion_optax.quantize`); counter-based random bits keyed by
        `seed`, the step count and the leaf, so a resumed run draws the same bits.
      seed: seed of the stochastic-rounding stream (None: 0).

    Returns:
      An `optax.GradientTransformationExtraArgs` with state `ScaleByLionState`
      (or `ScaleByLionQuantizedState` for int8 momentum).
    """
    mu_dtype, block_size, seed = _check_options(mu_dtype, block_size, stochastic_rounding, seed)
    decays = _decays(weight_decay)

    def init_fn(params):
        return _init_momentum(params, mu_dtype, block_size)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        treedef = jax.tree.structure(updates)
        flags, ps = _decay_flags("lion", decays, mask, params, treedef)
        lr, wd = _at(learning_rate, state.count), _at(weight_decay, state.count)
        grads = treedef.flatten_up_to(updates)
        mus, scales = _leaves(state, treedef)

        momentum = _Momentum(block_size, stochastic_rounding, seed, state.count)
        new_updates, new_mu, new_scale = [], [], []
        for i, (g, m, s, p, flag) in enumerate(zip(grads, mus, scales, ps, flags)):
            u, m, s = momentum.step(g, m, s, i, b1, b2, cautious)
            u = _with_decay(u, p, wd, flag)
            new_updates.append(jnp.asarray(-lr, u.dtype) * u)
            new_mu.append(m)
            new_scale.append(s)
        return treedef.unflatten(new_updates), _new_state(state, treedef, new_mu, new_scale)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stochastic_apply_updates(params: optax.Params, updates: optax.Updates, key) -> optax.Params:
    """`optax.apply_updates` that rounds bfloat16 parameters stochastically.

    For training with bfloat16 parameters and no float32 master copy: `p + u` is
    computed in float32 and written back with `stochastic_round_to_bf16`, so updates
    smaller than half a bfloat16 ulp still move the parameter in expectation. Other
    dtypes are added and cast as `optax.apply_updates` does. Pass a fresh `key` per
    step (e.g. `jax.random.fold_in(key, step)`).
    """
    treedef = jax.tree.structure(params)
    out = []
    for i, (p, u) in enumerate(zip(treedef.flatten_up_to(params), treedef.flatten_up_to(updates))):
        if u is None:
            out.append(p)
        elif p.dtype == jnp.bfloat16:
            total = p.astype(jnp.float32) + u.astype(jnp.float32)
            out.append(quantize.stochastic_round_to_bf16(total, jax.random.fold_in(key, i)))
        else:
            out.append((p + u).astype(p.dtype))
    return treedef.unflatten(out)


def _times(value: optax.ScalarOrSchedule, factor: float) -> optax.ScalarOrSchedule:
    return (lambda count: value(count) * factor) if callable(value) else value * factor


def _divided(value: optax.ScalarOrSchedule, factor: float) -> optax.ScalarOrSchedule:
    return (lambda count: value(count) / factor) if callable(value) else value / factor


def adamw_to_lion_hparams(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    factor: float = 10.0,
) -> tuple[optax.ScalarOrSchedule, optax.ScalarOrSchedule]:
    """The paper's AdamW -> Lion mapping: `(lr / factor, wd * factor)`.

    The effective decay `lr * wd` is preserved. The paper recommends factor 3-10 and
    uses 10 in all its worked examples (ViT: AdamW 1e-3 / 1.0 -> Lion 1e-4 / 10.0).
    Schedules are scaled pointwise, so warmup start, peak and end all shrink alike.
    """
    if not (isinstance(factor, (int, float)) and np.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a positive number (3-10 recommended), got {factor!r}")
    return _divided(learning_rate, factor), _times(weight_decay, factor)


def from_adamw(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    factor: float = 10.0,
    **lion_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """`lion` with hyperparameters mapped from a tuned AdamW setup.

    Args:
      learning_rate: the AdamW learning rate (scalar or schedule).
      weight_decay: the AdamW decoupled weight decay (scalar or schedule), as in
        `optax.adamw` where it is multiplied by the learning rate.
      factor: lr is divided and wd multiplied by it (see `adamw_to_lion_hparams`).
      **lion_kwargs: passed to `lion` (b1, b2, mu_dtype, mask).
    """
    lr, wd = adamw_to_lion_hparams(learning_rate, weight_decay, factor)
    return lion(learning_rate=lr, weight_decay=wd, **lion_kwargs)
