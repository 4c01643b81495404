"""train.optim: every optimizer reads `learning_rate` / `weight_decay` the same way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from train import optim
from train.errors import ConfigError


def _opt_cfg(name, schedule="constant"):
    cfg = common.base_config().optimizer  # every key the trainer reads, with its default
    cfg.update(dict(name=name, schedule=schedule, warmup_steps=0))
    cfg.lion, cfg.adamw, cfg.adafactor = common.lion(0.01, 2.0), common.adamw(0.01, 2.0), common.adafactor(0.01, 2.0)
    return cfg


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_decoupled_decay_is_lr_times_wd_for_every_optimizer(name):
    """With zero gradients only decay acts: kernels shrink by (1 - lr * wd), biases stay."""
    params = {"kernel": jnp.full((256, 256), 0.5), "bias": jnp.full((256,), 0.5)}
    mask = {"kernel": True, "bias": False}
    tx, _ = optim.make_optimizer(_opt_cfg(name), num_steps=10, mask=mask)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(params["kernel"] + updates["kernel"], 0.5 * (1 - 0.01 * 2.0), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)


def test_nonfinite_gradients_leave_the_state_unchanged():
    params = {"kernel": jnp.ones((4, 4))}
    tx, _ = optim.make_optimizer(_opt_cfg("lion"), num_steps=10, mask=None)
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
        optim.make_optimizer(_opt_cfg("sgd"), 10, None)
    with pytest.raises(ConfigError, match="optimizer.schedule"):
        optim.make_schedule(1.0, 10, _opt_cfg("lion", schedule="step"))


def _flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unstacked_name(name: str) -> str:
    """Path of an unrolled layer's leaf as the path of the stacked one: ['layers'][3] ->
    ['layers'] (decoder), ['blocks'][3] -> ['blocks'] (ViT)."""
    import re

    return re.sub(r"\[\d+\]", "", name)


@pytest.mark.parametrize("family", ["lm", "vit"])
def test_decay_mask_is_the_same_scanned_or_not_and_spares_norms_and_biases(family):
    from configs import lm as lm_configs
    from configs import vit as vit_configs
    from train import tasks

    masks = {}
    for scan in (True, False):
        config = (lm_configs if family == "lm" else vit_configs).get_config("demo")
        config.model.scan_layers = scan
        masks[scan] = _flat(optim.decay_mask(tasks.make_task(config), config.optimizer))
    unrolled = {}
    for name, flag in masks[False].items():
        unrolled.setdefault(_unstacked_name(name), set()).add(flag)
    assert {k: {v} for k, v in masks[True].items()} == unrolled
    for name, flag in masks[True].items():
        vector = "norm" in name or "bias" in name or "scale" in name
        assert flag is (not vector), name  # every kernel / embedding decays, nothing else
    assert sum(masks[True].values()) >= (7 if family == "lm" else 8)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_scanned_model_decays_kernels_only_through_the_optimizer(name):
    """The mask reaches the optimizer: with zero gradients on the scanned demo LM, every
    norm scale stays put and every matrix shrinks by lr * wd."""
    from configs import lm as lm_configs
    from flax import nnx

    from models import partitioning
    from train import tasks

    config = lm_configs.get_config("demo")
    task = tasks.make_task(config)
    tx, _ = optim.make_optimizer(_opt_cfg(name), 10, optim.decay_mask(task, config.optimizer))
    with partitioning.sharding_context(None):
        params = nnx.to_pure_dict(nnx.state(task.build(nnx.Rngs(0))))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax_apply(params, updates)
    for key, p in _flat(params).items():
        got = _flat(new)[key]
        if "norm" in key:
            np.testing.assert_array_equal(got, p, err_msg=key)
        else:
            np.testing.assert_allclose(got, p * (1 - 0.01 * 2.0), rtol=1e-5, atol=1e-7, err_msg=key)


def optax_apply(params, updates):
    import optax

    return optax.apply_updates(params, updates)


def test_negative_clip_norm_is_a_config_error():
    cfg = _opt_cfg("lion")
    cfg.grad_clip_norm = -1.0
    with pytest.raises(ConfigError, match="grad_clip_norm must be a number >= 0"):
        optim.make_optimizer(cfg, 10, None)
