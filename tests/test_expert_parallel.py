"""Expert parallelism (models.expert_dispatch) against unsharded runs on 8 CPU devices: the
MoE layer's output, gradients and one Lion step equal the single-device ones with the experts
split 2 and 4 ways (with FSDP, data and tensor parallelism beside); the emulated ragged
all-to-all against a NumPy transcription of `jax.lax.ragged_all_to_all`'s documented
semantics; the megablox kernel (interpreted) against ragged_dot; no device holds every
expert's weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import lion_optax
from models import expert_dispatch, moe, partitioning
from train.mesh import make_mesh

D, FFN, EXPERTS, TOP_K = 16, 32, 8, 2


def layer_and_batch(matmul="ragged_dot", seed=0, d=D, ffn=FFN):
    """The megablox kernel needs model and expert widths of 128 or more (else ragged_dot runs)."""
    with partitioning.sharding_context(None):
        layer = moe.MoeMlp(d, ffn, EXPERTS, TOP_K, matmul=matmul, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (8, 6, d), jnp.float32)
    return layer, x


def loss_and_step(layer, x, probe, mesh):
    """(output, loss, grads, params after one Lion step) of the layer, under `mesh` (None:
    one device), the parameters and batch placed as training places them."""
    graphdef, state = nnx.split(layer)
    tx = lion_optax.lion(1e-2, b1=0.9, b2=0.99, weight_decay=0.1)

    def step(state, x):
        def loss(state):
            out, aux = nnx.merge(graphdef, state)(x)
            return jnp.sum(out * probe) + 0.1 * aux["load_balancing_loss"], out
        (value, out), grads = jax.value_and_grad(loss, has_aux=True)(state)
        updates, _ = tx.update(grads, tx.init(state), state)
        return out, value, grads, optax.apply_updates(state, updates)

    if mesh is None:
        return jax.jit(step)(state, x)
    with partitioning.sharding_context(mesh):
        state = jax.device_put(state, partitioning.variable_shardings(state, mesh))
        x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(("data", "fsdp", "expert"))))
        return jax.jit(step)(state, x), state


@pytest.mark.parametrize("axes, matmul", [
    (dict(data=1, fsdp=4, expert=2), "ragged_dot"), (dict(data=2, fsdp=1, expert=4), "ragged_dot"),
    (dict(data=1, fsdp=2, expert=2, tensor=2), "ragged_dot"),
    (dict(data=2, fsdp=1, expert=4), "megablox_interpret")],
    ids=["fsdp4-expert2", "data2-expert4", "fsdp2-expert2-tensor2", "data2-expert4-megablox"])
def test_expert_parallel_equals_one_device(axes, matmul):
    d, ffn = (128, 128) if matmul.startswith("megablox") else (D, FFN)
    layer, x = layer_and_batch(matmul, d=d, ffn=ffn)
    probe = jax.random.normal(jax.random.PRNGKey(9), x.shape)
    want = loss_and_step(layer, x, probe, None)
    mesh = make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **axes})
    got, placed = loss_and_step(layer, x, probe, mesh)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    # No device holds every expert: each holds experts / expert-axis of them.
    gate = placed["gate"][...]
    shard = gate.addressable_shards[0].data
    assert shard.shape[0] == EXPERTS // axes["expert"]
    assert shard.shape[1] == d // axes.get("fsdp", 1)


def ragged_all_to_all_numpy(operands, outputs, in_off, send, out_off, recv):
    """jax.lax.ragged_all_to_all's documented semantics, over a list of devices: device i's
    rows operand[in_off[i][j]:+send[i][j]] land in device j's output at out_off[i][j]."""
    outputs = [o.copy() for o in outputs]
    for i, op in enumerate(operands):
        for j in range(len(operands)):
            assert recv[j][i] == send[i][j]
            outputs[j][out_off[i][j]:out_off[i][j] + send[i][j]] = op[in_off[i][j]:in_off[i][j] + send[i][j]]
    return outputs


def test_emulated_ragged_all_to_all_follows_the_documented_semantics():
    mesh = make_mesh({"data": 1, "fsdp": 1, "expert": 4, "tensor": 1}, jax.devices()[:4])
    rng = np.random.default_rng(0)
    send = np.array([[2, 0, 3, 1], [0, 4, 0, 2], [1, 1, 1, 1], [5, 0, 0, 0]], np.int32)  # [src, dst]
    recv = send.T.copy()
    in_off = np.cumsum(send, 1) - send
    out_off = (np.cumsum(send, 0) - send)  # destination j puts source i after sources < i
    operands = [rng.normal(size=(6, 3)).astype(np.float32) for _ in range(4)]
    outputs = [np.full((9, 3), -1.0, np.float32) for _ in range(4)]
    want = ragged_all_to_all_numpy(operands, outputs, in_off, send, out_off, recv)

    f = jax.shard_map(
        lambda op, out, a, b, c, d: expert_dispatch.ragged_all_to_all(
            op[0], out[0], a[0], b[0], c[0], d[0], axis_name="expert", emulate=True)[None],
        mesh=mesh, in_specs=(P("expert"),) * 6, out_specs=P("expert"))
    got = jax.jit(f)(np.stack(operands), np.stack(outputs), in_off, send, out_off, recv)
    np.testing.assert_array_equal(np.asarray(got), np.stack(want))


