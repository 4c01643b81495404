"""GPU and multi-node set-up that can be checked without the hardware: the launcher
detection, the chip table MFU uses, and the dependency ranges (tomllib, no resolver)."""

import functools
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


def _cudnn_packed_reference(q, k, v, bias, mask, q_seqlen, kv_seqlen, q_offsets, kv_offsets, *, scale,
                            mask_type, sliding_window_length=None):
    """What cuDNN's packed-sequence attention computes, transcribed from its documented layout
    in float64: each (offset, length) pair of a row is a sequence of its own, causal within
    itself (PADDING_CAUSAL), keys within the sliding window; tokens outside every segment
    get zeros."""
    import numpy as np

    from jax._src.cudnn.fused_attention_stablehlo import MaskType

    assert bias is None and mask is None
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape)
    group = q.shape[2] // k.shape[2]
    for b in range(q.shape[0]):
        for start, length in zip(np.asarray(q_offsets[b]), np.asarray(q_seqlen[b])):
            if length < 0:
                continue
            span = slice(start, start + length)
            logits = np.einsum("thd,shd->hts", q[b, span], np.repeat(k[b, span], group, axis=1)) * scale
            t, s = np.arange(length)[:, None], np.arange(length)[None, :]
            keep = s <= t if mask_type == MaskType.PADDING_CAUSAL else np.ones((length, length), bool)
            if sliding_window_length is not None:
                keep &= t - s < sliding_window_length
            logits = np.where(keep, logits, -np.inf)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[b, span] = np.einsum("hts,shd->thd", probs, np.repeat(v[b, span], group, axis=1))
    return out.astype(np.float32)


@pytest.mark.parametrize("window", [None, 5])
def test_cudnn_packed_documents_use_segment_lengths_not_a_mask(monkeypatch, window):
    """Packed documents reach cuDNN as segment lengths and offsets (its packed-sequence layout),
    not as a [seq, seq] mask: with cuDNN's documented semantics emulated (no GPU here), the
    result equals XLA's segment-id attention, for rows within `CUDNN_SEGMENTS` and for a
    batch with a row of more segments than that (the exact branch)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    from models import attention

    monkeypatch.setattr(attention, "platform", lambda: "gpu")
    monkeypatch.setattr(cudnn, "dot_product_attention", lambda *a, **kw: jax.pure_callback(
        functools.partial(_cudnn_packed_reference, **kw), jax.ShapeDtypeStruct(a[0].shape, jnp.float32), *a))
    seq = 80
    rng = np.random.default_rng(0)
    few = np.cumsum(rng.random((2, seq)) < 0.1, axis=1) + 1  # ~8 documents a row
    few[1, -7:] = 0  # padding at the end of a row
    many = np.arange(seq)[None] + 1  # one document per token: 80 > CUDNN_SEGMENTS
    assert attention.CUDNN_SEGMENTS < seq
    q, k, v = (jax.random.normal(key, (2, seq, heads, 8)).astype(jnp.bfloat16)
               for key, heads in zip(jax.random.split(jax.random.PRNGKey(1), 3), (4, 2, 2)))
    for ids in (few, np.concatenate([few[:1], many])):
        ids = jnp.asarray(ids, jnp.int32)
        got = attention.attend(q, k, v, implementation="cudnn", causal=True, segment_ids=ids, window=window)
        want = attention.xla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                       causal=True, segment_ids=ids, window=window)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2)


def test_packed_layout_lists_each_run_of_equal_ids():
    """The lengths and offsets equal a plain loop over each row's runs; rows with more runs
    than the layout holds keep the first ones, and `segment_count` says so."""
    import jax.numpy as jnp
    import numpy as np

    from models import attention

    rng = np.random.default_rng(3)
    ids = np.cumsum(rng.random((5, 40)) < 0.2, axis=1) + 1
    ids[2, 30:] = 0
    ids[3] = 1  # one segment
    for max_segments in (3, 12, 40):
        lengths, starts = attention.packed_layout(jnp.asarray(ids, jnp.int32), max_segments)
        for row, (l_row, s_row) in enumerate(zip(np.asarray(lengths), np.asarray(starts))):
            runs = [0] + [t for t in range(1, 40) if ids[row, t] != ids[row, t - 1]]
            want_starts = runs[:max_segments]
            ends = runs[1:] + [40]
            want_lengths = [e - s for s, e in zip(runs, ends)][:max_segments]
            pad = max_segments - len(want_starts)
            assert list(s_row) == want_starts + [-1] * (pad + 1)
            assert list(l_row) == want_lengths + [-1] * pad
        counts = [1 + int((ids[r, 1:] != ids[r, :-1]).sum()) for r in range(5)]
        assert list(np.asarray(attention.segment_count(jnp.asarray(ids)))) == counts
