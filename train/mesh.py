"""Device mesh from config: (data, fsdp, expert, tensor) on ICI, optionally x DCN for multi-slice.

    config.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_expert=1,
                       dcn_tensor=1)

`-1` fills one ICI axis with whatever devices remain. With any `dcn_*` > 1 the mesh is a
hybrid ICI x DCN mesh (each axis spans slices as dcn size x ICI size). Axes use
`AxisType.Auto` (GSPMD propagation), matching `models.partitioning`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.partitioning import MESH_AXES
from train.errors import ConfigError

DCN_AXES = tuple(f"dcn_{a}" for a in MESH_AXES)
# The mesh axes the global batch is split over (data parallelism, with FSDP as well).
BATCH_AXES = ("data", "fsdp", "expert")


def resolve_mesh_shape(mesh_cfg: Mapping, num_devices: int) -> tuple[dict[str, int], dict[str, int]]:
    """(ICI sizes, DCN sizes) per axis, with -1 filled; raises ConfigError when invalid."""
    unknown = set(mesh_cfg) - set(MESH_AXES) - set(DCN_AXES)
    if unknown:
        raise ConfigError(f"mesh: unknown axis {sorted(unknown)[0]!r}; axes are {list(MESH_AXES + DCN_AXES)}")
    ici = {a: mesh_cfg.get(a, 1) for a in MESH_AXES}
    dcn = {a: mesh_cfg.get(f"dcn_{a}", 1) for a in MESH_AXES}
    for name, size in [*ici.items(), *((f"dcn_{a}", s) for a, s in dcn.items())]:
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ConfigError(f"mesh.{name} must be a positive integer or -1, got {size!r}")
    if any(s == -1 for s in dcn.values()):
        raise ConfigError("mesh: -1 (fill) is allowed only on ICI axes (data, fsdp, expert, tensor)")
    fill = [a for a, s in ici.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {fill}")
    num_slices = math.prod(dcn.values())
    if num_devices % num_slices:
        raise ConfigError(f"mesh: {num_devices} devices do not split into {num_slices} DCN slices")
    per_slice = num_devices // num_slices
    fixed = math.prod(s for s in ici.values() if s != -1)
    if fill:
        if per_slice % fixed:
            raise ConfigError(
                f"mesh: cannot fill {fill[0]!r}: {per_slice} devices per slice not divisible by {fixed}")
        ici[fill[0]] = per_slice // fixed
    total = math.prod(ici.values()) * num_slices
    if total != num_devices:
        sizes = " x ".join(f"{a}={ici[a] * dcn[a]}" for a in MESH_AXES)
        raise ConfigError(f"mesh: {sizes} = {total} devices, but {num_devices} are available")
    return ici, dcn


def make_mesh(mesh_cfg: Mapping, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The training mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = resolve_mesh_shape(dict(mesh_cfg), len(devices))
    ici_shape = [ici[a] for a in MESH_AXES]
    dcn_shape = [dcn[a] for a in MESH_AXES]
    if math.prod(dcn_shape) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici_shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            # No topology-aware assignment for this shape/platform: row-major order.
            grid = np.asarray(devices).reshape(ici_shape)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=auto)


def batch_axis_size(mesh: Mesh) -> int:
    """Number of shards the global batch is split into (data x fsdp x expert)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, grad_accum_steps: int, mesh: Mesh, process_count: int) -> None:
    """Raises ConfigError unless each microbatch splits evenly over the batch axes and hosts."""
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {global_batch!r}")
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ConfigError(f"grad_accum_steps must be a positive integer, got {grad_accum_steps!r}")
    if global_batch % grad_accum_steps:
        raise ConfigError(f"batch_size {global_batch} is not divisible by grad_accum_steps {grad_accum_steps}")
    micro = global_batch // grad_accum_steps
    shards = batch_axis_size(mesh)
    if micro % shards:
        raise ConfigError(
            f"microbatch {micro} (batch_size {global_batch} / grad_accum_steps {grad_accum_steps}) "
            f"is not divisible by the data-parallel size data x fsdp x expert = {shards}")
    if global_batch % process_count:
        raise ConfigError(f"batch_size {global_batch} is not divisible by the {process_count} processes")


def to_global_batch(local_batch, mesh: jax.sharding.Mesh, spec: PartitionSpec | None = None):
    """Process-local numpy batch -> dict of global ``jax.Array``s sharded on the batch dim.

    ``spec`` defaults to the batch axes, ``PartitionSpec(("data", "fsdp"))`` (axes missing
    from the mesh are dropped); the global batch is the concatenation of all processes'
    local batches.
    """
    if spec is None:
        axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
        spec = PartitionSpec(axes if axes else None)
    sharding = NamedSharding(mesh, spec)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
