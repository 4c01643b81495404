"""Attention kernels (models.attention) and the chunked LM loss (models.lm_loss).

The Pallas TPU kernels run in interpret mode on CPU; each is compared with a float64
NumPy transcription of attention (forward) and with the XLA path (gradients).
"""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from models import attention, lm_loss, partitioning
from models.decoder import Decoder, decoder_config
from models.vit import ViT, vit_config

from _util import REPO, cli_flags

KERNELS = ["splash_interpret", "flash_interpret"]


def reference_attention(q, k, v, causal, segment_ids, window=None):
    """float64 attention, one (batch, head) at a time, GQA by head // group; `window`: key j
    allowed for query i only when i - window < j (a sliding window)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, seq, heads, _ = q.shape
    groups = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            scores = q[b, :, h] @ k[b, :, h // groups].T
            allowed = np.ones((seq, seq), bool)
            if causal:
                allowed &= np.tril(np.ones((seq, seq), bool))
            if window is not None:
                allowed &= np.arange(seq)[None, :] > np.arange(seq)[:, None] - window
            if segment_ids is not None:
                s = np.asarray(segment_ids[b])
                allowed &= s[:, None] == s[None, :]
            scores = np.where(allowed, scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // groups]
    return out


def qkv(seq=200, heads=4, kv_heads=2, head_dim=32, batch=2, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    shapes = [(batch, seq, h, head_dim) for h in (heads, kv_heads, kv_heads)]
    return [jax.random.normal(key, s, jnp.float32) for key, s in zip(keys, shapes)]


def packed_segments(batch, seq):
    """Two or three documents per row, boundaries not on a block edge."""
    ids = np.ones((batch, seq), np.int32)
    ids[:, 70:] = 2
    ids[1:, 150:] = 3
    return jnp.asarray(ids)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal,segmented", [(True, True), (False, False)])
def test_kernel_matches_reference_forward_and_gradients(kernel, causal, segmented):
    """Length 200 (not a block multiple), 4 query heads over 2 K/V heads."""
    q, k, v = qkv()
    seg = packed_segments(2, 200) if segmented else None
    run = lambda impl: lambda q, k, v: attention.attend(  # noqa: E731
        q, k, v, implementation=impl, causal=causal, segment_ids=seg)
    out = run(kernel)(q, k, v)
    np.testing.assert_allclose(out, reference_attention(q, k, v, causal, seg), atol=2e-5, rtol=2e-5)

    probe = jax.random.normal(jax.random.PRNGKey(9), out.shape)
    grads = jax.grad(lambda *a: jnp.sum(run(kernel)(*a) * probe), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: jnp.sum(run("xla")(*a) * probe), argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, atol=2e-4 * float(jnp.abs(e).max()), rtol=1e-3)


@pytest.mark.parametrize("kernel", ["xla", "splash_interpret"])
def test_sliding_window_matches_reference_forward_and_gradients(kernel):
    """A window of 100 over 600 positions (two 512-blocks of splash, so a whole key block
    falls outside the band), with packed documents: forward against the float64 reference,
    gradients against the XLA path; a window as long as the sequence is plain causal
    attention, and the flash kernel, which has no window, refuses one."""
    q, k, v = qkv(seq=600, heads=2, kv_heads=1, head_dim=16, batch=1)
    seg = jnp.asarray(np.where(np.arange(600) < 333, 1, 2)[None], jnp.int32)
    run = lambda impl, w: lambda q, k, v: attention.attend(  # noqa: E731
        q, k, v, implementation=impl, causal=True, segment_ids=seg, window=w)
    out = run(kernel, 100)(q, k, v)
    np.testing.assert_allclose(out, reference_attention(q, k, v, True, seg, window=100), atol=2e-5, rtol=2e-5)
    assert np.abs(np.asarray(out) - reference_attention(q, k, v, True, seg))[:, 100:333].max() > 1e-2
    np.testing.assert_array_equal(run(kernel, 600)(q, k, v), run(kernel, None)(q, k, v))
    if kernel != "xla":
        probe = jax.random.normal(jax.random.PRNGKey(9), out.shape)
        grads = jax.grad(lambda *a: jnp.sum(run(kernel, 100)(*a) * probe), argnums=(0, 1, 2))(q, k, v)
        expected = jax.grad(lambda *a: jnp.sum(run("xla", 100)(*a) * probe), argnums=(0, 1, 2))(q, k, v)
        for g, e in zip(grads, expected):
            np.testing.assert_allclose(g, e, atol=2e-4 * float(jnp.abs(e).max()), rtol=1e-3)
    with pytest.raises(attention.UnavailableAttention, match="has no sliding window"):
        run("flash_interpret", 100)(q, k, v)


def test_recompute_over_batch_chunks_matches_reference():
    """The path real ViT batches take (recompute, several sequences per kernel call, one
    call per chunk): 4 sequences of 128 in chunks of 2, forward against float64 and
    gradients against XLA."""
    q, k, v = qkv(seq=128, batch=4, seed=3)
    seg = packed_segments(4, 128) * (jnp.arange(128) < 110)  # a third segment id: padding-like
    run = lambda impl, **kw: lambda q, k, v: attention.attend(  # noqa: E731
        q, k, v, implementation=impl, causal=False, segment_ids=seg, **kw)
    chunked = run("splash_interpret", recompute=True, recompute_chunk_tokens=256)
    out = chunked(q, k, v)
    np.testing.assert_allclose(out, reference_attention(q, k, v, False, seg), atol=2e-5, rtol=2e-5)
    probe = jax.random.normal(jax.random.PRNGKey(8), out.shape)
    grads = jax.grad(lambda *a: jnp.sum(chunked(*a) * probe), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: jnp.sum(run("xla")(*a) * probe), argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, atol=2e-4 * float(jnp.abs(e).max()), rtol=1e-3)


def test_splash_kernel_built_in_one_trace_serves_the_next():
    """The kernel is cached per shape; built inside the train step's trace (under a scan,
    as scanned layers do) it is reused by the eval step's trace and must hold no tracers."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 72, 3, 8)) for i in range(3))  # a shape of its own
    attend = lambda q, k, v: attention.attend(q, k, v, implementation="splash_interpret", causal=True)  # noqa: E731
    in_scan = jax.jit(lambda q, k, v: jax.lax.scan(lambda c, _: (c, attend(q, k, v)), 0, None, length=1)[1][0])
    np.testing.assert_allclose(in_scan(q, k, v), jax.jit(attend)(q, k, v), atol=1e-6)


