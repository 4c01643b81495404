"""train.optim: every optimizer reads `learning_rate` / `weight_decay` the same way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import common
from train import optim
from train.errors import ConfigError


def _opt_cfg(name, schedule="constant"):
    return ConfigDict(dict(
        name=name, schedule=schedule, warmup_steps=0, end_lr_fraction=0.0, grad_clip_norm=1.0,
        decay_embeddings=True, lion=common.lion(0.01, 2.0), adamw=common.adamw(0.01, 2.0),
        adafactor=common.adafactor(0.01, 2.0)))


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_decoupled_decay_is_lr_times_wd_for_every_optimizer(name):
    """With zero gradients only decay acts: kernels shrink by (1 - lr * wd), biases stay."""
    params = {"kernel": jnp.full((256, 256), 0.5), "bias": jnp.full((256,), 0.5)}
    tx, _ = optim.make_optimizer(_opt_cfg(name), num_steps=10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(params["kernel"] + updates["kernel"], 0.5 * (1 - 0.01 * 2.0), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)


def test_nonfinite_gradients_leave_the_state_unchanged():
    params = {"kernel": jnp.ones((4, 4))}
    tx, _ = optim.make_optimizer(_opt_cfg("lion"), num_steps=10)
    state = tx.init(params)
    updates, new_state = tx.update({"kernel": jnp.full((4, 4), jnp.nan)}, state, params)
    np.testing.assert_array_equal(updates["kernel"], 0.0)
    assert int(new_state.total_notfinite) == 1


@pytest.mark.parametrize("kind", optim.SCHEDULES)
def test_schedules_warm_up_then_decay(kind):
    cfg = _opt_cfg("lion", schedule=kind)
    cfg.warmup_steps = 10
    lr = optim.make_schedule(1.0, 100, cfg)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(99)) <= 1.0 if kind == "constant" else float(lr(99)) < 1.0


def test_unknown_optimizer_and_schedule():
    with pytest.raises(ConfigError, match="optimizer.name"):
        optim.make_optimizer(_opt_cfg("sgd"), 10)
    with pytest.raises(ConfigError, match="optimizer.schedule"):
        optim.make_schedule(1.0, 10, _opt_cfg("lion", schedule="step"))
