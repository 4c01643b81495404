"""lion_optax: equality to optax.lion and to the paper's Algorithm 2, momentum dtype,
masks, the AdamW mapping, sharding, and integration with optax / flax / orbax."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lion_optax

STEPS = 100


def _params(dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "dense": {
            "kernel": jax.random.normal(k[0], (16, 24), dtype),
            "bias": jax.random.normal(k[1], (24,), dtype),
        },
        "embed": {"embedding": jax.random.normal(k[2], (32, 16), dtype)},
        "norm": {"scale": 1.0 + 0.1 * jax.random.normal(k[3], (16,), dtype)},
    }


def _grad_sequence(params, steps, seed=1):
    """Random gradients, each leaf's scale different, as a stacked tree [steps, ...]."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    stacked = [
        (10.0 ** (i - 2)) * jax.random.normal(k, (steps,) + p.shape, jnp.float32).astype(p.dtype)
        for i, (k, p) in enumerate(zip(keys, leaves))
    ]
    return jax.tree.unflatten(treedef, stacked)


def _run(opt, params, grads):
    """Applies `opt` along the gradient sequence under jit; returns final params, state
    and the stacked per-step params."""

    @jax.jit
    def go(params, grads):
        def step(carry, g):
            p, s = carry
            u, s = opt.update(g, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), p

        (p, s), history = jax.lax.scan(step, (params, opt.init(params)), grads)
        return p, s, history

    return go(params, grads)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- optax


@pytest.mark.parametrize("schedules", [False, True])
def test_fp32_momentum_equals_optax_lion_bitwise(schedules):
    params = _params()
    grads = _grad_sequence(params, STEPS)
    if schedules:
        lr = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 10, STEPS, 1e-5)
        wd = optax.linear_schedule(0.5, 0.05, STEPS)
    else:
        lr, wd = 3e-3, 0.5
    mask = {"dense": {"kernel": True, "bias": False}, "embed": True, "norm": False}
    for mu_dtype in (jnp.float32, None):
        ours = lion_optax.lion(lr, b1=0.9, b2=0.99, mu_dtype=mu_dtype, weight_decay=wd, mask=mask)
        ref = optax.lion(lr, b1=0.9, b2=0.99, mu_dtype=mu_dtype, weight_decay=wd, mask=mask)
        p_ours, s_ours, h_ours = _run(ours, params, grads)
        p_ref, s_ref, h_ref = _run(ref, params, grads)
        _assert_trees_equal(h_ours, h_ref)  # every one of the 100 steps
        _assert_trees_equal(s_ours.mu, s_ref[0].mu)
        assert int(s_ours.count) == STEPS
        # The run moved: decay and sign updates really happened.
        assert float(jnp.abs(p_ours["dense"]["kernel"] - params["dense"]["kernel"]).max()) > 0.05


def test_mask_callable_equals_tree_and_masks_decay():
    params = _params()
    grads = _grad_sequence(params, 5)
    by_fn = lion_optax.lion(1e-2, mu_dtype=jnp.float32, weight_decay=1.0, mask=lion_optax.decay_mask)
    by_tree = lion_optax.lion(
        1e-2, mu_dtype=jnp.float32, weight_decay=1.0, mask=lion_optax.decay_mask(params)
    )
    no_decay = lion_optax.lion(1e-2, mu_dtype=jnp.float32, weight_decay=0.0)
    p_fn, _, _ = _run(by_fn, params, grads)
    p_tree, _, _ = _run(by_tree, params, grads)
    p_none, _, _ = _run(no_decay, params, grads)
    _assert_trees_equal(p_fn, p_tree)
    # Masked-out leaves equal the no-decay run; decayed leaves differ from it.
    np.testing.assert_array_equal(p_fn["dense"]["bias"], p_none["dense"]["bias"])
    np.testing.assert_array_equal(p_fn["norm"]["scale"], p_none["norm"]["scale"])
    assert not np.array_equal(p_fn["dense"]["kernel"], p_none["dense"]["kernel"])


def test_scale_by_lion_direction_matches_optax():
    params = _params()
    grads = _grad_sequence(params, 20)
    ours = optax.chain(lion_optax.scale_by_lion(mu_dtype=jnp.float32), optax.scale(-1e-2))
    ref = optax.chain(optax.scale_by_lion(mu_dtype=jnp.float32), optax.scale(-1e-2))
    _assert_trees_equal(_run(ours, params, grads)[2], _run(ref, params, grads)[2])


