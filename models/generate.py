"""Autoregressive sampling from a `Decoder` with a KV cache.

The prompt is prefilled in one cached forward pass, then tokens are produced one at a
time inside an `nnx.scan`, all under a single `jax.jit`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.decoder import Decoder, init_cache


def sample_token(logits: jax.Array, temperature: float, key: jax.Array) -> jax.Array:
    """Next token from float logits [batch, vocab]; temperature 0 means greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def generate(model: Decoder, prompt_tokens: jax.Array, steps: int,
             temperature: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """Extend `prompt_tokens` [batch, prompt_len] by `steps` tokens.

    Returns [batch, prompt_len + steps] int32 (prompt followed by the new tokens). All
    prompts share one length (no padding). `rng` is required when temperature > 0.
    """
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    if steps < 1:
        return prompt_tokens
    total = prompt_tokens.shape[1] + steps
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt + steps = {total} exceeds max_seq_len={model.config.max_seq_len}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng key")
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt_tokens, rng, steps, float(temperature))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _generate(graphdef, state, prompt_tokens, rng, steps, temperature):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt_tokens.shape
    cache = init_cache(model.config, batch, prompt_len + steps)

    logits, cache = model.decode(prompt_tokens, cache, 0)
    rng, key = jax.random.split(rng)
    first = sample_token(logits[:, -1], temperature, key)

    @nnx.scan(in_axes=(nnx.Carry, None, 0), out_axes=(nnx.Carry, 0))
    def decode_step(carry, model, index):
        token, cache, rng = carry
        logits, cache = model.decode(token[:, None], cache, index)
        rng, key = jax.random.split(rng)
        return (sample_token(logits[:, -1], temperature, key), cache, rng), token

    indices = prompt_len + jnp.arange(steps - 1, dtype=jnp.int32)
    (last, _, _), emitted = decode_step((first, cache, rng), model, indices)
    new_tokens = jnp.concatenate([emitted.T, last[:, None]], axis=1)
    return jnp.concatenate([prompt_tokens, new_tokens], axis=1)
