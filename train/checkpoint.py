"""Orbax checkpoints of the train state, the data-iterator state and run metadata.

    workdir/checkpoints/<step>/{state,data,meta}

Saves are asynchronous (`CheckpointManager`), every `checkpoint_every` steps, keeping the
newest `keep_checkpoints`; a step directory only appears once its save has committed (orbax
writes to a temporary directory and renames it), so a crash mid-save leaves the previous
checkpoints intact, and old checkpoints are only deleted after a newer save committed.
Restore targets carry the current mesh's shardings, so a checkpoint written on one mesh
resumes on another.

`restore_latest` walks back from the newest step: a checkpoint that cannot be read
(truncated or missing files) is moved aside to `<step>.corrupt` with one warning line and
the next older one is tried. A checkpoint that reads fine but holds a different model
(shapes) or optimizer is a user error, not damage: it stops the run, naming the parameter.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from train.data import StepIterator
from train.errors import UserError


class Checkpointer:
    def __init__(self, directory: str, every: int, keep: int, *, async_save: bool = True):
        self.directory = os.path.abspath(directory) if "://" not in directory else directory
        self.every = int(every)  # 0: only the final / preemption checkpoint
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the trainer decides (`due`) and forces each save
            max_to_keep=int(keep) if keep else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, step: int, state, data_iter, meta: dict, *, force: bool = False) -> bool:
        """Starts an async save if `step` is on the interval (or `force`); True if started.

        The data iterator's state goes through grain's orbax handler (one file per process).
        """
        if not (force or self.due(step)):
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=True)

    def restore_latest(self, abstract_state, data_iter) -> Any | None:
        """Restores the newest readable checkpoint (see module doc); None if there is none."""
        self.manager.reload()
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = epath.Path(self.directory) / str(step)
            try:
                saved = ocp.StandardCheckpointHandler().metadata(path / "state")
            except Exception as e:  # unreadable metadata: damaged
                self._quarantine(step, e)
                continue
            check_compatible(saved, abstract_state, step)
            try:
                return self.restore(step, abstract_state, data_iter)
            except Exception as e:  # noqa: BLE001 - any read failure means damage
                self._quarantine(step, e)
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        path = epath.Path(self.directory) / str(step)
        if jax.process_index() == 0:
            target = path.parent / f"{step}.corrupt"
            n = 1
            while target.exists():
                target, n = path.parent / f"{step}.corrupt{n}", n + 1
            path.rename(target)
        multihost_utils.sync_global_devices(f"quarantine_{step}")
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        print(f"warning: skipped unreadable checkpoint {path} (moved to {step}.corrupt): {reason}",
              file=sys.stderr, flush=True)
        self.manager.reload()

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



def check_compatible(saved_metadata, abstract_state, step: int) -> None:
    """Raises UserError if checkpoint `step` holds other parameter shapes or optimizer state."""
    tree = getattr(saved_metadata, "item_metadata", saved_metadata)
    saved = {jax.tree_util.keystr(p): leaf for p, leaf in
             jax.tree_util.tree_flatten_with_path(tree.get("params", {}))[0]}
    wanted = {jax.tree_util.keystr(p): leaf for p, leaf in
              jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}
    for name in sorted(set(saved) | set(wanted)):
        if name not in saved:
            raise UserError(f"checkpoint step {step} has no parameter {name}: it was saved by a different model")
        if name not in wanted:
            raise UserError(f"checkpoint step {step} has parameter {name} that this model lacks")
        if tuple(saved[name].shape) != tuple(wanted[name].shape):
            raise UserError(f"checkpoint step {step}: parameter {name} has shape {tuple(saved[name].shape)}, "
                            f"the configured model expects {tuple(wanted[name].shape)}")
    def signature(leaves):
        return sorted((tuple(x.shape), np.dtype(x.dtype).name) for x in leaves)
    if signature(jax.tree.leaves(tree.get("opt_state", {}))) != signature(jax.tree.leaves(abstract_state.opt_state)):
        raise UserError(f"checkpoint step {step}: optimizer state does not match the configured optimizer "
                        "(saved with another optimizer.name or momentum dtype?)")
