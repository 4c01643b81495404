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
) -> Any:
    """A tree of bools like `params`: True where weight decay applies.

    Rules, in order:
      1. a leaf whose '/'-joined path matches any regex in `exclude` is not decayed;
      2. with `decay_embeddings=False`, a leaf whose path contains "embed"
         (token/position embeddings, case-insensitive) is not decayed;
      3. otherwise leaves with `ndim >= 2` (dense kernels, conv kernels, embedding
         tables, stacked scan-layer weights of matrices) are decayed, and vectors and
         scalars (biases, LayerNorm/RMSNorm scales) are not.

    Stacked (scanned) layers carry an extra leading axis, so a stacked bias is 2-D;
    exclude those by name (e.g. `exclude=("bias", "scale")`) when using scan.

    Usable directly as `lion(..., mask=decay_mask)` or with options via
    `mask=functools.partial(decay_mask, decay_embeddings=False)`. Works on dicts,
    `flax.nnx.State` and any pytree whose leaves have `.ndim` (arrays or
    `jax.ShapeDtypeStruct`).
    """
    patterns = [re.compile(p) for p in exclude]

    def flag(path, leaf) -> bool:
        name = _path_str(path)
        if any(p.search(name) for p in patterns):
            return False
        if not decay_embeddings and _EMBEDDING.search(name):
            return False
        return leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(flag, params)
