"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE) with dropless grouped-matmul dispatch, in Flax NNX.

Routing (float32, whatever the compute dtype): router logits [tokens, experts], softmax over
all experts, the top-k experts per token, and their weights renormalised to sum to 1 when
`norm_topk_prob` (Mixtral always does this; Qwen3-MoE by its config flag). Dispatch spends only
the active experts' FLOPs: the tokens x k assignments are sorted by expert and each expert's
SwiGLU runs on its own rows through `jax.lax.ragged_dot` (one grouped matmul per projection,
no capacity, nothing dropped), then the rows go back to their tokens and are summed with the
routing weights. No [tokens, experts, ...] dense einsum appears anywhere.

Auxiliary losses, returned beside the output: the load-balancing loss in the form Mixtral and
Qwen3-MoE train with (Hugging Face's `load_balancing_loss_func`: experts x sum over k and e of
the fraction of tokens whose k-th choice is e times the mean router probability of e; top-k
when balanced) and the router z-loss (mean squared log-sum-exp of the logits, ST-MoE), plus the
expert load (max and mean assignments per expert) for the metrics.

Parameters carry the logical axis `experts` (replicated by the default rules; expert
parallelism maps it to a mesh axis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


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


def grouped_swiglu(x, experts, weights, w_gate, w_up, w_down):
    """sum_k weights[t, k] * SwiGLU_{experts[t, k]}(x[t]) for every token, dropless: the
    T*k (token, expert) rows sorted by expert, one `ragged_dot` per projection."""
    tokens, k = experts.shape
    num_experts = w_gate.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # rows grouped by expert
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    rows = x[order // k]  # [T*k, d]
    hidden = jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, group_sizes)) * jax.lax.ragged_dot(rows, w_up, group_sizes)
    out_sorted = jax.lax.ragged_dot(hidden, w_down, group_sizes)  # [T*k, d]
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(tokens, k, -1)
    return jnp.einsum("tk,tkd->td", weights.astype(out.dtype), out), group_sizes


def _init(init, *names):
    return nnx.with_partitioning(init, names)


class MoeMlp(nnx.Module):
    """`num_experts` SwiGLU experts of width `ffn_dim`, `top_k` per token (see module doc).
    Call on [batch, seq, d_model]; returns (output, aux) with aux = {load_balancing_loss,
    router_z_loss, expert_load_max, expert_load_mean}."""

    def __init__(self, d_model: int, ffn_dim: int, num_experts: int, top_k: int, *,
                 norm_topk_prob: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"experts_per_token={top_k} must be between 1 and num_experts={num_experts}")
        self.top_k, self.norm_topk_prob, self.dtype = top_k, norm_topk_prob, dtype
        fan_in = lambda axis: nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=axis, out_axis=-1)  # noqa: E731
        self.router = nnx.Param(_init(fan_in(0), "embed", None)(rngs.params(), (d_model, num_experts), param_dtype))
        self.gate = nnx.Param(_init(fan_in(1), "experts", "embed", "mlp")(rngs.params(), (num_experts, d_model, ffn_dim), param_dtype))
        self.up = nnx.Param(_init(fan_in(1), "experts", "embed", "mlp")(rngs.params(), (num_experts, d_model, ffn_dim), param_dtype))
        self.down = nnx.Param(_init(fan_in(1), "experts", "mlp", "embed")(rngs.params(), (num_experts, ffn_dim, d_model), param_dtype))

    def __call__(self, x: jax.Array):
        batch, seq, d = x.shape
        flat = x.reshape(batch * seq, d)
        logits = flat.astype(jnp.float32) @ self.router[...].astype(jnp.float32)  # router in float32
        weights, experts, probs = route(logits, self.top_k, self.norm_topk_prob)
        dt = self.dtype
        out, load = grouped_swiglu(flat.astype(dt), experts, weights, self.gate[...].astype(dt),
                                   self.up[...].astype(dt), self.down[...].astype(dt))
        aux = {"load_balancing_loss": load_balancing_loss(probs, experts),
               "router_z_loss": router_z_loss(logits),
               "expert_load_max": jnp.max(load).astype(jnp.float32),
               "expert_load_mean": jnp.mean(load).astype(jnp.float32)}
        return out.reshape(batch, seq, d), aux
