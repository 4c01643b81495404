"""Reliability guarantees, each tested on real processes and real files:

exact resume after SIGKILL, resume on another mesh / process count, SIGTERM preemption,
damaged checkpoints, non-finite steps, and bad input rejected before anything is touched.
"""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _util import (REPO, assert_resumed_at, cli_flags, cpu_env, read_metrics, run_trainer, run_two_processes,
                   start_trainer, starts, tiny_lm, train_hf_bpe, train_losses)

from train import trainer
from train.errors import TrainingHalted


def saved_params(workdir, step):
    """The params of checkpoint `step` as host numpy arrays (no target: as saved)."""
    path = os.path.join(str(workdir), "checkpoints", str(step), "state")
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(path)
    return jax.tree.map(np.asarray, state["params"])


def assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


_REFERENCE = {}


def reference_run(tmp_path_factory, num_steps=12):
    """An uninterrupted in-process run of the tiny LM (8 devices), cached per length."""
    if num_steps not in _REFERENCE:
        workdir = tmp_path_factory.mktemp(f"reference{num_steps}")
        trainer.run(tiny_lm(num_steps=num_steps, checkpoint_every=2, keep_checkpoints=0), str(workdir))
        _REFERENCE[num_steps] = workdir
    return _REFERENCE[num_steps]


