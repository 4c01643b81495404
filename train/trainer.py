"""The training loop: config -> mesh -> sharded state -> jitted steps -> checkpoints.

`run(config, workdir)` validates everything it can before touching the workdir or compiling
(mesh, batch, optimizer, model, data), resumes from the newest readable checkpoint in
`workdir/checkpoints`, trains to `config.num_steps`, and writes metrics to
`workdir/metrics.jsonl` and `workdir/tb/`. Re-running the same command resumes.

Reliability (see docs/trainer.md "Preemption and resume"): the data order, dropout keys and
schedules are pure functions of the step, so a resumed run is bitwise the run it replaces;
SIGTERM (or orbax's multi-host preemption sync point) finishes the step, commits a
checkpoint and returns; non-finite steps are dropped on device and then skipped or halt the
run (`on_nonfinite`); a second trainer on the same workdir is refused (lock file).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from train import data as data_lib
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train import setup
from train.data import tokenize as tokenizer_lib
from train.checkpoint import Checkpointer
from train.errors import ConfigError, TrainingHalted, UserError

ON_NONFINITE = ("skip", "halt")


class _Preemption:
    """Single process: SIGTERM or Ctrl-C (SIGINT) sets a flag, the loop saves at the end of
    the step and returns; a second Ctrl-C exits at once (130) without saving. Several
    processes: orbax's preemption sync point (SIGTERM), which makes every process stop at
    the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, ckpt: Checkpointer):
        self._ckpt, self._flag, self._previous = ckpt, None, {}
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if not self._multi:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self._flag is not None and signum == signal.SIGINT:
            print("interrupted again: exiting without saving", file=sys.stderr, flush=True)
            os._exit(130)
        self._flag = signal.Signals(signum)

    @property
    def cause(self) -> str:
        return "interrupted" if self._flag == signal.SIGINT else "preempted"

    def reached(self, step: int) -> bool:
        return self._ckpt.manager.reached_preemption(step) if self._multi else self._flag is not None

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)


def _check_scalars(config) -> None:
    for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "profile_steps"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{key} must be a non-negative integer, got {value!r}")
    if config.log_every < 1:
        raise ConfigError(f"log_every must be >= 1, got {config.log_every}")
    if config.on_nonfinite not in ON_NONFINITE:
        raise ConfigError(f"on_nonfinite must be one of {ON_NONFINITE}, got {config.on_nonfinite!r}")


def _with_checkpoint_tokenizer(config):
    """With `init_from=hf:PATH`: no `data.tokenizer` means the checkpoint's own tokenizer
    (PATH/tokenizer.json), and `data.add_bos` None its convention (`_checkpoint_adds_bos`);
    the config is copied, not changed."""
    init_from = str(config.get("init_from") or "")
    if config.data.kind != "text":
        return config
    from_checkpoint = init_from.startswith("hf:")
    if not (from_checkpoint and not config.data.tokenizer) and config.data.get("add_bos") is not None:
        return config
    config = config.copy_and_resolve_references()
    if from_checkpoint and not config.data.tokenizer:
        config.data.tokenizer = init_from[len("hf:"):]
    if config.data.get("add_bos") is None:
        config.data.add_bos = from_checkpoint and _checkpoint_adds_bos(init_from[len("hf:"):])
    return config


