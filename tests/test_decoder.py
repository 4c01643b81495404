"""Tests for the decoder-only LM (models/decoder.py) and its generation loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from models import partitioning
from models.decoder import (
    Decoder,
    decoder_config,
    stack_layer_params,
    train_flops_per_token,
    unstack_layer_params,
)
from models.generate import generate
from models.lm_loss import cross_entropy_loss


def build(cfg, seed=0):
    with partitioning.sharding_context(None):
        return Decoder(cfg, rngs=nnx.Rngs(seed))


def forward(model, tokens):
    with partitioning.sharding_context(None):
        return model(tokens)


def param_count(cfg) -> int:
    with partitioning.sharding_context(None):
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def random_tokens(seed, shape, vocab=256):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_forward_shapes_and_dtypes(scan_layers):
    cfg = decoder_config("tiny", scan_layers=scan_layers)
    model = build(cfg)
    logits = forward(model, random_tokens(0, (2, 8)))
    assert logits.shape == (2, 8, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    if scan_layers:
        assert params["layers"]["attn"]["query"][...].shape == (2, 64, 4, 16)
        assert params["layers"]["attn"]["key"][...].shape == (2, 64, 2, 16)


@pytest.mark.parametrize(
    "size, expected", [("1b", 1_100_048_384), ("7b", 6_738_415_616), ("8b", 8_030_261_248)]
)
def test_published_param_counts(size, expected):
    assert param_count(decoder_config(size)) == expected


def test_unknown_size_raises():
    with pytest.raises(ValueError, match="unknown decoder size 'huge'"):
        decoder_config("huge")


def test_tied_embeddings_drop_output_projection():
    untied, tied = decoder_config("tiny"), decoder_config("tiny", tie_embeddings=True)
    assert param_count(untied) - param_count(tied) == untied.d_model * untied.vocab_size
    assert not hasattr(build(tied), "lm_head")


@pytest.mark.parametrize("scan_layers", [True, False])
def test_causal_mask(scan_layers):
    model = build(decoder_config("tiny", scan_layers=scan_layers))
    tokens = random_tokens(1, (2, 12))
    cut = 5
    changed = tokens.at[:, cut + 1:].set((tokens[:, cut + 1:] + 7) % 256)
    before, after = forward(model, tokens), forward(model, changed)
    np.testing.assert_allclose(before[:, :cut + 1], after[:, :cut + 1], atol=1e-6, rtol=0)
    assert float(jnp.abs(before[:, cut + 1:] - after[:, cut + 1:]).max()) > 1e-3


def test_scanned_matches_unrolled():
    unrolled = build(decoder_config("tiny", scan_layers=False), seed=0)
    scanned = build(decoder_config("tiny", scan_layers=True), seed=1)
    unrolled_params = nnx.state(unrolled, nnx.Param).to_pure_dict()
    state = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(state, stack_layer_params(unrolled_params))
    nnx.update(scanned, state)

    tokens = random_tokens(2, (2, 10))
    np.testing.assert_allclose(forward(scanned, tokens), forward(unrolled, tokens),
                               atol=1e-5, rtol=1e-5)
    roundtrip = unstack_layer_params(nnx.state(scanned, nnx.Param).to_pure_dict())
    jax.tree.map(np.testing.assert_array_equal, roundtrip, unrolled_params)


@pytest.mark.parametrize("remat, saved", [
    ("full", set()),
    ("save_dots", set()),
    ("save_qkv_proj", {"query_proj", "key_proj", "value_proj"}),
    ("save_dot_except_mlp", {"query_proj", "key_proj", "value_proj", "out_proj"}),
])
def test_remat_keeps_loss_and_grads_and_saves_only_what_it_names(remat, saved):
    """Every policy gives remat=none's loss and gradients; the MaxText-style ones keep
    exactly their named projections of each layer for the backward (print_saved_residuals)."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals

    tokens = random_tokens(3, (2, 8))

    def loss_fn(cfg):
        graphdef, params = nnx.split(build(cfg))

        def loss(params):
            with partitioning.sharding_context(None):
                return cross_entropy_loss(nnx.merge(graphdef, params)(tokens), tokens)[0]
        return loss, params

    base, params = loss_fn(decoder_config("tiny", scan_layers=False))
    policy, _ = loss_fn(decoder_config("tiny", scan_layers=False, remat=remat))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(policy, params)
    assert set(re.findall(r"named '(\w+)'", printed.getvalue())) == saved, printed.getvalue()
    base_loss, base_grads = jax.jit(jax.value_and_grad(base))(params)
    loss, grads = jax.jit(jax.value_and_grad(policy))(params)
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads, base_grads)


