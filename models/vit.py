"""Vision Transformer (Dosovitskiy et al., 2021, arXiv:2010.11929) in Flax NNX.

Layout follows the original paper: patch embedding, optional class token, learned
(or fixed 2-D sin-cos) position embedding, pre-LayerNorm encoder blocks, final
LayerNorm and a linear classifier. Every parameter carries logical axis names from
`models.partitioning`; build and call the model inside
`models.partitioning.sharding_context(mesh_or_None)`.

With `scan_layers=True` the encoder blocks are stacked along a leading 'layers'
axis and applied with `nnx.scan`; `stack_blocks` / `unstack_blocks` convert
parameters between the two layouts (see `copy_params`).

The model's state is parameters only: dropout takes a PRNG key at call time
(`model(images, train=True, dropout_rng=key)`), split per layer identically in
both layouts.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import attention as attention_lib
from models import layer_stack
from models.partitioning import constrain
from models.spec import VIT_SIZES, ViTConfig, vit_config  # noqa: F401 - re-exported

Dtype = Any

# name: (width, depth, mlp_dim, num_heads)
_ACT = ("act_batch", "act_length", "act_embed")


# -------------------------------------------------------------------------------- layers


def _sharded(init, *names: str | None):
    """`init` annotated with logical axis names (one per parameter dimension)."""
    return nnx.with_partitioning(init, names)


_BIAS_INIT = nnx.initializers.normal(stddev=1e-6)


def posemb_sincos_2d(grid_size: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, shape (grid_size**2, width), row-major.

    A quarter of the channels each holds sin(x), cos(x), sin(y), cos(y) at
    geometrically spaced frequencies from 1 down to 1 / temperature.
    """
    quarter = width // 4
    freqs = temperature ** -(np.arange(quarter) / max(quarter - 1, 1))
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    x_angles = cols.reshape(-1, 1) * freqs
    y_angles = rows.reshape(-1, 1) * freqs
    parts = [np.sin(x_angles), np.cos(x_angles), np.sin(y_angles), np.cos(y_angles)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `rng` is None (evaluation) or `rate` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _split(rng: jax.Array | None, num: int) -> list[jax.Array | None]:
    return [None] * num if rng is None else list(jax.random.split(rng, num))


def _layer_norm(cfg: ViTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.width, epsilon=1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        scale_init=_sharded(nnx.initializers.ones_init(), "embed"),
        bias_init=_sharded(nnx.initializers.zeros_init(), "embed"),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Multi-head self-attention with the `cfg.attention` kernel (`models.attention`)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.implementation = cfg.attention
        heads = (cfg.num_heads, cfg.head_dim)
        # Xavier over (embed) -> (heads * head_dim): LinearGeneral inits the flat kernel.
        proj = dict(
            in_features=cfg.width, out_features=heads, use_bias=cfg.qkv_bias,
            kernel_init=_sharded(nnx.initializers.xavier_uniform(), "embed", "heads", "head_dim"),
            bias_init=_sharded(_BIAS_INIT, "heads", "head_dim"),
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
        )
        self.query = nnx.LinearGeneral(**proj)
        self.key = nnx.LinearGeneral(**proj)
        self.value = nnx.LinearGeneral(**proj)
        self.out = nnx.LinearGeneral(
            in_features=heads, out_features=cfg.width, axis=(-2, -1),
            kernel_init=_sharded(nnx.initializers.xavier_uniform(), "heads", "head_dim", "embed"),
            bias_init=_sharded(_BIAS_INIT, "embed"),
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
        )

    def __call__(self, x: jax.Array, recompute: bool = False) -> jax.Array:
        """`recompute`: keep only q, k, v for the backward (a Pallas kernel's padded
        inputs and outputs are recomputed), for steps without a remat of their own."""
        names = ("act_batch", "act_length", "act_heads", None)
        q = layer_stack.name(self.query(x), "query_proj")
        q = constrain(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), names)
        k = constrain(layer_stack.name(self.key(x), "key_proj"), names)
        v = constrain(layer_stack.name(self.value(x), "value_proj"), names)
        mixed = attention_lib.attend(q, k, v, implementation=self.implementation, recompute=recompute)
        mixed = constrain(mixed.astype(v.dtype), names)
        return layer_stack.name(self.out(mixed), "out_proj")


class MlpBlock(nnx.Module):
    """Dense -> GELU -> dropout -> Dense."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        xavier = nnx.initializers.xavier_uniform()
        self.fc1 = nnx.Linear(
            cfg.width, cfg.mlp_dim, kernel_init=_sharded(xavier, "embed", "mlp"),
            bias_init=_sharded(_BIAS_INIT, "mlp"), **common)
        self.fc2 = nnx.Linear(
            cfg.mlp_dim, cfg.width, kernel_init=_sharded(xavier, "mlp", "embed"),
            bias_init=_sharded(_BIAS_INIT, "embed"), **common)
        self.dropout = cfg.dropout

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        h = constrain(self.fc1(x), ("act_batch", "act_length", "act_mlp"))

        # Only fc1's output is kept for the backward; GELU (whose autodiff would keep
        # several [tokens, mlp_dim] intermediates) and dropout are recomputed from it.
        @jax.checkpoint
        def rest(h):
            return self.fc2(_dropout(jax.nn.gelu(h), self.dropout, dropout_rng))

        return rest(h)


class EncoderBlock(nnx.Module):
    """Pre-LN residual block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(cfg, rngs)
        self.attention = Attention(cfg, rngs=rngs)
        self.norm2 = _layer_norm(cfg, rngs)
        self.mlp = MlpBlock(cfg, rngs=rngs)
        self.dropout = cfg.dropout
        self.recompute_attention = cfg.remat != "full"

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """`dropout_rng`: PRNG key in training, None for evaluation."""
        attn_rng, hidden_rng, mlp_rng = _split(dropout_rng, 3)
        # LayerNorm runs in float32; recomputing it keeps those copies out of the residuals.
        norm1, norm2 = jax.checkpoint(lambda x: self.norm1(x)), jax.checkpoint(lambda x: self.norm2(x))
        x = x + _dropout(self.attention(norm1(x), self.recompute_attention), self.dropout, attn_rng)
        x = x + _dropout(self.mlp(norm2(x), hidden_rng), self.dropout, mlp_rng)
        return constrain(x, _ACT)


class Encoder(nnx.Module):
    """`depth` encoder blocks (a list, or one stacked block when scanned) + final LN."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.scan_layers = cfg.scan_layers
        self.remat = cfg.remat
        self.blocks = layer_stack.make_layers(lambda r: EncoderBlock(cfg, rngs=r), cfg.depth,
                                              cfg.scan_layers, rngs)
        self.norm = _layer_norm(cfg, rngs)

    def __call__(self, x: jax.Array, dropout_rngs: jax.Array | None = None) -> jax.Array:
        """`dropout_rngs`: one PRNG key per block (shape (depth,)) in training, else None."""
        def call(block: EncoderBlock, x: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
            return block(x, dropout_rng)

        step = layer_stack.remat(call, self.remat, in_scan=self.scan_layers)
        if self.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=layer_stack.LAYERS)
            def run_layers(block: EncoderBlock, x: jax.Array, rng: jax.Array | None) -> jax.Array:
                return step(block, x, rng)

            x = run_layers(self.blocks, x, dropout_rngs)
        else:
            for i, block in enumerate(self.blocks):
                x = step(block, x, None if dropout_rngs is None else dropout_rngs[i])
        return self.norm(x)


class ViT(nnx.Module):
    """Vision Transformer classifier: NHWC images -> float32 logits."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embed = nnx.Conv(
            cfg.channels, cfg.width, kernel_size=(p, p), strides=(p, p), padding="VALID",
            kernel_init=_sharded(
                nnx.initializers.lecun_normal(), "patch", "patch", "channels", "embed"),
            bias_init=_sharded(nnx.initializers.zeros_init(), "embed"),
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
        )
        if cfg.pool_type == "tok":
            init = _sharded(nnx.initializers.zeros_init(), None, None, "embed")
            self.cls_token = nnx.Param(init(rngs.params(), (1, 1, cfg.width), cfg.param_dtype))
        if cfg.posemb == "learn":
            # Original layout: the learned table also covers the class-token position.
            init = _sharded(nnx.initializers.normal(cfg.width**-0.5), None, "posemb", "embed")
            shape = (1, cfg.seq_len, cfg.width)
            self.posemb = nnx.Param(init(rngs.params(), shape, cfg.param_dtype))
        self.encoder = Encoder(cfg, rngs=rngs)
        head_init = (nnx.initializers.zeros_init() if cfg.head_zero_init
                     else nnx.initializers.lecun_normal())
        self.head = nnx.Linear(
            cfg.width, cfg.num_classes,
            kernel_init=_sharded(head_init, "embed", "classes"),
            bias_init=_sharded(nnx.initializers.zeros_init(), "classes"),
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
        )

    def embed(self, images: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Images (B, H, W, C) -> token sequence (B, seq_len, width)."""
        cfg = self.cfg
        x = self.patch_embed(images.astype(cfg.dtype))
        x = x.reshape(x.shape[0], -1, cfg.width)
        if cfg.posemb == "sincos2d":  # patches only; the class token gets no position
            x = x + jnp.asarray(posemb_sincos_2d(cfg.grid_size, cfg.width), cfg.dtype)
        if cfg.pool_type == "tok":
            cls = self.cls_token[...].astype(cfg.dtype)
            cls = jnp.broadcast_to(cls, (x.shape[0], 1, cfg.width))
            x = jnp.concatenate([cls, x], axis=1)
        if cfg.posemb == "learn":
            x = x + self.posemb[...].astype(cfg.dtype)
        x = _dropout(x, cfg.dropout, dropout_rng)
        return constrain(x, _ACT)

    def __call__(
        self, images: jax.Array, *, train: bool = False, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """Logits (B, num_classes) in float32 for NHWC `images`.

        With `train=True` and `cfg.dropout > 0`, `dropout_rng` (a PRNG key) is required;
        the model holds no RNG state, so its state is parameters only.
        """
        rng = None
        if train and self.cfg.dropout > 0:
            if dropout_rng is None:
                raise ValueError("ViT with dropout > 0 needs `dropout_rng` when train=True.")
            rng = dropout_rng
        embed_rng, layers_rng = _split(rng, 2)
        layer_rngs = None if layers_rng is None else jax.random.split(layers_rng, self.cfg.depth)
        x = self.encoder(self.embed(images, embed_rng), layer_rngs)
        pooled = x[:, 0] if self.cfg.pool_type == "tok" else x.mean(axis=1)
        return self.head(pooled).astype(jnp.float32)


# ------------------------------------------------------ layout conversion and accounting


def stack_blocks(params: dict) -> dict:
    """Pure param dict of an unrolled ViT -> the scanned layout (leading 'layers' axis)."""
    stacked = layer_stack.stack(params["encoder"]["blocks"])
    return {**params, "encoder": {**params["encoder"], "blocks": stacked}}


def unstack_blocks(params: dict) -> dict:
    """Pure param dict of a scanned ViT -> the unrolled layout (one entry per block)."""
    blocks = layer_stack.unstack(params["encoder"]["blocks"])
    return {**params, "encoder": {**params["encoder"], "blocks": blocks}}


def copy_params(source: ViT, target: ViT) -> None:
    """Copies `source`'s parameters into `target` in place, restacking blocks if needed.

    Both models must share every setting except `scan_layers`, `remat` and `dtype`.
    """
    params = nnx.to_pure_dict(nnx.state(source, nnx.Param))
    if target.cfg.scan_layers and not source.cfg.scan_layers:
        params = stack_blocks(params)
    elif source.cfg.scan_layers and not target.cfg.scan_layers:
        params = unstack_blocks(params)
    state = nnx.state(target, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(target, state)


def count_params(model: nnx.Module) -> int:
    """Number of scalars in the `nnx.Param`s of a model (abstract or concrete)."""
    state = nnx.state(model, nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def train_flops_per_image(cfg: ViTConfig) -> float:
    """Matmul FLOPs of one training step per image: 3 x forward, 2 FLOPs per MAC.

    Counts the patch embedding, q/k/v/out projections, attention scores and the
    weighted sum, the MLP and the head; norms, softmax and GELU are ignored.
    """
    n, w = cfg.seq_len, cfg.width
    patch_embed = cfg.num_patches * cfg.patch_size**2 * cfg.channels * w
    per_block = 4 * n * w * w + 2 * n * n * w + 2 * n * w * cfg.mlp_dim
    head = w * cfg.num_classes
    forward_macs = patch_embed + cfg.depth * per_block + head
    return 3.0 * 2.0 * forward_macs
