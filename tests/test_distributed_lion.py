"""Distributed Lion (lion_optax.distributed_lion) under shard_map on 8 CPU devices, the
HLO communication count (train.analysis.hlo_bytes), and the trainer with `optimizer.lion.distributed`."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lion_optax

N = 8
LR, B1, B2, WD = 0.01, 0.9, 0.99, 0.3
MASK = {"w": True, "b": False}


def mesh_of(n=N):
    return jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("data",))


def run_sharded(tx, params, grads):
    """Applies `tx` for every step of `grads` ([steps, N, ...] per leaf: one gradient per
    worker) inside shard_map; returns the params of every worker, [N, ...] per leaf."""

    def worker(params, grads):
        grads = jax.tree.map(lambda g: g[:, 0], grads)  # [steps, ...] of this worker
        state = tx.init(params)
        for t in range(jax.tree.leaves(grads)[0].shape[0]):
            updates, state = tx.update(jax.tree.map(lambda g, t=t: g[t], grads), state, params)
            params = optax.apply_updates(params, updates)
        return jax.tree.map(lambda p: p[None], params)

    n = jax.tree.leaves(grads)[0].shape[1]
    mapped = jax.shard_map(worker, mesh=mesh_of(n), in_specs=(P(), P(None, "data")),
                           out_specs=P("data"), check_vma=False)
    return jax.tree.map(np.asarray, jax.jit(mapped)(params, grads))


def reference(params, grads, vote, mask=MASK, wd=WD):
    """The paper's algorithm in float64 NumPy, with the documented zero-sign encoding."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    n = grads["w"].shape[1]
    m = {k: np.zeros((n,) + v.shape) for k, v in p.items()}
    for t in range(grads["w"].shape[0]):
        for k, mask_k in mask.items():
            g = np.asarray(grads[k][t], np.float64)
            d = np.sign(B1 * m[k] + (1 - B1) * g)
            m[k] = B2 * m[k] + (1 - B2) * g
            parity = np.where(np.arange(n) % 2 == 0, 1.0, -1.0).reshape((n,) + (1,) * (d.ndim - 1))
            d = np.where(d == 0, parity, d)
            delta = np.sign(d.sum(0)) if vote == "majority" else d.mean(0)
            p[k] = p[k] - LR * (delta + (wd * p[k] if mask_k else 0.0))
    return p


def problem(seed=0, steps=4, n=N):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(5, 7)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32)}
    grads = {k: rng.normal(size=(steps, n) + v.shape).astype(np.float32) for k, v in params.items()}
    return params, grads


@pytest.mark.parametrize("vote, n", [("majority", 8), ("mean", 8), ("majority", 7)])
def test_matches_float64_transcription_of_the_paper(vote, n):
    params, grads = problem(n=n)
    grads["b"][:, :, 0] = 0.0  # zero signs: with odd N they vote +1 (the documented bias)
    tx = lion_optax.distributed_lion(LR, B1, B2, mu_dtype=jnp.float32, weight_decay=WD, mask=MASK,
                                     vote=vote)
    got = run_sharded(tx, params, grads)
    want = reference(params, grads, vote)
    for k in params:
        for i in range(1, n):  # every worker holds the same parameters
            np.testing.assert_array_equal(got[k][i], got[k][0])
        np.testing.assert_allclose(got[k][0], want[k], rtol=0, atol=1e-6)
        assert not np.allclose(want[k], params[k])


@pytest.mark.parametrize("vote, mu_dtype", [("majority", jnp.float32), ("mean", jnp.float32),
                                            ("majority", jnp.int8)])
