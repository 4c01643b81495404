"""Token dispatch to a mixture of experts: grouped matmuls and expert parallelism.

`dispatch(x, experts, weights, w_gate, w_up, w_down)` returns, for every token t,
sum_k weights[t, k] * SwiGLU_{experts[t, k]}(x[t]), dropless and spending only the active
experts' FLOPs: the (token, choice) rows are sorted by expert and each projection is one
grouped matmul over the sorted rows (`grouped_matmul`: `jax.lax.ragged_dot`, or on TPU the
Pallas megablox `gmm` kernel that ships with jax).

Without a mesh that is the whole story. Under a mesh (`jax.set_mesh`) it runs in a
`jax.shard_map` over every mesh axis, each device on its own tokens (split over the batch
axes data x fsdp x expert) - no sort ever spans the global batch:

- expert weights enter split over `expert` on their expert dimension and over `tensor` on
  their hidden dimension (GSPMD gathers the `fsdp` split of the model dimension first, as for
  any FSDP weight), so a device holds num_experts / expert of them;
- with `expert` > 1, each device sends every row to the device that holds its expert with
  one `jax.lax.ragged_all_to_all` over the `expert` axis (sizes exchanged first, receive
  buffer sized for the worst case, expert x local rows, as MaxText sizes it), regroups the
  received rows by local expert, runs its experts and sends the rows back the same way;
- with `tensor` > 1 each device computes a slice of every expert's hidden units and the
  outputs are summed over `tensor` once, per token.

XLA:CPU has no ragged all-to-all, nor do v5e slices of more than 16 chips
(`ragged_exchange_compiles`), so there `ragged_all_to_all` is carried out by a padded
`all_to_all` with the same arguments and result (each device sends every peer a buffer of
all its rows; tests/test_moe.py checks it against the documented semantics).
"""

from __future__ import annotations

import functools
import importlib
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from models.spec import EXPERT_MATMULS as MATMULS

BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes tokens are split over
EXPERT_AXIS, TENSOR_AXIS = "expert", "tensor"


