"""Logical axis names for parameters and activations, and their mapping to mesh axes.

Every parameter in `models/` is created with `nnx.with_partitioning(init, (logical, ...))`
using the names below; activations are constrained at block boundaries with `constrain`.
A single rules table (`DEFAULT_RULES`) maps logical names to the physical mesh axes
`data`, `fsdp`, `expert` and `tensor`; the trainer may override it from config. Names that a
rule maps to `None` (or that are missing) stay replicated.

Build and call models inside `sharding_context(mesh, rules)`: with a mesh, flax shards
each annotated Variable as it is created (eager sharding) using these rules; with
`mesh=None` annotations are kept as metadata only, so models also run on one device.
Meshes are built with `jax.sharding.AxisType.Auto` axes (GSPMD-style propagation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
from flax.core import spmd as core_spmd
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None). Parameters are sharded over
# `fsdp` along their model dimension and over `tensor` along heads / MLP / vocab; a mixture
# of experts' weights over `expert` along their expert dimension. Outside the experts the
# `expert` axis is one more data-parallel axis, as in MaxText: activations are sharded over
# (data, fsdp, expert) along batch and the other weights over (fsdp, expert).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", ("fsdp", "expert")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("experts", "expert"),
    ("expert_embed", "fsdp"),  # an expert's model dimension (its expert dimension has `expert`)
    ("classes", None),
    ("patch", None),
    ("channels", None),
    ("posemb", None),
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


@contextlib.contextmanager
def sharding_context(
    mesh: jax.sharding.Mesh | None, rules: Sequence[tuple[str, object]] | None = None
) -> Iterator[None]:
    """Mesh + logical rules for model construction and tracing (see module doc)."""
    from flax import nnx

    rules = tuple(DEFAULT_RULES if rules is None else rules)
    if mesh is None:
        with nnx.use_eager_sharding(False), nnx.logical_axis_rules(rules):
            yield
        return
    # Eager sharding looks names up with dict.get, so drop axes this mesh lacks.
    present = []
    for name, target in rules:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.axis_names)
        present.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(present)):
        yield


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Sequence[tuple[str, object]] | None = None,
    mesh_axis_names: Sequence[str] | None = None,
) -> PartitionSpec:
    """PartitionSpec for `logical_axes` under `rules` (default: the active context rules).

    Mesh axes not in `mesh_axis_names` (when given) are dropped, so one rules table
    serves meshes that lack, e.g., a `tensor` axis.
    """
    if rules is None:
        rules = core_spmd.get_logical_axis_rules() or DEFAULT_RULES
    table = dict(rules)
    out = []
    used: set[str] = set()
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(
            a for a in axes
            if a not in used and (mesh_axis_names is None or a in mesh_axis_names)
        )
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op when no mesh is active. Mesh axes
    that are manual here (inside `jax.shard_map`) are left out."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    # Inside a shard_map, its manual axes are already split: constrain over the others.
    names = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    spec = logical_to_spec(logical_axes, mesh_axis_names=names)
    return jax.lax.with_sharding_constraint(x, spec)


def variable_shardings(abstract_state, mesh: jax.sharding.Mesh, rules=None):
    """NamedShardings for an `nnx.State` of (abstract) Variables carrying logical names.

    Variables without a sharding annotation are replicated, and so is any dimension
    whose size the mapped mesh axes do not divide (e.g. a 257-entry vocabulary on a
    2-way `tensor` axis), so every model fits every mesh. Mesh axes of size 1 are left out
    of the specs.
    """
    from flax import nnx

    def divisible(spec: PartitionSpec, shape) -> PartitionSpec:
        out = []
        for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            names = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))
                          if mesh.shape[a] > 1)
            ways = 1
            for name in names:
                ways *= mesh.shape[name]
            out.append(None if not names or dim % ways else names[0] if len(names) == 1 else names)
        return PartitionSpec(*out)

    def one(v):
        if isinstance(v, nnx.Variable):
            names = v.get_metadata().get("out_sharding")
            if names:
                spec = logical_to_spec(names, rules, mesh.axis_names)
                return NamedSharding(mesh, divisible(spec, v.shape))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def logical_axes(state) -> dict:
    """The logical axis names of every Variable of an `nnx.State` (abstract or concrete),
    as a pure dict shaped like `nnx.to_pure_dict(state)` whose leaves are tuples of names
    (None for a dimension without one, or for a Variable without an annotation)."""
    from flax import nnx

    out: dict = {}
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
    for path, v in leaves:
        names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = tuple(names) if names else (None,) * len(getattr(v, "shape", ()))
    return out
