"""Optimizer and learning-rate schedule from config (optax + lion_optax).

    config.optimizer = dict(
        name="lion",                  # lion | adamw | adafactor
        schedule="cosine",            # cosine | rsqrt | linear | constant (after warmup)
        warmup_steps=..., end_lr_fraction=0.0, grad_clip_norm=1.0,
        decay_embeddings=True,
        lion=dict(learning_rate=1e-4, weight_decay=10.0, b1=0.9, b2=0.99,
                  mu_dtype="bfloat16",          # | float32 | int8 (block_size: 0 = per row)
                  stochastic_rounding=False, cautious=False,
                  distributed="", vote_axis="data",  # "majority" | "mean": Distributed Lion
                  fused_apply=False, kernel="auto"),  # update + apply in one pass (int8)
        adamw=dict(learning_rate=1e-3, weight_decay=1.0, b1=0.9, b2=0.999, eps=1e-6),
        adafactor=dict(learning_rate=1e-3, weight_decay=1e-3, ...),
    )

Each optimizer keeps its own paper-style hyperparameters, so `--config.optimizer.name=adamw`
switches to the AdamW baseline without touching anything else. Weight decay is decoupled and
multiplied by the learning rate (optax convention) and applies to matrices only: `decay_mask`
decides from each parameter's logical axes, so stacked (scanned) layers' norm scales and
biases are not decayed. `optimizer.lion.distributed` switches to Distributed Lion
(`lion_optax.distributed_lion`, per-worker momentum and 1-bit sign votes over
`optimizer.lion.vote_axis`), which the train step runs inside `jax.shard_map` (train/dlion.py);
clipping then applies to each worker's local gradients. `optimizer.lion.fused_apply` makes
the train step update and apply in one pass (`lion_optax.fused_lion`, a Pallas kernel for
int8 momentum on TPU) through `fused_apply`, on the same optimizer state as the optax path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

import lion_optax
from train import dlion
from train.errors import ConfigError

OPTIMIZERS = ("lion", "adamw", "adafactor")
SCHEDULES = ("cosine", "rsqrt", "linear", "constant")
LION_MOMENTUM = ("bfloat16", "float32", "int8", None)  # optimizer.lion.mu_dtype
DISTRIBUTED = ("", "majority", "mean")  # optimizer.lion.distributed: off, or the vote
# Logical axes that are not feature axes when deciding weight decay: the axis scanned
# layers are stacked on, and head_dim (heads x head_dim is one feature axis split in two,
# so a (heads, head_dim) attention bias is a vector).
NON_FEATURE_AXES = ("layers", "head_dim")


def decay_mask(task, opt_cfg: Mapping) -> dict:
    """Tree of bools over `task`'s parameters (pure dict), True where weight decay
    applies: parameters with at least two feature axes (`lion_optax.decay_mask` with the
    model's logical axes), not embeddings when `optimizer.decay_embeddings=False`. The
    same for scanned and unrolled layers."""
    shapes, axes = task.abstract_params()
    return lion_optax.decay_mask(shapes, logical_axes=axes, ignore_axes=NON_FEATURE_AXES,
                                 decay_embeddings=bool(opt_cfg.decay_embeddings))


def make_schedule(peak: float, num_steps: int, opt_cfg: Mapping) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then cosine / rsqrt / linear decay or constant."""
    warmup = int(opt_cfg.warmup_steps)
    kind = opt_cfg.schedule
    end = peak * float(opt_cfg.end_lr_fraction)
    if kind not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule must be one of {SCHEDULES}, got {kind!r}")
    if warmup < 0:
        raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {warmup}")
    decay_steps = max(num_steps - warmup, 1)
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif kind == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif kind == "rsqrt":
        scale = max(warmup, 1)
        after = lambda count: peak * jnp.sqrt(scale / (jnp.maximum(count, 0) + scale))  # noqa: E731
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def vote_axis(opt_cfg: Mapping) -> str | None:
    """The mesh axis Distributed Lion votes over, or None when it is off (the default);
    raises ConfigError for an unknown `optimizer.lion.distributed` or a bad axis."""
    vote = opt_cfg.lion.distributed
    if vote not in DISTRIBUTED:
        raise ConfigError(f"optimizer.lion.distributed must be one of {DISTRIBUTED}, got {vote!r}")
    axis = opt_cfg.lion.vote_axis
    if not isinstance(axis, str) or not axis:
        raise ConfigError(f"optimizer.lion.vote_axis must be a mesh axis name, got {axis!r}")
    return axis if vote and opt_cfg.name == "lion" else None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the optimizer state lives beyond the parameters' own sharding; both None
    (the default) means next to the parameters, replicated over the batch axes."""

    vote_axis: str | None = None  # Distributed Lion: one momentum per worker along this axis
    zero_axis: str | None = None  # ZeRO-1: the state is also split over this mesh axis


def make_layout(config, mesh, rules) -> Layout:
    """The `Layout` the config asks for (`optimizer.lion.distributed`,
    `optimizer.shard_state_over_data`); ConfigError for a combination the mesh or the
    other does not allow."""
    vote = vote_axis(config.optimizer)
    zero = "data" if config.optimizer.shard_state_over_data else None
    if vote is not None:
        dlion.check_mesh(mesh, vote, rules)
        if zero is not None:
            raise ConfigError("optimizer.shard_state_over_data cannot be combined with "
                              "optimizer.lion.distributed (each worker keeps its own momentum)")
    return Layout(vote_axis=vote, zero_axis=zero)


def clip_norm(opt_cfg: Mapping) -> float:
    """`optimizer.grad_clip_norm` as a float (0 = no clipping); ConfigError if negative."""
    clip = opt_cfg.grad_clip_norm or 0.0
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0:
        raise ConfigError(f"optimizer.grad_clip_norm must be a number >= 0 (0 = no clipping), got {clip!r}")
    return float(clip)


def _common(opt_cfg: Mapping, name: str, num_steps: int):
    """(lr schedule, weight decay, remaining hyperparameters) of optimizer `name`; for
    Lion the rest is spelled as `lion_optax.lion` keywords plus the trainer's own keys
    (`distributed`, `vote_axis`, `fused_apply`, `kernel`)."""
    hp = dict(opt_cfg[name])
    peak = hp.pop("learning_rate")
    if not isinstance(peak, (int, float)) or isinstance(peak, bool) or not peak >= 0:
        raise ConfigError(f"optimizer.{name}.learning_rate must be a number >= 0 (0 freezes the "
                          f"parameters; a negative lr climbs the loss), got {peak!r}")
    lr = make_schedule(float(peak), num_steps, opt_cfg)
    wd = float(hp.pop("weight_decay", 0.0))
    if name == "lion":
        mu_dtype = hp.pop("mu_dtype", "bfloat16")
        if mu_dtype not in LION_MOMENTUM:
            raise ConfigError(f"optimizer.lion.mu_dtype must be one of {LION_MOMENTUM}, got {mu_dtype!r}")
        hp["mu_dtype"] = None if mu_dtype is None else jnp.dtype(mu_dtype)
        if hp.get("block_size") == 0:  # config spelling of "one int8 block per row"
            hp["block_size"] = None
    return lr, wd, hp


def make_optimizer(opt_cfg: Mapping, num_steps: int,
                   mask) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transform, learning-rate schedule) for `opt_cfg.name`, with global-norm
    clipping and non-finite updates dropped; `mask` (from `decay_mask`) selects the
    parameters that are weight-decayed."""
    name = opt_cfg.name
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name must be one of {OPTIMIZERS}, got {name!r}")
    clip = clip_norm(opt_cfg)
    lr, wd, hp = _common(opt_cfg, name, num_steps)
    if name == "lion":
        vote, axis = hp.pop("distributed", ""), hp.pop("vote_axis", "data")
        hp.pop("fused_apply", None), hp.pop("kernel", None)  # see `fused_apply`
        if vote_axis(opt_cfg) is None:
            try:
                tx = lion_optax.lion(lr, weight_decay=wd, mask=mask, **hp)
            except ValueError as e:  # e.g. block_size <= 0
                raise ConfigError(f"optimizer.lion: {e}") from None
        else:
            if hp.pop("cautious", False):  # its per-tensor rescale does not survive 1-bit votes
                raise ConfigError(f"optimizer.lion.cautious is not supported with distributed={vote!r}")
            try:
                tx = lion_optax.distributed_lion(lr, weight_decay=wd, mask=mask,
                                                 axis_name=axis, vote=vote, **hp)
            except (TypeError, ValueError) as e:  # e.g. an option only `lion` has
                raise ConfigError(f"optimizer.lion with distributed={vote!r}: {e}") from None
    elif name == "adamw":
        mu_dtype = hp.pop("mu_dtype", None)
        tx = optax.adamw(lr, weight_decay=wd, mask=mask,
                         mu_dtype=None if mu_dtype is None else jnp.dtype(mu_dtype), **hp)
    else:
        # optax.adafactor applies `weight_decay_rate` per step, not times the learning rate;
        # pass lr(t) * wd so weight_decay means the same for every optimizer here.
        decay = (lambda count: lr(count) * wd) if wd else None
        tx = optax.adafactor(lr, weight_decay_rate=decay, weight_decay_mask=mask, **hp)
    # Always a two-element chain (identity when clipping is off; both have an empty
    # state), so turning clipping on or off keeps the checkpointed state's structure.
    tx = optax.chain(optax.clip_by_global_norm(clip) if clip else optax.identity(), tx)
    # A step whose gradients hold NaN/Inf leaves params and optimizer state untouched
    # (optax counts it in `total_notfinite`); the trainer then skips or halts.
    return optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 2), lr


