"""The training loop: config -> mesh -> sharded state -> jitted steps -> checkpoints.

`run(config, workdir)` validates everything it can before compiling (mesh, batch,
optimizer, model, data), resumes from the newest checkpoint in `workdir/checkpoints`,
trains to `config.num_steps`, and writes metrics to `workdir/metrics.jsonl` and
`workdir/tb/`. Re-running the same command resumes.
"""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import partitioning
from train import data as data_lib
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train import optim, preprocess, steps, tasks
from train.checkpoint import Checkpointer
from train.errors import ConfigError


class _StopFlag:
    """Set by SIGTERM (preemption): finish the step, checkpoint, exit 0."""

    def __init__(self):
        self.stop = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


def _check_scalars(config) -> None:
    for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{key} must be a non-negative integer, got {value!r}")
    if config.log_every < 1:
        raise ConfigError(f"log_every must be >= 1, got {config.log_every}")


def _mean_metrics(window: list[dict]) -> dict[str, float]:
    host = jax.device_get(window)
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def evaluate(eval_step, params, config, mesh) -> dict[str, float]:
    totals: dict[str, float] = {}
    for local in data_lib.make_eval_batches(config.data, config.batch_size):
        sums = eval_step(params, data_lib.to_global_batch(local, mesh))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.pop("count", 0.0), 1.0)
    return {f"eval_{k}": v / count for k, v in totals.items()}


def run(config, workdir: str) -> dict[str, float]:
    """Trains per `config` in `workdir`; returns the last logged metrics."""
    _check_scalars(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch(config.batch_size, config.grad_accum_steps, mesh, jax.process_count())
    task = tasks.make_task(config)
    tx, lr_schedule = optim.make_optimizer(config.optimizer, config.num_steps)
    rules = tuple(tuple(r) for r in config.sharding_rules) or partitioning.DEFAULT_RULES
    train_iter = data_lib.make_train_iterator(config.data, config.batch_size, config.seed)

    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                        config.keep_checkpoints)
    graphdef, abstract_params = steps.abstract_model(task, mesh, rules)
    shardings = steps.state_shardings(abstract_params, tx, mesh)
    latest = ckpt.latest_step()
    if latest is None:
        graphdef, state, _ = steps.init_state(task, tx, mesh, rules, config.seed)
    else:
        target = steps.abstract_state(shardings, task, tx, mesh, rules)
        state = ckpt.restore(latest, target, train_iter)
    start = int(jax.device_get(state.step))

    train_step = jax.jit(
        steps.make_train_step(task, graphdef, tx, lr_schedule, config.grad_accum_steps),
        in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)
    eval_step = jax.jit(steps.make_eval_step(task, graphdef))

    units = task.units(config.batch_size)
    flops_per_step = task.flops_per_example() * config.batch_size
    peak = metrics_lib.peak_flops_total()
    meta = {"config": json.loads(config.to_json_best_effort()), "mesh": dict(mesh.shape),
            "process_count": jax.process_count()}
    logger = metrics_lib.MetricsLogger(workdir, config.num_steps, start)
    if start:
        logger.message(f"resumed from step {start}")

    last: dict[str, float] = {}
    window: list[dict] = []
    t_window, steps_in_window = time.perf_counter(), 0
    with _StopFlag() as flag, partitioning.sharding_context(mesh, rules):
        for step in range(start, config.num_steps):
            batch = data_lib.to_global_batch(next(train_iter), mesh)
            state, metrics = train_step(state, batch)
            window.append(metrics)
            steps_in_window += 1
            done = step + 1
            if done == start + 1:  # the first step compiles: keep it out of throughput
                jax.block_until_ready(state.step)
                t_window, steps_in_window = time.perf_counter(), 0
            if done % config.log_every == 0 or done == config.num_steps:
                last = _mean_metrics(window)
                elapsed = time.perf_counter() - t_window
                if steps_in_window:
                    per_sec = steps_in_window / elapsed
                    for unit, n in units.items():
                        last[f"{unit}_per_sec"] = n * per_sec
                    last["mfu"] = flops_per_step * per_sec / peak
                logger.write(done, last)
                window, t_window, steps_in_window = [], time.perf_counter(), 0
            if config.eval_every and (done % config.eval_every == 0 or done == config.num_steps):
                eval_metrics = evaluate(eval_step, state.params, config, mesh)
                logger.write(done, eval_metrics)
                last.update(eval_metrics)
                t_window, steps_in_window = time.perf_counter(), 0
            logger.advance(done)
            stop = flag.stop
            ckpt.save(done, state, train_iter, {**meta, "step": done},
                      force=stop or done == config.num_steps)
            if stop:
                logger.message(f"SIGTERM: saved step {done}, exiting")
                break
    ckpt.close()
    logger.close()
    if config.get("sample_steps", 0) and start < config.num_steps:
        text = sample_text(task, graphdef, state.params, config, mesh, rules)
        if jax.process_index() == 0:
            print(f"--- sample ({config.sample_steps} tokens) ---\n{text}\n---", flush=True)
    return last


def sample_text(task, graphdef, params, config, mesh, rules, prompt: str = "def ") -> str:
    """A sample (temperature 0.8) from the trained LM, decoded to text."""
    from flax import nnx

    from models.generate import generate

    tokenizer = preprocess.make_tokenizer(config.data.tokenizer)
    tokens = tokenizer.encode(prompt).tolist()
    steps_ = min(int(config.sample_steps), task.model_config.max_seq_len - len(tokens))
    with partitioning.sharding_context(mesh, rules):
        model = nnx.merge(graphdef, params)
        out = generate(model, jnp.asarray([tokens], jnp.int32), steps_, temperature=0.8,
                       rng=jax.random.PRNGKey(config.seed))
    return tokenizer.decode(np.asarray(jax.device_get(out))[0])