def test_sharded_forward_matches_single_device():
    cfg = decoder_config("tiny")
    tokens = random_tokens(4, (4, 8))
    reference = forward(build(cfg), tokens)

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3)
    with partitioning.sharding_context(mesh):
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        shardings = partitioning.variable_shardings(abstract_state, mesh)

        def init():
            return nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)))

        state = jax.jit(init, out_shardings=shardings)()
        logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)

    params = nnx.to_pure_dict(state)
    assert params["embed"].sharding.spec == P("tensor", "fsdp")
    assert params["lm_head"].sharding.spec == P("fsdp", "tensor")
    query = params["layers"]["attn"]["query"]
    assert query.sharding.spec == P(None, "fsdp", "tensor", None)
    assert query.addressable_shards[0].data.shape == (2, 32, 2, 16)
    assert params["layers"]["mlp"]["down"].sharding.spec == P(None, "tensor", "fsdp")
    np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)


def test_bf16_compute_returns_float32_logits():
    cfg32 = decoder_config("tiny")
    cfg16 = dataclasses.replace(cfg32, dtype=jnp.bfloat16)
    tokens = random_tokens(5, (2, 8))
    model16 = build(cfg16)
    logits16, logits32 = forward(model16, tokens), forward(build(cfg32), tokens)
    assert logits16.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model16, nnx.Param))} == {
        jnp.dtype(jnp.float32)}
    assert float(jnp.abs(logits16 - logits32).max()) < 0.1
    assert not np.array_equal(logits16, logits32)


def test_attn_logit_softcap_only_when_enabled():
    tokens = random_tokens(6, (2, 8))
    assert decoder_config("tiny").attn_logit_softcap is None
    plain = forward(build(decoder_config("tiny")), tokens)
    capped = forward(build(decoder_config("tiny", attn_logit_softcap=0.5)), tokens)
    loose = forward(build(decoder_config("tiny", attn_logit_softcap=1e6)), tokens)
    assert float(jnp.abs(capped - plain).max()) > 1e-3
    np.testing.assert_allclose(loose, plain, atol=1e-5)


def greedy_by_recompute(model, prompt, steps):
    tokens = prompt
    for _ in range(steps):
        next_token = jnp.argmax(forward(model, tokens)[:, -1], axis=-1).astype(jnp.int32)
        tokens = jnp.concatenate([tokens, next_token[:, None]], axis=1)
    return tokens


@pytest.mark.parametrize("scan_layers,window", [(True, None), (False, None), (True, 4)])
def test_generate_with_cache_matches_full_recompute(scan_layers, window):
    """Also with a sliding window of 4 (shorter than the 11 tokens): the cached decode masks
    the same keys as the full forward."""
    model = build(decoder_config("tiny", scan_layers=scan_layers, sliding_window=window))
    prompt = random_tokens(7, (2, 5))
    with partitioning.sharding_context(None):
        cached = generate(model, prompt, steps=6, temperature=0.0, rng=None)
    assert cached.shape == (2, 11) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(cached, greedy_by_recompute(model, prompt, 6))


def test_generate_sampling_is_seeded():
    model = build(decoder_config("tiny"))
    prompt = random_tokens(8, (2, 4))
    with partitioning.sharding_context(None):
        first = generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(1))
        again = generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(1))
        other = generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(first[:, :4], prompt)
    assert int(first.min()) >= 0 and int(first.max()) < 256


def test_cross_entropy_loss_matches_optax():
    logits = jax.random.normal(jax.random.key(9), (2, 6, 256)) * 3
    targets = random_tokens(10, (2, 6))
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    expected = (per_token * mask).sum() / mask.sum()
    expected_z = 1e-3 * (log_z ** 2 * mask).sum() / mask.sum()

    loss, aux = cross_entropy_loss(logits.astype(jnp.bfloat16), targets, mask, z_loss=1e-3)
    assert loss.dtype == jnp.float32
    loss, aux = cross_entropy_loss(logits, targets, mask, z_loss=1e-3)
    np.testing.assert_allclose(aux["nll"], expected, rtol=1e-6)
    np.testing.assert_allclose(aux["z_loss"], expected_z, rtol=1e-5)
    np.testing.assert_allclose(loss, expected + expected_z, rtol=1e-6)
    assert int(aux["num_tokens"]) == 10