# ------------------------------------------------------------------- paper, Algorithm 2


def _algorithm2_numpy(theta, grads, lrs, wds, b1, b2, decay):
    """Chen et al. 2023, Algorithm 2, transcribed in float64 NumPy."""
    theta = {k: v.astype(np.float64) for k, v in theta.items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    for t in range(len(lrs)):
        for k in theta:
            g = grads[k][t].astype(np.float64)
            c = b1 * m[k] + (1 - b1) * g
            theta[k] = theta[k] - lrs[t] * (np.sign(c) + (wds[t] * theta[k] if decay[k] else 0.0))
            m[k] = b2 * m[k] + (1 - b2) * g
    return theta


def test_matches_paper_algorithm2_float64():
    flat = {"w": _params()["dense"]["kernel"], "b": _params()["dense"]["bias"]}
    grads = _grad_sequence(flat, STEPS)
    lr_fn = optax.cosine_decay_schedule(1e-3, STEPS, alpha=0.1)
    wd_fn = optax.linear_schedule(1.0, 0.1, STEPS)
    lrs = np.array([lr_fn(t) for t in range(STEPS)], np.float64)
    wds = np.array([wd_fn(t) for t in range(STEPS)], np.float64)
    decay = {"w": True, "b": False}
    ours = lion_optax.lion(lr_fn, b1=0.95, b2=0.98, mu_dtype=jnp.float32, weight_decay=wd_fn, mask=decay)
    p_ours, _, _ = _run(ours, flat, grads)
    ref = _algorithm2_numpy(
        {k: np.asarray(v) for k, v in flat.items()},
        {k: np.asarray(v) for k, v in grads.items()},
        lrs, wds, 0.95, 0.98, decay,
    )
    for k in flat:
        # 100 float32 roundings of O(1) values: a few ulps each.
        np.testing.assert_allclose(np.asarray(p_ours[k], np.float64), ref[k], rtol=0, atol=2e-6)


# ------------------------------------------------------------------ momentum dtype


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_momentum_dtype_never_drifts(param_dtype):
    params = _params(param_dtype)
    grads = _grad_sequence(params, 3)
    for mu_dtype, expect in [(jnp.bfloat16, jnp.bfloat16), (None, param_dtype), (jnp.float32, jnp.float32)]:
        opt = lion_optax.lion(1e-3, mu_dtype=mu_dtype)
        state = opt.init(params)
        assert {x.dtype for x in jax.tree.leaves(state.mu)} == {jnp.dtype(expect)}
        eager = opt.update(jax.tree.map(lambda g: g[0], grads), state, params)[1]
        p, s, _ = _run(opt, params, grads)
        for st in (eager, s):
            assert {x.dtype for x in jax.tree.leaves(st.mu)} == {jnp.dtype(expect)}
            assert st.count.dtype == jnp.int32
        assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(param_dtype)}


def test_bf16_momentum_loss_matches_fp32_momentum():
    """Linear regression, 300 steps: bf16 momentum reaches the fp32-momentum loss within 2%."""
    kx, kw, kn = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (512, 32))
    w_true = jax.random.normal(kw, (32, 4))
    y = x @ w_true + 0.1 * jax.random.normal(kn, (512, 4))

    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    def train(mu_dtype):
        opt = lion_optax.lion(optax.cosine_decay_schedule(3e-2, 300), mu_dtype=mu_dtype, weight_decay=1e-2)
        p = {"w": jnp.zeros((32, 4)), "b": jnp.zeros((4,))}

        @jax.jit
        def go(p):
            def step(carry, _):
                p, s = carry
                u, s = opt.update(jax.grad(loss)(p), s, p)
                return (optax.apply_updates(p, u), s), None

            return jax.lax.scan(step, (p, opt.init(p)), length=300)[0][0]

        return float(loss(go(p)))

    initial = float(jnp.mean(y**2))
    l32, l16 = train(jnp.float32), train(jnp.bfloat16)
    assert l32 < 0.02 * initial  # it actually trained (noise floor is 0.01)
    assert abs(l16 - l32) <= 0.02 * l32, (l16, l32)


# ------------------------------------------------------------------ decay mask / mapping


