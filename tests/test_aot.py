"""train.aot: the real train step compiled for TPU topologies on this CPU (libtpu)."""

import json
import re
import os
import subprocess
import sys

import jax
import pytest

from configs import lm as lm_configs
from configs import vit as vit_configs

pytest.importorskip("libtpu", reason="the `tpu` extra (libtpu) is part of the test install")

from train import aot, setup  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train.errors import ConfigError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30


def _needed(report) -> int:
    """Bytes per chip the step needs: XLA's allocation where jax reports it (0.12), else
    arguments + libtpu's temp_size (0.10; larger than the allocation for our steps)."""
    return report.get("allocated_bytes_per_chip", report["total_bytes_per_chip"])


def test_vit_b16_on_v4_state_bytes_and_lion_quarter_of_adamw():
    """Per-chip parameter and optimizer-state bytes as compile_report counts them (from the
    sharded abstract state, before compiling; the fit tests below compile)."""
    config = vit_configs.get_config("B/16")
    config.batch_size, config.model.remat = 64, "full"
    devices, chip = aot.topology_devices("v4:2x2x1")
    assert len(devices) == 4 and devices[0].device_kind == "TPU v4" and chip.hbm_limit == 30.75 * GiB
    state = setup.build(config, devices).abstract_state
    assert sum(x.size for x in jax.tree.leaves(state.params)) == 86_567_656
    # Parameters are replicated over the 4-way data axis: full fp32 copy per chip.
    assert aot.shard_bytes(state.params) == 4 * 86_567_656
    assert aot.shard_bytes(state.opt_state) == pytest.approx(2 * 86_567_656, rel=1e-3)

    config.optimizer.name = "adamw"
    state = setup.build(config, devices).abstract_state
    assert aot.shard_bytes(state.opt_state) == pytest.approx(8 * 86_567_656, rel=1e-3)


def test_vit_b16_batch_4096_without_remat_fits_8_v4_chips():
    """The paper's setting (no remat, Lion): splash attention, and LayerNorm / GELU / the
    kernel recomputed in the backward, keep the step within a v4 chip's 30.75 GiB."""
    config = vit_configs.get_config("B/16")
    config.model.remat = "none"
    report = aot.compile_report(config, "v4:2x2x2")
    assert report["fits"], report
    assert _needed(report) <= 30.75 * GiB


def test_llama3_8b_fits_eight_v5e_chips_at_seq_8192():
    """`configs/lm.py:8b-v5e`: 1 sequence of 8192 per 16 GiB chip with int8 Lion momentum,
    the fused apply, the vocabulary-sliced loss and libtpu's bf16 propagation off (without
    the last the same step needs ~18.5 GB per chip and does not fit)."""
    report = aot.compile_report(lm_configs.get_config("8b-v5e"), "v5e:2x4")
    assert report["params"] == 8_030_261_248 and report["batch_size"] == 8
    assert report["fits"], report
    assert _needed(report) <= 16 * GiB


def test_lm_1b_on_v5e_is_fsdp_sharded_a_quarter_per_chip():
    config = lm_configs.get_config("1b")
    config.batch_size, config.data.seq_len, config.model.max_seq_len = 8, 256, 256
    built = setup.build(config, aot.topology_devices("v5e:2x2")[0])
    assert sum(x.size for x in jax.tree.leaves(built.abstract_state.params)) == 1_100_048_384
    assert dict(built.mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    # fsdp shards every matrix 4 ways (the 2048-wide norms too): a quarter per chip.
    assert aot.shard_bytes(built.abstract_state.params) == pytest.approx(4 * 1_100_048_384 / 4, rel=1e-3)
    assert aot.shard_bytes(built.abstract_state.opt_state) == pytest.approx(2 * 1_100_048_384 / 4, rel=1e-3)


def _aot_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "train.aot", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_exit_codes():
    bad = _aot_cli("--config=configs/lm.py:1b", "--topology=v9:2x2")
    assert bad.returncode == 2 and "unknown TPU topology 'v9:2x2'" in bad.stderr
    assert "Traceback" not in bad.stderr
    # 8B fp32 weights + Lion state + grads cannot fit four 16 GiB chips.
    nofit = _aot_cli("--config=configs/lm.py:8b", "--topology=v5e:2x2", "--json",
                     "--config.batch_size=4", "--config.data.seq_len=256", "--config.model.max_seq_len=256")
    assert nofit.returncode == 1, nofit.stderr[-2000:]
    assert "unexpected worker hostname" not in nofit.stderr  # libtpu's start-up errors
    report = json.loads(nofit.stdout)
    assert report["fits"] is False and report["params"] == 8_030_261_248
    assert not [k for k in report if "roofline" in k or "mfu" in k or "seconds" in k]  # no step time


def test_unknown_topology_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown TPU topology"):
        aot.topology_devices("v4:2x2x2x2")
    # Shapes that parse but are not slices Cloud TPU provisions (libtpu accepted v4:3x3).
    for topology in ("v4:3x3", "v4:2x2", "v5p:4x4x6", "v5e:3x3", "v6e:2x2x2"):
        with pytest.raises(ConfigError, match=f"'{topology}' is not a {topology.split(':')[0]} slice shape"):
            aot.topology_devices(topology)


def test_hybrid_mesh_over_two_slices():
    devices, _ = aot.topology_devices("v5e:2x2", num_slices=2)
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 2, "dcn_data": 2}, devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "expert": 1, "tensor": 1}
    slices = [[d.slice_index for d in row] for row in mesh.devices[:, :, 0, 0]]
    # The DCN factor is the outer part of `data`: only data-parallel traffic crosses slices.
    assert slices == [[0, 0], [0, 0], [1, 1], [1, 1]]


