"""Lion with int8 momentum, updated and applied in one pass over memory (a Pallas TPU kernel).

An optax transform returns updates that `optax.apply_updates` adds later, so with int8
momentum XLA makes two passes over each tensor on TPU: the row maxima of the new momentum
(a reduction XLA will not fuse into its consumers), then the sign update, requantization
and parameter add, which reads the gradient and momentum again. `fused_lion(...).apply(grads, state, params)` returns
the new params and state directly: one kernel reads g, theta and the int8 momentum once
per row tile, keeps the rows in VMEM while it reduces them, and writes theta and the momentum
back in place (about 14 bytes per float32 parameter instead of 19).

    opt = lion_optax.fused_lion(1e-4, weight_decay=1.0, mask=lion_optax.decay_mask)
    state = opt.init(params)
    params, state = opt.apply(grads, state, params)           # jit with donated params/state
    updates, state = opt.update(grads, state, params)         # the plain optax path, same math

The kernel covers int8 momentum with one scale per row (`block_size=None`, the default)
and rows that fit in VMEM; every other leaf and option goes through `lion`'s XLA code,
so `apply` always equals `update` followed by `optax.apply_updates` (to float rounding).
Given the momentum's shardings (`mu_shardings`), each leaf runs under `jax.shard_map` on
every device's shard of the momentum (ZeRO-sharded state updates a slice of the params).
When the last axis is split across devices the row maxima are combined with a `pmax`
and that leaf takes the two-pass XLA route. On other backends (`kernel="auto"`) the XLA
code runs; `kernel="interpret"` runs the Pallas kernel in interpret mode (for tests).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lion_optax import _lion, quantize

__all__ = ["FusedLion", "fused_lion"]

KERNELS = ("auto", "pallas", "interpret", "xla")
_VMEM_LIMIT = 16 * 2**20  # scoped VMEM the kernel asks for: what a TPU v4 core allows
_VMEM_BUDGET = 12 * 2**20  # what one grid step's tiles may use of it
# VMEM per entry of a tile: double-buffered inputs (theta, g, q) and outputs (theta, q),
# plus float32 temporaries (measured: a 64 x 8192 tile needs 22.1 MiB, 42 B/entry).
_BYTES_PER_ENTRY = 2 * (4 + 4 + 1) + 2 * (4 + 1) + 16
_ROW_ALIGN = 32  # int8 tiles on TPU are (32, 128): row blocks come in multiples of 32
_LANES = 128
_MAX_TILE_ENTRIES = 2**19  # at most 2 MiB of float32 per operand tile


class FusedLion(NamedTuple):
    """`init` / `update` are `lion`'s (an optax transformation); `apply(grads, state,
    params, grad_scale=None, apply_if=None, mu_shardings=None) -> (params, state)` also
    applies the update (see `fused_lion`)."""

    init: optax.TransformInitFn
    update: optax.TransformUpdateExtraArgsFn
    apply: Callable[..., tuple[optax.Params, Any]]


def row_tile(rows: int, width: int) -> int | None:
    """Rows per kernel grid step for a [rows, width] leaf, or None when even the smallest
    tile of whole rows does not fit the VMEM budget (that leaf uses the XLA route). VMEM
    holds a row in whole 128-lane vregs: an 8-wide row (a router's) takes 128 entries."""
    lanes = -(-width // _LANES) * _LANES
    per_row = lanes * _BYTES_PER_ENTRY
    fit = min(_VMEM_BUDGET // per_row, max(_MAX_TILE_ENTRIES // lanes, 1))
    if rows <= max(fit, _ROW_ALIGN) and rows * per_row <= _VMEM_BUDGET:
        return rows  # one block spanning every row: any row count is a legal block
    tile = fit // _ROW_ALIGN * _ROW_ALIGN
    return tile or None


def kernel_dma_bytes(rows: int, width: int, param_dtype=jnp.float32, grad_dtype=jnp.float32) -> int | None:
    """HBM bytes the kernel's grid moves for one [rows, width] leaf, from its BlockSpecs:
    each grid step reads a (tile, width) block of theta, g and int8 m plus a tile of
    float32 scales, and writes theta, m and the scales back (the last block padded to a
    whole tile). A compile-time model of the DMAs, independent of the `CostEstimate` the
    kernel hands Pallas (which `cost_analysis()` merely reports); None if the leaf takes
    the XLA route."""
    tile = row_tile(rows, width)
    if tile is None:
        return None
    p, g = jnp.dtype(param_dtype).itemsize, jnp.dtype(grad_dtype).itemsize
    per_row = width * (p + g + 1) + 4 + width * (p + 1) + 4  # read theta, g, m, scale; write 3
    return pl.cdiv(rows, tile) * tile * per_row


def _sign(x):
    # jnp.sign's Pallas TPU lowering asks the local device for its TPU generation,
    # which fails when compiling ahead of time on a host without one.
    return jnp.where(x > 0, 1.0, jnp.where(x < 0, -1.0, 0.0)).astype(x.dtype)


def _rows_math(p, g, m, scale, hp, b1, b2, decay, row_max):
    """New (params, int8 momentum, scales) of [rows, n] blocks; `hp` = (lr, wd, grad_scale,
    apply flag). The same arithmetic, in the same order, as `lion` + `optax.apply_updates`;
    with the flag 0 the inputs come back unchanged (a skipped step)."""
    lr, wd, gscale, keep = hp[0], hp[1], hp[2], hp[3] == 0
    g = g.astype(jnp.float32) * gscale
    m32 = m.astype(jnp.float32) * scale
    direction = _sign((1.0 - b1) * g + b1 * m32)
    new_m = (1.0 - b2) * g + b2 * m32
    new_scale = row_max(jnp.max(jnp.abs(new_m), axis=-1, keepdims=True)) / quantize._QMAX
    inv = jnp.where(new_scale > 0, 1.0 / new_scale, 0.0)
    q = jnp.clip(jnp.round(new_m * inv), -quantize._QMAX, quantize._QMAX).astype(jnp.int8)
    pf = p.astype(jnp.float32)
    if decay:
        direction = direction + wd * pf
    new_p = (pf + (-lr) * direction).astype(p.dtype)
    return jnp.where(keep, p, new_p), jnp.where(keep, m, q), jnp.where(keep, scale, new_scale)


def _transpose_vector(v, to_column: bool):
    """(1, T) lanes -> (T, 1) column, or back, exactly: a masked sum with the identity (a
    relayout Mosaic may not lower; here one extra pass over a T x T tile per T rows)."""
    t = max(v.shape)
    eye = jax.lax.broadcasted_iota(jnp.int32, (t, t), 0) == jax.lax.broadcasted_iota(jnp.int32, (t, t), 1)
    return jnp.sum(jnp.where(eye, v, 0.0), axis=1 if to_column else 0, keepdims=True)


def _kernel(hp_ref, p_ref, g_ref, m_ref, s_ref, p_out, m_out, s_out, *, b1, b2, decay):
    hp = (hp_ref[0], hp_ref[1], hp_ref[2], hp_ref[3])
    scale = _transpose_vector(s_ref[0], to_column=True)
    p, q, s = _rows_math(p_ref[...], g_ref[...], m_ref[...], scale, hp, b1, b2, decay,
                         row_max=lambda x: x)
    p_out[...] = p
    m_out[...] = q
    s_out[0] = _transpose_vector(s, to_column=False)


def _pallas_rows(p, g, m, s, hp, *, b1, b2, decay, interpret):
    """The kernel over [rows, n] arrays. The [rows, 1] scales travel as [tiles, 1, tile]:
    a column of one float per row would be padded to 128 lanes in TPU memory (512 bytes
    per row, a third of the traffic of a 768-wide row), a row of them is not."""
    rows, n = p.shape
    tile = row_tile(rows, n)
    tiles = pl.cdiv(rows, tile)
    lanes = jnp.pad(s.reshape(rows), (0, tiles * tile - rows)).reshape(tiles, 1, tile)
    block = pl.BlockSpec((tile, n), lambda i: (i, 0))
    scale_block = pl.BlockSpec((1, 1, tile), lambda i: (i, 0, 0))
    moved = sum(x.size * x.dtype.itemsize for x in (p, g, m, s, p, m, s))  # in, then out
    p, m, lanes = pl.pallas_call(
        functools.partial(_kernel, b1=b1, b2=b2, decay=decay),
        grid=(tiles,),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), block, block, block, scale_block],
        out_specs=[block, block, scale_block],
        out_shape=[jax.ShapeDtypeStruct(p.shape, p.dtype), jax.ShapeDtypeStruct(m.shape, m.dtype),
                   jax.ShapeDtypeStruct(lanes.shape, lanes.dtype)],
        input_output_aliases={1: 0, 3: 1, 4: 2},  # theta, momentum and scales in place
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",),
                                             vmem_limit_bytes=_VMEM_LIMIT),
        cost_estimate=pl.CostEstimate(flops=20 * p.size, transcendentals=0, bytes_accessed=moved),
        interpret=interpret,
    )(hp, p, g, m, lanes)
    return p, m, lanes.reshape(-1)[:rows].reshape(rows, 1)


def _local_leaf(p, g, m, s, hp, b1, b2, decay, kernel, split_axes):
    """One device's shard: ND leaves as [rows, last axis]; row maxima `pmax`ed over
    `split_axes` (the mesh axes splitting the last axis), where the kernel cannot go."""
    shape, sshape = p.shape, s.shape
    n = shape[-1] if shape else 1
    p2, g2, m2, s2 = (x.reshape(-1, x.shape[-1] if x.ndim else 1) for x in (p, g, m, s))

    def xla():
        row_max = (lambda x: jax.lax.pmax(x, split_axes)) if split_axes else (lambda x: x)
        return _rows_math(p2, g2, m2, s2, hp, b1, b2, decay, row_max)

    def pallas(interpret: bool):
        return _pallas_rows(p2, g2, m2, s2, hp, b1=b1, b2=b2, decay=decay, interpret=interpret)

    if split_axes or kernel == "xla" or row_tile(p2.shape[0], n) is None:
        out = xla()
    elif kernel == "auto":
        out = jax.lax.platform_dependent(tpu=lambda: pallas(False), default=xla)
    else:
        out = pallas(kernel == "interpret")
    return out[0].reshape(shape), out[1].reshape(shape), out[2].reshape(sshape)


def _sharded_leaf(hp, p, g, m, s, sharding, b1, b2, decay, kernel):
    """`_local_leaf` on every device's shard of the momentum's `sharding` (shard_map);
    params and gradients are brought to that layout first (a slice when they are
    replicated over an axis the state is split over, as with ZeRO)."""
    if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
        return _local_leaf(p, g, m, s, hp, b1, b2, decay, kernel, ())
    spec = (tuple(sharding.spec) + (None,) * p.ndim)[:p.ndim]
    last = spec[-1]
    split = () if last is None else (last if isinstance(last, tuple) else (last,))
    leaf, scale = P(*spec), P(*spec[:-1], None)
    local = functools.partial(_local_leaf, b1=b1, b2=b2, decay=decay, kernel=kernel, split_axes=split)
    return jax.shard_map(
        lambda hp, p, g, m, s: local(p, g, m, s, hp), mesh=sharding.mesh,
        in_specs=(P(), leaf, leaf, leaf, scale), out_specs=(leaf, leaf, scale), check_vma=False,
    )(hp, p, g, m, s)


def fused_lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = jnp.int8,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask: _lion.MaskOrFn = None,
    *,
    kernel: str = "auto",
    **lion_kwargs: Any,
) -> FusedLion:
    """`lion` (same arguments; int8 momentum by default) plus a fused `apply`.

    Args:
      kernel: "auto" (Pallas on TPU, XLA elsewhere), "pallas", "interpret" (the Pallas
        kernel interpreted, any backend) or "xla".
      **lion_kwargs: `block_size`, `cautious`, `stochastic_rounding`, `seed` as in
        `lion`; only int8 momentum with `block_size=None` and neither of the last
        three options takes the kernel.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not all(isinstance(x, (int, float)) for x in (b1, b2)):  # compiled into the kernel
        raise ValueError(f"fused_lion: b1 and b2 must be Python numbers, got {b1!r}, {b2!r}")
    tx = _lion.lion(learning_rate, b1, b2, mu_dtype, weight_decay, mask, **lion_kwargs)
    mu_dtype, block_size, _ = _lion._check_options(
        mu_dtype, lion_kwargs.get("block_size"), lion_kwargs.get("stochastic_rounding", False),
        lion_kwargs.get("seed"))
    fusable = (_lion._is_int8(mu_dtype) and block_size is None and not lion_kwargs.get("cautious")
               and not lion_kwargs.get("stochastic_rounding"))
    decays = _lion._decays(weight_decay)

    def unfused(grads, state, params, grad_scale, apply_if):
        if grad_scale is not None:
            grads = jax.tree.map(lambda g: g * grad_scale, grads)
        updates, new_state = tx.update(grads, state, params)
        new_params = optax.apply_updates(params, updates)
        if apply_if is None:
            return new_params, new_state
        return jax.tree.map(lambda new, old: jnp.where(apply_if, new, old),
                            (new_params, new_state), (params, state))

    def apply(grads, state, params, grad_scale=None, apply_if=None, mu_shardings=None):
        """(new params, new state). `grad_scale` (a scalar, e.g. a clipping factor)
        multiplies the gradients first; with `apply_if` (a boolean scalar) False, params
        and state come back unchanged (e.g. a step with non-finite gradients).
        `mu_shardings`: the momentum's NamedShardings (a tree like the params, e.g.
        `lion_optax.state_shardings(opt, params).mu`); the kernel then runs on each
        device's shard. Without them it sees whole arrays, which XLA would gather."""
        if not fusable:
            return unfused(grads, state, params, grad_scale, apply_if)
        lr, wd = _lion._at(learning_rate, state.count), _lion._at(weight_decay, state.count)
        gs = 1.0 if grad_scale is None else grad_scale
        ok = True if apply_if is None else apply_if
        hp = jnp.stack([jnp.asarray(x, jnp.float32) for x in (lr, wd, gs, ok)])
        treedef = jax.tree.structure(params)
        flags = (_lion._resolve_mask(mask, params, treedef) if decays
                 else [False] * treedef.num_leaves)
        if not all(isinstance(f, bool) for f in flags):  # an array mask: lion's own path
            return unfused(grads, state, params, grad_scale, apply_if)
        placements = ([None] * treedef.num_leaves if mu_shardings is None
                      else treedef.flatten_up_to(mu_shardings))
        leaves = zip(treedef.flatten_up_to(params), treedef.flatten_up_to(grads),
                     treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.mu_scale),
                     flags, placements)
        out = []
        for p, g, m, s, flag, sharding in leaves:
            shape = jnp.shape(p)
            p, g, m = (jnp.reshape(x, shape or (1,)) for x in (p, g, m))
            p, m, s = _sharded_leaf(hp, p, g, m, s, sharding, float(b1), float(b2), flag, kernel)
            out.append((p.reshape(shape), m.reshape(shape), s))
        new_p, new_m, new_s = zip(*out) if out else ((), (), ())
        new_state = _lion._new_state(state, treedef, list(new_m), list(new_s))
        if apply_if is not None:
            new_state = new_state._replace(count=jnp.where(apply_if, new_state.count, state.count))
        return treedef.unflatten(new_p), new_state

    return FusedLion(tx.init, tx.update, apply)

