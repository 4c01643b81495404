"""lion_optax options beyond the paper: int8 blockwise momentum, stochastic rounding,
Cautious Lion, and ZeRO-sharded optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lion_optax
from lion_optax import quantize


def _params(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "kernel": jax.random.normal(k[0], (16, 600)),  # last axis: 2 full blocks + a partial one
        "bias": jax.random.normal(k[1], (24,)),
        "scalar": jax.random.normal(k[2], ()),
        "embed": jax.random.normal(k[3], (8, 256)),
    }


def _grads(params, steps, seed=1):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return [treedef.unflatten([(10.0 ** (i - 2)) * jax.random.normal(jax.random.fold_in(k, t), p.shape)
                               for i, (k, p) in enumerate(zip(keys, leaves))]) for t in range(steps)]


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


# --------------------------------------------------------------------------- int8


def _np_quantize(x, block):
    """numpy float32 reference of blockwise absmax int8 along the last axis."""
    x = np.asarray(x, np.float32).reshape(np.shape(x) or (1,))
    n = x.shape[-1]
    nb = 1 if block is None else -(-n // block)
    width = block if nb > 1 else n
    xp = np.zeros(x.shape[:-1] + (nb * width,), np.float32)
    xp[..., :n] = x
    xb = xp.reshape(x.shape[:-1] + (nb, width))
    scale = (np.abs(xb).max(-1) / np.float32(127.0)).astype(np.float32)
    inv = np.where(scale > 0, np.float32(1.0) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    q = np.clip(np.round(xb * inv[..., None]), -127, 127).astype(np.int8)
    return q.reshape(x.shape[:-1] + (-1,))[..., :n], scale


def _np_dequantize(q, scale, block, shape):
    q = np.asarray(q).reshape(np.shape(q) or (1,)).astype(np.float32)
    n = q.shape[-1]
    nb = scale.shape[-1]
    width = block if nb > 1 else n
    qp = np.zeros(q.shape[:-1] + (nb * width,), np.float32)
    qp[..., :n] = q
    x = (qp.reshape(q.shape[:-1] + (nb, width)) * scale[..., None]).reshape(q.shape[:-1] + (-1,))
    return x[..., :n].reshape(shape)


def test_quantize_blockwise_error_shapes_and_roundtrip():
    x = jax.random.normal(jax.random.key(0), (5, 600)) * jnp.linspace(0.01, 10, 600)
    q, s = quantize.quantize_blockwise(x, 256)
    assert q.dtype == jnp.int8 and q.shape == x.shape and s.shape == (5, 3)
    assert quantize.scale_shape((5, 600), 256) == (5, 3) and quantize.scale_shape((), 256) == (1,)
    back = quantize.dequantize_blockwise(q, s, 256)
    # Round to nearest: each entry within half a step (scale) of its block.
    step = np.repeat(np.asarray(s), 256, axis=-1)[:, :600]
    assert np.all(np.abs(np.asarray(back - x)) <= 0.5 * step * (1 + 1e-6))
    ref_q, ref_s = _np_quantize(x, 256)
    np.testing.assert_array_equal(np.asarray(q), ref_q)
    np.testing.assert_array_equal(np.asarray(s), ref_s)
    # Stochastic rounding is unbiased: the mean of many draws converges to x.
    draws = jax.vmap(lambda k: quantize.dequantize_blockwise(
        *quantize.quantize_blockwise(x[:1], 256, k), 256))(jax.random.split(jax.random.key(1), 2000))
    bias = np.abs(np.asarray(draws.mean(0) - x[:1])) / np.repeat(np.asarray(s[:1]), 256, -1)[:, :600]
    assert bias.max() < 0.05  # in units of the quantization step; RTN bias reaches 0.5


@pytest.mark.parametrize("block", [256, None])
def test_int8_lion_equals_numpy_reference(block):
    """Dequantize -> Lion step -> requantize, written out in numpy float32 (blocks of 256
    along the last axis, or whole rows)."""
    params = _params()
    grads = _grads(params, 5)
    b1, b2, lr, wd = 0.9, 0.99, 1e-3, 0.1
    opt = lion_optax.lion(lr, b1, b2, mu_dtype=jnp.int8, weight_decay=wd, block_size=block)
    state = opt.init(params)
    update = jax.jit(opt.update)
    ref_p = {k: np.asarray(v) for k, v in params.items()}
    ref_m = {k: np.zeros(np.shape(v), np.float32) for k, v in params.items()}
    p = params
    for g in grads:
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
        for k in ref_p:
            gk = np.asarray(g[k], np.float32)
            c = np.float32(1 - b1) * gk + np.float32(b1) * ref_m[k]
            ref_p[k] = ref_p[k] - np.float32(lr) * (np.sign(c) + np.float32(wd) * ref_p[k])
            q, s = _np_quantize(np.float32(1 - b2) * gk + np.float32(b2) * ref_m[k], block)
            ref_m[k] = _np_dequantize(q, s, block, np.shape(gk))
    for k in ref_p:
        np.testing.assert_allclose(np.asarray(p[k]), ref_p[k], rtol=1e-6, atol=1e-7)
        got = np.asarray(quantize.dequantize_blockwise(state.mu[k], state.mu_scale[k], block))
        # XLA may round a product differently in the last bit: a value at a rounding tie can
        # land one quantization step away (seen for 1 entry in 10^4); nothing else differs.
        close = np.isclose(got, ref_m[k], rtol=1e-6, atol=1e-9)
        assert close.mean() > 0.999, k
        step = np.abs(ref_m[k]).max() / 127
        assert np.all(np.abs(got - ref_m[k]) <= 1.01 * step), k


def test_int8_state_is_about_one_byte_per_param_and_tracks_fp32_momentum():
    params = {"w": jnp.zeros((64, 4096)), "b": jnp.zeros((4096,))}
    n = sum(p.size for p in jax.tree.leaves(params))
    for block, per_param in ((None, 1 + 4 / 4096), (256, 1 + 4 / 256)):  # rows / 256-blocks
        state = lion_optax.lion(1e-3, mu_dtype=jnp.int8, block_size=block).init(params)
        state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.mu, state.mu_scale)))
        assert state_bytes / n == pytest.approx(per_param, rel=1e-3)
    opt8 = lion_optax.lion(1e-3, mu_dtype=jnp.int8, block_size=256)
    # Over 30 steps the int8 momentum stays within a few quantization steps of fp32.
    opt32 = lion_optax.lion(1e-3, mu_dtype=jnp.float32)
    s32 = opt32.init(params)
    for g in _grads(params, 30, seed=3):
        _, state = jax.jit(opt8.update)(g, state, params)
        _, s32 = jax.jit(opt32.update)(g, s32, params)
    m8 = quantize.dequantize_blockwise(state.mu["w"], state.mu_scale["w"], 256)
    err = np.abs(np.asarray(m8 - s32.mu["w"])) / np.abs(np.asarray(s32.mu["w"])).max()
    assert err.max() < 0.03


def test_int8_lion_with_inject_hyperparams_and_state_shardings():
    params = _params()
    opt = optax.inject_hyperparams(lion_optax.lion, static_args=("block_size",))(
        learning_rate=1e-3, mu_dtype=jnp.int8, block_size=128)
    state = opt.init(params)
    assert state.inner_state.mu_scale["kernel"].shape == (16, 5)
    with pytest.raises(ValueError, match="static_args"):
        optax.inject_hyperparams(lion_optax.lion)(learning_rate=1e-3, block_size=128).init(params)
    mesh = _mesh((2, 4))
    sh = {"kernel": NamedSharding(mesh, P(None, "tensor")), "bias": NamedSharding(mesh, P("tensor")),
          "scalar": NamedSharding(mesh, P()), "embed": NamedSharding(mesh, P("data", "tensor"))}
    opt8 = lion_optax.lion(1e-3, mu_dtype=jnp.int8, block_size=256)
    state_sh = lion_optax.state_shardings(opt8, params, sh)
    assert state_sh.mu["kernel"] == sh["kernel"]
    # Scales keep the axes that divide them: (16, 3) cannot split 3 over 4; (8, 1) keeps data.
    assert state_sh.mu_scale["kernel"].spec == P(None, None)
    assert state_sh.mu_scale["embed"].spec == P("data", None)
    state = jax.jit(opt8.init, out_shardings=state_sh)(jax.device_put(params, sh))
    assert state.mu_scale["embed"].sharding.spec == P("data", None)


# ------------------------------------------------------------- stochastic rounding


def _momentum_after(opt, grads, steps):
    """The momentum (float32) of `scale_by_lion` after `steps` updates with fixed `grads`."""
    params = jax.tree.map(jnp.zeros_like, grads)

    def body(state, _):
        return opt.update(grads, state)[1], None

    state, _ = jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))(opt.init(params))
    if isinstance(state, lion_optax.ScaleByLionQuantizedState):
        return quantize.dequantize_blockwise(state.mu["w"], state.mu_scale["w"])  # per-row scales
    return state.mu["w"].astype(jnp.float32)


def test_stochastic_rounding_removes_the_bias_of_round_to_nearest_momentum():
    """Constant gradient g: the momentum's exact value is g * (1 - b2^t). In bfloat16 with
    round-to-nearest the update 0.01 * (g - m) falls under half an ulp long before m
    reaches g and the momentum freezes; stochastic rounding keeps it unbiased."""
    steps, b2, g = 600, 0.99, 1.0039
    exact = g * (1 - b2**steps)
    grads = {"w": jnp.full((4096,), g)}
    rtn = _momentum_after(lion_optax.scale_by_lion(b2=b2), grads, steps)
    sr = _momentum_after(lion_optax.scale_by_lion(b2=b2, stochastic_rounding=True), grads, steps)
    assert float(rtn.mean()) < exact - 0.1  # frozen far below (measured: 0.19)
    assert abs(float(sr.mean()) - exact) < 0.005


def test_stochastic_rounding_removes_the_bias_of_round_to_nearest_int8_momentum():
    """Int8: each row's scale is set by its largest entry (gradient 100), so the small
    entries (gradient 0.3) sit below half a quantization step (0.39) and their momentum
    updates of 0.01 * (0.3 - m) round to nothing; stochastically they average out right."""
    steps, b2 = 300, 0.99
    g = jnp.full((64, 256), 0.3).at[:, 0].set(100.0)
    exact = 0.3 * (1 - b2**steps)
    kw = dict(b2=b2, mu_dtype=jnp.int8)
    rtn = _momentum_after(lion_optax.scale_by_lion(**kw), {"w": g}, steps)[:, 1:]
    sr = _momentum_after(lion_optax.scale_by_lion(**kw, stochastic_rounding=True), {"w": g}, steps)[:, 1:]
    assert float(rtn.mean()) < 0.1 * exact  # stuck at (about) zero
    assert abs(float(sr.mean()) - exact) < 0.02 * exact


def test_stochastic_rounding_of_bf16_params():
    params = {"w": jnp.ones((8192,), jnp.bfloat16)}
    updates = {"w": jnp.full((8192,), 1e-4, jnp.float32)}  # 1/78 of a bf16 ulp at 1.0

    def run(apply):
        def body(p, key):
            return apply(p, key), None
        return jax.jit(lambda p: jax.lax.scan(body, p, jax.random.split(jax.random.key(0), 1000)))(params)[0]

    rtn = run(lambda p, _: optax.apply_updates(p, updates))
    sr = run(lambda p, k: lion_optax.stochastic_apply_updates(p, updates, k))
    assert rtn["w"].dtype == sr["w"].dtype == jnp.bfloat16
    assert float(rtn["w"].astype(jnp.float32).mean()) == 1.0
    assert float(sr["w"].astype(jnp.float32).mean()) == pytest.approx(1.1, abs=0.002)


def test_random_bits_are_uniform_independent_and_shard_invariant():
    """The counter-based bits: each of the 32 bits set half the time, neighbouring entries
    and consecutive steps (keys) uncorrelated, and the same bits when the output is split
    over 8 devices (every device hashes its own global indices)."""
    shape = (512, 1024)
    key = jax.random.fold_in(jax.random.key(3), 17)
    bits = np.asarray(quantize.random_bits(key, shape))
    ones = np.stack([(bits >> k) & 1 for k in range(32)]).reshape(32, -1).mean(axis=1)
    assert np.all(np.abs(ones - 0.5) < 0.005), ones  # 4 sigma at 2^19 samples is 0.0028
    u = (bits >> 8).astype(np.float64) / 2**24
    assert abs(u.mean() - 0.5) < 0.002 and abs(u.var() - 1 / 12) < 0.001
    flat = u.reshape(-1) - 0.5
    assert abs(np.mean(flat[1:] * flat[:-1])) / (1 / 12) < 0.01  # neighbours
    nxt = np.asarray(quantize.random_bits(jax.random.fold_in(jax.random.key(3), 18), shape))
    v = (nxt >> 8).astype(np.float64) / 2**24 - 0.5
    assert abs(np.mean(flat * v.reshape(-1))) / (1 / 12) < 0.01  # next step's key
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    sharded = jax.jit(quantize.random_bits, static_argnums=1,
                      out_shardings=NamedSharding(mesh, P("a", "b")))(key, shape)
    np.testing.assert_array_equal(np.asarray(sharded), bits)


def test_stochastic_rounding_is_reproducible_and_validated():
    params = _params()
    g = _grads(params, 1)[0]
    opt = lion_optax.lion(1e-3, stochastic_rounding=True, seed=7)
    a = jax.jit(opt.update)(g, opt.init(params), params)
    b = jax.jit(opt.update)(g, opt.init(params), params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="stochastic_rounding"):
        lion_optax.lion(1e-3, mu_dtype=jnp.float32, stochastic_rounding=True)
    with pytest.raises(ValueError, match="block_size"):
        lion_optax.lion(1e-3, mu_dtype=jnp.int8, block_size=0)
    with pytest.raises(ValueError, match="mu_dtype"):
        lion_optax.lion(1e-3, mu_dtype=jnp.int32)


# ---------------------------------------------------------------------- cautious


def test_cautious_lion_equals_numpy_reference():
    """C-Lion (Liang et al. 2024): u = sign(c); keep u where u * g > 0, scale by
    size / (kept + 1); decoupled decay as in Lion."""
    params = _params()
    grads = _grads(params, 6)
    b1, b2, lr, wd = 0.9, 0.99, 1e-3, 0.1
    opt = lion_optax.lion(lr, b1, b2, mu_dtype=jnp.float32, weight_decay=wd, cautious=True)
    state, p = opt.init(params), params
    ref_p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    ref_m = {k: np.zeros(np.shape(v)) for k, v in params.items()}
    masked = 0
    for g in grads:
        u, state = jax.jit(opt.update)(g, state, p)
        p = optax.apply_updates(p, u)
        for k in ref_p:
            gk = np.asarray(g[k], np.float64)
            d = np.sign((1 - b1) * gk + b1 * ref_m[k])
            keep = (d * gk > 0).astype(np.float64)
            masked += int(keep.size - keep.sum())
            d = d * keep * (keep.size / (keep.sum() + 1))
            ref_p[k] = ref_p[k] - lr * (d + wd * ref_p[k])
            ref_m[k] = b2 * ref_m[k] + (1 - b2) * gk
    assert masked > 0  # the mask did something
    for k in ref_p:
        np.testing.assert_allclose(np.asarray(p[k]), ref_p[k], rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------- ZeRO


def test_zero_shardings_split_state_over_data_and_update_matches():
    mesh = _mesh((4, 2))
    params = {"w": jnp.arange(32 * 16, dtype=jnp.float32).reshape(32, 16) / 100,
              "v": jnp.ones((6,)), "odd": jnp.ones((3, 5))}
    sh = {"w": NamedSharding(mesh, P(None, "tensor")), "v": NamedSharding(mesh, P()),
          "odd": NamedSharding(mesh, P())}
    zsh = lion_optax.zero_shardings(params, sh, "data")
    assert zsh["w"].spec == P("data", "tensor")  # largest dim divisible by 4
    assert zsh["v"].spec == P()  # 6 is not divisible by 4: stays replicated
    assert zsh["odd"].spec == P()
    params = jax.device_put(params, sh)
    opt = lion_optax.lion(1e-2, weight_decay=0.1)
    state_sh = lion_optax.state_shardings(opt, params, zero_axis="data")
    assert state_sh.mu["w"].spec == P("data", "tensor")
    state = jax.jit(opt.init, out_shardings=state_sh)(params)
    # Per-device momentum bytes of w drop by the data-parallel size (4).
    assert state.mu["w"].addressable_shards[0].data.nbytes == state.mu["w"].nbytes // 8
    plain_state = opt.init(params)

    def step(p, s, g, grad_sh):
        g = jax.lax.with_sharding_constraint(g, grad_sh)
        u, s = opt.update(g, s, p)
        return jax.lax.with_sharding_constraint(optax.apply_updates(p, u), sh), s

    zero_step = jax.jit(lambda p, s, g: step(p, s, g, zsh), out_shardings=(sh, state_sh))
    plain_step = jax.jit(lambda p, s, g: step(p, s, g, sh))
    zp, zs, pp, ps = params, state, params, plain_state
    for g in _grads(params, 4, seed=5):
        zp, zs = zero_step(zp, zs, g)
        pp, ps = plain_step(pp, ps, g)
    for a, b in zip(jax.tree.leaves((zp, zs)), jax.tree.leaves((pp, ps))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6)
    assert zp["w"].sharding == sh["w"] and zs.mu["w"].sharding.spec == P("data", "tensor")