def fused_apply(opt_cfg: Mapping, num_steps: int, mask):
    """`(grads, opt_state, params, opt_state_shardings) -> (params, opt_state)` doing what
    `make_optimizer`'s transform plus `optax.apply_updates` do (clipping, dropping
    non-finite steps), with the Lion update applied in one pass by `lion_optax.fused_lion`
    on each device's shard of the state; None unless `optimizer.lion.fused_apply`. It
    reads and writes `make_optimizer`'s state, so checkpoints are interchangeable between
    the two paths."""
    if opt_cfg.name != "lion" or not opt_cfg.lion.fused_apply:
        return None
    if vote_axis(opt_cfg) is not None:
        raise ConfigError("optimizer.lion.fused_apply cannot be combined with optimizer.lion.distributed")
    lr, wd, hp = _common(opt_cfg, "lion", num_steps)
    kernel = hp.pop("kernel", "auto")
    for key in ("distributed", "vote_axis", "fused_apply"):
        hp.pop(key, None)
    try:
        opt = lion_optax.fused_lion(lr, weight_decay=wd, mask=mask, kernel=kernel, **hp)
    except ValueError as e:
        raise ConfigError(f"optimizer.lion: {e}") from None
    clip = clip_norm(opt_cfg)

    def apply(grads, opt_state, params, opt_state_shardings=None):
        # opt_state is make_optimizer's: apply_if_finite(chain(clip or identity, lion))
        inner = opt_state.inner_state
        mu_shardings = None
        if opt_state_shardings is not None:
            mu_shardings = opt_state_shardings.inner_state[1].mu
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        scale = None
        if clip:  # optax.clip_by_global_norm's factor
            norm = optax.global_norm(grads)
            scale = jnp.where(norm < clip, 1.0, clip / norm)
        params, lion_state = opt.apply(grads, inner[1], params, scale, finite, mu_shardings)
        bad = optax.safe_increment
        return params, opt_state._replace(
            notfinite_count=jnp.where(finite, 0, bad(opt_state.notfinite_count)),
            last_finite=finite,
            total_notfinite=jnp.where(finite, opt_state.total_notfinite, bad(opt_state.total_notfinite)),
            inner_state=(inner[0], lion_state))

    return apply
