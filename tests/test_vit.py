"""Tests for models/vit.py: configs, parameter counts, layouts, sharding, precision, FLOPs."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models import partitioning
from models.vit import (
    ViT,
    ViTConfig,
    copy_params,
    count_params,
    posemb_sincos_2d,
    stack_blocks,
    train_flops_per_image,
    unstack_blocks,
    vit_config,
)

TINY = ViTConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, image_size=16,
                 num_classes=10, head_zero_init=False)


def build(cfg: ViTConfig, seed: int = 0) -> ViT:
    with partitioning.sharding_context(None):
        return ViT(cfg, rngs=nnx.Rngs(seed))


def images(cfg: ViTConfig, batch: int = 4, seed: int = 0) -> jax.Array:
    shape = (batch, cfg.image_size, cfg.image_size, cfg.channels)
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@nnx.jit(static_argnames="train")
def _apply(model: ViT, x: jax.Array, train: bool, rng: jax.Array | None) -> jax.Array:
    return model(x, train=train, dropout_rng=rng)


def forward(model: ViT, x: jax.Array, mesh=None, dropout_seed: int | None = None) -> jax.Array:
    """Logits under jit; `dropout_seed` switches to train mode with that dropout key."""
    train = dropout_seed is not None
    rng = jax.random.key(dropout_seed) if train else None
    with partitioning.sharding_context(mesh):
        return _apply(model, x, train, rng)


def jaxpr_text(model: ViT, x: jax.Array, grad: bool = False) -> str:
    """Printed jaxpr of the forward pass (or of the gradient of its sum)."""
    graphdef, params = nnx.split(model)

    def fn(params):
        return nnx.merge(graphdef, params)(x).sum()

    return str(jax.make_jaxpr(jax.grad(fn) if grad else fn)(params))


# ----------------------------------------------------------------------------------
# Configs and parameter counts
# ----------------------------------------------------------------------------------


def test_vit_config_resolves_variants_and_overrides():
    b16 = vit_config("B/16")
    assert (b16.width, b16.depth, b16.mlp_dim, b16.num_heads, b16.patch_size) == (
        768, 12, 3072, 12, 16)
    g14 = vit_config("g/14", image_size=518)
    assert (g14.width, g14.depth, g14.mlp_dim, g14.num_heads, g14.patch_size) == (
        1408, 40, 6144, 16, 14)
    assert g14.image_size == 518 and g14.num_patches == 37 * 37
    s8 = vit_config("S/8", pool_type="gap", num_classes=10)
    assert (s8.width, s8.patch_size, s8.pool_type, s8.seq_len) == (384, 8, "gap", 28 * 28)
    assert vit_config("B/32").seq_len == 7 * 7 + 1
    assert vit_config("e/14").mlp_dim == 15360


@pytest.mark.parametrize("variant", ["X/16", "B16", "B/x", "b/16", "", "B/0"])
def test_unknown_variant_raises(variant):
    with pytest.raises(ValueError, match="Unknown ViT variant"):
        vit_config(variant)


@pytest.mark.parametrize("bad", [dict(pool_type="max"), dict(posemb="rope"),
                                 dict(remat="offload"), dict(image_size=20),
                                 dict(num_heads=3)])
def test_invalid_config_raises(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, **bad)


@pytest.mark.parametrize("variant,expected", [
    ("Ti/16", 5_717_416), ("S/16", 22_050_664), ("B/16", 86_567_656), ("L/16", 304_326_632)])
def test_param_counts_match_original_vit(variant, expected):
    cfg = vit_config(variant)
    with partitioning.sharding_context(None):
        abstract = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    assert count_params(abstract) == expected


def test_scanned_layout_has_same_count_and_layer_axis():
    cfg = vit_config("B/16", scan_layers=True)
    with partitioning.sharding_context(None):
        abstract = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    assert count_params(abstract) == 86_567_656
    fc1 = abstract.encoder.blocks.mlp.fc1.kernel
    assert fc1.shape == (12, 768, 3072)
    assert fc1.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    query = abstract.encoder.blocks.attention.query.kernel
    assert query.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")


def test_state_is_annotated_params_only():
    for scan in (False, True):
        cfg = dataclasses.replace(TINY, scan_layers=scan, dropout=0.1)
        with partitioning.sharding_context(None):
            model = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
        flat = nnx.to_flat_state(nnx.state(model))
        assert len(flat) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        for path, var in flat:
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(var.get_value().shape), path


# ----------------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_type", ["tok", "gap"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_output_shape_and_dtype(pool_type, posemb):
    cfg = dataclasses.replace(TINY, pool_type=pool_type, posemb=posemb)
    model = build(cfg)
    assert hasattr(model, "cls_token") == (pool_type == "tok")
    assert hasattr(model, "posemb") == (posemb == "learn")
    logits = forward(model, images(cfg, batch=3))
    assert logits.shape == (3, cfg.num_classes) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits)) and float(jnp.std(logits)) > 0


def test_head_zero_init_gives_zero_logits():
    model = build(dataclasses.replace(TINY, head_zero_init=True))
    np.testing.assert_array_equal(forward(model, images(TINY)), 0.0)


def test_posemb_sincos_2d_layout():
    table = posemb_sincos_2d(grid_size=3, width=8)
    assert table.shape == (9, 8) and table.dtype == np.float32
    # Token (row 0, col 0): sin = 0, cos = 1 in all four quarters.
    np.testing.assert_allclose(table[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
    # Token (row 1, col 2): x-part uses the column, y-part the row; lowest frequency 1e-4.
    np.testing.assert_allclose(table[5, [0, 1, 4, 5]], np.sin([2, 2e-4, 1, 1e-4]), rtol=1e-6)


def test_dropout_only_in_train_mode():
    cfg = dataclasses.replace(TINY, dropout=0.5)
    model, x = build(cfg), images(cfg)
    eval_out = forward(model, x)
    np.testing.assert_allclose(eval_out, model(x), atol=1e-5)  # eager: no key needed
    train_a = forward(model, x, dropout_seed=0)
    assert not np.allclose(train_a, eval_out)
    assert not np.allclose(train_a, forward(model, x, dropout_seed=1))
    np.testing.assert_array_equal(train_a, forward(model, x, dropout_seed=0))
    with pytest.raises(ValueError, match="dropout_rng"):
        model(x, train=True)
    # Without dropout, train mode needs no key and equals eval.
    np.testing.assert_array_equal(build(TINY)(x, train=True), build(TINY)(x))


# ----------------------------------------------------------------------------------
# Layouts: scan vs unrolled, remat
# ----------------------------------------------------------------------------------


def test_scanned_matches_unrolled_with_same_weights():
    cfg = dataclasses.replace(TINY, dropout=0.2)
    unrolled = build(cfg, seed=0)
    scanned = build(dataclasses.replace(cfg, scan_layers=True), seed=1)
    x = images(cfg)
    assert not np.allclose(forward(unrolled, x), forward(scanned, x))
    copy_params(unrolled, scanned)
    np.testing.assert_allclose(forward(scanned, x), forward(unrolled, x), atol=1e-5, rtol=1e-5)
    # Per-layer dropout keys are the same in both layouts.
    np.testing.assert_allclose(forward(scanned, x, dropout_seed=3),
                               forward(unrolled, x, dropout_seed=3), atol=1e-5, rtol=1e-5)

    # And back: a fresh unrolled model loaded from the scanned weights.
    restored = build(TINY, seed=2)
    copy_params(scanned, restored)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(unrolled, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(restored, nnx.Param))):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def test_stack_unstack_round_trip():
    params = nnx.to_pure_dict(nnx.state(build(TINY), nnx.Param))
    stacked = stack_blocks(params)
    assert stacked["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 64)
    jax.tree.map(np.testing.assert_array_equal, unstack_blocks(stacked), params)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_variants_match(scan_layers):
    x = images(TINY)
    reference = build(dataclasses.replace(TINY, scan_layers=scan_layers))

    def loss_and_grads(model):
        # Functional style (split / merge under jax.grad), as a trainer would use it.
        graphdef, params = nnx.split(model)

        def loss_fn(params):
            return jnp.mean(nnx.merge(graphdef, params)(x) ** 2)

        with partitioning.sharding_context(None):
            return jax.jit(jax.value_and_grad(loss_fn))(params)

    ref_loss, ref_grads = loss_and_grads(reference)
    # The blocks recompute their LayerNorms and GELU (local checkpoints) in every variant;
    # a remat policy adds the whole-block checkpoint on top.
    local = jaxpr_text(reference, x, grad=True).count("remat")
    for remat in ("full", "save_dots"):
        model = build(dataclasses.replace(TINY, scan_layers=scan_layers, remat=remat))
        copy_params(reference, model)
        assert jaxpr_text(model, x, grad=True).count("remat") > local
        loss, grads = loss_and_grads(model)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


# ----------------------------------------------------------------------------------
# Sharding and precision
# ----------------------------------------------------------------------------------


def make_mesh():
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_forward_matches_single_device(scan_layers):
    cfg = dataclasses.replace(TINY, scan_layers=scan_layers)
    model = build(cfg)
    x = images(cfg, batch=8)
    expected = forward(model, x)

    mesh = make_mesh()
    graphdef, state = nnx.split(model)
    shardings = partitioning.variable_shardings(nnx.eval_shape(lambda: state), mesh)
    sharded = nnx.merge(graphdef, jax.device_put(state, shardings))

    lead = (None,) if scan_layers else ()
    block = sharded.encoder.blocks if scan_layers else sharded.encoder.blocks[0]
    expected_specs = [
        (block.mlp.fc1.kernel, P(*lead, "fsdp", "tensor")),
        (block.mlp.fc2.kernel, P(*lead, "tensor", "fsdp")),
        (block.attention.query.kernel, P(*lead, "fsdp", "tensor", None)),
        (block.attention.out.kernel, P(*lead, "tensor", None, "fsdp")),
        (sharded.head.kernel, P("fsdp", None)),
        (sharded.posemb, P(None, None, "fsdp")),
    ]
    for var, spec in expected_specs:
        assert var[...].sharding == NamedSharding(mesh, spec)
    assert len(block.mlp.fc1.kernel[...].addressable_shards) == 8

    batch_sharded_x = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    logits = forward(sharded, batch_sharded_x, mesh=mesh)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_sharding_context_shards_params_at_creation():
    mesh = make_mesh()
    for scan in (False, True):
        cfg = dataclasses.replace(TINY, scan_layers=scan)
        with partitioning.sharding_context(mesh):
            model = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
        block = model.encoder.blocks if scan else model.encoder.blocks[0]
        lead = (None,) if scan else ()
        assert block.mlp.fc1.kernel.get_value().sharding.spec == P(*lead, "fsdp", "tensor")
        assert block.attention.key.bias.get_value().sharding.spec == P(*lead, "tensor", None)
        assert model.patch_embed.kernel.get_value().sharding.spec == P(None, None, None, "fsdp")


def test_bf16_compute_returns_float32_logits():
    reference = build(TINY)
    model = build(dataclasses.replace(TINY, dtype=jnp.bfloat16))
    copy_params(reference, model)
    assert model.encoder.blocks[0].mlp.fc1.kernel[...].dtype == jnp.float32
    x = images(TINY)
    logits = forward(model, x)
    assert logits.dtype == jnp.float32
    text = jaxpr_text(model, x)
    # Matmuls run in bf16 except the attention scores; the only `exp` is the softmax.
    dot_dtypes = re.findall(r"(\w+)\[[\d,]*\] = dot_general", text)
    assert dot_dtypes.count("f32") == TINY.depth and set(dot_dtypes) == {"bf16", "f32"}
    assert re.findall(r"(\w+)\[[\d,]*\] = exp", text) == ["f32"] * TINY.depth
    expected = forward(reference, x)
    np.testing.assert_allclose(logits, expected, atol=0.05 * float(jnp.abs(expected).max()))


# ----------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------


def test_train_flops_match_xla_cost_analysis():
    cfg = ViTConfig(width=64, depth=2, mlp_dim=256, num_heads=4, patch_size=8, image_size=32,
                    num_classes=10)
    batch = 2
    graphdef, params = nnx.split(build(cfg))
    x, labels = images(cfg, batch=batch), jnp.arange(batch)

    def loss_fn(params, x, labels):
        logits = nnx.merge(graphdef, params)(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    compiled = jax.jit(jax.grad(loss_fn)).lower(params, x, labels).compile()
    xla_flops_per_image = compiled.cost_analysis()["flops"] / batch
    assert xla_flops_per_image == pytest.approx(train_flops_per_image(cfg), rel=0.1)
