"""models.moe against independent references: a float64 transcription that sends each token
through its own top-k experts one at a time (weights renormalised as each family does:
Mixtral always, Qwen3-MoE by `norm_topk_prob`), in output and gradients; the auxiliary losses
against their formulas written out; dropless dispatch with every token sent to one expert."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import moe, partitioning

FAMILIES = {  # (experts, top-k, norm_topk_prob)
    "mixtral": (8, 2, True),
    "qwen3_moe": (16, 4, True),
    "qwen3_moe_unnormalised": (16, 4, False),
}


def make(num_experts, top_k, norm, d=16, ffn=24, seed=0):
    with partitioning.sharding_context(None):
        layer = moe.MoeMlp(d, ffn, num_experts, top_k, norm_topk_prob=norm, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, 12, d), jnp.float32)
    return layer, x


def params_of(layer):
    return {k: np.asarray(getattr(layer, k)[...], np.float64) for k in ("router", "gate", "up", "down")}


def reference(p, x, top_k, norm):
    """float64, one token and one chosen expert at a time (NumPy)."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = x @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    chosen = []
    for t in range(len(x)):
        top = np.argsort(-probs[t], kind="stable")[:top_k]
        w = probs[t, top] / (probs[t, top].sum() if norm else 1.0)
        chosen.append(top)
        for e, we in zip(top, w):
            a = x[t] @ p["gate"][e]
            h = a / (1 + np.exp(-a)) * (x[t] @ p["up"][e])
            out[t] += we * (h @ p["down"][e].T)  # stored [experts, d_model, ffn]
    return out, logits, probs, np.array(chosen)


def dense_loss_f64(p, x, top_k, norm, probe):
    """The same in float64 JAX with a dense per-expert mask (no sorting, no grouped matmul),
    for the gradients: sum(output * probe)."""
    logits = x @ p["router"]
    probs = jax.nn.softmax(logits, -1)
    top_w, top_e = jax.lax.top_k(probs, top_k)
    if norm:
        top_w = top_w / top_w.sum(-1, keepdims=True)
    mask = jnp.sum(jax.nn.one_hot(top_e, probs.shape[-1], dtype=x.dtype) * top_w[..., None], axis=1)  # [T, E]
    h = jax.nn.silu(jnp.einsum("td,edf->tef", x, p["gate"])) * jnp.einsum("td,edf->tef", x, p["up"])
    out = jnp.einsum("te,tef,edf->td", mask, h, p["down"])
    return jnp.sum(out * probe)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_equals_the_per_token_float64_reference(family):
    num_experts, top_k, norm = FAMILIES[family]
    layer, x = make(num_experts, top_k, norm)
    out, aux = layer(x)
    p = params_of(layer)
    want, _, _, chosen = reference(p, x, top_k, norm)
    np.testing.assert_allclose(np.asarray(out).reshape(want.shape), want, rtol=1e-5, atol=1e-5)
    assert len(np.unique(chosen)) == num_experts  # every expert had tokens

    probe = jax.random.normal(jax.random.PRNGKey(7), x.shape)
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        y, _ = nnx.merge(graphdef, state)(x)
        return jnp.sum(y * probe)

    g_state, g_x = jax.grad(loss, argnums=(0, 1))(state, x)
    with jax.enable_x64(True):
        p64 = {k: jnp.asarray(v) for k, v in p.items()}
        x64 = jnp.asarray(np.asarray(x, np.float64).reshape(-1, x.shape[-1]))
        want_p, want_x = jax.grad(dense_loss_f64, argnums=(0, 1))(
            p64, x64, top_k, norm, jnp.asarray(np.asarray(probe, np.float64).reshape(x64.shape)))
        want_p = {k: np.asarray(v) for k, v in want_p.items()}
        want_x = np.asarray(want_x)
    np.testing.assert_allclose(np.asarray(g_x).reshape(want_x.shape), want_x, rtol=1e-4, atol=1e-5)
    for name in ("router", "gate", "up", "down"):
        got = np.asarray(getattr(g_state, name)[...])
        np.testing.assert_allclose(got, want_p[name], rtol=1e-4, atol=1e-5 * np.abs(want_p[name]).max(), err_msg=name)


def test_aux_losses_equal_their_formulas():
    num_experts, top_k, norm = FAMILIES["mixtral"]
    layer, x = make(num_experts, top_k, norm, seed=3)
    _, aux = layer(x)
    _, logits, probs, chosen = reference(params_of(layer), x, top_k, norm)
    tokens = len(logits)
    # Hugging Face's load_balancing_loss_func: E * sum_k sum_e (share of tokens whose k-th
    # choice is e) * (mean router probability of e).
    balance = 0.0
    for k in range(top_k):
        for e in range(num_experts):
            balance += np.mean(chosen[:, k] == e) * probs[:, e].mean()
    np.testing.assert_allclose(float(aux["load_balancing_loss"]), num_experts * balance, rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(aux["router_z_loss"]), np.mean(lse ** 2), rtol=1e-5)
    counts = np.bincount(chosen.reshape(-1), minlength=num_experts)
    assert float(aux["expert_load_max"]) == counts.max() and float(aux["expert_load_mean"]) == tokens * top_k / num_experts


