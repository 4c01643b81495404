"""What the ViT and the decoder share about their stack of identical layers.

With `scan_layers` a model holds one layer module whose parameters have a leading `layers`
axis (built by `nnx.vmap`, run by `nnx.scan`: compile time stays flat in depth); otherwise
an `nnx.List` of layers. `stack` / `unstack` convert parameters between the two layouts,
`remat` wraps one layer's call in the configured rematerialisation policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.spec import REMAT_POLICIES  # noqa: F401 - re-exported

# Activations a layer names with `name` (`jax.ad_checkpoint.checkpoint_name`) for the
# MaxText-style policies: save_qkv_proj keeps the q, k, v projections, save_dot_except_mlp
# also the attention output projection; everything else is recomputed.
QKV_PROJ = ("query_proj", "key_proj", "value_proj")
_SAVED_NAMES = {"save_qkv_proj": QKV_PROJ, "save_dot_except_mlp": QKV_PROJ + ("out_proj",)}
# Metadata for nnx.vmap / nnx.scan: the stacked axis is the logical axis "layers".
LAYERS = {nnx.PARTITION_NAME: "layers"}


def make_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num: int, scan: bool,
                rngs: nnx.Rngs):
    """`num` layers from `make_layer(rngs)`: one stacked module when `scan`, else a list."""
    if not scan:
        return nnx.List([make_layer(rngs) for _ in range(num)])

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYERS)
    def stacked(rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(rngs)

    return stacked(rngs)


def name(x: jax.Array, label: str) -> jax.Array:
    """`x` tagged `label` for the remat policies that save it by name (identity otherwise)."""
    return checkpoint_name(x, label)


def remat(fn: Callable, policy: str, in_scan: bool) -> Callable:
    """`fn` (one layer's call) rematerialised per `policy` in REMAT_POLICIES: "full" keeps
    only its inputs, "save_dots" also its matmul outputs, "save_qkv_proj" /
    "save_dot_except_mlp" the activations named so (see _SAVED_NAMES), "none" returns `fn`."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat={policy!r} is not one of {REMAT_POLICIES}")
    if policy == "none":
        return fn
    saved = None
    if policy == "save_dots":
        saved = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    elif policy in _SAVED_NAMES:
        saved = jax.checkpoint_policies.save_only_these_names(*_SAVED_NAMES[policy])
    # Inside scan the loop already stops CSE across the boundary; outside it must not.
    return nnx.remat(fn, policy=saved, prevent_cse=not in_scan)


def stack(per_layer: Mapping[int, object]):
    """{0: layer params, 1: ...} (pure dicts) -> one tree with a leading `layers` axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *(per_layer[i] for i in sorted(per_layer)))


def unstack(stacked) -> dict[int, object]:
    """Inverse of `stack`: a tree with a leading `layers` axis -> {0: ..., 1: ...}."""
    num = jax.tree.leaves(stacked)[0].shape[0]
    return {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num)}
