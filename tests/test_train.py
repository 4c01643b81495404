"""The trainer end to end on tiny configs: both families learn, resume is exact, mesh
layouts agree, bad input fails with one line, and two processes train together."""

import os

import numpy as np
import pytest
from _util import (assert_resumed_at, read_metrics, run_trainer, run_two_processes, starts, tiny_lm, tiny_vit,
                   train_losses)

from train import aot, setup, trainer
from train import mesh as mesh_lib
from train.errors import ConfigError


def test_lm_trains_resumes_exactly_and_logs(tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    last = trainer.run(tiny_lm(), full)
    assert last["tokens_per_sec"] > 0 and 0 < last["mfu"] < 1
    losses = train_losses(full)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    record = read_metrics(full)[-1]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(record)
    assert sorted(os.listdir(os.path.join(full, "checkpoints"))) == ["3", "6"]
    assert os.listdir(os.path.join(full, "tb"))

    # Same run, stopped after step 3 (its checkpoint), then resumed by the same command.
    trainer.run(tiny_lm(**{"num_steps": 3}), split)
    trainer.run(tiny_lm(), split)
    assert starts(split) == [0, 3]
    assert_resumed_at(split, 3)
    resumed = train_losses(split)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == losses[step], step  # bitwise: same data, rng and state


@pytest.mark.parametrize("pack_mode", ["cache", "stream"])
def test_eval_pipeline_is_built_once_per_run(tmp_path, monkeypatch, pack_mode):
    """Tokenizer, token source and eval pipeline are built once, however many evals run."""
    from train import data as data_lib
    from train.data import batch, pack
    from train.data import tokenize as tokenizer

    counts = {}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(tokenizer, "ByteTokenizer", counted("tokenizer", tokenizer.ByteTokenizer))
    monkeypatch.setattr(batch, "data_source", counted("source", batch.data_source))
    monkeypatch.setattr(pack, "WindowSource", counted("source", pack.WindowSource))
    monkeypatch.setattr(data_lib, "make_eval_batches", counted("eval", data_lib.make_eval_batches))
    per_run = {}
    for evals in (1, 4):
        counts.clear()
        tokenizer.clear_cache()  # a fresh build per run
        trainer.run(tiny_lm(num_steps=evals, eval_every=1, checkpoint_every=0,
                            **{"data.pack_mode": pack_mode}), str(tmp_path / f"{pack_mode}{evals}"))
        per_run[evals] = dict(counts)
    assert per_run[4] == per_run[1], per_run  # nothing rebuilt per eval
    assert per_run[4]["eval"] == 1 and per_run[4]["source"] == 2, per_run  # one train, one eval source
    assert per_run[4]["tokenizer"] == 1, per_run  # built once, shared by train and eval


def test_vit_demo_path_trains_and_evaluates(tmp_path):
    last = trainer.run(tiny_vit(), str(tmp_path))
    assert 0 <= last["eval_accuracy"] <= 1 and last["examples_per_sec"] > 0
    evals = [m for m in read_metrics(str(tmp_path)) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [4]


@pytest.mark.parametrize("mesh", [
    {"data": 2, "fsdp": 4, "tensor": 1},
    {"data": 1, "fsdp": 4, "tensor": 2},
])
def test_mesh_layouts_give_the_same_losses(tmp_path, mesh):
    base = train_losses_of(tmp_path / "data8", {"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1})
    other = train_losses_of(tmp_path / "other", {f"mesh.{k}": v for k, v in mesh.items()})
    for step in base:
        np.testing.assert_allclose(other[step], base[step], rtol=0, atol=1e-5)


_BASE_RUNS = {}


def _base_run(workdir, overrides):
    key = tuple(sorted(overrides.items()))
    if key not in _BASE_RUNS:
        trainer.run(tiny_lm(**{"num_steps": 3, "checkpoint_every": 100, **overrides}), str(workdir))
        _BASE_RUNS[key] = {m["step"]: m for m in read_metrics(str(workdir)) if "loss" in m}
    return _BASE_RUNS[key]


def train_losses_of(workdir, overrides):
    return {step: m["loss"] for step, m in _base_run(workdir, overrides).items()}


def grad_norms_of(workdir, overrides):
    """step -> logged (pre-clipping) gradient norm: unlike Lion's losses, it scales with
    the gradients, so a mis-scaled reduction shows here."""
    return {step: m["grad_norm"] for step, m in _base_run(workdir, overrides).items()}


def _reference_and_step_grads(config, transform):
    """(reference: `jax.grad` of the task loss on the whole batch, unsharded, no mesh;
    the trainer's gradient function built by `transform(task, graphdef, abstract)` and run
    on the sharded batch) for the tiny LM at its initial parameters."""
    import jax
    import optax
    from flax import nnx

    from train import data as data_lib
    from train import setup

    built = setup.build(config)
    mesh, task, graphdef, abstract = built.mesh, built.task, built.graphdef, built.abstract_params
    params = built.init_state().params
    local = next(data_lib.make_train_iterator(config.data, config.batch_size, 0))
    rng = jax.random.PRNGKey(1)
    host_params = jax.tree.map(np.asarray, params)
    reference = jax.jit(jax.grad(lambda p: task.loss(nnx.merge(graphdef, p), local, rng)[0]))(host_params)
    grad_fn = transform(task, graphdef, abstract)
    with built.context():
        _, grads = jax.jit(grad_fn)(params, mesh_lib.to_global_batch(local, mesh), rng)
    assert float(optax.global_norm(reference)) > 0
    return jax.tree.map(np.asarray, reference), jax.tree.map(np.asarray, grads)


def _assert_close_trees(a, b):
    import jax
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(y, x, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_accumulated_gradients_equal_the_full_batch_gradient():
    from train import steps

    ref, got = _reference_and_step_grads(
        tiny_lm(**{"mesh.data": 8}), lambda task, g, _: steps.make_grad_fn(task, g, 2))
    _assert_close_trees(ref, got)


@pytest.mark.parametrize("mesh", [{"mesh.data": 8}, {"mesh.data": 2, "mesh.fsdp": 4}])
def test_zero_gradients_equal_the_unsharded_gradient(mesh):
    import lion_optax
    from train import steps

    def zero(task, graphdef, abstract):
        return steps.zero_grad_fn(steps.make_grad_fn(task, graphdef, 1),
                                  lion_optax.zero_shardings(abstract, axis="data"))

    ref, got = _reference_and_step_grads(tiny_lm(**mesh), zero)
    _assert_close_trees(ref, got)


def test_grad_accumulation_matches_full_batch(tmp_path):
    one = {"mesh.data": 8}
    two = {"mesh.data": 8, "grad_accum_steps": 2}
    base, accum = train_losses_of(tmp_path / "accum1", one), train_losses_of(tmp_path / "accum2", two)
    for step in base:
        np.testing.assert_allclose(accum[step], base[step], rtol=0, atol=1e-5)
    base, accum = grad_norms_of(tmp_path / "accum1", one), grad_norms_of(tmp_path / "accum2", two)
    for step in base:
        np.testing.assert_allclose(accum[step], base[step], rtol=1e-5)


@pytest.mark.parametrize("mesh", [{"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1},
                                  {"mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1}])
def test_zero_sharded_optimizer_state_matches_and_reduce_scatters(tmp_path, mesh):
    """optimizer.shard_state_over_data: same losses as the replicated optimizer, 1/|data| of
    the state per device, and gradients reduce-scattered instead of all-reduced."""
    base = train_losses_of(tmp_path / "base", mesh)  # shared with the mesh-layout test
    zero = train_losses_of(tmp_path / "zero", {**mesh, "optimizer.shard_state_over_data": True})
    for step in base:
        np.testing.assert_allclose(zero[step], base[step], rtol=0, atol=1e-5)
    base = grad_norms_of(tmp_path / "base", mesh)
    zero = grad_norms_of(tmp_path / "zero", {**mesh, "optimizer.shard_state_over_data": True})
    for step in base:
        np.testing.assert_allclose(zero[step], base[step], rtol=1e-5)
    collectives = {}
    for flag in (False, True):
        config = tiny_lm(**{**mesh, "optimizer.shard_state_over_data": flag})
        built = setup.build(config)
        state, lowered = built.abstract_state, built.lower_train_step()
        hlo = lowered.compile().as_text()
        collectives[flag] = (aot.shard_bytes(state.opt_state),
                             {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(")
                              for op in ("reduce-scatter", "all-gather")})
    (plain_bytes, plain_ops), (zero_bytes, zero_ops) = collectives[False], collectives[True]
    assert zero_bytes < plain_bytes / mesh["mesh.data"] * 1.1, (zero_bytes, plain_bytes)
    assert plain_ops["reduce-scatter"] == 0 and zero_ops["reduce-scatter"] >= 8, zero_ops
    assert zero_ops["all-gather"] >= 8, zero_ops


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mesh_cfg, message", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "3 devices, but 8 are available"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one axis may be -1"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "not divisible by 3"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, "positive integer or -1"),
    ({"data": -1, "experts": 2}, "unknown axis 'experts'"),
])
def test_bad_mesh_is_one_clear_error(mesh_cfg, message):
    with pytest.raises(ConfigError, match=message):
        mesh_lib.make_mesh(mesh_cfg)


def test_batch_not_divisible_by_data_parallel_size():
    mesh = mesh_lib.make_mesh({"data": 8})
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size"):
        mesh_lib.check_batch(12, 1, mesh, 1)
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        mesh_lib.check_batch(16, 3, mesh, 1)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/lm.py:demo", "--config.no_such_key=1"], "no_such_key"),
    (["--config=configs/lm.py:demo", "--config.num_steps=abc"], "num_steps"),
    (["--config=configs/lm.py:huge"], "unknown variant 'huge'"),
    (["--config=configs/lm.py:demo", "--config.mesh.data=3"], "3 devices, but"),
    (["--config=configs/lm.py:demo", "--config.optimizer.name=sgd"], "optimizer.name must be one of"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, message):
    workdir = tmp_path / "wd"
    result = run_trainer(*args, f"--workdir={workdir}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- 2 processes


def test_two_processes_train_save_and_resume(tmp_path):
    multi = tmp_path / "multi"
    run_two_processes(multi, num_steps=2, checkpoint_every=2)
    assert sorted(os.listdir(multi / "checkpoints")) == ["2"]
    run_two_processes(multi, num_steps=4, checkpoint_every=2)
    assert starts(multi) == [0, 2]
    assert_resumed_at(multi, 2)
    losses = train_losses(str(multi))
    assert sorted(losses) == [1, 2, 3, 4]
    # One process with the same 8 devices sees the same global batches and math.
    single = train_losses_of(tmp_path / "single", {"mesh.data": 8, "num_steps": 4})
    for step in losses:
        np.testing.assert_allclose(losses[step], single[step], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_baseline_optimizers_train(tmp_path, name):
    last = trainer.run(tiny_lm(**{"optimizer.name": name, "num_steps": 3, "checkpoint_every": 3}), str(tmp_path))
    losses = train_losses(str(tmp_path))
    assert sorted(losses) == [1, 2, 3] and np.isfinite(last["loss"])
    assert losses[3] < losses[1]
