"""GPU and multi-node set-up that can be checked without the hardware: the launcher
detection, the chip table MFU uses, and the dependency ranges (tomllib, no resolver)."""

import os
import tomllib

import pytest

from train import hardware, multihost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"}, True),  # srun, 4 tasks
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False),  # the batch script itself, not a step
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}, False),  # one task
    ({}, False),
])
def test_multi_node_start_is_detected_under_srun_only(monkeypatch, env, expected):
    for key in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(multihost.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    multihost.initialize()
    assert calls == ([((), {})] if expected else [])


@pytest.mark.parametrize("kind, name", [("NVIDIA H200", "NVIDIA H200"), ("NVIDIA H100 80GB HBM3", "NVIDIA H100"),
                                        ("TPU v5 lite", "TPU v5e"), ("cpu", None)])
def test_chip_table_names_the_accelerators_mfu_is_measured_on(kind, name):
    chip = hardware.chip_for_device_kind(kind)
    assert (chip.name if chip else None) == name


def test_dependency_ranges_admit_the_current_jax_and_name_a_gpu_extra():
    project = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]
    jax_pin = next(d for d in project["dependencies"] if d.startswith("jax"))
    assert jax_pin == "jax>=0.10,<0.13"  # 0.10 on Python 3.11, 0.12 on 3.12+
    assert any(d.startswith("jax[cuda13]") for d in project["optional-dependencies"]["gpu"])
    # torch/transformers (test references) only where the CPU torch file exists.
    assert all("python_version < '3.12'" in d for d in project["optional-dependencies"]["test"]
               if d.startswith(("torch", "transformers")))


def test_auto_attention_on_gpu_runs_float32_and_softcap_through_xla(monkeypatch):
    """cuDNN's fused attention takes bf16/fp16 only: `auto` sends a float32 config (the demos)
    to XLA on a GPU, while naming `cudnn` with float32 inputs is an error."""
    import jax
    import numpy as np

    from models import attention

    monkeypatch.setattr(attention, "platform", lambda: "gpu")
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 16, 4, 8))
    got = attention.attend(q, k, v, implementation="auto", causal=True)
    np.testing.assert_array_equal(got, attention.xla_attention(q, k, v, causal=True))
    with pytest.raises(attention.UnavailableAttention, match="needs bf16 or fp16"):
        attention.attend(q, k, v, implementation="cudnn", causal=True)
    # A logit soft-cap (cuDNN has none) also goes to XLA under `auto`, in bf16 (it raised).
    q, k, v = (x.astype(jax.numpy.bfloat16) for x in (q, k, v))
    got = attention.attend(q, k, v, implementation="auto", causal=True, logit_softcap=30.0)
    np.testing.assert_array_equal(got, attention.xla_attention(q, k, v, causal=True, logit_softcap=30.0))
    with pytest.raises(attention.UnavailableAttention, match="no logit soft-cap"):
        attention.attend(q, k, v, implementation="cudnn", causal=True, logit_softcap=30.0)