def test_identical_gradients_equal_lion(vote, mu_dtype):
    params, grads = problem(seed=1, steps=3)
    grads = jax.tree.map(lambda g: np.repeat(g[:, :1], N, axis=1), grads)
    grads["w"][:, :, 0] = 0.0  # exact zero signs too (m stays 0 on that row)
    kwargs = {"b1": B1, "b2": B2, "mu_dtype": mu_dtype, "weight_decay": WD, "mask": MASK}
    got = run_sharded(lion_optax.distributed_lion(LR, vote=vote, **kwargs), params, grads)
    tx = lion_optax.lion(LR, **kwargs)

    @jax.jit
    def lion_steps(params, grads):
        state = tx.init(params)
        for t in range(grads["w"].shape[0]):
            updates, state = tx.update(jax.tree.map(lambda g, t=t: g[t, 0], grads), state, params)
            params = optax.apply_updates(params, updates)
        return params

    want = lion_steps(params, grads)
    for k in params:
        np.testing.assert_array_equal(got[k][0], np.asarray(want[k]))


@pytest.mark.parametrize("vote", ["majority", "mean"])
def test_zero_coordinates_do_not_drift_for_even_n(vote):
    params, grads = problem(seed=2, steps=5)
    grads["w"][:, :, :2] = 0.0  # two rows that never get a gradient (like padded vocab rows)
    tx = lion_optax.distributed_lion(LR, B1, B2, weight_decay=0.0, vote=vote)
    got = run_sharded(tx, params, grads)
    np.testing.assert_array_equal(got["w"][:, :2], np.broadcast_to(params["w"][:2], (N, 2, 7)))
    assert np.mean(got["w"][0, 2:] != params["w"][2:]) > 0.8  # the rest trains (ties aside)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="vote must be one of"):
        lion_optax.distributed_lion(1e-3, vote="median")
    with pytest.raises(ValueError, match="axis_name must be"):
        lion_optax.distributed_lion(1e-3, axis_name="")
    tx = lion_optax.distributed_lion(1e-3)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="axis 'data' is not bound"):
        tx.update(params, tx.init(params), params)


# ------------------------------------------------------------------- train.analysis.hlo_bytes


def test_collective_bytes_of_known_collectives():
    from train.analysis.hlo_bytes import collective_bytes

    def f(x, y):
        return jax.lax.psum(x, "data"), jax.lax.all_gather(y, "data", tiled=True)

    mapped = jax.jit(jax.shard_map(f, mesh=mesh_of(), in_specs=P("data"), out_specs=P("data")))
    text = mapped.lower(jnp.ones((64, 16)), jnp.ones((64,), jnp.uint8)).compile().as_text()
    got = collective_bytes(text)
    # psum of a float32[8, 16] shard: 512 bytes, ring all-reduce 2 * 7/8 of it per device.
    assert got["all-reduce"] == {"count": 1, "operand_bytes": 512, "wire_bytes": 2 * 7 / 8 * 512}
    # all_gather of 8 bytes per device into 64: each device receives the other 7/8 of 64.
    assert got["all-gather"] == {"count": 1, "operand_bytes": 8, "wire_bytes": 7 / 8 * 64}
    assert got["total"]["wire_bytes"] == 896 + 56


def test_collective_bytes_async_forms_loops_and_group_syntax():
    from train.analysis.hlo_bytes import collective_bytes

    text = """HloModule m, num_partitions=8
%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  %x = f32[256]{0} get-tuple-element(%p), index=1
  %ar = f32[256]{0} all-reduce(%x), replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %t = (s32[], f32[256]{0}) tuple(%i, %ar)
}
%cond2 (q: (s32[], u8[64])) -> pred[] {
  %k = s32[]{:T(128)} constant(5)
  %q = (s32[], u8[64]{0}) parameter(0)
  %i2 = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%i2, %k), direction=LT
}
%body2 (r: (s32[], u8[64])) -> (s32[], u8[64]) {
  %r = (s32[], u8[64]{0}) parameter(0)
  %y = u8[64]{0} get-tuple-element(%r), index=1
  %a2a = u8[64]{0} all-to-all(%y), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}
  ROOT %t2 = (s32[], u8[64]{0}) tuple(%i3, %a2a)
}
ENTRY %main (a: bf16[16], b: f32[256]) -> bf16[128] {
  %a = bf16[16]{0} parameter(0)
  %b = f32[256]{0} parameter(1)
  %ags = (bf16[16]{0}, bf16[128]{0}) all-gather-start(%a), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = bf16[128]{0} all-gather-done(%ags)
  %w = (s32[], f32[256]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %w2 = (s32[], u8[64]{0}) while(%init2), condition=%cond2, body=%body2
  %rs = f32[128]{0} reduce-scatter(%b), replica_groups=mesh['x'=2,'y'=4] {'x'}, dimensions={0}, to_apply=%add
  ROOT %r = bf16[128]{0} copy(%agd)
}
"""
    got = collective_bytes(text)
    assert got["all-gather"] == {"count": 1, "operand_bytes": 32, "wire_bytes": 7 * 32}
    assert got["all-reduce"] == {"count": 3, "operand_bytes": 3 * 1024, "wire_bytes": 3 * 2 * 3 / 4 * 1024}
    assert got["reduce-scatter"] == {"count": 1, "operand_bytes": 1024, "wire_bytes": 1 / 2 * 1024}
    # No known_trip_count: read off `i < 5`.
    assert got["all-to-all"] == {"count": 5, "operand_bytes": 5 * 64, "wire_bytes": 5 * 1 / 2 * 64}


