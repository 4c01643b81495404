"""What the benchmark scripts share: the compile-only environment, the shortened demo tasks,
one training run read back from its metrics, and a train step timed as the trainer runs it.

Run a benchmark as `python benchmarks/NAME.py` (this folder is then first on `sys.path`) and
import this module before anything that loads jax: the environment below must be set first.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu only compiles for TPU topologies here (train.aot): it must never open a chip, and
# several processes may load it at once.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # else libtpu logs 4 lines of errors
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from configs import lm as lm_configs  # noqa: E402
from configs import vit as vit_configs  # noqa: E402
from train import data as data_lib  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train import setup, trainer  # noqa: E402

VIT_STEPS, LM_STEPS = 800, 300  # the demo tasks' lengths


@dataclasses.dataclass
class Task:
    name: str
    config: object  # ml_collections.ConfigDict, the base for every run of this task
    optimizers: tuple[str, ...]


def demo_tasks(quick: bool) -> list[Task]:
    """The demo configs, shortened (the LM to 2 layers); eval often enough to draw curves.
    `quick`: 40 steps, for checking that a benchmark runs."""
    vit = vit_configs.get_config("demo")
    vit.num_steps, vit.eval_every, vit.log_every = VIT_STEPS, 50, 50
    vit.optimizer.warmup_steps = 80

    lm = lm_configs.get_config("demo")
    lm.model.num_layers = 2
    lm.num_steps, lm.batch_size, lm.eval_every, lm.log_every = LM_STEPS, 16, 25, 25
    lm.optimizer.warmup_steps = 30

    # The MoE demo shortened the same way: 8 experts of width 192, top-2, so its active MLP
    # width is the byte LM's 384 (issue 30: MoE against dense at equal active parameters).
    moe = lm_configs.get_config("moe-demo")
    moe.model.num_layers = 2
    moe.num_steps, moe.batch_size, moe.eval_every, moe.log_every = LM_STEPS, 16, 25, 25
    moe.optimizer.warmup_steps = 30

    tasks = [Task("ViT digits", vit, ("adamw", "lion")),
             Task("byte LM", lm, ("adamw", "adafactor", "lion")),
             Task("MoE byte LM", moe, ("adamw", "lion"))]
    for t in tasks:
        t.config.sample_steps = 0
        t.config.checkpoint_every = 0  # only the final (forced) save
        if quick:
            t.config.num_steps, t.config.eval_every, t.config.log_every = 40, 20, 20
            t.config.optimizer.warmup_steps = 10
    return tasks


def demo_task(name: str, quick: bool):
    """The config of the demo task called `name` ("ViT digits", "byte LM" or "MoE byte LM")."""
    return next(t.config for t in demo_tasks(quick) if t.name == name)


def train_and_read(config, root: str) -> tuple[dict, list[dict]]:
    """Trains `config` in a fresh workdir under `root`: (the last logged metrics, every row
    of its metrics.jsonl)."""
    workdir = tempfile.mkdtemp(dir=root)
    last = trainer.run(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return last, rows


class StepRunner:
    """One config's state and jitted train step, built by `train.setup.build` as the trainer's."""

    def __init__(self, config):
        self.config = config
        built = setup.build(config)
        self.context = built.context
        self.state = built.init_state()
        self.step = built.train_step
        batches = data_lib.make_train_iterator(config.data, config.batch_size, config.seed)
        self.batch = mesh_lib.to_global_batch(next(batches), built.mesh)  # reused: times compute only
        self.flops_per_step = built.task.flops_per_example() * config.batch_size
        self.seconds: list[float] = []  # per-step time of each timed round
        self.run(2)  # compile and warm up

    def run(self, num_steps: int) -> float:
        """Seconds per step over `num_steps` steps, waiting for the last one."""
        with self.context():
            start = time.perf_counter()
            for _ in range(num_steps):
                self.state, metrics = self.step(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / num_steps