def test_dropless_with_every_token_sent_to_one_expert():
    """All 24 tokens choose expert 5 first: nothing is dropped (no capacity), the output is the
    reference's, and expert 5 carries all 24 rows."""
    num_experts, top_k, norm = 8, 2, True
    layer, x = make(num_experts, top_k, norm, seed=5)
    x = jnp.abs(x)  # positive inputs and a large positive router column: expert 5 wins everywhere
    layer.router[...] = layer.router[...].at[:, 5].set(5.0)
    out, aux = layer(x)
    want, _, _, chosen = reference(params_of(layer), x, top_k, norm)
    assert (chosen[:, 0] == 5).all()
    np.testing.assert_allclose(np.asarray(out).reshape(want.shape), want, rtol=1e-5, atol=1e-5)
    assert float(aux["expert_load_max"]) == 24


def test_bad_expert_counts_are_errors():
    with pytest.raises(ValueError, match="experts_per_token=9 must be between 1 and num_experts=8"):
        moe.MoeMlp(16, 24, 8, 9, rngs=nnx.Rngs(0))


# Published totals, both with untied embeddings (Hugging Face model cards / config.json shapes).
PUBLISHED = {"mixtral-8x7b": (46_702_792_704, 12.9e9), "qwen3-30b-a3b": (30_532_122_624, 3.3e9)}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_presets_have_the_published_parameter_counts(size):
    from models import decoder

    cfg = decoder.decoder_config(size)
    with partitioning.sharding_context(None):
        shapes = nnx.state(nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    total, active = PUBLISHED[size]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == total
    # Active: what a token runs through (FLOPs and MFU count these), plus the embedding lookup.
    got_active = decoder.matmul_params(cfg) + cfg.vocab_size * cfg.d_model
    assert abs(got_active / active - 1) < 0.02, got_active


def test_moe_decoder_trains_scanned_or_unrolled_alike(tmp_path):
    """The MoE demo's model, scanned and unrolled, gives the same logits and router values;
    a run of it trains, and its metrics carry the router losses and the expert load."""
    from _util import read_metrics, tiny_lm

    from configs import lm as lm_configs
    from models import decoder
    from train import trainer

    demo = lm_configs.get_config("moe-demo").model
    assert demo.num_experts == 8 and demo.experts_per_token * demo.expert_ffn_dim == 384  # the dense demo's width
    cfg = decoder.decoder_config("tiny", d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64,
                                 num_experts=4, experts_per_token=2, expert_ffn_dim=16, qk_norm=True)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 256)
    outs = []
    with partitioning.sharding_context(None):
        scanned = decoder.Decoder(cfg, rngs=nnx.Rngs(0))
        unrolled = decoder.Decoder(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(1))
        state = nnx.state(unrolled, nnx.Param)  # the scanned model's weights, unstacked
        nnx.replace_by_pure_dict(state, decoder.unstack_layer_params(nnx.state(scanned, nnx.Param).to_pure_dict()))
        nnx.update(unrolled, state)
        for model in (scanned, unrolled):
            hidden, aux = model.hidden_and_aux(tokens)
            outs.append((np.asarray(hidden), {k: float(v) for k, v in aux.items()}))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    assert outs[0][1].keys() == {"load_balancing_loss", "router_z_loss", "expert_load_max", "expert_load_mean"}
    for k in outs[0][1]:
        np.testing.assert_allclose(outs[0][1][k], outs[1][1][k], rtol=1e-5)

    config = tiny_lm(num_steps=4, **{"model.num_experts": 4, "model.experts_per_token": 2, "model.expert_ffn_dim": 32})
    last = trainer.run(config, str(tmp_path / "run"))
    logged = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert len(logged) == 4 and all(np.isfinite(m["loss"]) for m in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]
    # Near-uniform routing at the start: the loss is near its balanced value, top-k = 2.
    assert abs(last["load_balancing_loss"] / 2 - 1) < 0.25
    assert last["expert_load_max"] >= last["expert_load_mean"] == 16 * 32 * 2 / 4


def test_expert_weights_are_initialised_per_expert():
    """Each expert's matrices have the fan-in scale of a dense layer of their shape (the expert
    axis is a batch axis: counting it in the fan-in would shrink them by sqrt(experts))."""
    with partitioning.sharding_context(None):
        layer = moe.MoeMlp(256, 512, 64, 2, rngs=nnx.Rngs(0))
    for name, fan_in in (("gate", 256), ("up", 256), ("down", 512)):
        std = float(np.std(np.asarray(getattr(layer, name)[...])))
        assert abs(std * fan_in ** 0.5 - 1) < 0.05, (name, std * fan_in ** 0.5)