def test_xla_path_matches_reference():
    q, k, v = qkv(seq=40)
    seg = packed_segments(2, 40).at[:, 30:].set(5)
    out = attention.attend(q, k, v, implementation="xla", causal=True, segment_ids=seg)
    np.testing.assert_allclose(out, reference_attention(q, k, v, True, seg), atol=1e-5, rtol=1e-5)


def test_auto_picks_the_platform_kernel():
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "gpu") == "cudnn"
    assert attention.resolve("auto", "cpu") == "xla"
    for name, backend in [("splash", "cpu"), ("flash", "gpu"), ("cudnn", "tpu")]:
        with pytest.raises(attention.UnavailableAttention, match=name):
            attention.resolve(name, backend)


def _decoder_loss_and_grads(cfg, tokens, segment_ids, mesh=None):
    with partitioning.sharding_context(mesh):
        model = Decoder(cfg, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens, segment_ids=segment_ids)
            return lm_loss.cross_entropy_loss(logits, tokens)[0]

        return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("kernel", KERNELS)
def test_sharded_decoder_with_kernel_equals_unsharded_xla(kernel):
    """8 CPU devices (data 2 x fsdp 2 x tensor 2): the kernel runs per shard of batch and
    heads under shard_map; loss and every gradient equal the unsharded XLA model's."""
    cfg = decoder_config("tiny", scan_layers=True, attention="xla")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 136), 0, cfg.vocab_size)
    seg = jnp.asarray(np.repeat([[1] * 50 + [2] * 86], 4, 0), jnp.int32)
    ref_loss, ref_grads = _decoder_loss_and_grads(cfg, tokens, seg)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    loss, grads = _decoder_loss_and_grads(dataclasses.replace(cfg, attention=kernel), tokens, seg, mesh)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, e, atol=1e-5 + 1e-3 * float(jnp.abs(e).max()), rtol=1e-3)