def _checkpoint_adds_bos(path: str) -> bool:
    """Whether the checkpoint's tokenizer starts documents with its bos token, as
    `transformers` does: tokenizer_config.json's `add_bos_token` when it says, else whether
    it names a bos token at all (Llama 3: yes; Qwen: none)."""
    from etils import epath

    try:
        config = json.loads((epath.Path(os.path.expanduser(path)) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    if "add_bos_token" in config:
        return bool(config["add_bos_token"])
    return bool(config.get("bos_token"))


def _check_workdir(workdir: str) -> None:
    """Raises UserError unless `workdir` is (or can be created as) a writable directory."""
    if "://" in workdir:
        return  # object stores: checked by the first write
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"workdir {workdir} exists and is not a directory")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"workdir {workdir} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"workdir {workdir} is not writable ({existing} does not allow writing)")


def _lock_workdir(workdir: str):
    """Exclusive lock on `workdir/.lock` held for the run (process 0 only); None remote."""
    if "://" in workdir or jax.process_index() != 0:
        return None
    os.makedirs(workdir, exist_ok=True)
    handle = open(os.path.join(workdir, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"workdir {workdir} is in use by another trainer (pid {owner})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _params_finite(params) -> bool:
    return bool(_all_finite(params))


def evaluate(eval_step, params, eval_batches, mesh) -> dict[str, float]:
    """Mean eval metrics over one pass of `eval_batches` (built once per run, re-iterated)."""
    totals: dict[str, float] = {}
    for local in eval_batches:
        sums = eval_step(params, mesh_lib.to_global_batch(local, mesh))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.pop("count", 0.0), 1.0)
    return {f"eval_{k}": v / count for k, v in totals.items()}


def run(config, workdir: str) -> dict[str, float]:
    """Trains per `config` in `workdir`; returns the last logged metrics."""
    # Everything that can be wrong with the input is found before the workdir is touched.
    _check_scalars(config)
    config = _with_checkpoint_tokenizer(config)
    built = setup.build(config)  # mesh, model, optimizer, shardings, steps: nothing allocated
    config = built.config  # with what the task derived (data.seq_len)
    if built.task.init_from and config.data.kind == "text":
        need, have = data_lib.get_vocab_size(config.data), built.task.model_config.vocab_size
        if need > have:
            raise ConfigError(f"tokenizer {config.data.tokenizer!r} has {need} tokens, more than the "
                              f"vocabulary of init_from {built.task.init_from} ({have})")
    train_iter = data_lib.make_train_iterator(config.data, config.batch_size, config.seed)
    # Built once per run (tokenizer, source, pipeline): each eval re-iterates it, and a
    # missing eval split is found here, not after the first stretch of training.
    eval_batches = data_lib.make_eval_batches(config.data, config.batch_size) if config.eval_every else None
    _check_workdir(workdir)
    lock = _lock_workdir(workdir)
    try:
        return _train(built, workdir, train_iter, eval_batches)
    finally:
        if lock is not None:
            lock.close()


def _train(built: setup.Run, workdir, train_iter, eval_batches) -> dict[str, float]:
    config, mesh, task = built.config, built.mesh, built.task
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                        config.keep_checkpoints)
    config_dict = json.loads(config.to_json_best_effort())
    restored = ckpt.restore_latest(built.abstract_state, train_iter, config_dict)
    state = restored if restored is not None else built.init_state()
    start = int(jax.device_get(state.step))
    train_step, eval_step = built.train_step, built.eval_step

    units = task.units(config.batch_size)
    flops_per_step = task.flops_per_example() * config.batch_size
    peak = metrics_lib.peak_flops_total()
    meta = {"config": config_dict, "mesh": dict(mesh.shape), "process_count": jax.process_count(),
            "data_iterator": "step" if isinstance(train_iter, data_lib.StepIterator) else "stream"}
    hf_config = task.hf_config()  # what `python -m train.hf export` writes as config.json
    if hf_config is not None:
        meta["hf_config"] = hf_config
    halt_on_nonfinite = config.on_nonfinite == "halt"
    logger = metrics_lib.MetricsLogger(workdir, config.num_steps, start)
    logger.event(start, "start")
    if start:
        logger.message(f"resumed from step {start}")

    t_start = time.perf_counter()
    last: dict[str, float] = {}
    window: list[tuple[int, dict]] = []  # (step, device metrics) since the last log
    nonfinite_total, checked_upto, preempted = 0, start, False
    t_window, steps_in_window = time.perf_counter(), 0

    def check_nonfinite() -> None:
        """Counts new non-finite steps (their updates were dropped on device); with
        on_nonfinite=halt, stops the run before anything else is saved."""
        nonlocal nonfinite_total, checked_upto
        pending = [(s, m) for s, m in window if s > checked_upto]
        flags = jax.device_get([m["nonfinite"] for _, m in pending])
        bad = [s for (s, _), f in zip(pending, flags) if f > 0]
        checked_upto = pending[-1][0] if pending else checked_upto
        nonfinite_total += len(bad)
        if bad and halt_on_nonfinite:
            raise TrainingHalted(
                f"non-finite loss or gradients at step {bad[0]} (on_nonfinite=halt); no checkpoint "
                f"written after step {ckpt.latest_step() or 0}")
        for s in bad:
            logger.message(f"warning: step {s}: non-finite loss or gradients, update skipped")

    # The signal handlers stay until the last save has committed: a second Ctrl-C while it
    # is written exits at once (the partial save is ignored by the next restore).
    with _Preemption(ckpt) as preemption:
        try:
            if restored is None and config.num_steps == 0 and task.init_from:  # import, then export
                ckpt.save(0, state, train_iter, {**meta, "step": 0}, force=True)
            with built.context():
                profile = (start + 2, start + 2 + config.profile_steps) if config.profile_steps else None
                for step in range(start, config.num_steps):
                    if profile and step == profile[0]:
                        jax.profiler.start_trace(os.path.join(workdir, "tb"))
                    state, metrics = train_step(state, mesh_lib.to_global_batch(next(train_iter), mesh))
                    if profile and step + 1 in (profile[1], config.num_steps) and step >= profile[0]:
                        jax.block_until_ready(state.step)
                        jax.profiler.stop_trace()
                        logger.message(f"profiled steps {profile[0] + 1}-{step + 1}: {os.path.join(workdir, 'tb')}")
                        profile = None
                    done = step + 1
                    window.append((done, metrics))
                    steps_in_window += 1
                    if done == start + 1:  # the first step compiles: keep it out of throughput
                        jax.block_until_ready(state.step)
                        t_window, steps_in_window = time.perf_counter(), 0
                    preempted = preemption.reached(done)
                    save = preempted or done == config.num_steps or ckpt.due(done)
                    if done % config.log_every == 0 or done == config.num_steps:
                        check_nonfinite()
                        host = jax.device_get([m for _, m in window])
                        last = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "nonfinite"}
                        last["nonfinite_steps"] = nonfinite_total
                        if steps_in_window:
                            per_sec = steps_in_window / (time.perf_counter() - t_window)
                            last.update({f"{u}_per_sec": n * per_sec for u, n in units.items()})
                            last["mfu"] = flops_per_step * per_sec / peak
                        logger.write(done, last)
                        window, t_window, steps_in_window = [], time.perf_counter(), 0
                    if config.eval_every and (done % config.eval_every == 0 or done == config.num_steps):
                        eval_metrics = evaluate(eval_step, state.params, eval_batches, mesh)
                        logger.write(done, eval_metrics)
                        last.update(eval_metrics)
                        t_window, steps_in_window = time.perf_counter(), 0
                    logger.advance(done)
                    if save:
                        check_nonfinite()
                        if not _params_finite(state.params):
                            raise TrainingHalted(f"parameters are not finite at step {done}; not saving")
                        ckpt.save(done, state, train_iter, {**meta, "step": done}, force=True)
                    if preempted:
                        logger.message(f"{preemption.cause}: saved step {done}, exiting")
                        break
            if start >= config.num_steps:
                saved0 = restored is None and config.num_steps == 0 and task.init_from
                logger.summary(f"nothing to train: num_steps={config.num_steps}, "
                               + ("saved the imported parameters as step 0" if saved0
                                  else f"the run is at step {start} (raise --config.num_steps to go on)"))
            elif not preempted:
                logger.summary(closing_line(config.num_steps, start, last, time.perf_counter() - t_start))
        finally:
            try:
                ckpt.close()  # waits for in-flight saves to commit
            finally:
                logger.close()
    if config.get("sample_steps") and start < config.num_steps and not preempted:
        text = sample_text(built, state.params)
        if jax.process_index() == 0:
            print(f"--- sample ({config.sample_steps} tokens) ---\n{text}\n---", flush=True)
    return last