@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["rhs", "rhs-transposed"])
def test_megablox_kernel_equals_ragged_dot(transpose_rhs):
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.normal(size=(200, 384)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(5, 384, 256)), jnp.float32)  # tiles of 256, k = 1.5 tiles
    sizes = jnp.asarray([30, 0, 71, 50, 19], jnp.int32)  # 170 of 200 rows: the rest give zeros
    want = jax.lax.ragged_dot(lhs, rhs, sizes)
    if transpose_rhs:  # the weight stored [groups, n, k], as the down projection is
        rhs = jnp.swapaxes(rhs, 1, 2)
    got = expert_dispatch.grouped_matmul(lhs, rhs, sizes, "megablox_interpret", transpose_rhs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-4)
    assert not np.asarray(got[170:]).any()
    probe = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    grad = functools.partial(jax.grad(lambda a, b, m: jnp.sum(
        probe * expert_dispatch.grouped_matmul(a, b, sizes, m, transpose_rhs)), argnums=(0, 1)), lhs, rhs)
    for a, b in zip(grad("megablox_interpret"), grad("ragged_dot")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-4)
        assert np.abs(np.asarray(a)).max() > 1  # not vacuous


def test_megablox_weight_gradient_comes_out_in_the_weights_layout():
    """With the weight stored transposed, tgmm writes its gradient as [groups, n, k]: no
    transpose follows it (compiled for TPU, a transpose there let XLA keep the stacked
    layers' float32 gradient with the fsdp-split d_model as its 128-lane-padded last
    dimension: 4x its bytes)."""
    lhs = jnp.zeros((256, 384), jnp.float32)
    rhs = jnp.zeros((4, 256, 384), jnp.float32)  # [groups, n, k]
    sizes = jnp.asarray([64, 64, 64, 64], jnp.int32)
    grad = jax.grad(lambda w: jnp.sum(expert_dispatch.grouped_matmul(lhs, w, sizes, "megablox_interpret", True)))
    eqns = jax.make_jaxpr(grad)(rhs).eqns

    def transposes(eqns):
        for e in eqns:
            if e.primitive.name == "transpose" and e.outvars[0].aval.shape == rhs.shape:
                yield e
            for value in e.params.values():  # sub-jaxprs (pjit, custom_vjp, shard_map, ...)
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        yield from transposes(sub.eqns)

    assert not list(transposes(eqns))


def test_layer_with_the_megablox_kernel_equals_ragged_dot():
    layer, x = layer_and_batch("megablox_interpret", d=128, ffn=128)
    got = layer(x)[0]
    layer.matmul = "ragged_dot"
    np.testing.assert_allclose(np.asarray(got), np.asarray(layer(x)[0]), rtol=1e-5, atol=1e-5)


def test_expert_axis_that_does_not_divide_the_experts_is_an_error():
    layer, x = layer_and_batch()
    mesh = make_mesh({"data": 2, "fsdp": 1, "expert": 3, "tensor": 1}, jax.devices()[:6])
    with partitioning.sharding_context(mesh), pytest.raises(ValueError, match="does not divide num_experts=8"):
        jax.eval_shape(lambda x: layer(x), x[:6])


def test_checkpoint_saved_with_one_expert_size_resumes_on_another(tmp_path):
    """A tiny MoE LM saved at step 4 with the experts split 2 ways resumes with them split 4
    ways: its losses at steps 5 and 6 are the uninterrupted 2-way run's."""
    from _util import assert_resumed_at, tiny_lm, train_losses

    from train import trainer

    moe_lm = {"model.num_experts": 8, "model.experts_per_token": 2, "model.expert_ffn_dim": 16}
    reference, workdir = str(tmp_path / "reference"), str(tmp_path / "resharded")
    trainer.run(tiny_lm(num_steps=6, **moe_lm, **{"mesh.expert": 2}), reference)
    trainer.run(tiny_lm(num_steps=4, checkpoint_every=2, **moe_lm, **{"mesh.expert": 2}), workdir)
    trainer.run(tiny_lm(num_steps=6, checkpoint_every=2, **moe_lm, **{"mesh.expert": 4}), workdir)
    assert_resumed_at(workdir, 4)
    ref, got = train_losses(reference), train_losses(workdir)
    for step in (5, 6):
        np.testing.assert_allclose(got[step], ref[step], rtol=0, atol=1e-5)


@pytest.mark.parametrize("options", [
    {"optimizer.shard_state_over_data": True, "optimizer.lion.mu_dtype": "int8",
     "optimizer.lion.fused_apply": True, "grad_accum_steps": 2},
    {"optimizer.lion.distributed": "majority"},
], ids=["zero-int8-fused-accum", "distributed-lion"])
def test_expert_parallelism_composes_with_the_optimizer_options(tmp_path, options):
    """The tiny MoE LM trained 3 steps with the experts split 2 ways (data 4 x expert 2) logs
    the losses of the same run with FSDP in place of expert parallelism (data 4 x fsdp 2: the
    same 4 replicas for ZeRO's reduce-scatter and Distributed Lion's vote), with ZeRO, int8
    momentum, the fused apply and gradient accumulation together, and with Distributed Lion."""
    from _util import tiny_lm, train_losses

    from train import trainer

    moe_lm = {"model.num_experts": 4, "model.experts_per_token": 2, "model.expert_ffn_dim": 16,
              "num_steps": 3, **options}
    trainer.run(tiny_lm(**moe_lm, **{"mesh.fsdp": 2}), str(tmp_path / "dp"))
    trainer.run(tiny_lm(**moe_lm, **{"mesh.expert": 2}), str(tmp_path / "ep"))
    want, got = train_losses(tmp_path / "dp"), train_losses(tmp_path / "ep")
    assert sorted(got) == [1, 2, 3]
    for step in got:
        np.testing.assert_allclose(got[step], want[step], rtol=0, atol=1e-5)