def test_decay_mask_rules():
    params = _params()
    params["stacked"] = {"bias": jnp.zeros((4, 8))}
    assert lion_optax.decay_mask(params) == {
        "dense": {"kernel": True, "bias": False},
        "embed": {"embedding": True},
        "norm": {"scale": False},
        "stacked": {"bias": True},
    }
    no_emb = lion_optax.decay_mask(params, decay_embeddings=False, exclude=("bias$",))
    assert no_emb["embed"]["embedding"] is False
    assert no_emb["stacked"]["bias"] is False
    assert no_emb["dense"]["kernel"] is True


def test_decay_mask_ignores_stacked_axes_by_path_or_logical_names():
    params = {"layers": {"norm": {"scale": jnp.zeros((4, 8))}, "kernel": jnp.zeros((4, 8, 8)),
                         "qbias": jnp.zeros((4, 2, 4))},
              "head": jnp.zeros((8, 3))}
    by_path = lion_optax.decay_mask(params, stacked=(r"(^|/)layers/",))
    assert by_path == {"layers": {"norm": {"scale": False}, "kernel": True, "qbias": True},
                       "head": True}
    axes = {"layers": {"norm": {"scale": ("layers", "embed")}, "kernel": ("layers", "embed", "mlp"),
                       "qbias": ("layers", "heads", "head_dim")},
            "head": ("embed", None)}  # a broadcast (None) axis is not a feature axis
    by_names = lion_optax.decay_mask(params, logical_axes=axes)
    assert by_names == {"layers": {"norm": {"scale": False}, "kernel": True, "qbias": True},
                        "head": False}
    split_heads = lion_optax.decay_mask(params, logical_axes=axes, ignore_axes=("layers", "head_dim"))
    assert split_heads["layers"]["qbias"] is False and split_heads["layers"]["kernel"] is True


def test_decay_mask_on_nnx_state_and_abstract_shapes():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.tok = nnx.Embed(10, 4, rngs=rngs)
            self.proj = nnx.Linear(4, 3, rngs=rngs)
            self.norm = nnx.LayerNorm(3, rngs=rngs)

    state = nnx.state(nnx.eval_shape(lambda: Net(nnx.Rngs(0))), nnx.Param)
    flags = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(lion_optax.decay_mask(state))}
    assert flags == {
        "norm/bias": False, "norm/scale": False, "proj/bias": False,
        "proj/kernel": True, "tok/embedding": True,
    }


def test_from_adamw_mapping():
    lr, wd = lion_optax.adamw_to_lion_hparams(1e-3, 1.0)
    assert lr == pytest.approx(1e-4) and wd == pytest.approx(10.0)
    lr_s, wd_s = lion_optax.adamw_to_lion_hparams(
        optax.warmup_cosine_decay_schedule(1e-6, 3e-3, 10, 100), optax.constant_schedule(0.1), factor=3
    )
    adam_lr = optax.warmup_cosine_decay_schedule(1e-6, 3e-3, 10, 100)
    for t in (0, 5, 10, 50, 99):
        assert float(lr_s(t)) == pytest.approx(float(adam_lr(t)) / 3, rel=1e-6)
        assert float(lr_s(t) * wd_s(t)) == pytest.approx(float(adam_lr(t)) * 0.1, rel=1e-6)
    params = _params()
    grads = _grad_sequence(params, 10)
    mapped = lion_optax.from_adamw(3e-3, 0.1, factor=5, mu_dtype=jnp.float32)
    direct = lion_optax.lion(3e-3 / 5, weight_decay=0.1 * 5, mu_dtype=jnp.float32)
    _assert_trees_equal(_run(mapped, params, grads)[0], _run(direct, params, grads)[0])
    for bad in (0, -3, float("nan")):
        with pytest.raises(ValueError, match="factor"):
            lion_optax.from_adamw(1e-3, 0.1, factor=bad)


def test_missing_params_is_a_clear_error():
    params = _params()
    opt = lion_optax.lion(1e-3)
    with pytest.raises(ValueError, match="params"):
        opt.update(params, opt.init(params))
    # Without weight decay params are not needed.
    lion_optax.lion(1e-3, weight_decay=0.0).update(params, opt.init(params))


# ------------------------------------------------------------------------- sharding


