"""Test setup: 8 virtual CPU devices, set before jax is imported anywhere."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# libtpu (from the `tpu` extra) must never try to open a chip during tests.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")
# Compile-only use of libtpu: several processes may load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
