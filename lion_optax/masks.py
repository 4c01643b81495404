"""Which parameters get weight decay.

The convention of ViT/LLM training (big_vision, MaxText, the Lion paper's setups):
decay weight matrices and kernels, never biases, norm scales or other vectors.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

__all__ = ["decay_mask"]

_EMBEDDING = re.compile(r"embed", re.IGNORECASE)


def _path_str(path) -> str:
    return "/".join(
        str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
    )


def decay_mask(
    params: Any,
    *,
    decay_embeddings: bool = True,
    exclude: Sequence[str] = (),
    stacked: Sequence[str] = (),
    logical_axes: Any = None,
    ignore_axes: Sequence[str] = ("layers",),
) -> Any:
    """A tree of bools like `params`: True where weight decay applies.

    Rules, in order:
      1. a leaf whose '/'-joined path matches any regex in `exclude` is not decayed;
      2. with `decay_embeddings=False`, a leaf whose path contains "embed"
         (token/position embeddings, case-insensitive) is not decayed;
      3. otherwise a leaf is decayed iff it has at least two feature axes: matrices,
         kernels and embedding tables are decayed; biases, norm scales and other
         vectors or scalars are not. Feature axes are counted as:
         - plain pytrees: `ndim`, less one leading axis for each regex in `stacked`
           that the leaf's path matches. Layers stacked for `nnx.scan` / `lax.scan`
           carry a leading layer axis that is not a feature axis: with the stack under
           a `layers` key, `stacked=(r"(^|/)layers/",)` keeps stacked biases and norm
           scales (2-D there) undecayed;
         - with `logical_axes` (a pytree like `params` whose leaves are tuples of
           logical axis names, as given to `nnx.with_partitioning`): the names that
           are not None (broadcast axes of size 1) and not in `ignore_axes` (default
           `("layers",)`, the stacking axis). Models that split a feature axis into
           heads x head_dim can add "head_dim" so that a (heads, head_dim) bias counts
           as the vector it is.

    Usable directly as `lion(..., mask=decay_mask)` or with options via
    `mask=functools.partial(decay_mask, stacked=(r"(^|/)layers/",))`. Works on dicts,
    `flax.nnx.State` and any pytree whose leaves have `.ndim` (arrays or
    `jax.ShapeDtypeStruct`).
    """
    patterns = [re.compile(p) for p in exclude]
    stacks = [re.compile(p) for p in stacked]
    ignored = frozenset(ignore_axes)

    def excluded(path) -> tuple[str, bool]:
        name = _path_str(path)
        if any(p.search(name) for p in patterns):
            return name, True
        return name, not decay_embeddings and bool(_EMBEDDING.search(name))

    def by_shape(path, leaf) -> bool:
        name, skip = excluded(path)
        return not skip and leaf.ndim - sum(1 for s in stacks if s.search(name)) >= 2

    def by_names(path, leaf, names) -> bool:
        del leaf
        _, skip = excluded(path)
        return not skip and sum(1 for n in names if n is not None and n not in ignored) >= 2

    if logical_axes is None:
        return jax.tree_util.tree_map_with_path(by_shape, params)
    return jax.tree_util.tree_map_with_path(by_names, params, logical_axes)
