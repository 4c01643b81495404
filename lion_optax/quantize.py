"""Low-precision storage for optimizer state: blockwise int8 and stochastic rounding.

Blockwise int8 (`quantize_blockwise` / `dequantize_blockwise`): each block of the LAST
axis (`block_size` consecutive entries, or the whole row with `block_size=None`) shares
one float32 scale (its absolute maximum / 127) and stores `round(x / scale)` as int8.
The int8 array keeps the parameter's shape and the scales its rank (`shape[:-1] +
(number of blocks,)`), so both shard like the parameter. A last axis that is not a
multiple of the block is padded inside the computation only. Storage: 1 byte per entry
plus 4 bytes per block (1.016 B/param at block 256, less for whole rows).

On TPU, whole-row blocks are the fast layout: the row maximum is a lane reduction that
XLA fuses like a softmax's, and the scale broadcast stays inside the fusions. Blocks
smaller than a row split the minor axis, which changes TPU's tiled layout: XLA then
materializes relayout copies and scale broadcasts (see docs/beyond_the_paper.md for the measured bytes).

Stochastic rounding (`stochastic_round_to_bf16`, and `quantize_blockwise(key=...)`)
rounds up with probability equal to the discarded fraction, so the rounding error has
zero mean: a running average (Lion's momentum `b2 * m + (1 - b2) * g`) or a parameter
receiving many updates smaller than half a unit in the last place keeps moving, where
round-to-nearest would freeze it. The random bits are counter-based (`random_bits`): a
32-bit integer hash of each entry's index and two words drawn once per call from a
`jax.random` key. That is a few integer operations per entry, elementwise, so it fuses
into the update on any backend and shards like the data; drawing one threefry sample per
entry instead made the update 7-9x slower than without rounding on CPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "dequantize_blockwise",
    "quantize_blockwise",
    "random_bits",
    "scale_shape",
    "stochastic_round_to_bf16",
]

_QMAX = 127.0


def _num_blocks(n: int, block_size: int | None) -> int:
    return 1 if block_size is None else math.ceil(n / block_size)


def scale_shape(shape: tuple[int, ...], block_size: int | None) -> tuple[int, ...]:
    """Shape of the float32 scales of an int8 array of `shape` (a scalar counts as (1,))."""
    shape = tuple(shape) or (1,)
    return shape[:-1] + (_num_blocks(shape[-1], block_size),)


def _blocks(x: jax.Array, block_size: int | None) -> jax.Array:
    """[..., n] -> [..., nb, block], zero-padding n up to a multiple of the block."""
    x = x.reshape(x.shape or (1,))
    n = x.shape[-1]
    nb = _num_blocks(n, block_size)
    block = block_size if nb > 1 else n
    if nb * block != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)])
    return x.reshape(x.shape[:-1] + (nb, block))


def _unblocks(xb: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    n = (tuple(shape) or (1,))[-1]
    return xb.reshape(xb.shape[:-2] + (-1,))[..., :n].reshape(shape)


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finalizer (xorshift-multiply, the "lowbias32" constants): every
    input bit flips each output bit with probability close to 1/2."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 random bits of `shape`, counter-based: `mix(mix(index ^ a) ^ b)` of each
    entry's row-major index, with the words (a, b) drawn from `key`. Deterministic in
    (key, shape), elementwise (XLA fuses it into its consumer and partitions it like
    the output), and cheap; for rounding noise, not for cryptography. Tensors of more
    than 2^32 entries repeat indices modulo 2^32."""
    a, b = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
        stride *= shape[dim]
    return _mix32(_mix32(index ^ a) ^ b)


def quantize_blockwise(
    x: jax.Array, block_size: int | None = None, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """`x` -> (int8 values shaped like `x`, float32 scales of `scale_shape`).

    Absmax scaling per block of `block_size` entries of the last axis (None: the whole
    last axis, one scale per row); values are rounded to nearest, or stochastically when
    a PRNG `key` is given (unbiased: E[dequantized] = x).
    """
    xb = _blocks(x.astype(jnp.float32), block_size)
    scale = jnp.max(jnp.abs(xb), axis=-1) / _QMAX
    inv = jnp.where(scale > 0, 1.0 / scale, 0.0)[..., None]
    y = xb * inv
    if key is None:
        q = jnp.round(y)
    else:
        # 24 random bits -> uniform [0, 1) with float32's resolution.
        noise = (random_bits(key, y.shape) >> 8).astype(jnp.float32) * (1.0 / 2**24)
        q = jnp.floor(y + noise)
    q = jnp.clip(q, -_QMAX, _QMAX).astype(jnp.int8)
    return _unblocks(q, x.shape), scale


def dequantize_blockwise(
    q: jax.Array, scale: jax.Array, block_size: int | None = None, dtype=jnp.float32
) -> jax.Array:
    """Inverse of `quantize_blockwise`, in `dtype`."""
    qb = _blocks(q, block_size).astype(dtype)
    return _unblocks(qb * scale.astype(dtype)[..., None], q.shape)


def stochastic_round_to_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
    """float32 `x` -> bfloat16, rounding up with probability equal to the dropped fraction.

    Adds 16 random bits below bfloat16's last mantissa bit of the float32 pattern and
    truncates, so E[result] = x for every finite x whose rounding stays finite.
    """
    if x.dtype != jnp.float32:
        raise TypeError(f"stochastic_round_to_bf16 expects float32, got {x.dtype}")
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = random_bits(key, x.shape) >> 16
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    rounded = jnp.where(jnp.isfinite(x), rounded, bits)  # leave inf / nan alone
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
