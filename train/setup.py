"""A run assembled in one place: config -> mesh -> task -> optimizer -> layout -> shardings
-> abstract state -> jitted train and eval steps.

    run = setup.build(config)           # over all devices of all processes
    run = setup.build(config, devices)  # e.g. a TPU slice's devices, compiled on a CPU (train.aot)
    state = run.init_state()            # created in its shardings by one jitted init
    with run.context():
        state, metrics = run.train_step(state, batch)

`build` checks everything about the config that does not need data or a workdir (mesh and
batch, model, optimizer, state layout, attention kernel) and allocates nothing: the
parameters exist only as sharded ShapeDtypeStructs until `init_state` (or a checkpoint
restore into `abstract_state`). The trainer, `train.aot`, the benchmarks and the tests all
build their runs here; the step functions (`train.steps`, `train.dlion`) receive the
built objects and never read the config.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding

import lion_optax
from models import hf, partitioning
from train import mesh as mesh_lib
from train import optim, steps, tasks
from train.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything one training run is made of; see the module doc."""

    config: Any
    mesh: Mesh
    rules: tuple
    task: Any  # train.tasks: ImageClassification | LanguageModeling
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    layout: optim.Layout  # where the optimizer state lives (Distributed Lion, ZeRO)
    graphdef: Any  # the model's static structure; steps `nnx.merge` it with the params
    abstract_params: Any  # ShapeDtypeStructs with their NamedShardings
    shardings: steps.TrainState  # of every state leaf
    abstract_state: steps.TrainState  # ShapeDtypeStructs: the restore target
    train_step: Callable  # jitted (state, batch) -> (state, metrics), state donated
    eval_step: Callable  # jitted (params, batch) -> sums

    def context(self):
        """The mesh and logical-axis rules the steps must be traced and run under."""
        return partitioning.sharding_context(self.mesh, self.rules)

    def init_state(self) -> steps.TrainState:
        """A fresh train state from `config.seed`, created directly in `shardings`; with
        `config.init_from`, the parameters are the checkpoint's, each device reading only
        its own shard (`models.hf.load_params`), and the optimizer state starts fresh."""
        params = None
        if self.task.init_from:
            params = hf.load_params(self.task.init_from, self.task.model_config, self.abstract_params)
        return steps.init_state(self.task, self.tx, self.shardings, self.mesh, self.rules,
                                self.config.seed, self.layout, params)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """One global batch as ShapeDtypeStructs, sharded over the batch axes."""
        sharding = NamedSharding(self.mesh, steps.BATCH_SPEC)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                for k, v in self.task.example_batch_shapes(self.config.batch_size).items()}

    def lower_train_step(self):
        """The train step lowered for `abstract_state` and `abstract_batch` (compile it for
        memory, cost or HLO); nothing is allocated."""
        with self.context():
            return self.train_step.lower(self.abstract_state, self.abstract_batch())

    def lower_eval_step(self):
        """The eval step (the forward pass) lowered for the abstract parameters and batch."""
        with self.context():
            return self.eval_step.lower(self.abstract_state.params, self.abstract_batch())


def sharding_rules(config) -> tuple:
    """`config.sharding_rules` as tuples, or the default logical-axis rules."""
    return tuple(tuple(r) for r in config.sharding_rules) or partitioning.DEFAULT_RULES


def tpu_compiler_options(config, mesh: Mesh) -> dict | None:
    """`config.tpu_compiler_options` when the mesh's devices are TPUs (else None)."""
    options = dict(config.tpu_compiler_options or {})
    return options if options and mesh.devices.flat[0].platform == "tpu" else None


def build(config, devices=None) -> Run:
    """The `Run` of `config` over `devices` (default: all devices of all processes).
    Raises ConfigError (one line, for the CLI) for anything the config gets wrong."""
    devices = list(jax.devices() if devices is None else devices)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    mesh_lib.check_batch(config.batch_size, config.grad_accum_steps, mesh,
                         len({d.process_index for d in devices}))
    task = tasks.make_task(config)
    config = task.resolve(config)  # e.g. data.seq_len left to the model
    experts = config.get("model", {}).get("num_experts") or 0
    if experts and experts % mesh.shape["expert"]:
        raise ConfigError(f"mesh.expert={mesh.shape['expert']} does not divide model.num_experts={experts}")
    mask = optim.decay_mask(task, config.optimizer)
    tx, lr_schedule = optim.make_optimizer(config.optimizer, config.num_steps, mask)
    apply_fn = optim.fused_apply(config.optimizer, config.num_steps, mask)
    rules = sharding_rules(config)
    layout = optim.make_layout(config, mesh, rules)
    graphdef, abstract_params = steps.abstract_model(task, mesh, rules)
    shardings = steps.train_state_shardings(abstract_params, tx, mesh, layout)
    abstract_state = steps.abstract_state(abstract_params, shardings, tx, layout)

    grad_shardings = None
    if layout.zero_axis is not None:  # gradients arrive in the optimizer state's layout
        grad_shardings = lion_optax.zero_shardings(abstract_params, axis=layout.zero_axis)
    if apply_fn is not None:
        apply_fn = functools.partial(apply_fn, opt_state_shardings=shardings.opt_state)
    nan_at = config.debug_nan_at_step  # a logged step number: state.step + 1
    step = steps.make_train_step(task, graphdef, tx, lr_schedule,
                                 grad_accum_steps=config.grad_accum_steps, layout=layout,
                                 grad_shardings=grad_shardings, apply_fn=apply_fn,
                                 nan_at_step=nan_at - 1 if nan_at > 0 else None)
    train_step = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None),
                         donate_argnums=0, compiler_options=tpu_compiler_options(config, mesh))
    eval_step = jax.jit(steps.make_eval_step(task, graphdef))
    return Run(config=config, mesh=mesh, rules=rules, task=task, tx=tx, lr_schedule=lr_schedule,
               layout=layout, graphdef=graphdef, abstract_params=abstract_params,
               shardings=shardings, abstract_state=abstract_state, train_step=train_step,
               eval_step=eval_step)