def wait_for_step(workdir, step, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        logged = [m["step"] for m in read_metrics(workdir) if "loss" in m]
        if logged and max(logged) >= step:
            return max(logged)
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


# ---------------------------------------------------------------- 1. exact resume after SIGKILL


def test_sigkill_then_same_command_is_bitwise_identical(tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory)
    workdir = tmp_path / "killed"
    args = ["--config=configs/lm.py:demo", f"--workdir={workdir}",
            *cli_flags(num_steps=12, checkpoint_every=2, keep_checkpoints=0)]
    proc = start_trainer(*args)
    killed_after = wait_for_step(workdir, 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert killed_after < 12
    # Whatever was in flight (an async save, metrics) is ignored or replayed.
    saved = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    result = run_trainer(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 2 <= saved <= killed_after and starts(workdir) == [0, saved]
    assert_resumed_at(workdir, saved, result.stderr)  # resumed, not retrained from step 1
    assert_bitwise_equal(saved_params(workdir, 12), saved_params(reference, 12))
    ref_losses, losses = train_losses(reference), train_losses(workdir)
    assert sorted(losses) == list(range(1, 13))
    for step in range(1, 13):
        assert losses[step] == ref_losses[step], step


# ------------------------------------------------------- 2. another mesh / process count


def test_resume_on_a_different_mesh(tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory, num_steps=6)
    workdir = str(tmp_path / "remesh")
    trainer.run(tiny_lm(num_steps=4, checkpoint_every=2, **{"mesh.data": 8}), workdir)
    saved = saved_params(workdir, 4)
    trainer.run(tiny_lm(num_steps=6, checkpoint_every=2, **{"mesh.data": 2, "mesh.fsdp": 4}), workdir)
    assert starts(workdir) == [0, 4]
    assert_resumed_at(workdir, 4)
    # The checkpoint restored onto the 2x4 mesh holds exactly the saved values.
    from train import checkpoint, setup
    from train.data import make_train_iterator

    config = tiny_lm(**{"mesh.data": 2, "mesh.fsdp": 4})
    target = setup.build(config).abstract_state
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), 2, 0)
    restored = ckpt.restore(4, target, make_train_iterator(config.data, 16, 0))
    ckpt.close()
    assert_bitwise_equal(jax.tree.map(np.asarray, restored.params), saved)
    embed = restored.params["embed"]
    assert embed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # tensor has size 1
    assert embed.sharding.shard_shape(embed.shape) == (384, 8)  # 32 columns over fsdp=4
    ref, got = train_losses(reference), train_losses(workdir)
    for step in (5, 6):
        np.testing.assert_allclose(got[step], ref[step], rtol=0, atol=1e-5)


def test_saved_by_two_processes_resumed_by_one(tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory, num_steps=6)
    workdir = tmp_path / "procs"
    run_two_processes(workdir, num_steps=4, checkpoint_every=2)
    trainer.run(tiny_lm(num_steps=6, checkpoint_every=2), str(workdir))
    assert starts(workdir) == [0, 4]
    assert_resumed_at(workdir, 4)
    ref, got = train_losses(reference), train_losses(workdir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in got:
        np.testing.assert_allclose(got[step], ref[step], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------ 3. preemption


def _signal_then_saved(workdir, signum, message):
    """Starts the tiny LM with no periodic checkpoints, sends `signum` after step 3 and checks
    the run saved one checkpoint within two steps, printed `message: saved step N, exiting`
    as its last line and exited 0 without a traceback; returns (args, saved step)."""
    args = ["--config=configs/lm.py:demo", f"--workdir={workdir}",
            *cli_flags(num_steps=100_000, checkpoint_every=0)]
    proc = start_trainer(*args)
    at_signal = wait_for_step(workdir, 3, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    saved = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    assert len(saved) == 1 and at_signal <= saved[0] <= at_signal + 2, (saved, at_signal)
    assert err.strip().splitlines()[-1] == f"{message}: saved step {saved[0]}, exiting", err[-2000:]
    return args, saved[0]


def test_sigterm_checkpoints_within_a_step_exits_0_and_resumes(tmp_path):
    workdir = tmp_path / "preempt"
    args, saved = _signal_then_saved(workdir, signal.SIGTERM, "preempted")
    proc = start_trainer(*args)  # the same command resumes
    wait_for_step(workdir, saved + 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert starts(workdir) == [0, saved]
    assert_resumed_at(workdir, saved, err)
    steps = [m["step"] for m in read_metrics(workdir) if "loss" in m]
    assert steps[: saved + 1] == list(range(1, saved + 2))  # continued at the save


def test_ctrl_c_saves_like_sigterm_and_a_second_exits_at_once(tmp_path):
    workdir = tmp_path / "ctrl_c"
    args, saved = _signal_then_saved(workdir, signal.SIGINT, "interrupted")
    proc = start_trainer(*args)  # resumes; two Ctrl-C: the second one exits during the save
    wait_for_step(workdir, saved + 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted again: exiting without saving", err[-2000:]
    assert starts(workdir) == [0, saved]


# ------------------------------------------------------------------ 4. damaged checkpoints


def _truncate_data_files(step_dir):
    # Every OCDBT data file cut in half, as a copy that stopped midway. Not one file: some hold
    # only per-process b-tree nodes that a restore never reads (truncating one of those alone
    # resumes correctly from that step, measured), so "the largest file" was not always damage.
    for root, _, names in os.walk(step_dir / "state"):
        if os.path.basename(root) == "d":
            for name in names:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(os.path.getsize(f.name) // 2)


def _alter_one_value(step_dir):
    # Silent corruption: the state rewritten with one parameter 1 ulp off, in valid files that
    # orbax and tensorstore read without complaint (measured: so does a flipped bit in the
    # middle of a zstd-compressed data file, most of the time); only the fingerprint in the
    # checkpoint's metadata tells.
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(step_dir / "state")
        scale = np.asarray(state["params"]["final_norm"]["scale"]).copy()
        scale[0] = np.nextafter(scale[0], np.float32(np.inf))
        state["params"]["final_norm"]["scale"] = scale
        ckpt.save(step_dir / "altered", state)
    shutil.rmtree(step_dir / "state")
    os.rename(step_dir / "altered", step_dir / "state")


def _remove_manifest(step_dir):
    os.remove(step_dir / "state" / "manifest.ocdbt")


def _remove_metadata(step_dir):
    os.remove(step_dir / "state" / "_METADATA")


@pytest.mark.parametrize("damage", [_truncate_data_files, _alter_one_value, _remove_manifest, _remove_metadata])
def test_damaged_newest_checkpoint_falls_back_with_one_warning(tmp_path, tmp_path_factory, capfd, damage):
    reference = reference_run(tmp_path_factory, num_steps=8)
    workdir = tmp_path / "damaged"
    trainer.run(tiny_lm(num_steps=6, checkpoint_every=2, keep_checkpoints=2), str(workdir))
    ckpts = workdir / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["4", "6"]
    damage(ckpts / "6")
    # An async save that never committed: orbax's temporary directory for step 8.
    shutil.copytree(ckpts / "4", ckpts / "8.orbax-checkpoint-tmp-1700000000000000")
    capfd.readouterr()
    trainer.run(tiny_lm(num_steps=8, checkpoint_every=2, keep_checkpoints=2), str(workdir))
    warnings = [l for l in capfd.readouterr().err.splitlines() if l.startswith("warning: skipped")]
    assert len(warnings) == 1 and f"{ckpts / '6'}" in warnings[0], warnings
    assert (ckpts / "6.corrupt").is_dir()  # moved aside, never deleted
    assert {"6", "8"} <= set(os.listdir(ckpts))
    assert starts(workdir) == [0, 4]
    # Resumed from step 4: the rest of the run is exactly the uninterrupted one.
    ref, got = train_losses(reference), train_losses(workdir)
    for step in (5, 6, 7, 8):
        assert got[step] == ref[step], step
    assert_bitwise_equal(saved_params(workdir, 8), saved_params(reference, 8))


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), KeyError("exhausted")])
def test_read_error_that_is_not_damage_stops_and_moves_nothing(tmp_path, capfd, monkeypatch, error):
    """A permission or object-store error, or a data-iterator state grain cannot restore,
    says nothing about the files: one error naming the step and the cause, nothing moved
    (was: moved to 6.corrupt and the run restarted from step 0)."""
    from train import checkpoint
    from train.errors import UserError

    workdir = tmp_path / "transient"
    trainer.run(tiny_lm(num_steps=4, checkpoint_every=2), str(workdir))
    before = _snapshot(workdir)

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(checkpoint.Checkpointer, "restore", fail)
    capfd.readouterr()
    with pytest.raises(UserError) as raised:
        trainer.run(tiny_lm(num_steps=6, checkpoint_every=2), str(workdir))
    message = str(raised.value)
    assert message.startswith("could not read checkpoint step 4") and type(error).__name__ in message
    assert "\n" not in message and "warning: skipped" not in capfd.readouterr().err
    assert _snapshot(workdir) == before and starts(workdir) == [0]


# --------------------------------------------------------------------- 5. non-finite steps


def test_nonfinite_step_is_skipped_and_counted(tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory, num_steps=6)
    workdir = tmp_path / "skip"
    last = trainer.run(tiny_lm(num_steps=6, checkpoint_every=2, debug_nan_at_step=3), str(workdir))
    assert last["nonfinite_steps"] == 1
    metrics = {m["step"]: m for m in read_metrics(workdir) if "loss" in m}
    assert not np.isfinite(metrics[3]["grad_norm"])
    # Step 3's update was dropped: params after step 3 equal those after step 2.
    ref = train_losses(reference)
    assert metrics[1]["loss"] == ref[1] and metrics[2]["loss"] == ref[2]
    for step in (2, 4, 6):
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved_params(workdir, step)))


@pytest.mark.parametrize("fused", [False, True])
def test_logged_lr_is_the_applied_lr_after_a_skipped_step(tmp_path, fused):
    """Lion moves a parameter that is not weight-decayed by exactly lr per element
    (|sign| = 1), so the change of a norm scale between per-step checkpoints is the lr the
    optimizer applied; with a decaying schedule it must equal the logged lr at every step,
    also after the NaN step 3 was dropped (the optimizer's count did not advance there)."""
    workdir = tmp_path / "lr"
    extra = {"optimizer.lion.fused_apply": True, "optimizer.lion.kernel": "interpret"} if fused else {}
    trainer.run(tiny_lm(num_steps=6, checkpoint_every=1, keep_checkpoints=0, debug_nan_at_step=3,
                        **{"optimizer.schedule": "linear", "optimizer.grad_clip_norm": 0.0, **extra}),
                str(workdir))
    logged = {m["step"]: m["lr"] for m in read_metrics(workdir) if "lr" in m}
    scale = {s: saved_params(workdir, s)["layers"]["attn_norm"]["scale"] for s in range(1, 7)}
    assert np.array_equal(scale[3], scale[2])  # the NaN step changed nothing
    for step in (2, 4, 5, 6):
        applied = float(np.max(np.abs(scale[step] - scale[step - 1])))
        np.testing.assert_allclose(applied, logged[step], rtol=1e-3, err_msg=f"step {step}")
    assert logged[4] < logged[2]  # the schedule decays, so a lagging count would show


def test_nonfinite_step_halts_without_saving(tmp_path):
    workdir = tmp_path / "halt"
    with pytest.raises(TrainingHalted, match="non-finite loss or gradients at step 3"):
        trainer.run(tiny_lm(num_steps=6, checkpoint_every=2, debug_nan_at_step=3, on_nonfinite="halt"),
                    str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    result = run_trainer("--config=configs/lm.py:demo", f"--workdir={tmp_path / 'halt_cli'}",
                         *cli_flags(num_steps=6, checkpoint_every=2, debug_nan_at_step=3,
                                    on_nonfinite="halt"))
    assert result.returncode == 3
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "step 3" in errors[0] and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- 6. bad input


def _snapshot(path):
    """(file, mtime) of everything a run wrote; the `.lock` file (pid of the last trainer
    that held the workdir) is bookkeeping, not run data."""
    return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getmtime(os.path.join(r, f)))
                  for r, _, fs in os.walk(path) for f in fs if f != ".lock")


BAD_INPUT = [
    (["--config.no_such_key=1"], "no_such_key"),
    (["--config.num_steps=abc"], "num_steps"),
    (["--config.num_steps=-5"], "num_steps must be a non-negative integer"),
    (["--config.mesh.data=3"], "3 devices, but 8 are available"),
    (["--config.batch_size=12"], "not divisible by the data-parallel size"),
    (["--config.optimizer.name=adam"], "optimizer.name must be one of"),
    (["--config.data.seq_len=100", "--config.model.max_seq_len=64"], "exceeds the model's max_seq_len"),
    (["--config.data.name=imagenet2012", "--config.data.kind=image", "--config.data.data_dir=/nonexistent/tfds"],
     "imagenet2012"),
    (["--config.on_nonfinite=ignore"], "on_nonfinite must be one of"),
    (["--config.optimizer.lion.mu_dtype=int4"], "optimizer.lion.mu_dtype must be one of"),
    (["--config.optimizer.lion.mu_dtype=int8", "--config.optimizer.lion.block_size=-1"],
     "block_size must be a positive int"),
    (["--config.optimizer.lion.distributed=median"], "optimizer.lion.distributed must be one of"),
    (["--config.optimizer.lion.distributed=majority", "--config.optimizer.lion.vote_axis=model"],
     "vote_axis 'model' is not a mesh axis"),
    (["--config.optimizer.lion.fused_apply=True", "--config.optimizer.lion.kernel=cuda"],
     "kernel must be one of"),
    (["--config.optimizer.grad_clip_norm=-1"], "grad_clip_norm must be a number >= 0"),
    (["--config.optimizer.lion.learning_rate=-0.001"], "optimizer.lion.learning_rate must be a number >= 0"),
    (["--config.model.num_experts=4", "--config.model.experts_per_token=5"],
     "experts_per_token=5 must be between 1 and num_experts=4"),
    (["--config.model.num_experts=6", "--config.mesh.expert=4"],
     "mesh.expert=4 does not divide model.num_experts=6"),
    (["--config.model.num_experts=4", "--config.model.expert_matmul=dense"], "expert_matmul='dense' is not one of"),
    (["--config.optimizer.lion.learning_rat=1"],
     "unknown config key config.optimizer.lion.learning_rat (in --config.optimizer.lion.learning_rat); "
     "did you mean config.optimizer.lion.learning_rate?"),
    (["--config.resume_from=x"], "unknown config key config.resume_from"),
    (["--config.init_from=/ckpt/llama"], "init_from must be hf:PATH (a Hugging Face checkpoint directory)"),
    (["--config.data.tokenizer=/nonexistent/sp.model"], "data.tokenizer /nonexistent/sp.model cannot be read"),
    (["--config.data.tokenizer=README.md"], "data.tokenizer README.md is not a SentencePiece .model file"),
    (["--config.data.tokenizer=benchmarks/results/compare_optimizers.json"],
     "is not a Hugging Face tokenizer.json"),
    (["--config.data.eval_split=nosuch", "--config.eval_every=1"], "Unknown split 'nosuch'"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUT)
def test_bad_input_one_line_exit_2_workdir_untouched(tmp_path, extra, message):
    workdir = tmp_path / "never_created"
    result = run_trainer("--config=configs/lm.py:demo", f"--workdir={workdir}",
                         *cli_flags(num_steps=2), *extra)
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("config, message", [
    ("configs/vitt.py:demo", "--config: cannot load the config file ([Errno 2] No such file or directory"),
    ("configs", "--config: cannot load the config file ([Errno 21] Is a directory"),
])
def test_config_file_that_does_not_load_is_one_line(tmp_path, config, message):
    result = run_trainer(f"--config={config}", f"--workdir={tmp_path / 'never_created'}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "never_created").exists()


@pytest.mark.parametrize("variant", ["1b", "8b"])
def test_large_lm_without_a_tokenizer_is_one_line(tmp_path, variant):
    workdir = tmp_path / "never_created"
    # Every model field of every preset can be set from the command line (it was "unknown
    # config key" for the 8b's num_layers): the run gets as far as the missing tokenizer.
    result = run_trainer(f"--config=configs/lm.py:{variant}", f"--workdir={workdir}", "--config.num_steps=1",
                         "--config.model.num_layers=4", "--config.model.head_dim=64")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "data.tokenizer is not set" in errors[0] and "Traceback" not in result.stderr
    assert not workdir.exists()


def test_model_vocabulary_follows_the_tokenizer_unless_set(tmp_path):
    from train import setup

    train_hf_bpe(tmp_path / "tokenizer.json", vocab_size=400)
    built = setup.build(tiny_lm(**{"data.tokenizer": str(tmp_path / "tokenizer.json")}))
    assert built.task.model_config.vocab_size == 512  # 400, padded to a multiple of 128
    assert built.abstract_params["embed"].shape == (512, 32)
    assert setup.build(tiny_lm()).task.model_config.vocab_size == 384  # bytes: 257


def test_tokenizer_larger_than_the_model_vocabulary_is_one_line(tmp_path):
    train_hf_bpe(tmp_path / "tokenizer.json", vocab_size=400)
    workdir = tmp_path / "never_created"
    result = run_trainer("--config=configs/lm.py:demo", f"--workdir={workdir}", *cli_flags(num_steps=2),
                         f"--config.data.tokenizer={tmp_path / 'tokenizer.json'}", "--config.data.vocab_size=257")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "data.vocab_size=257 is smaller than the vocabulary" in errors[0] and "set data.vocab_size >= 400" in errors[0]
    assert "Traceback" not in result.stderr and not workdir.exists()


def test_checkpoint_write_failure_is_one_line_and_keeps_older_checkpoints(tmp_path):
    """A full disk, simulated by a file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so
    writes past it fail with EFBIG): the step-4 save fails part-way. One `error:` line,
    exit 4, no orbax temporary directory left, step 2 byte-identical, and a rerun with
    room resumes from it."""
    workdir = tmp_path / "full"
    args = ["--config=configs/lm.py:demo", f"--workdir={workdir}"]
    trainer.run(tiny_lm(num_steps=2, checkpoint_every=2), str(workdir))
    ckpts = workdir / "checkpoints"
    before = _snapshot(ckpts / "2")
    # Half the tree metadata, a file every save writes at the same size (how values are grouped
    # into data files varies from save to save, so half the largest data file was not always hit);
    # the run's metrics and event files stay below it, and no compile cache entry is written.
    limit = os.path.getsize(ckpts / "2" / "state" / "_METADATA") // 2

    # Set in a fresh interpreter that then execs the trainer (no preexec_fn under JAX threads).
    small_disk = (f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
                  "os.execv(sys.executable, [sys.executable, '-m', 'train', *sys.argv[1:]])")
    proc = subprocess.run([sys.executable, "-c", small_disk, *args, *cli_flags(num_steps=4, checkpoint_every=2)],
                          cwd=REPO, env={**cpu_env(), "JAX_ENABLE_COMPILATION_CACHE": "false"},
                          capture_output=True, text=True, timeout=240)
    err = proc.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 4, err[-3000:]
    assert lines[-1].startswith("error: could not write checkpoint step 4") and "errno 27" in lines[-1], lines
    assert len(lines) == 2 and lines[0] == "resumed from step 2", lines  # nothing else printed
    assert os.listdir(ckpts) == ["2"]  # the partial step-4 save is gone
    assert _snapshot(ckpts / "2") == before
    result = run_trainer(*args, *cli_flags(num_steps=4, checkpoint_every=2))
    assert result.returncode == 0 and "resumed from step 2" in result.stderr, result.stderr[-3000:]
    assert sorted(os.listdir(ckpts)) == ["2", "4"]


def test_workdir_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_trainer("--config=configs/lm.py:demo", f"--workdir={blocker / 'run'}", *cli_flags(num_steps=2))
    assert result.returncode == 2 and "is not a directory" in result.stderr, result.stderr[-2000:]


def test_checkpoint_of_another_model_shape_names_the_parameter(tmp_path):
    workdir = tmp_path / "shape"
    trainer.run(tiny_lm(num_steps=2, checkpoint_every=2), str(workdir))
    before = _snapshot(workdir)
    result = run_trainer("--config=configs/lm.py:demo", f"--workdir={workdir}",
                         *cli_flags(num_steps=4, **{"model.ffn_dim": 96}))
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "['layers']['mlp']['down']" in errors[0] and "(2, 64, 32)" in errors[0], errors
    assert _snapshot(workdir) == before  # the good checkpoint is untouched


def test_second_trainer_on_the_same_workdir_is_refused(tmp_path):
    workdir = tmp_path / "locked"
    workdir.mkdir()
    with open(workdir / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("12345")
        held.flush()
        result = run_trainer("--config=configs/lm.py:demo", f"--workdir={workdir}", *cli_flags(num_steps=2))
    assert result.returncode == 2 and "is in use by another trainer (pid 12345)" in result.stderr
    assert sorted(os.listdir(workdir)) == [".lock"]
