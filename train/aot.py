"""Compile the real train step for a TPU topology on this CPU and report its memory.

    python -m train.aot --config=configs/vit.py:B/16 --topology=v4:2x2x2 [--json]
    python -m train.aot --config=configs/lm.py:8b --topology=v5e:16x16 --num_slices=2 \
        --config.mesh.dcn_data=2

Needs libtpu (`pip install -e '.[tpu]'`); nothing touches a chip. Prints parameters,
per-chip bytes of params / optimizer state / temporaries / total against the chip's HBM and
whether it fits; with jax >= 0.12 also what XLA allocates (`allocation_report`), which then
decides the fit. Exits 1 when the step does not fit, 2 on bad input. It reports no step time:
a roofline max(FLOPs / peak, bytes / bandwidth) is the chip's peak by definition whenever
compute dominates, and XLA's cost model counts no work inside kernels (custom calls) and a
scanned layer once, so neither is a measurement.

`compile_report` from another program needs the CLI's environment set before jax loads:
JAX_PLATFORMS=cpu, TPU_ACCELERATOR_TYPE (any TPU type; libtpu then never looks for a chip),
TPU_WORKER_HOSTNAMES=localhost and ALLOW_MULTIPLE_LIBTPU_LOAD=1, as `benchmarks/common.py` does.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # the CLI only compiles: jax on CPU, and libtpu never opens a chip
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # else libtpu logs 4 lines of errors
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiling processes at once

import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from train import cli, hardware, setup  # noqa: E402
from train.errors import ConfigError, UserError  # noqa: E402

_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


# Slice shapes Cloud TPU provisions (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): v5e and v6e
# are 2-D, up to 16x16; v4 and v5p are 3-D, 2x2x1 to 2x4x4, then multiples of 4 (full cubes).
_TWO_D = {(1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)}
_SMALL_3D = {(1, 2, 2), (2, 2, 2), (2, 2, 4), (2, 4, 4)}
SLICE_SHAPES_HINT = {
    "v5e": "one of 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16", "v6e": "one of 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16",
    "v4": "2x2x1, 2x2x2, 2x2x4, 2x4x4, or three multiples of 4 (4x4x4, 4x4x8, ...)",
    "v5p": "2x2x1, 2x2x2, 2x2x4, 2x4x4, or three multiples of 4 (4x4x4, 4x4x8, ...)"}


def _is_slice_shape(generation: str, dims: list[int]) -> bool:
    shape = tuple(sorted(dims))
    if generation in ("v5e", "v6e"):
        return shape in _TWO_D
    return len(shape) == 3 and (shape in _SMALL_3D or all(d % 4 == 0 for d in shape))


def topology_devices(topology: str, num_slices: int = 1):
    """(devices, Chip) of `num_slices` TPU slices like 'v4:2x2x2' or 'v5e:4x4' (one device
    per chip); with several slices, devices carry `slice_index` for a hybrid DCN mesh."""
    match = _TOPOLOGY.match(topology)
    if not match:
        raise ConfigError(
            f"unknown TPU topology {topology!r}; expected e.g. v4:2x2x2, v5e:4x4, v5p:2x2x2, v6e:2x2")
    chip = hardware.CHIPS[match.group(1)]
    dims = [int(d) for d in match.group(2).split("x")]
    if not _is_slice_shape(match.group(1), dims):
        raise ConfigError(f"{topology!r} is not a {match.group(1)} slice shape: {SLICE_SHAPES_HINT[match.group(1)]}")
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError("train.aot compiles with libtpu, which is not installed: pip install -e '.[tpu]'")
    from jax.experimental import topologies

    if not isinstance(num_slices, int) or num_slices < 1:
        raise ConfigError(f"--num_slices must be a positive integer, got {num_slices!r}")
    kwargs = {"chip_config_name": "megacore"} if chip.megacore else {}
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except Exception:
        # Slices smaller than one host need the host bounds spelled out.
        bounds = (dims + [1, 1, 1])[:3]
        try:
            desc = topologies.get_topology_desc(
                topology_name=topology, platform="tpu", chips_per_host_bounds=bounds, **kwargs)
        except Exception as e:
            raise ConfigError(f"cannot build TPU topology {topology!r}: {str(e).splitlines()[0]}") from None
    return list(desc.devices), chip


def shard_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (max over devices)."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def compile_report(config, topology: str, num_slices: int = 1) -> dict:
    """Compiles the train step of `config` for `topology` (x `num_slices`); returns the report."""
    devices, chip = topology_devices(topology, num_slices)
    built = setup.build(config, devices)
    mesh, state = built.mesh, built.abstract_state
    lowered = built.lower_train_step()
    report = {
        "topology": topology if num_slices == 1 else f"{num_slices} x {topology}", "chips": len(devices), "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "params": int(sum(math.prod(p.shape) for p in jax.tree.leaves(state.params))),
        "batch_size": config.batch_size,
        "optimizer": config.optimizer.name,
        "params_bytes_per_chip": shard_bytes(state.params),
        "optimizer_state_bytes_per_chip": shard_bytes(state.opt_state),
        "hbm_bytes_per_chip": chip.hbm_limit,
    }
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA reports out-of-memory as a compile error
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
            raise
        needed = re.search(r"(?:Used|required for HLO temporaries \()\s*([\d.]+)([KMGT]?)", message)
        report.update(fits=False, compile_error=message.strip().splitlines()[0][:300])
        if needed:
            scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[needed.group(2)]
            report["temp_bytes_per_chip"] = float(needed.group(1)) * scale
        return report

    mem = compiled.memory_analysis()
    live = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    total = live + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes
    report.update(temp_bytes_per_chip=mem.temp_size_in_bytes, total_bytes_per_chip=total,
                  fits=total <= chip.hbm_limit)
    report.update(allocation_report(mem, chip.hbm_limit))
    return report


def allocation_report(mem, hbm_limit: int) -> dict:
    """What XLA itself allocates in HBM, where the jax exposes it (jax >= 0.12; not 0.10).

    `total_allocation_bytes` is the sum of the program's buffer allocations, arguments
    included: the figure XLA:TPU's out-of-memory check compares with HBM (its error's "memory
    required for HLO temporaries" is this number). `temp_size_in_bytes` (the report's
    `temp_bytes_per_chip`, what MaxText prints) equals it minus the arguments for MaxText's
    steps but exceeds that for ours (by 2.5 GB for Qwen3-30B-A3B on v5e-64, 4.0 GB for the 8b
    on v5p-64; on a toy scan it appears with libtpu's bf16 propagation, docs/results.md), so
    arguments + `temp_size` overstates what the step needs. With the allocation known, `fits`
    is decided from it."""
    allocated = int(getattr(mem, "total_allocation_bytes", 0) or 0)
    if not allocated:
        return {}
    code = mem.generated_code_size_in_bytes
    return {"allocated_bytes_per_chip": allocated + code,
            "allocated_temp_bytes_per_chip": allocated - mem.argument_size_in_bytes,
            "fits": allocated + code <= hbm_limit}


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = [
        f"topology        {r['topology']} ({r['chips']} x {r['device_kind']}), mesh {r['mesh']}",
        f"params          {r['params']:,}   optimizer {r['optimizer']}   batch {r['batch_size']}",
        f"params/chip     {gib(r['params_bytes_per_chip'])}",
        f"opt state/chip  {gib(r['optimizer_state_bytes_per_chip'])}",
    ]
    if "temp_bytes_per_chip" in r:
        lines.append(f"temporaries     {gib(r['temp_bytes_per_chip'])}")
    if "total_bytes_per_chip" in r:
        lines.append(f"total/chip      {gib(r['total_bytes_per_chip'])} of {gib(r['hbm_bytes_per_chip'])} HBM")
    elif "temp_bytes_per_chip" in r:
        lines[-1] += f" (the compiler needed more than {gib(r['hbm_bytes_per_chip'])} HBM)"
    if "allocated_bytes_per_chip" in r:
        lines.append(f"XLA allocates   {gib(r['allocated_bytes_per_chip'])} of {gib(r['hbm_bytes_per_chip'])} HBM "
                     f"with arguments and code (temporaries {gib(r['allocated_temp_bytes_per_chip'])})")
    lines.append(f"fits            {'yes' if r['fits'] else 'NO'}")
    if "compile_error" in r:
        lines.append(f"compiler        {r['compile_error']}")
    return "\n".join(lines)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config: configs/<file>.py:<variant>.")
_TOPOLOGY_FLAG = flags.DEFINE_string("topology", None, "TPU topology, e.g. v4:2x2x2 or v5e:16x16.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Number of slices (multi-slice over DCN; set config.mesh.dcn_*).")
_JSON = flags.DEFINE_bool("json", False, "Print the report as JSON.")


def main(argv) -> None:
    del argv
    try:
        report = compile_report(_CONFIG.value, _TOPOLOGY_FLAG.value, _NUM_SLICES.value)
    except UserError as e:
        cli.fail(str(e))
    print(json.dumps(report, indent=1) if _JSON.value else format_report(report), flush=True)
    sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("config", "topology"))
