"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE) with dropless grouped-matmul dispatch, in Flax NNX.

Routing (float32, whatever the compute dtype): router logits [tokens, experts], softmax over
all experts, the top-k experts per token, and their weights renormalised to sum to 1 when
`norm_topk_prob` (Mixtral always does this; Qwen3-MoE by its config flag). Dispatch
(models.expert_dispatch) spends only the active experts' FLOPs: the tokens x k assignments
are sorted by expert and each expert's SwiGLU runs on its own rows through one grouped matmul
per projection (no capacity, nothing dropped), on each device's own tokens and, with an
`expert` mesh axis, on the device holding the expert; then the rows go back to their tokens
and are summed with the routing weights. No [tokens, experts, ...] dense einsum appears.

Auxiliary losses, returned beside the output: the load-balancing loss in the form Mixtral and
Qwen3-MoE train with (Hugging Face's `load_balancing_loss_func`: experts x sum over k and e of
the fraction of tokens whose k-th choice is e times the mean router probability of e; top-k
when balanced) and the router z-loss (mean squared log-sum-exp of the logits, ST-MoE), plus the
expert load (max and mean assignments per expert) for the metrics.

Parameters carry the logical axis `experts`, which the default rules map to the `expert`
mesh axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import expert_dispatch
from models.attention import platform


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool):
    """(weights [T, k] float32, experts [T, k] int32, probs [T, E] float32) of router
    `logits` [T, E]: softmax over all experts, the top-k, renormalised if `norm_topk_prob`."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def load_balancing_loss(probs: jax.Array, experts: jax.Array) -> jax.Array:
    """Hugging Face's Mixtral / Qwen3-MoE form: E * sum_{k,e} frac[k, e] * mean_prob[e], where
    frac[k, e] is the share of tokens whose k-th choice is expert e (top-k when balanced)."""
    num_experts = probs.shape[-1]
    frac = jnp.mean(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=0)  # [k, E]
    return num_experts * jnp.sum(frac * jnp.mean(probs, axis=0)[None, :])


def router_z_loss(logits: jax.Array) -> jax.Array:
    """Mean over tokens of logsumexp(logits)^2 (ST-MoE, Zoph et al. 2022)."""
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def _init(init, *names):
    return nnx.with_partitioning(init, names)


class MoeMlp(nnx.Module):
    """`num_experts` SwiGLU experts of width `ffn_dim`, `top_k` per token (see module doc).
    Call on [batch, seq, d_model]; returns (output, aux) with aux = {load_balancing_loss,
    router_z_loss, expert_load_max, expert_load_mean}."""

    def __init__(self, d_model: int, ffn_dim: int, num_experts: int, top_k: int, *,
                 norm_topk_prob: bool = True, matmul: str = "auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"experts_per_token={top_k} must be between 1 and num_experts={num_experts}")
        if matmul not in expert_dispatch.MATMULS:
            raise ValueError(f"expert_matmul must be one of {expert_dispatch.MATMULS}, got {matmul!r}")
        self.top_k, self.norm_topk_prob, self.matmul, self.dtype = top_k, norm_topk_prob, matmul, dtype
        # fan-in scaling per expert (axis 0 is a batch axis, not part of the fan-in).
        def fan_in(axis, out_axis=-1, batch=(0,)):
            return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=axis,
                                                     out_axis=out_axis, batch_axis=batch)
        self.router = nnx.Param(_init(fan_in(0, batch=()), "embed", None)(rngs.params(), (d_model, num_experts), param_dtype))
        self.gate = nnx.Param(_init(fan_in(1), "experts", "expert_embed", "mlp")(rngs.params(), (num_experts, d_model, ffn_dim), param_dtype))
        self.up = nnx.Param(_init(fan_in(1), "experts", "expert_embed", "mlp")(rngs.params(), (num_experts, d_model, ffn_dim), param_dtype))
        # The down projection is stored [experts, d_model, ffn] too (and multiplied transposed):
        # split over fsdp on d_model, a last dimension of d_model / fsdp (32 for Qwen3 on 64
        # chips) would be padded to TPU's 128 lanes, 4x its bytes in every copy.
        self.down = nnx.Param(_init(fan_in(2, out_axis=1), "experts", "expert_embed", "mlp")(rngs.params(), (num_experts, d_model, ffn_dim), param_dtype))

    def __call__(self, x: jax.Array):
        batch, seq, d = x.shape
        flat = x.reshape(batch * seq, d)
        logits = flat.astype(jnp.float32) @ self.router[...].astype(jnp.float32)  # router in float32
        weights, experts, probs = route(logits, self.top_k, self.norm_topk_prob)
        dt, where = self.dtype, platform()
        out = expert_dispatch.dispatch(
            flat.astype(dt), experts, weights, self.gate[...].astype(dt), self.up[...].astype(dt),
            self.down[...].astype(dt), matmul=expert_dispatch.resolve_matmul(self.matmul, where),
            platform=where)
        load = jnp.bincount(experts.reshape(-1), length=probs.shape[-1])
        aux = {"load_balancing_loss": load_balancing_loss(probs, experts),
               "router_z_loss": router_z_loss(logits),
               "expert_load_max": jnp.max(load).astype(jnp.float32),
               "expert_load_mean": jnp.mean(load).astype(jnp.float32)}
        return out.reshape(batch, seq, d), aux
