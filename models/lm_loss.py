"""Token cross-entropy for language models, plain or chunked over sequence and vocabulary.

`cross_entropy_loss(logits, ...)` takes materialized logits. `chunked_cross_entropy(
hidden, kernel, ...)` gives the same loss and gradients from the final hidden states and
the output-head kernel [d_model, vocab] without materializing [tokens, vocab] float32
logits or a whole-vocabulary head gradient at once:

- `chunk` splits every sequence into blocks of positions (a `lax.scan`);
- `vocab_chunks` splits the vocabulary into strided slices (vocabulary id
  `k * vocab_chunks + j` is column k of slice j, so a slice keeps the kernel's own
  vocabulary sharding) and combines them with an online log-sum-exp (a `lax.scan` whose
  body is under `jax.checkpoint`). Each step then gathers one slice of an FSDP-sharded
  head and produces one slice of its gradient, not the whole [d_model, vocab] partial sum.

The backward recomputes each block's logits (one extra output-head matmul forward).
With a 128k vocabulary the logits, their gradient and the head's gradient are otherwise
the largest temporaries of the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.partitioning import constrain

Array = jax.Array
_LOGITS = ("act_batch", "act_length", "act_vocab")


def head_logits(hidden: Array, kernel: Array) -> Array:
    """float32 logits [batch, seq, vocab] of `hidden` [batch, seq, d] and `kernel` [d, vocab]."""
    logits = jnp.einsum("btd,dv->btv", hidden, kernel, preferred_element_type=jnp.float32)
    return constrain(logits, _LOGITS).astype(jnp.float32)


def _token_terms(logits: Array, targets: Array):
    """(log Z, target logit, correct) per token of float32 `logits`."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # One-hot keeps the target gather local when the vocab axis is sharded.
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32), axis=-1)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return log_z, target_logit, correct


def _vocab_chunked_terms(hidden: Array, kernel: Array, targets: Array, num: int):
    """`_token_terms(head_logits(hidden, kernel), targets)` over `num` strided vocabulary slices."""
    d, vocab = kernel.shape
    # [d, vocab] -> [num, d, vocab / num]: slice j holds vocabulary ids j, j + num, ...
    slices = constrain(jnp.moveaxis(kernel.reshape(d, vocab // num, num), -1, 0), (None, "embed", "vocab"))
    slot, owner = targets // num, targets % num

    @jax.checkpoint
    def step(carry, xs):
        run_max, run_sum, target_logit, best_id = carry
        w, j = xs
        logits = head_logits(hidden, w)
        # log Z does not depend on the shift, so the running max carries no gradient; it is
        # also the best logit so far, which gives the argmax for the accuracy.
        top = jax.lax.stop_gradient(logits.max(-1))
        new_max = jnp.maximum(run_max, top)
        run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(-1)
        hit = jax.nn.one_hot(slot, logits.shape[-1], dtype=jnp.float32) * (owner == j)[..., None]
        target_logit = target_logit + jnp.sum(logits * hit, -1)
        best_id = jnp.where(top > run_max, jnp.argmax(logits, -1).astype(jnp.int32) * num + j, best_id)
        return (new_max, run_sum, target_logit, best_id), None

    zero = jnp.zeros(targets.shape, jnp.float32)
    init = (jnp.full(targets.shape, -jnp.inf, jnp.float32), zero, zero, jnp.zeros(targets.shape, jnp.int32))
    (run_max, run_sum, target_logit, best_id), _ = jax.lax.scan(
        step, init, (slices, jnp.arange(num, dtype=jnp.int32)))
    return run_max + jnp.log(run_sum), target_logit, (best_id == targets).astype(jnp.float32)


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


def chunked_cross_entropy(hidden: Array, kernel: Array, targets: Array, mask: Array | None = None,
                          z_loss: float = 0.0, chunk: int = 0,
                          vocab_chunks: int = 1) -> tuple[Array, dict[str, Array]]:
    """`cross_entropy_loss(head_logits(hidden, kernel), targets, mask, z_loss)` computed
    `chunk` sequence positions and `vocab / vocab_chunks` vocabulary entries at a time
    (see the module docstring).

    hidden [batch, seq, d]; kernel [d, vocab] in the compute dtype (its gradient flows
    back to the head parameters). `chunk` <= 0 or >= seq: no sequence chunking, else it
    must divide seq; `vocab_chunks` must divide vocab.
    """
    batch, seq = targets.shape
    vocab = kernel.shape[-1]
    if chunk <= 0 or chunk >= seq:
        chunk = seq
    if seq % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {seq}")
    if vocab_chunks < 1 or vocab % vocab_chunks:
        raise ValueError(f"loss vocab_chunks {vocab_chunks} does not divide the vocabulary size {vocab}")
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)

    def block_sums(h, y, m):
        if vocab_chunks > 1:
            terms = _vocab_chunked_terms(h, kernel, y, vocab_chunks)
        else:
            terms = _token_terms(head_logits(h, kernel), y)
        log_z, target_logit, correct = terms
        return (jnp.sum((log_z - target_logit) * m), jnp.sum(jnp.square(log_z) * m), jnp.sum(correct * m))

    num = seq // chunk
    if num == 1:
        return _finish(*block_sums(hidden, targets, mask), mask.sum(), z_loss)

    def split(x, names):
        x = jnp.moveaxis(x.reshape((batch, num, chunk) + x.shape[2:]), 1, 0)
        return constrain(x, (None,) + names)

    # The vocabulary scan already recomputes its logits in the backward; a whole-vocabulary
    # block is recomputed here.
    body = jax.checkpoint(block_sums) if vocab_chunks == 1 else block_sums

    def add(totals, xs):
        return tuple(t + s for t, s in zip(totals, body(*xs))), None

    xs = (split(hidden, ("act_batch", "act_length", "act_embed")),
          split(targets, ("act_batch", "act_length")), split(mask, ("act_batch", "act_length")))
    zero = jnp.zeros([], jnp.float32)
    (nll_sum, z_sum, correct_sum), _ = jax.lax.scan(add, (zero, zero, zero), xs)
    return _finish(nll_sum, z_sum, correct_sum, mask.sum(), z_loss)
