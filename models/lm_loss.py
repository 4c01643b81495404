"""Token cross-entropy for language models, plain or chunked over the sequence.

`cross_entropy_loss(logits, ...)` takes materialized logits. `chunked_cross_entropy(
hidden, logits_fn, ...)` gives the same loss and gradients while computing the float32
logits for `chunk` positions of every sequence at a time: a `lax.scan` over chunks with
each chunk under `jax.checkpoint`, so neither pass holds more than one chunk of
[batch, chunk, vocab] logits (the backward recomputes a chunk's logits, one extra
output-head matmul forward). With a 128k vocabulary the full logits and their gradient
are otherwise the largest activations of the step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from models.partitioning import constrain

Array = jax.Array


def _token_terms(logits: Array, targets: Array):
    """(log Z, target logit, correct) per token of float32 `logits`."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # One-hot keeps the target gather local when the vocab axis is sharded.
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32), axis=-1)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return log_z, target_logit, correct


def _finish(nll_sum, z_sum, correct_sum, num_tokens, z_loss):
    denom = jnp.maximum(num_tokens, 1.0)
    nll, z_term = nll_sum / denom, z_loss * z_sum / denom
    aux = {"nll": nll, "z_loss": z_term, "accuracy": correct_sum / denom, "num_tokens": num_tokens}
    return nll + z_term, aux


def cross_entropy_loss(logits: Array, targets: Array, mask: Array | None = None,
                       z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
    """Mean token cross-entropy (+ z_loss * log(Z)^2) in float32 over `mask`ed tokens.

    Returns (loss, aux) with aux = {nll, z_loss, accuracy, num_tokens}.
    """
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    log_z, target_logit, correct = _token_terms(logits, targets)
    return _finish(jnp.sum((log_z - target_logit) * mask), jnp.sum(jnp.square(log_z) * mask),
                   jnp.sum(correct * mask), mask.sum(), z_loss)


def chunked_cross_entropy(hidden: Array, logits_fn: Callable[[Array], Array], targets: Array,
                          mask: Array | None = None, z_loss: float = 0.0,
                          chunk: int = 0) -> tuple[Array, dict[str, Array]]:
    """`cross_entropy_loss(logits_fn(hidden), targets, mask, z_loss)` computed `chunk`
    sequence positions at a time (see the module docstring).

    hidden [batch, seq, d]; `logits_fn` maps [batch, chunk, d] to float32 logits and may
    close over the output-head parameters (their gradient is accumulated over chunks in
    their own dtype). `chunk` <= 0 or >= seq: no chunking. It must divide seq.
    """
    batch, seq = targets.shape
    if chunk <= 0 or chunk >= seq:
        return cross_entropy_loss(logits_fn(hidden), targets, mask, z_loss)
    if seq % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {seq}")
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    num = seq // chunk

    def split(x, names):
        x = jnp.moveaxis(x.reshape((batch, num, chunk) + x.shape[2:]), 1, 0)
        return constrain(x, (None,) + names)

    @jax.checkpoint
    def chunk_sums(h, y, m):
        log_z, target_logit, correct = _token_terms(logits_fn(h), y)
        return (jnp.sum((log_z - target_logit) * m), jnp.sum(jnp.square(log_z) * m), jnp.sum(correct * m))

    def add(totals, xs):
        return tuple(t + s for t, s in zip(totals, chunk_sums(*xs))), None

    xs = (split(hidden, ("act_batch", "act_length", "act_embed")),
          split(targets, ("act_batch", "act_length")), split(mask, ("act_batch", "act_length")))
    zero = jnp.zeros([], jnp.float32)
    (nll_sum, z_sum, correct_sum), _ = jax.lax.scan(add, (zero, zero, zero), xs)
    return _finish(nll_sum, z_sum, correct_sum, mask.sum(), z_loss)