def closing_line(num_steps: int, start: int, last: dict, seconds: float) -> str:
    """`done: step 900/900 (this run 600 steps, 4m12s)  loss 2.0123  eval loss 2.1000 ...`."""
    minutes, secs = divmod(int(round(seconds)), 60)
    parts = [f"done: step {num_steps}/{num_steps} (this run {num_steps - start} steps, {minutes}m{secs:02d}s)"]
    for key, name in (("loss", "loss"), ("eval_loss", "eval loss"), ("eval_accuracy", "eval accuracy")):
        if key in last:
            parts.append(f"{name} {last[key]:.4f}")
    if last.get("nonfinite_steps"):
        parts.append(f"{int(last['nonfinite_steps'])} non-finite steps skipped")
    return "  ".join(parts)


def sample_text(built: setup.Run, params, prompt: str = "def ") -> str:
    """A sample (temperature 0.8) from the trained LM, decoded to text."""
    from flax import nnx

    from models.generate import generate

    config = built.config
    tokenizer = tokenizer_lib.make_tokenizer(config.data.tokenizer)
    tokens = tokenizer.encode(prompt).tolist()
    steps_ = min(int(config.sample_steps), built.task.model_config.max_seq_len - len(tokens))
    with built.context():
        model = nnx.merge(built.graphdef, params)
        out = generate(model, jnp.asarray([tokens], jnp.int32), steps_, temperature=0.8,
                       rng=jax.random.PRNGKey(config.seed))
    return tokenizer.decode(np.asarray(jax.device_get(out))[0])