def test_hbm_bytes_skips_vmem_buffers_and_bookkeeping():
    """A TPU-style program: p (f32, 4 KiB) is staged into VMEM by an async copy, then one
    fusion reads it from VMEM plus g from HBM and writes its result to HBM."""
    from train.analysis.hlo_bytes import hbm_bytes

    text = """HloModule m
ENTRY %main (p: f32[1024], g: f32[1024]) -> f32[1024] {
  %p = f32[1024]{0:T(1024)} parameter(0)
  %g = f32[1024]{0:T(1024)} parameter(1)
  %cs = (f32[1024]{0:T(1024)S(1)}, f32[1024]{0:T(1024)}, u32[]{:S(2)}) copy-start(%p)
  %cd = f32[1024]{0:T(1024)S(1)} copy-done(%cs)
  %b = f32[1024]{0:T(1024)S(1)} bitcast(%cd)
  ROOT %f = f32[1024]{0:T(1024)} fusion(%b, %g, %g), kind=kLoop, calls=%fused
}
"""
    # copy: 4 KiB read from HBM (into VMEM, not written to HBM); fusion: g read once (4 KiB),
    # VMEM operand free, result written (4 KiB).
    assert hbm_bytes(text) == 3 * 4096


def test_hbm_sizes_include_tile_padding():
    from train.analysis.hlo_bytes import shape_bytes

    assert shape_bytes("f32[1000,1]{1,0:T(8,128)}", hbm_only=True) == 1000 * 128 * 4  # a column
    assert shape_bytes("f32[1000,1]{0,1:T(1,128)}", hbm_only=True) == 1024 * 4  # lane-major
    assert shape_bytes("s8[40,100]{1,0:T(32,128)(4,1)}", hbm_only=True) == 64 * 128
    assert shape_bytes("f32[1000,1]{1,0:T(8,128)}") == 1000 * 4  # logical without hbm_only


# --------------------------------------------------------------------------- trainer


def tiny_lm_config(vote="majority", **overrides):
    from _util import tiny_lm

    return tiny_lm(**{"optimizer.lion.distributed": vote, "mesh.data": 8, **overrides})


def compiled_comm(config):
    from train import setup
    from train.analysis import hlo_bytes

    lowered = setup.build(config).lower_train_step()
    return hlo_bytes.collective_bytes(lowered.compile().as_text())["total"]


def test_train_step_communicates_16x_less_than_lion():
    lion = compiled_comm(tiny_lm_config(""))
    majority = compiled_comm(tiny_lm_config("majority"))
    ratio = lion["wire_bytes"] / majority["wire_bytes"]
    print(f"\nper-device wire bytes per step: Lion {lion['wire_bytes']:.0f}, "
          f"Distributed Lion (majority) {majority['wire_bytes']:.0f}: {ratio:.1f}x less")
    assert ratio >= 16