def test_train_flops_per_token_matches_xla_cost_analysis():
    cfg = decoder_config("tiny", d_model=128, num_heads=4, num_kv_heads=2, ffn_dim=512,
                         scan_layers=False)
    batch, seq = 2, 64
    with partitioning.sharding_context(None):
        graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))

        def loss_fn(params, tokens):
            logits = nnx.merge(graphdef, params)(tokens)
            return cross_entropy_loss(logits, tokens)[0]

        tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        compiled = jax.jit(jax.grad(loss_fn)).lower(params, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    measured = cost["flops"] / (batch * seq)
    predicted = train_flops_per_token(cfg, seq, causal=False)  # XLA computes every score
    assert abs(measured / predicted - 1) < 0.10, (measured, predicted)


def test_train_flops_with_a_sliding_window_count_the_keys_in_the_band():
    cfg, seq, window = decoder_config("tiny", sliding_window=16), 64, 16
    keys = np.minimum(np.arange(seq) + 1, window).sum() / seq  # per query, counted from the mask
    base = train_flops_per_token(decoder_config("tiny"), seq, causal=False)
    score = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # per key attended
    assert train_flops_per_token(cfg, seq) == pytest.approx(base - score * seq + score * keys)


@pytest.mark.parametrize("attention", ["xla", "splash_interpret"])
def test_packed_documents_lose_what_each_document_loses_alone(attention):
    """Document masking (train.pack.lm_example with eos_id): the per-token loss of a
    window packing three documents equals each document's loss run alone, and the target
    after each end of document is masked out."""
    from train.data.pack import lm_example

    eos = 255
    cfg = decoder_config("tiny", attention=attention, dtype=jnp.float32)
    model = build(cfg)
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(0, 250, n), eos) for n in (5, 9, 3)]
    window = np.concatenate(docs + [rng.integers(0, 250, 4)])[:33]  # the 4th document is cut
    ex = lm_example(window, eos_id=eos)
    assert ex["segment_ids"].tolist()[:19] == [1] * 6 + [2] * 10 + [3] * 3
    assert ex["positions"].tolist()[:19] == list(range(6)) + list(range(10)) + list(range(3))

    @nnx.jit
    def logits_of(model, inputs, positions, segment_ids):
        return model.logits(model.hidden(inputs, positions, segment_ids))[0]

    def per_token_nll(inputs, targets, positions=None, segment_ids=None):
        as_batch = lambda x: None if x is None else jnp.asarray(x)[None]  # noqa: E731
        with partitioning.sharding_context(None):
            logits = logits_of(model, as_batch(inputs), as_batch(positions), as_batch(segment_ids))
        return np.asarray(-jax.nn.log_softmax(logits)[np.arange(len(targets)), targets])

    packed = per_token_nll(ex["inputs"], ex["targets"], ex["positions"], ex["segment_ids"])
    start = 0
    for doc in docs:
        alone = per_token_nll(doc[:-1], doc[1:])
        np.testing.assert_allclose(packed[start:start + len(doc) - 1], alone, rtol=2e-5, atol=2e-5)
        assert ex["mask"][start + len(doc) - 1] == 0  # eos -> next document's first token: skipped
        assert ex["mask"][start:start + len(doc) - 1].all()
        start += len(doc)
    # Without the segment ids and positions the same window's losses differ (attention crosses).
    assert not np.allclose(per_token_nll(ex["inputs"], ex["targets"])[6:15], packed[6:15], atol=1e-4)


def test_lm_task_passes_segment_ids_and_positions_to_the_model():
    """The trainer's loss (train.tasks) on a window of whole packed documents equals the mean
    per-token loss of the documents run alone: it hands the model the segment ids. (Dropping
    the per-document positions would not show here: within one document RoPE only sees
    relative positions, so only precision at long offsets depends on them.)"""
    from _util import tiny_lm

    from train import tasks
    from train.data.pack import lm_example

    config = tiny_lm(**{"data.document_mask": True, "data.seq_len": 32, "model.attention": "xla"})
    task = tasks.make_task(config)
    model = build(task.model_config)
    rng = np.random.default_rng(1)
    docs = [np.append(rng.integers(0, 250, n), 256) for n in (11, 7, 12)]  # 33 tokens: one window
    batch = {k: jnp.asarray(v)[None] for k, v in lm_example(np.concatenate(docs), eos_id=256).items()}
    with partitioning.sharding_context(None):
        _, aux = task.loss(model, batch, None)
        alone = []
        for d in docs:
            logits = model(jnp.asarray(d[:-1])[None])[0]
            alone.append(-jax.nn.log_softmax(logits)[np.arange(len(d) - 1), d[1:]])
    np.testing.assert_allclose(float(aux["nll"]), float(jnp.concatenate(alone).mean()), rtol=2e-5)
