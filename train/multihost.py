"""Multi-process setup: Cloud TPU pods and SLURM jobs (auto-detected) or explicit flags.

On a multi-host TPU VM slice, and in a SLURM job step of several tasks (`srun`, one task per
GPU node), `jax.distributed.initialize()` discovers everything itself (the coordinator is
the first node of SLURM_JOB_NODELIST; GPUs then talk over NCCL). Elsewhere (other launchers,
CPU tests with several processes) pass a coordinator address, process count and id, by
flags or by the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID. CPU processes talk through gloo collectives.
"""

from __future__ import annotations

import os

import jax

from train.errors import ConfigError


def _on_tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def _in_slurm_job_step() -> bool:
    """Inside `srun` with more than one task (SLURM_STEP_ID is set only within a job step)."""
    return "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def skip_tpu_probe_without_chips() -> None:
    """With libtpu installed (the `tpu` and `test` extras) jax tries the TPU backend first,
    and on a machine without TPU chips libtpu prints five lines of errors about worker
    hostnames before jax falls back. There, unless JAX_PLATFORMS says otherwise, use the CPU
    (or leave the choice to jax when a CUDA plugin is installed). Call before any jax work."""
    import importlib.util

    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if any(importlib.util.find_spec(p) for p in ("jax_cuda13_plugin", "jax_cuda12_plugin")):
        return
    try:
        from jax._src import hardware_utils  # how jax itself counts TPU chips (PCI ids)

        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except Exception:  # noqa: BLE001 - a jax without it: leave the choice to jax
        return
    if chips == 0:
        jax.config.update("jax_platforms", "cpu")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator:
        if num_processes is None or process_id is None:
            raise ConfigError("--coordinator needs --num_processes and --process_id")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id {process_id} is not in [0, {num_processes})")
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif _on_tpu_pod() or _in_slurm_job_step():
        jax.distributed.initialize()