@pytest.mark.parametrize("family", ["lm", "vit"])
def test_tpu_step_runs_the_splash_kernel(family):
    """attention='auto' on a TPU topology compiles the splash kernel (Mosaic custom calls
    for the forward and the backward) and no [batch, heads, seq, seq] score tensor."""
    if family == "lm":
        config = lm_configs.get_config("demo")
        config.batch_size, config.data.seq_len = 8, 256
    else:
        config = vit_configs.get_config("demo")
        config.batch_size = 8
    lowered = setup.build(config, aot.topology_devices("v5e:2x2")[0]).lower_train_step()
    hlo = lowered.compile().as_text()
    kernels = {re.match(r"\s*%?([\w]+)", line).group(1) for line in hlo.splitlines()
               if 'custom_call_target="tpu_custom_call"' in line}
    assert any(k.startswith("splash_mha_fwd") for k in kernels), kernels
    assert any(k.startswith("splash_mha_dq") for k in kernels), kernels
    assert any(k.startswith("splash_mha_dkv") for k in kernels), kernels
    if family == "lm":  # with attention='xla' this step holds 177 [..., 256, 256] arrays
        assert not re.search(r"\w+\[[\d,]*256,256\]", hlo)


def test_tpu_moe_step_runs_megablox_and_the_ragged_all_to_all():
    """A mixture of experts on a TPU topology with the experts split over 2 chips: the grouped
    matmuls are the megablox kernels (gmm forward, gmm and tgmm backward) and tokens travel
    by ragged all-to-all; no [tokens, experts, ...] tensor appears."""
    config = lm_configs.get_config("moe-demo")
    config.batch_size, config.data.seq_len, config.mesh.expert = 8, 256, 2
    built = setup.build(config, aot.topology_devices("v5e:2x2")[0])
    assert dict(built.mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 1}
    hlo = built.lower_train_step().compile().as_text()
    kernels = {re.match(r"\s*%?([\w]+)", line).group(1) for line in hlo.splitlines()
               if 'custom_call_target="tpu_custom_call"' in line}
    assert "gmm" in kernels and "tgmm" in kernels, kernels
    assert "ragged-all-to-all" in hlo
    # 512 tokens per chip x 8 experts would be a [512, 8, ...] or [8, 512, ...] dispatch tensor.
    assert not re.search(r"\[(512,8|8,512),\d+\]", hlo)


def test_expert_parallelism_compiles_on_v5e_slices_without_the_ragged_all_to_all():
    """libtpu cannot compile a ragged all-to-all on v5e slices of more than 16 chips ("limited
    ICI routing"): there the tokens travel by the padded all_to_all, and the step compiles."""
    config = lm_configs.get_config("moe-demo")
    config.batch_size, config.data.seq_len, config.mesh.expert = 32, 128, 2
    built = setup.build(config, aot.topology_devices("v5e:4x8")[0])
    hlo = built.lower_train_step().compile().as_text()
    assert "ragged-all-to-all" not in hlo and "all-to-all" in hlo


def test_moe_layers_spend_only_the_active_experts_flops():
    """XLA's count for the model's forward pass (layers unrolled, the XLA ragged_dot path, whose
    TPU cost model counts the rows it multiplies): the mixture of experts (8 experts of width
    192, 2 per token) minus the dense model of the same active width (384) is the routers'
    cost alone, so the experts' FLOPs per token are the active experts'. A dense dispatch
    (every expert on every token) would be 4x. (The backward is not checked here: XLA:TPU
    lowers ragged_dot's weight gradient as a masked dense product, experts x the active
    FLOPs, which is why the TPU step uses megablox's tgmm kernel, and XLA counts no FLOPs
    inside kernels; docs/moe.md.)"""
    from train.analysis import moe_flops

    ratio = moe_flops.moe_layers_over_active()
    assert ratio < 1.15, ratio


def test_the_fit_is_what_xla_allocates_when_the_jax_reports_it():
    """With `total_allocation_bytes` (jax >= 0.12) the fit is XLA's allocation (arguments
    included) plus code, not arguments + `temp_size_in_bytes`, which for some programs exceeds
    what XLA allocates; without it (jax 0.10) the report is unchanged. On a real compile the
    printed report carries the allocation exactly when the jax gives it, and its fit follows it."""
    from types import SimpleNamespace

    mem = SimpleNamespace(argument_size_in_bytes=3 * GiB, temp_size_in_bytes=9 * GiB, generated_code_size_in_bytes=GiB,
                          total_allocation_bytes=10 * GiB)
    assert aot.allocation_report(mem, 12 * GiB) == {
        "allocated_bytes_per_chip": 11 * GiB, "allocated_temp_bytes_per_chip": 7 * GiB, "fits": True}
    assert aot.allocation_report(mem, 10.5 * GiB)["fits"] is False
    del mem.total_allocation_bytes  # jax 0.10
    assert aot.allocation_report(mem, 12 * GiB) == {}

    config = lm_configs.get_config("demo")
    config.update_from_flattened_dict({"model.num_layers": 2, "batch_size": 8})
    report = aot.compile_report(config, "v5e:2x2")
    text = aot.format_report(report)
    assert "needed more than" not in text and ("XLA allocates" in text) == ("allocated_bytes_per_chip" in report)
    if "allocated_bytes_per_chip" in report:
        assert 0 < report["allocated_temp_bytes_per_chip"] < report["allocated_bytes_per_chip"]
        assert report["fits"] == (report["allocated_bytes_per_chip"] <= report["hbm_bytes_per_chip"])