def _mesh():
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _sharded_params(mesh):
    specs = {
        "dense": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")},
        "embed": {"embedding": P("tensor", "fsdp")},
        "norm": {"scale": P()},
    }
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    return jax.device_put(_params(), shardings), shardings


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def test_state_born_sharded_like_params_and_update_has_no_collectives():
    mesh = _mesh()
    params, shardings = _sharded_params(mesh)
    opt = lion_optax.lion(optax.cosine_decay_schedule(1e-3, 100), weight_decay=0.1, mask=lion_optax.decay_mask)
    abstract = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, shardings)
    state_sh = lion_optax.state_shardings(opt, abstract)
    assert state_sh.mu == shardings
    assert state_sh.count == NamedSharding(mesh, P())

    state = jax.jit(opt.init, out_shardings=state_sh)(params)
    for mu, p in zip(jax.tree.leaves(state.mu), jax.tree.leaves(params), strict=True):
        assert mu.sharding == p.sharding and mu.dtype == jnp.bfloat16
    assert state.count.sharding.is_fully_replicated

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    grads = jax.device_put(jax.tree.map(lambda g: g[0], _grad_sequence(params, 1)), shardings)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    hlo = compiled.as_text()
    assert not [c for c in COLLECTIVES if c in hlo], "update must be collective-free"
    new_params, new_state = compiled(params, state, grads)
    for mu, p, s in zip(jax.tree.leaves(new_state.mu), jax.tree.leaves(new_params), jax.tree.leaves(shardings)):
        assert mu.sharding == s and p.sharding == s and mu.dtype == jnp.bfloat16


@pytest.mark.parametrize("options, expected", [
    ({}, set()),
    ({"mu_dtype": jnp.int8}, {"all-reduce"}),  # row maxima over a split last axis
    ({"mu_dtype": jnp.int8, "block_size": 4}, set()),  # each block lies inside one shard
    ({"cautious": True}, {"all-reduce"}),  # the per-tensor rescale
])
def test_which_options_add_collectives_to_the_sharded_update(options, expected):
    """What docs/lion_optax.md and the `lion` docstring say about collectives, counted on one sharded
    tree (kernels split on both axes over a 2x4 mesh). Kinds, not counts: XLA's combiner merges
    the per-tensor all-reduces into one on newer jax (3 on 0.10, 1 on 0.12)."""
    import re

    mesh = _mesh()
    params, shardings = _sharded_params(mesh)
    opt = lion_optax.lion(1e-3, weight_decay=0.1, mask=lion_optax.decay_mask, **options)
    abstract = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, shardings)
    state = jax.jit(opt.init, out_shardings=lion_optax.state_shardings(opt, abstract))(params)

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    hlo = jax.jit(step).lower(params, state, params).compile().as_text()
    counts = {c: len(re.findall(rf"= \S+ {c}(-start)?\(", hlo)) for c in COLLECTIVES}
    assert {c for c, n in counts.items() if n} == expected, counts


def test_state_shardings_for_wrapped_optimizers():
    mesh = _mesh()
    params, shardings = _sharded_params(mesh)
    replicated = NamedSharding(mesh, P())
    wrapped = {
        "inject": optax.inject_hyperparams(lion_optax.lion)(learning_rate=1e-3),
        "chain": optax.chain(optax.clip_by_global_norm(1.0), lion_optax.lion(1e-3)),
        "multisteps": optax.MultiSteps(lion_optax.lion(1e-3), every_k_schedule=2),
        # Factored second moments: row/column statistics are not param-shaped.
        "adafactor": optax.adafactor(1e-3, min_dim_size_to_factor=8),
    }
    for name, opt in wrapped.items():
        state_sh = lion_optax.state_shardings(opt, params)
        state = jax.jit(opt.init, out_shardings=state_sh)(params)
        # Param-shaped state leaves carry their parameter's sharding; others are replicated.
        ok = optax.tree_map_params(
            opt,
            lambda leaf, p: leaf.sharding == p.sharding if leaf.shape == p.shape
            else leaf.sharding.is_fully_replicated,
            state, params, transform_non_params=lambda _: True)
        assert all(jax.tree.leaves(ok)), name
        like = optax.tree_map_params(opt, lambda leaf, p: leaf.shape == p.shape, state, params,
                                     transform_non_params=lambda _: False)
        assert sum(jax.tree.leaves(like)) >= (1 if name == "adafactor" else len(jax.tree.leaves(params))), name
        non_params = optax.tree_map_params(opt, lambda _: None, state, transform_non_params=lambda x: x)
        assert all(x.sharding == replicated for x in jax.tree.leaves(non_params)), name


# ---------------------------------------------------------------------- integration


