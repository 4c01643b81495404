"""Decoder-only language model (LLaMA-style) in Flax NNX.

Pre-norm blocks of grouped-query attention with rotary position embeddings and a
SwiGLU MLP, RMSNorm everywhere, no biases. Every parameter carries logical axis names
from `models.partitioning`; build and call the model inside
`partitioning.sharding_context(mesh_or_None)`.

Layers are either unrolled (`nnx.List` of blocks) or, with `scan_layers=True`, stacked
along a leading `layers` axis and run with `nnx.scan`, which keeps compile time nearly
flat in depth. `stack_layer_params` / `unstack_layer_params` convert between the two.

Precision: parameters are stored in `param_dtype` and cast to the compute `dtype` at
use; attention softmax, RMSNorm statistics, RoPE and the returned logits are float32.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from models import attention as attention_lib
from models import layer_stack, lm_loss, moe
from models.partitioning import constrain
from models.spec import DECODER_SIZES, DecoderConfig, RopeScaling, decoder_config  # noqa: F401 - re-exported

Array = jax.Array
# {'k', 'v'}: [layers, batch, max_len, kv_heads, head_dim] in the compute dtype.
KVCache = dict[str, Array]

ACT_EMBED = ("act_batch", "act_length", "act_embed")


# ----------------------------------------------------------------------------- layers


def _kernel_init(in_axis, out_axis):
    return nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
    """A parameter annotated with logical axis `names`."""
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis (d_model, or `dim` named `axis`) with a
    learned scale; statistics in float32."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dim: int | None = None, axis: str = "embed"):
        self.eps, self.dtype = cfg.norm_eps, cfg.dtype
        self.scale = _param(rngs, nnx.initializers.ones, (dim or cfg.d_model,), (axis,),
                            cfg.param_dtype)

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> Array:
    """float32 inverse frequencies [head_dim / 2] of the rotary embedding."""
    half = head_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    wavelen = 2 * jnp.pi / inv_freq
    low_wavelen = scaling.original_max_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_len / scaling.high_freq_factor
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((scaling.original_max_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, scaled)


def apply_rope(x: Array, positions: Array, theta: float, scaling: RopeScaling | None = None) -> Array:
    """Rotary embedding of `x` [batch, seq, heads, head_dim] at `positions` [batch, seq].

    Rotates the pairs (x[i], x[i + head_dim/2]) ("rotate half" convention, as Hugging
    Face's Llama) in float32.
    """
    inv_freq = rope_frequencies(x.shape[-1], theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d, h, k, q = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        in_proj, pd = _kernel_init(0, (1, 2)), cfg.param_dtype
        self.query = _param(rngs, in_proj, (d, h, q), ("embed", "heads", "head_dim"), pd)
        self.key = _param(rngs, in_proj, (d, k, q), ("embed", "kv_heads", "head_dim"), pd)
        self.value = _param(rngs, in_proj, (d, k, q), ("embed", "kv_heads", "head_dim"), pd)
        self.out = _param(rngs, _kernel_init((0, 1), 2), (h, q, d),
                          ("heads", "head_dim", "embed"), pd)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg, rngs=rngs, dim=q, axis="head_dim")
            self.k_norm = RMSNorm(cfg, rngs=rngs, dim=q, axis="head_dim")

    def __call__(self, x, positions, cache=None, cache_index=None, segment_ids=None):
        """x: [batch, seq, d_model] -> (same shape, updated per-layer cache or None).

        Without a cache, attention runs with `cfg.attention` (`models.attention`), within
        `segment_ids` when given. With a cache, keys/values of `x` are written at slots
        `cache_index + [0, seq)` and queries attend (XLA path) to every filled slot up
        to their own.
        """
        cfg, dt = self.config, self.config.dtype
        kv_axes = ("act_batch", "act_length", "act_kv_heads", None)
        q = layer_stack.name(jnp.einsum("btd,dhq->bthq", x, self.query[...].astype(dt)), "query_proj")
        k = layer_stack.name(jnp.einsum("btd,dkq->btkq", x, self.key[...].astype(dt)), "key_proj")
        v = layer_stack.name(jnp.einsum("btd,dkq->btkq", x, self.value[...].astype(dt)), "value_proj")
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        k, v = constrain(k, kv_axes), constrain(v, kv_axes)
        q = apply_rope(q, positions, cfg.rope_theta, cfg.rope_scaling) * jnp.asarray(cfg.head_dim ** -0.5, dt)
        k = apply_rope(k, positions, cfg.rope_theta, cfg.rope_scaling)

        if cache is None:
            context = attention_lib.attend(q, k, v, implementation=cfg.attention, causal=True,
                                           segment_ids=segment_ids, logit_softcap=cfg.attn_logit_softcap,
                                           window=cfg.sliding_window)
        else:
            slot = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), slot)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), slot)
            cache = {"k": k, "v": v}
            # Causal over cache slots: query at slot cache_index+t sees slots <= its own
            # (and, with a sliding window, the window's slots before it).
            context = attention_lib.xla_attention(q, k, v, causal=True, query_offset=cache_index,
                                                  logit_softcap=cfg.attn_logit_softcap,
                                                  window=cfg.sliding_window)
        context = constrain(context, ("act_batch", "act_length", "act_heads", None))
        out = jnp.einsum("bthq,hqd->btd", context, self.out[...].astype(dt))
        return layer_stack.name(out, "out_proj"), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.dtype
        d, f, pd, init = cfg.d_model, cfg.ffn_dim, cfg.param_dtype, _kernel_init(0, 1)
        self.gate = _param(rngs, init, (d, f), ("embed", "mlp"), pd)
        self.up = _param(rngs, init, (d, f), ("embed", "mlp"), pd)
        self.down = _param(rngs, init, (f, d), ("mlp", "embed"), pd)

    def __call__(self, x: Array) -> Array:
        dt = self.dtype
        hidden = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        hidden = constrain(hidden, ("act_batch", "act_length", "act_mlp"))
        return hidden @ self.down[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.)), the MLP dense or a
    mixture of experts (`cfg.num_experts`); returns the router's auxiliary values too ({}
    for a dense MLP)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg, rngs=rngs)
        if cfg.num_experts:
            self.mlp = moe.MoeMlp(cfg.d_model, cfg.expert_ffn_dim or cfg.ffn_dim, cfg.num_experts,
                                  cfg.experts_per_token, norm_topk_prob=cfg.norm_topk_prob,
                                  matmul=cfg.expert_matmul,
                                  dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        else:
            self.mlp = MLP(cfg, rngs=rngs)
        self.experts = bool(cfg.num_experts)

    def __call__(self, x, positions, cache=None, cache_index=None, segment_ids=None):
        attn_out, cache = self.attn(self.attn_norm(x), positions, cache, cache_index, segment_ids)
        x = x + attn_out
        mlp_out, aux = self.mlp(self.mlp_norm(x)) if self.experts else (self.mlp(self.mlp_norm(x)), {})
        return constrain(x + mlp_out, ACT_EMBED), cache, aux


# ----------------------------------------------------------------------------- model


class Decoder(nnx.Module):
    """LLaMA-style decoder-only LM; see the module docstring."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d, vocab = cfg.d_model, cfg.vocab_size
        self.embed = _param(rngs, nnx.initializers.normal(d ** -0.5), (vocab, d),
                            ("vocab", "embed"), cfg.param_dtype)
        self.layers = layer_stack.make_layers(lambda r: Block(cfg, rngs=r), cfg.num_layers,
                                              cfg.scan_layers, rngs)
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, _kernel_init(0, 1), (d, vocab), ("embed", "vocab"),
                                  cfg.param_dtype)

    def __call__(self, tokens: Array, positions: Array | None = None,
                 segment_ids: Array | None = None) -> Array:
        """tokens [batch, seq] int -> float32 logits [batch, seq, vocab] (causal; with
        `segment_ids`, also within each packed document)."""
        return self.logits(self.hidden(tokens, positions, segment_ids))

    def hidden(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None) -> Array:
        """The final-normed activations [batch, seq, d_model] that `logits` projects."""
        return self._forward(tokens, positions, None, None, segment_ids)[0]

    def hidden_and_aux(self, tokens: Array, positions: Array | None = None,
                       segment_ids: Array | None = None) -> tuple[Array, dict]:
        """(`hidden`, the routers' auxiliary values averaged over layers, `expert_load_max`
        the largest over layers): {} for a dense model (models.moe names them)."""
        hidden, _, aux = self._forward(tokens, positions, None, None, segment_ids)
        return hidden, aux

    def head_kernel(self) -> Array:
        """The output head [d_model, vocab] in the compute dtype (the embedding's transpose
        when tied), as `models.lm_loss.chunked_cross_entropy` takes it."""
        dt = self.config.dtype
        if self.config.tie_embeddings:
            return self.embed[...].astype(dt).T
        return self.lm_head[...].astype(dt)

    def logits(self, hidden: Array) -> Array:
        """float32 logits [batch, seq, vocab] of `hidden` [batch, seq, d_model] (the output head)."""
        return lm_loss.head_logits(hidden, self.head_kernel())

    def decode(self, tokens: Array, cache: KVCache, cache_index, positions=None):
        """Cached forward of `tokens` written at slots [cache_index, cache_index + seq).

        Returns (float32 logits [batch, seq, vocab], updated cache). Positions default
        to the slot indices.
        """
        hidden, cache, _ = self._forward(tokens, positions, cache, cache_index, None)
        return self.logits(hidden), cache

    def _forward(self, tokens, positions, cache, cache_index, segment_ids):
        cfg = self.config
        batch, seq = tokens.shape
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.dtype)
        x = constrain(x, ACT_EMBED)
        x, cache, aux = self._run_layers(x, positions, cache, cache_index, segment_ids)
        return self.final_norm(x), cache, aux

    def _run_layers(self, x, positions, cache, cache_index, segment_ids):
        cfg = self.config

        def run_block(block, x, layer_cache):
            x, layer_cache, aux = block(x, positions, layer_cache, cache_index, segment_ids)
            return x, (layer_cache, aux)

        run_block = layer_stack.remat(run_block, cfg.remat, in_scan=cfg.scan_layers)

        if cfg.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                      transform_metadata=layer_stack.LAYERS)
            def scan_blocks(x, block, layer_cache):
                return run_block(block, x, layer_cache)

            x, (cache, aux) = scan_blocks(x, self.layers, cache)
            return x, cache, _over_layers(aux)

        new_caches, auxes = [], []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
            x, (layer_cache, aux) = run_block(block, x, layer_cache)
            new_caches.append(layer_cache)
            auxes.append(aux)
        if cache is not None:
            cache = jax.tree.map(lambda *c: jnp.stack(c), *new_caches)
        return x, cache, _over_layers(jax.tree.map(lambda *a: jnp.stack(a), *auxes))


