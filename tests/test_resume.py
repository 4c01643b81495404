"""Resuming after a config change: a hyperparameter change that keeps the state's layout
resumes at the saved step; one that changes it stops with one `error:` line naming what
differs (exit 2) and leaves the checkpoint exactly as it was. A checkpoint is only moved
aside when it cannot be read (tests/test_reliability.py)."""

import os
import shutil

import pytest
from _util import assert_resumed_at, run_two_processes, starts, tiny_lm

from train import trainer
from train.errors import UserError


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A workdir with the tiny LM's step-2 checkpoint (each test resumes a copy)."""
    workdir = tmp_path_factory.mktemp("saved") / "run"
    trainer.run(tiny_lm(num_steps=2, checkpoint_every=2), str(workdir))
    return workdir


def _snapshot(path):
    """(file, size, mtime) of everything under `path` except the trainer's lock file."""
    return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getsize(os.path.join(r, f)),
                   os.path.getmtime(os.path.join(r, f)))
                  for r, _, fs in os.walk(path) for f in fs if f != ".lock")


def test_hyperparameter_changes_that_keep_the_layout_resume(tmp_path, capfd):
    workdir = str(tmp_path / "run")
    trainer.run(tiny_lm(num_steps=2, checkpoint_every=2, keep_checkpoints=0), workdir)  # clip 1.0
    changes = [
        {"optimizer.grad_clip_norm": 0.0},  # clipping off
        {"optimizer.grad_clip_norm": 0.5, "optimizer.lion.learning_rate": 3e-4,
         "optimizer.lion.weight_decay": 0.3, "optimizer.lion.b1": 0.95, "optimizer.lion.b2": 0.98},
        {"optimizer.schedule": "cosine", "optimizer.warmup_steps": 2},
    ]
    for i, change in enumerate(changes):
        capfd.readouterr()
        trainer.run(tiny_lm(num_steps=4 + 2 * i, checkpoint_every=2, keep_checkpoints=0, **change), workdir)
        assert_resumed_at(workdir, 2 + 2 * i, capfd.readouterr().err)
    assert starts(workdir) == [0, 2, 4, 6]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6", "8"]  # none moved


@pytest.mark.parametrize("change, named", [
    ({"optimizer.name": "adamw"}, "optimizer.name: 'lion' -> 'adamw'"),
    ({"optimizer.lion.mu_dtype": "float32"}, "optimizer.lion.mu_dtype: 'bfloat16' -> 'float32'"),
    ({"data.pack_mode": "stream"}, "data.pack_mode: 'auto' -> 'stream'"),
    ({"model.num_kv_heads": 4}, "model.num_kv_heads: 2 -> 4"),
])
def test_layout_change_stops_naming_it_and_keeps_the_checkpoint(tmp_path, capfd, saved_run, change, named):
    """In process (UserError); the CLI prints a UserError as one `error:` line with exit 2
    (tests/test_reliability.py, e.g. the model-shape case)."""
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    before = _snapshot(workdir)
    capfd.readouterr()
    with pytest.raises(UserError, match="checkpoint step 2") as error:
        trainer.run(tiny_lm(num_steps=4, checkpoint_every=2, **change), str(workdir))
    assert named in str(error.value) and "\n" not in str(error.value)
    assert "warning: skipped" not in capfd.readouterr().err
    assert _snapshot(workdir) == before  # nothing moved, nothing trained
    assert starts(workdir) == [0]


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory):
    """A workdir with a step-2 checkpoint of the tiny LM reading streamed (packed) text."""
    workdir = tmp_path_factory.mktemp("streamed") / "run"
    trainer.run(tiny_lm(num_steps=2, checkpoint_every=2, **{"data.pack_mode": "stream"}), str(workdir))
    return workdir


@pytest.mark.parametrize("change, named", [
    ({"data.num_workers": 1}, "data.num_workers: 0 -> 1"),  # was: grain KeyError, moved to 2.corrupt
    ({"data.seq_len": 16}, "data.seq_len: 32 -> 16"),  # was: resumed silently
    ({"data.document_mask": True}, "data.document_mask: False -> True"),
])
def test_streaming_position_under_other_data_settings_stops(tmp_path, streamed_run, change, named):
    workdir = tmp_path / "run"
    shutil.copytree(streamed_run, workdir)
    before = _snapshot(workdir)
    with pytest.raises(UserError, match="checkpoint step 2 holds a streaming data position") as error:
        trainer.run(tiny_lm(num_steps=4, checkpoint_every=2, **{"data.pack_mode": "stream", **change}),
                    str(workdir))
    assert named in str(error.value)
    assert _snapshot(workdir) == before and starts(workdir) == [0]


def test_streaming_position_saved_by_one_process_is_not_resumed_by_two(tmp_path):
    workdir = tmp_path / "stream"
    stream = {"data.pack_mode": "stream", "checkpoint_every": 2}
    trainer.run(tiny_lm(num_steps=2, **stream), str(workdir))
    before = _snapshot(workdir)
    outs = run_two_processes(workdir, check=False, num_steps=4, **stream)
    for returncode, err in outs:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert returncode == 2 and len(errors) == 1, err[-3000:]
        assert "streaming data position of 1 process(es), this run has 2" in errors[0], errors
    assert _snapshot(workdir) == before
    # The same checkpoint resumes with the process count that saved it.
    trainer.run(tiny_lm(num_steps=4, **stream), str(workdir))
    assert_resumed_at(workdir, 2)


def test_checkpoint_of_another_state_layout_stops_naming_it(tmp_path, saved_run):
    """A checkpoint whose optimizer state holds the same arrays nested differently (as another
    version of the code or of optax would write it) passes the shape checks and fails in the
    restore itself: one line saying the state is laid out differently, nothing moved."""
    import orbax.checkpoint as ocp

    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    state_dir = workdir / "checkpoints" / "2" / "state"
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(state_dir)
        state["opt_state"] = {"nested": state["opt_state"]}
        ckpt.save(workdir / "relaid", state)
    shutil.rmtree(state_dir)
    os.rename(workdir / "relaid", state_dir)
    before = _snapshot(workdir)
    with pytest.raises(UserError, match="checkpoint step 2: its train state is laid out differently"):
        trainer.run(tiny_lm(num_steps=4, checkpoint_every=2), str(workdir))
    assert _snapshot(workdir) == before and starts(workdir) == [0]
