"""Orbax checkpoints of the train state, the data-iterator state and run metadata.

    workdir/checkpoints/<step>/{state,data,meta}

Saves are asynchronous (`CheckpointManager`), every `checkpoint_every` steps, keeping the
newest `keep_checkpoints`; a step directory only appears once its save has committed, so
a crash mid-save leaves the previous checkpoints intact. Restore targets carry the current
mesh's shardings, so a checkpoint written on one mesh resumes on another.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from train.data import StepIterator


class Checkpointer:
    def __init__(self, directory: str, every: int, keep: int, *, async_save: bool = True):
        self.directory = os.path.abspath(directory) if "://" not in directory else directory
        self.every = max(int(every), 1)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=self.every,
            max_to_keep=int(keep) if keep else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter, meta: dict, *, force: bool = False) -> bool:
        """Starts an async save if `step` is on the interval (or `force`); True if started.

        The data iterator's state goes through grain's orbax handler (one file per process).
        """
        if not (force or step % self.every == 0):
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state, data_iter) -> Any:
        """Restores the state (in `abstract_state`'s shardings) and positions `data_iter`.

        Map-style input (`StepIterator`) is a pure function of the step, so it is simply
        moved to the restored step: this also works after a change of process count.
        Streaming input restores grain's per-process iterator state.
        """
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if not isinstance(data_iter, StepIterator):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if isinstance(data_iter, StepIterator):
            data_iter.set_state({"step": int(restored.state.step)})
        return restored.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