def _over_layers(aux: dict) -> dict:
    """Per-layer router values [layers] -> the mean over layers (the largest load: max)."""
    return {k: jnp.max(v) if k == "expert_load_max" else jnp.mean(v) for k, v in aux.items()}


def init_cache(cfg: DecoderConfig, batch: int, max_len: int) -> KVCache:
    """Zeroed KV cache for `batch` sequences of up to `max_len` tokens."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}


# ----------------------------------------------------------------------------- layouts


def stack_layer_params(params: dict) -> dict:
    """Unrolled pure-dict params ({'layers': {0: ..., 1: ...}}) -> scanned layout.

    Works on `nnx.state(model, nnx.Param).to_pure_dict()` (or any state-shaped dict);
    load the result with `nnx.replace_by_pure_dict` into a `scan_layers=True` model.
    """
    return {**params, "layers": layer_stack.stack(params["layers"])}


def unstack_layer_params(params: dict) -> dict:
    """Inverse of `stack_layer_params`: leading `layers` axis -> {0: ..., 1: ...}."""
    return {**params, "layers": layer_stack.unstack(params["layers"])}


# ----------------------------------------------------------------------------- training


def matmul_params(cfg: DecoderConfig) -> int:
    """Parameters used in matmuls per token: all projections (of a mixture of experts, the
    router and the experts a token runs through: active parameters) and the output head,
    not the lookup."""
    d, q = cfg.d_model, cfg.head_dim
    attention = 2 * d * cfg.num_heads * q + 2 * d * cfg.num_kv_heads * q
    if cfg.num_experts:  # the experts a token runs through, and the router
        mlp = cfg.experts_per_token * 3 * d * (cfg.expert_ffn_dim or cfg.ffn_dim) + d * cfg.num_experts
    else:
        mlp = 3 * d * cfg.ffn_dim
    return cfg.num_layers * (attention + mlp) + d * cfg.vocab_size


def train_flops_per_token(cfg: DecoderConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token: 6N + 12*L*H*Q*T (PaLM, appendix B), the attention term
    halved by default since a causal token attends to half the sequence on average (as
    MaxText counts it); `causal=False` counts the full score matrix, as XLA computes it.
    With a sliding window W < seq_len a causal token attends to W - (W - 1) W / (2 T) keys
    on average (W each, less the first W - 1 positions' shortfall)."""
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    if not causal:
        return float(6 * matmul_params(cfg) + attention)
    w = cfg.sliding_window
    if w is not None and w < seq_len:
        return float(6 * matmul_params(cfg) + attention * (w - (w - 1) * w / (2 * seq_len)) / seq_len)
    return float(6 * matmul_params(cfg) + attention / 2)