def test_vit_with_splash_equals_xla():
    """Non-causal, 17 tokens (16 patches + class token) padded to the block and masked."""
    cfg = vit_config("Ti/4", width=32, depth=2, mlp_dim=64, num_heads=2, image_size=16,
                     num_classes=10, scan_layers=True, attention="xla")
    images = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))

    def loss_and_grads(cfg):
        graphdef, params = nnx.split(ViT(cfg, rngs=nnx.Rngs(0)))
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(images) ** 2)  # noqa: E731
        return jax.value_and_grad(loss)(params)

    with partitioning.sharding_context(None):
        ref_loss, ref_grads = loss_and_grads(dataclasses.replace(cfg, head_zero_init=False))
        loss, grads = loss_and_grads(dataclasses.replace(cfg, head_zero_init=False,
                                                         attention="splash_interpret"))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # The key bias's gradient is zero in exact arithmetic (softmax ignores a per-query
    # shift), so compare against the largest gradient, not each leaf's own.
    scale = max(float(jnp.abs(e).max()) for e in jax.tree.leaves(ref_grads))
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, e, atol=1e-5 * scale, rtol=1e-3)


def test_chunked_loss_equals_plain_loss_and_gradients():
    batch, seq, d, vocab = 2, 24, 16, 300
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    hidden = jax.random.normal(keys[0], (batch, seq, d))
    head = jax.random.normal(keys[1], (d, vocab)) * 0.5
    targets = jax.random.randint(keys[2], (batch, seq), 0, vocab)
    # Half the targets are the argmax, so the accuracy is not 0 (and its id mapping counts).
    top = jnp.argmax(jnp.einsum("btd,dv->btv", hidden, head), -1)
    targets = jnp.where(jnp.arange(seq) % 2 == 0, top, targets)
    mask = (jax.random.uniform(keys[3], (batch, seq)) > 0.2).astype(jnp.float32)

    def loss(hidden, head, chunk, vocab_chunks=1):
        return lm_loss.chunked_cross_entropy(hidden, head, targets, mask, 1e-2, chunk, vocab_chunks)

    plain, plain_grads = jax.value_and_grad(lambda *a: loss(*a, 0)[0], argnums=(0, 1))(hidden, head)
    # float64 transcription of the mean masked NLL + z-loss.
    logits = np.einsum("btd,dv->btv", np.float64(hidden), np.float64(head))
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    m = np.float64(mask)
    expected = ((log_z - target) * m).sum() / m.sum() + 1e-2 * (log_z ** 2 * m).sum() / m.sum()
    np.testing.assert_allclose(plain, expected, rtol=1e-5)
    accuracy = np.mean((logits.argmax(-1) == np.asarray(targets))[m > 0])
    assert accuracy > 0.4
    np.testing.assert_allclose(loss(hidden, head, 0)[1]["accuracy"], accuracy, rtol=1e-6)
    for chunk, vocab_chunks in ((4, 1), (8, 1), (0, 3), (0, 5), (8, 4)):
        value, grads = jax.value_and_grad(lambda *a: loss(*a, chunk, vocab_chunks)[0],
                                          argnums=(0, 1))(hidden, head)
        np.testing.assert_allclose(value, plain, rtol=1e-6)
        for g, e in zip(grads, plain_grads):
            np.testing.assert_allclose(g, e, atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(loss(hidden, head, chunk, vocab_chunks)[1]["accuracy"], accuracy, rtol=1e-6)
    with pytest.raises(ValueError, match="divide"):
        loss(hidden, head, 5)
    with pytest.raises(ValueError, match="vocabulary"):
        loss(hidden, head, 0, 7)


def test_sharded_chunked_loss_equals_unsharded_plain_loss():
    """8 CPU devices (data 2 x fsdp 2 x tensor 2), untied and tied heads: the loss over
    sequence blocks and strided vocabulary slices, and every gradient, equal the plain
    unsharded loss of the materialized logits."""
    for tied in (False, True):
        cfg = decoder_config("tiny", scan_layers=True, tie_embeddings=tied)
        tokens = jax.random.randint(jax.random.PRNGKey(4), (4, 32), 0, cfg.vocab_size)

        def loss_and_grads(mesh, chunk, vocab_chunks):
            with partitioning.sharding_context(mesh):
                graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))

                def loss(params):
                    model = nnx.merge(graphdef, params)
                    if vocab_chunks == 0:
                        return lm_loss.cross_entropy_loss(model(tokens), tokens, None, 1e-2)[0]
                    return lm_loss.chunked_cross_entropy(model.hidden(tokens), model.head_kernel(), tokens,
                                                         None, 1e-2, chunk, vocab_chunks)[0]

                return jax.jit(jax.value_and_grad(loss))(params)

        ref_loss, ref_grads = loss_and_grads(None, 0, 0)
        mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
        for chunk, vocab_chunks in ((0, 4), (8, 2)):
            loss, grads = loss_and_grads(mesh, chunk, vocab_chunks)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
            for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
                np.testing.assert_allclose(g, e, atol=1e-6 + 1e-4 * float(jnp.abs(e).max()), rtol=1e-3)