def resolve_matmul(matmul: str, platform: str) -> str:
    """The grouped matmul `matmul` runs as: 'auto' is megablox on TPU, ragged_dot elsewhere."""
    if matmul not in MATMULS:
        raise ValueError(f"expert_matmul must be one of {MATMULS}, got {matmul!r}")
    if matmul == "auto":
        return "megablox" if platform == "tpu" else "ragged_dot"
    if matmul == "megablox" and platform != "tpu":
        raise ValueError(f"expert_matmul='megablox' needs a TPU backend, this one is {platform!r}; "
                         "use 'auto', 'ragged_dot' or 'megablox_interpret'")
    return matmul


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, matmul: str,
                   transpose_rhs: bool = False) -> jax.Array:
    """lhs [m, k] rows grouped in order by `group_sizes` [g] (summing to at most m; later rows
    give zeros) times rhs [g, k, n] of their group (rhs [g, n, k] transposed when
    `transpose_rhs`): [m, n] in lhs's dtype."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    # One tiling serves the kernel's forward and both backward products, where k and n trade
    # places: a k and n tile of the same multiple of 128 (the TPU lane width) fits all three.
    tile = max((t for t in (512, 256, 128) if t <= min(k, n)), default=0)
    if matmul == "ragged_dot" or not tile:
        return jax.lax.ragged_dot(lhs, jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs, group_sizes)
    tm = min(512, -(-m // 128) * 128)
    padded = -(-m // tm) * tm
    # The kernel leaves rows past the last group unwritten (NaN when interpreted, stale on
    # TPU), in its output and in its gradient for lhs: both are masked to zeros.
    valid = (jnp.arange(m, dtype=jnp.int32) < jnp.sum(group_sizes))[:, None]
    zero = jnp.zeros((), lhs.dtype)
    lhs_p = jnp.pad(jnp.where(valid, lhs, zero), ((0, padded - m), (0, 0)))
    out = _megablox(lhs_p, rhs, group_sizes.astype(jnp.int32), (tm, tile, tile), transpose_rhs,
                    matmul == "megablox_interpret")
    return jnp.where(valid, out[:m], zero)


def _kernels():
    # The kernels module (the package's `gmm` attribute is the differentiable wrapper);
    # imported only where it is used.
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _megablox(lhs, rhs, group_sizes, tiling, transpose_rhs, interpret):
    """megablox `gmm` with the VJP of `jax.experimental.pallas.ops.tpu.megablox.ops.gmm`,
    except that with `transpose_rhs` the weight gradient comes out of `tgmm` already in the
    weight's [g, n, k] layout (grad^T @ lhs per group) instead of as [g, k, n] transposed
    afterwards: the compiler otherwise keeps the stacked layers' float32 gradient in a
    layout whose last dimension is the fsdp-split d_model (32 on 64 chips, padded to 128
    lanes: 4x its bytes, 1.7 GiB more temporaries per chip for Qwen3-30B-A3B on v5e-64)."""
    return _kernels().gmm(lhs, rhs, group_sizes, lhs.dtype, tiling, None, None, transpose_rhs, interpret)


def _megablox_fwd(lhs, rhs, group_sizes, tiling, transpose_rhs, interpret):
    return _megablox(lhs, rhs, group_sizes, tiling, transpose_rhs, interpret), (lhs, rhs, group_sizes)


def _megablox_bwd(tiling, transpose_rhs, interpret, residual, grad):
    lhs, rhs, group_sizes = residual
    kernels = _kernels()
    grad_lhs = kernels.gmm(grad, rhs, group_sizes, lhs.dtype, tiling, None, None,
                           not transpose_rhs, interpret)
    a, b = (grad, lhs) if transpose_rhs else (lhs, grad)  # [g, n, k] or [g, k, n]
    grad_rhs = kernels.tgmm(a.swapaxes(0, 1), b, group_sizes, rhs.dtype, tiling, None, rhs.shape[0],
                            interpret=interpret)
    return grad_lhs, grad_rhs, None


_megablox.defvjp(_megablox_fwd, _megablox_bwd)


def swiglu_experts(rows, group_sizes, w_gate, w_up, w_down, matmul: str):
    """Each row through the SwiGLU expert of its group (rows sorted by group); every weight
    is [experts, d_model, ffn] (see models.moe on why the down projection is stored so)."""
    gate = grouped_matmul(rows, w_gate, group_sizes, matmul)
    up = grouped_matmul(rows, w_up, group_sizes, matmul)
    return grouped_matmul(jax.nn.silu(gate) * up, w_down, group_sizes, matmul, transpose_rhs=True)


def ragged_exchange_compiles(platform: str, mesh) -> bool:
    """Whether `jax.lax.ragged_all_to_all` compiles here: not on XLA:CPU, nor on v5e slices
    of more than 16 chips (libtpu 0.0.42: "Ragged all-to-all is currently not supported in
    limited ICI routing settings"; measured with train.aot on v5e:4x8 and v5e:8x8, while
    v5e:4x4, v6e:8x8, v5p and v4 slices compile it). Elsewhere the padded exchange runs."""
    if platform == "cpu":
        return False
    kind = getattr(getattr(mesh, "abstract_device", None), "device_kind", "") or ""
    return not (platform == "tpu" and "lite" in kind.lower() and "v5" in kind.lower() and mesh.size > 16)


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                      *, axis_name: str, emulate: bool):
    """`jax.lax.ragged_all_to_all` (rows operand[input_offsets[j]:+send_sizes[j]] go to device
    j of `axis_name`, landing at output[output_offsets[j]:] there; recv_sizes[i] rows arrive
    from device i), or with `emulate` the same through a padded `all_to_all` (see module doc)."""
    if not emulate:
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                         recv_sizes, axis_name=axis_name)
    rows, out_rows = operand.shape[0], output.shape[0]
    pos = jnp.arange(rows, dtype=jnp.int32)[None, :]
    src = jnp.clip(input_offsets[:, None] + pos, 0, rows - 1)
    chunks = jnp.where((pos < send_sizes[:, None])[..., None], operand[src], 0)  # [peers, rows, ...]
    got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # [i] = what device i sent here
    where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # its offsets here
    dest = jnp.where(pos < recv_sizes[:, None], where[:, None] + pos, out_rows)  # out of range: dropped
    return output.at[dest.reshape(-1)].set(got.reshape(-1, *operand.shape[1:]), mode="drop")


def _exclusive_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


def _inverse(perm):
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def local_dispatch(x, experts, weights, w_gate, w_up, w_down, *, num_experts: int, matmul: str,
                   ep: int = 1, emulate: bool = False, tensor: bool = False):
    """`dispatch` on one device's tokens x [T, d] (experts, weights [T, k]) and its experts'
    weights (w_gate, w_up, w_down [num_experts / ep, d, f]): the body of the shard_map."""
    tokens, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # rows grouped by (global) expert
    rows = x[order // k]  # [T*k, d]
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    if ep == 1:
        out_sorted = swiglu_experts(rows, counts, w_gate, w_up, w_down, matmul)
    else:
        local = num_experts // ep
        me = jax.lax.axis_index(EXPERT_AXIS)
        # [source, destination]: rows each device sends each other device.
        per = jax.lax.all_gather(counts, EXPERT_AXIS).reshape(ep, ep, local)
        shard = jnp.sum(per, axis=-1)
        send, recv = shard[me], shard[:, me]
        send_off = _exclusive_cumsum(shard, axis=1)  # where each source's rows for a peer start
        recv_off = _exclusive_cumsum(shard, axis=0)  # where a destination puts each source
        buffer = jnp.zeros((tokens * k * ep,) + rows.shape[1:], rows.dtype)
        exchange = functools.partial(ragged_all_to_all, axis_name=EXPERT_AXIS, emulate=emulate)
        got = exchange(rows, buffer, send_off[me], send, recv_off[me], recv)
        # Received rows come by source, then by local expert: regroup them by local expert
        # (padding rows last, as group `local`).
        local_counts = per[:, me, :]  # [source, local expert]
        ends = jnp.cumsum(local_counts.reshape(-1))
        segment = jnp.searchsorted(ends, jnp.arange(buffer.shape[0], dtype=jnp.int32), side="right")
        key = jnp.where(segment >= ep * local, local, segment % local)
        regroup = jnp.argsort(key, stable=True)
        out_local = swiglu_experts(got[regroup], jnp.sum(local_counts, axis=0), w_gate, w_up, w_down, matmul)
        back = out_local[_inverse(regroup)]
        out_sorted = exchange(back, jnp.zeros_like(rows), recv_off[:, me], recv, send_off[:, me], send)
    out = out_sorted[_inverse(order)].reshape(tokens, k, -1)
    out = jnp.einsum("tk,tkd->td", weights.astype(out.dtype), out)
    return jax.lax.psum(out, TENSOR_AXIS) if tensor else out


def dispatch(x, experts, weights, w_gate, w_up, w_down, *, matmul: str, platform: str):
    """See the module doc: x [T, d], experts / weights [T, k] -> [T, d]."""
    num_experts = w_gate.shape[0]
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return local_dispatch(x, experts, weights, w_gate, w_up, w_down, num_experts=num_experts,
                              matmul=matmul)
    # Inside another shard_map (Distributed Lion's vote over `data`) its manual axes are
    # already split: this one is manual over the others.
    sizes = {a: n for a, n in zip(mesh.axis_names, mesh.axis_sizes) if a not in mesh.manual_axes}
    batch = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    ep, tp = sizes.get(EXPERT_AXIS, 1), sizes.get(TENSOR_AXIS, 1)
    if num_experts % ep:
        raise ValueError(f"the expert mesh axis ({ep}) does not divide num_experts={num_experts}")
    if x.shape[0] % math.prod(sizes[a] for a in batch):  # a few tokens (sampling): left to GSPMD
        return local_dispatch(x, experts, weights, w_gate, w_up, w_down, num_experts=num_experts,
                              matmul=matmul)
    hidden = TENSOR_AXIS if tp > 1 and w_gate.shape[2] % tp == 0 else None
    e_axis = EXPERT_AXIS if ep > 1 else None
    body = functools.partial(local_dispatch, num_experts=num_experts, matmul=matmul, ep=ep,
                             emulate=not ragged_exchange_compiles(platform, mesh), tensor=hidden is not None)
    tok = P(batch or None)
    return jax.shard_map(
        body, in_specs=(tok, tok, tok, P(e_axis, None, hidden), P(e_axis, None, hidden),
                        P(e_axis, None, hidden)),
        out_specs=tok, axis_names=frozenset(sizes), check_vma=False)(x, experts, weights, w_gate, w_up, w_down)