def test_inject_hyperparams_equals_plain_and_can_change_lr():
    params = _params()
    grads = _grad_sequence(params, 10)
    plain = lion_optax.lion(1e-3, weight_decay=0.1, mu_dtype=jnp.float32)
    injected = optax.inject_hyperparams(lion_optax.lion)(learning_rate=1e-3, weight_decay=0.1, mu_dtype=jnp.float32)
    _assert_trees_equal(_run(plain, params, grads)[2], _run(injected, params, grads)[2])
    state = injected.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    g0 = jax.tree.map(lambda g: g[0], grads)
    updates, state = injected.update(g0, state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    assert state.inner_state.mu["dense"]["kernel"].dtype == jnp.float32
    assert float(jnp.abs(state.inner_state.mu["dense"]["kernel"]).max()) > 0


def test_multisteps_equals_lion_on_mean_gradient():
    params = _params()
    grads = _grad_sequence(params, 8)
    k = 4
    multi = optax.MultiSteps(lion_optax.lion(1e-2, mu_dtype=jnp.float32, weight_decay=0.1), every_k_schedule=k)
    p_multi, s_multi, _ = _run(multi.gradient_transformation(), params, grads)
    mean_grads = jax.tree.map(lambda g: g.reshape((8 // k, k) + g.shape[1:]).mean(axis=1), grads)
    p_ref, _, _ = _run(lion_optax.lion(1e-2, mu_dtype=jnp.float32, weight_decay=0.1), params, mean_grads)
    for a, b in zip(jax.tree.leaves(p_multi), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert int(s_multi.gradient_step) == 2


def test_chain_after_global_norm_clipping():
    params = _params()
    grads = _grad_sequence(params, 10)
    clipped = optax.chain(optax.clip_by_global_norm(1e-3), lion_optax.lion(1e-2, mu_dtype=jnp.float32))
    ref = optax.chain(optax.clip_by_global_norm(1e-3), optax.lion(1e-2, mu_dtype=jnp.float32))
    _assert_trees_equal(_run(clipped, params, grads)[0], _run(ref, params, grads)[0])


def test_flax_nnx_optimizer_and_linen_train_state():
    from flax import nnx
    from flax.training import train_state

    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = x @ jnp.linspace(-1.0, 1.0, 8).reshape(8, 1)

    model = nnx.Linear(8, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, lion_optax.lion(5e-2, mask=lion_optax.decay_mask), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    nnx_losses = [float(nnx_step(model, optimizer)) for _ in range(30)]
    assert optimizer.opt_state.mu["kernel"].dtype == jnp.bfloat16
    assert nnx_losses[-1] < 0.5 * nnx_losses[0]

    # Same model as a Linen-style TrainState over the same initial weights.
    graphdef, params = nnx.split(nnx.Linear(8, 1, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(params)
    apply = lambda p, inp: nnx.merge(graphdef, p)(inp)  # noqa: E731
    ts = train_state.TrainState.create(apply_fn=apply, params=params, tx=lion_optax.lion(5e-2, mask=lion_optax.decay_mask))

    @jax.jit
    def ts_step(ts):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((ts.apply_fn(p, x) - y) ** 2))(ts.params)
        return ts.apply_gradients(grads=grads), loss

    ts_losses = []
    for _ in range(30):
        ts, loss = ts_step(ts)
        ts_losses.append(float(loss))
    np.testing.assert_allclose(ts_losses, nnx_losses, rtol=1e-6)
    assert ts.opt_state.mu["kernel"].dtype == jnp.bfloat16


def test_orbax_roundtrip_keeps_dtypes_shardings_and_values(tmp_path):
    import orbax.checkpoint as ocp

    mesh = _mesh()
    params, shardings = _sharded_params(mesh)
    opt = lion_optax.lion(1e-3)
    state_sh = lion_optax.state_shardings(opt, params)
    state = jax.jit(opt.init, out_shardings=state_sh)(params)
    grads = jax.device_put(jax.tree.map(lambda g: g[0], _grad_sequence(params, 1)), shardings)
    _, state = jax.jit(opt.update)(grads, state, params)

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
        ckpt.wait_until_finished()
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = ckpt.restore(tmp_path / "state", target)
    assert isinstance(restored, lion_optax.ScaleByLionState)
    _assert_trees_equal(restored, state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.sharding == b.sharding
    assert restored.mu["dense"]["kernel"].dtype == jnp.bfloat16
    # Restored state keeps stepping in bf16.
    _, nxt = jax.jit(opt.update)(grads, restored, params)
    assert nxt.mu["dense"]["kernel"].dtype == jnp.bfloat16 and int(nxt.count) == 2