def test_chunked_loss_never_holds_all_logits():
    """The compiled gradient's temporaries stay below one float32 copy of the logits."""
    batch, seq, d, vocab = 4, 512, 64, 4096
    hidden = jax.ShapeDtypeStruct((batch, seq, d), jnp.float32)
    head = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
    targets = jnp.zeros((batch, seq), jnp.int32)

    def temp_bytes(chunk, vocab_chunks=1):
        def loss(hidden, head):
            return lm_loss.chunked_cross_entropy(hidden, head, targets, None, 0.0, chunk, vocab_chunks)[0]
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, head).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = batch * seq * vocab * 4
    assert temp_bytes(0) >= logits_bytes
    assert temp_bytes(64) < logits_bytes / 2, (temp_bytes(64), logits_bytes)
    assert temp_bytes(0, 8) < logits_bytes / 2, (temp_bytes(0, 8), logits_bytes)


def test_kernel_unavailable_on_this_backend_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train", f"--workdir={tmp_path}", "--config=configs/lm.py:demo",
         *cli_flags(**{"model.attention": "splash"})],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "splash" in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_loss_chunk_settings_that_do_not_divide_are_config_errors():
    from configs import lm as lm_configs
    from train import tasks
    from train.errors import ConfigError

    for key, value, match in (("loss_chunk", 7, "loss_chunk 7"), ("loss_vocab_chunks", 7, "loss_vocab_chunks 7"),
                              ("loss_vocab_chunks", 0, "loss_vocab_chunks 0")):
        config = lm_configs.get_config("demo")
        config[key] = value
        with pytest.raises(ConfigError, match=match):
            tasks.make_task(config)
    # The task's loss with 3 vocabulary slices (the 257-entry byte vocabulary is padded to
    # 384) equals its loss without.
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 128), 0, 257)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "mask": jnp.ones((2, 128))}
    losses = []
    for vocab_chunks in (1, 3):
        config = lm_configs.get_config("demo")
        config.loss_vocab_chunks = vocab_chunks
        task = tasks.make_task(config)
        with partitioning.sharding_context(None):
            losses.append(task.loss(task.build(nnx.Rngs(0)), batch, None)[0])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