def test_nonfinite_on_one_worker_skips_the_step_on_all():
    from train import dlion, steps

    tx = optax.apply_if_finite(lion_optax.distributed_lion(0.1, weight_decay=0.0), 100)
    params = {"w": jnp.ones(4)}

    def grad_fn(params, batch, rng):  # worker 3's examples are NaN
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(batch["x"] @ p["w"]))(params)
        return (loss, {}), grads

    mesh = mesh_of()
    step = dlion.make_voting_train_step(grad_fn, tx, lambda s: 0.1, "data")
    state = steps.TrainState(jnp.zeros([], jnp.int32), params,
                             dlion.for_every_worker(tx.init(params), N), jax.random.PRNGKey(0))
    x = np.ones((16, 4), np.float32)
    nan_on_worker_3 = np.where(np.arange(16)[:, None] // 2 == 3, np.nan, x)  # 2 rows each
    with jax.set_mesh(mesh):
        bad, metrics = jax.jit(step)(state, {"x": jnp.asarray(nan_on_worker_3)})
        good, _ = jax.jit(step)(state, {"x": jnp.asarray(x)})
    assert metrics["nonfinite"] == 1 and not np.isfinite(metrics["loss"])
    np.testing.assert_array_equal(bad.params["w"], params["w"])
    np.testing.assert_array_equal(bad.opt_state.notfinite_count, np.ones(N))
    # The count still advances (train.nonfinite.count_skipped_step), so schedules follow the step.
    np.testing.assert_array_equal(bad.opt_state.inner_state.count, np.ones(N))
    np.testing.assert_allclose(good.params["w"], 0.9 * np.ones(4))
    assert good.opt_state.inner_state.mu["w"].shape == (N, 4)


def test_trainer_trains_resumes_bitwise_and_accumulates(tmp_path, capfd):
    import json
    import shutil

    from _util import read_metrics, starts, train_losses
    from test_reliability import assert_bitwise_equal, saved_params

    from train import trainer

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    trainer.run(tiny_lm_config(), str(full))
    losses = train_losses(full)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1]
    opt_state = saved_opt_state(full, 6)
    assert all(x.shape[0] == N for x in jax.tree.leaves(opt_state))
    assert any(not np.array_equal(x[0], x[1]) for x in jax.tree.leaves(opt_state))  # per worker

    # What a kill right after the step-3 checkpoint leaves; then the same command again.
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    kept = [m for m in read_metrics(full) if m["step"] <= 3]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
    capfd.readouterr()
    trainer.run(tiny_lm_config(), str(resumed))
    assert "resumed from step 3" in capfd.readouterr().err
    assert starts(resumed)[-1] == 3
    assert sorted(train_losses(resumed)) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert train_losses(resumed)[step] == losses[step], step
    assert_bitwise_equal(saved_params(resumed, 6), saved_params(full, 6))
    assert_bitwise_equal(saved_opt_state(resumed, 6), opt_state)

    # Gradient accumulation (local to each worker) gives the same steps.
    trainer.run(tiny_lm_config(num_steps=3, grad_accum_steps=2), str(tmp_path / "accum"))
    for step, loss in train_losses(tmp_path / "accum").items():
        np.testing.assert_allclose(loss, losses[step], rtol=0, atol=1e-5)


def saved_opt_state(workdir, step):
    import os

    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(os.path.join(str(workdir), "checkpoints", str(step), "state"))
    return jax.tree.map(np.asarray, state["opt_state"])


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer.lion.distributed": "median"}, "optimizer.lion.distributed must be one of"),
    ({"optimizer.lion.vote_axis": "model"}, "vote_axis 'model' is not a mesh axis"),
    ({"optimizer.lion.vote_axis": "tensor"}, "must be a data-parallel axis"),
    ({"optimizer.lion.vote_axis": "fsdp"}, "shards parameters over it"),
])
def test_bad_config_is_one_config_error(tmp_path, overrides, message):
    from train import trainer
    from train.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        trainer.run(tiny_lm_config(**overrides), str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
