"""Orbax checkpoints of the train state, the data-iterator state and run metadata.

    workdir/checkpoints/<step>/{state,data,meta}

Saves are asynchronous (`CheckpointManager`), every `checkpoint_every` steps, keeping the
newest `keep_checkpoints`; a step directory only appears once its save has committed (orbax
writes to a temporary directory and renames it), so a crash mid-save leaves the previous
checkpoints intact, and old checkpoints are only deleted after a newer save committed.
Restore targets carry the current mesh's shardings, so a checkpoint written on one mesh
resumes on another.

Every save records a fingerprint of the state in its metadata (per leaf: the wrapping
uint32 sum of its bit patterns, one jitted reduction on device), and a restore recomputes it:
a flipped bit anywhere in the saved values, which the storage layer itself does not detect,
shows as a mismatch (and a non-finite parameter in a checkpoint without a fingerprint).

`restore_latest` walks back from the newest step: a checkpoint whose files are known to be
damaged (missing or truncated files, undecodable metadata, a fingerprint mismatch) is moved
aside to `<step>.corrupt` with one warning line and the next older one is tried. Any other
failure to read (a permission or object-store error, a data-iterator state that cannot be
restored) stops the run with one line naming the step and the cause, files untouched.

Hyperparameters that keep the state's layout (lr, weight decay, betas, clipping on or off,
schedule, num_steps) resume. A checkpoint that reads fine but does not fit the run (other
parameter shapes, optimizer or momentum dtype; a streaming data position saved by another
process count, pack mode or data settings) is a user error, not damage: it stops the run
with one line naming what differs from the saved config, and the checkpoint stays where it is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from train.data import StepIterator
from train.errors import CheckpointWriteError, UserError


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
        self._pending: int | None = None  # step of the save that may still be in flight
        self._failed = False

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
            meta=ocp.args.JsonSave({**meta, "fingerprint": fingerprint(state)}),
        )
        try:
            self.wait_for_pending()  # a failed async save surfaces here, named by its step
            self._pending = step
            return self.manager.save(step, args=args, force=True)
        except CheckpointWriteError:
            raise
        except Exception as e:  # noqa: BLE001 - disk full, quota, permissions, object store
            self._write_failed(step, e)

    def wait_for_pending(self) -> None:
        """Waits for the in-flight save; CheckpointWriteError if it failed."""
        if self._pending is None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._write_failed(self._pending, e)
        self._pending = None

    def _write_failed(self, step: int, error: BaseException) -> None:
        """Removes the partial save, then raises one CheckpointWriteError naming the cause."""
        self._failed, self._pending = True, None
        # orbax's writer tasks that died with this error are logged by asyncio ("Task exception
        # was never retrieved", a traceback) whenever they are collected, after our one line,
        # and the writes they never started warn "coroutine ... was never awaited" at exit.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        try:  # joins orbax's background threads, so nothing writes into the partial save
            self.manager.close()
        except Exception:  # noqa: BLE001 - the error being reported
            pass
        if jax.process_index() == 0:  # writer threads may still be finishing: until 1 s is quiet
            quiet = 0
            for _ in range(200):
                leftovers = list(epath.Path(self.directory).glob("*.orbax-checkpoint-tmp*"))
                quiet = 0 if leftovers else quiet + 1
                if quiet >= 10:
                    break
                for tmp in leftovers:
                    try:
                        tmp.rmtree()
                    except OSError:
                        pass
                time.sleep(0.1)
        steps = [int(p.name) for p in epath.Path(self.directory).iterdir() if p.name.isdigit()]
        cause = error
        while not isinstance(cause, OSError) and (cause.__cause__ or cause.__context__) is not None:
            cause = cause.__cause__ or cause.__context__
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        code = re.search(r"os_error_code='?(\d+)", str(cause))  # tensorstore's spelling of errno
        if isinstance(cause, OSError) and cause.errno:
            reason = f"{os.strerror(cause.errno)} (errno {cause.errno})"
        elif code:
            reason = f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
        newest = max(steps, default=None)
        kept = f"the newest checkpoint, step {newest}, is intact" if newest is not None else "no checkpoint was kept"
        raise CheckpointWriteError(f"could not write checkpoint step {step} to {self.directory}: {reason}; "
                                   f"stopped, {kept} (rerun the same command to resume)") from None

    def restore_latest(self, abstract_state, data_iter, config: dict | None = None) -> Any | None:
        """Restores the newest readable checkpoint (see module doc); None if there is none.

        `config` (the run's config as a dict) names what differs when the checkpoint does
        not fit this run: that raises UserError and leaves the checkpoint where it is, and
        so does any read failure that is not known damage (CheckpointReadError).
        """
        self.manager.reload()
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = epath.Path(self.directory) / str(step)
            try:
                saved = ocp.StandardCheckpointHandler().metadata(path / "state")
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception as e:  # noqa: BLE001 - classified below
                self._damaged_or_raise(step, e)
                continue
            check_compatible(saved, abstract_state, step, (meta or {}).get("config"), config)
            check_data_state(meta or {}, data_iter, step, config)
            try:
                state = self.restore(step, abstract_state, data_iter)
                verify(state, (meta or {}).get("fingerprint"), step)
                return state
            except Exception as e:  # noqa: BLE001 - classified below
                if "tree structure" in str(e).lower():  # readable, but another state layout
                    what = _differs((meta or {}).get("config"), config, ("optimizer.", "model."),
                                    "saved by another optimizer or model")
                    raise UserError(f"checkpoint step {step}: its train state is laid out differently "
                                    f"({what}); resume with the saved settings or use a new workdir") from None
                self._damaged_or_raise(step, e)
        return None

    def _damaged_or_raise(self, step: int, error: Exception) -> None:
        """Moves checkpoint `step` aside if `error` says its files are damaged; otherwise
        raises it (our own UserErrors, out of memory) or a CheckpointReadError naming it."""
        if isinstance(error, (UserError, MemoryError)) or "RESOURCE_EXHAUSTED" in str(error):
            raise error
        if not is_damage(error):
            raise CheckpointReadError(
                f"could not read checkpoint step {step} in {self.directory}: {_reason(error)}; "
                "nothing was moved or deleted (rerun once the cause is fixed)") from None
        self._quarantine(step, error)

    def _quarantine(self, step: int, error: Exception) -> None:
        path = epath.Path(self.directory) / str(step)
        if jax.process_index() == 0:
            target = path.parent / f"{step}.corrupt"
            n = 1
            while target.exists():
                target, n = path.parent / f"{step}.corrupt{n}", n + 1
            path.rename(target)
        multihost_utils.sync_global_devices(f"quarantine_{step}")
        print(f"warning: skipped unreadable checkpoint {path} (moved to {step}.corrupt): {_reason(error)}",
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
        self.wait_for_pending()

    def close(self) -> None:
        """Waits for the in-flight save (CheckpointWriteError if it failed) and closes."""
        try:
            if not self._failed:
                self.wait_for_pending()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - only after a failed save, already reported
                if not self._failed:
                    raise



class CheckpointDamage(Exception):
    """A checkpoint read back without error holds other values than were saved."""


class CheckpointReadError(UserError):
    """A checkpoint could not be read for a reason that says nothing about its files
    (permissions, an object store, an iterator state that does not restore): exit 2."""


# tensorstore status codes of files that are missing, cut short or do not decode.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")


def is_damage(error: BaseException) -> bool:
    """True for errors known to mean a checkpoint's files are damaged: missing or truncated
    files, metadata that does not decode, a fingerprint mismatch. Permission, network and
    other errors are not: they may pass, and the checkpoint may be good."""
    if isinstance(error, (CheckpointDamage, FileNotFoundError, json.JSONDecodeError)):
        return True
    if isinstance(error, OSError):  # permissions, timeouts, a full or unmounted disk
        return False
    return isinstance(error, ValueError) and str(error).startswith(_DAMAGE_CODES)


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _leaf_bits(x: jax.Array) -> jax.Array:
    """`x`'s bit patterns as uint32 (each element zero-extended from its own width)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _leaf_sums(leaves):
    return jnp.stack([jnp.sum(_leaf_bits(x), dtype=jnp.uint32) for x in leaves])


def fingerprint(state) -> dict[str, list]:
    """{leaf path: [dtype name, wrapping uint32 sum of its bit patterns]}: any single
    flipped bit changes its leaf's sum; the sum does not depend on the sharding."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
    sums = np.asarray(jax.device_get(_leaf_sums(list(leaves))))
    return {jax.tree_util.keystr(p): [np.dtype(x.dtype).name, int(v)]
            for p, x, v in zip(paths, leaves, sums)}


def verify(state, saved: dict | None, step: int) -> None:
    """Raises CheckpointDamage if the restored `state` differs from the `saved` fingerprint
    (leaves restored in another dtype are not compared), or, for a checkpoint saved without
    one, if a parameter is not finite (a run never saves non-finite parameters)."""
    if saved:
        for name, (dtype, value) in fingerprint(state).items():
            if name in saved and saved[name][0] == dtype and saved[name][1] != value:
                raise CheckpointDamage(f"checkpoint step {step}: {name} does not match the "
                                       "fingerprint saved with it (the data files were altered)")
    elif not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params)):
        raise CheckpointDamage(f"checkpoint step {step}: restored parameters are not finite")


def config_diff(saved: dict | None, current: dict | None, prefixes: tuple[str, ...]) -> list[str]:
    """`key: saved -> current` for the flattened config keys under `prefixes` that differ."""
    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    a, b = flat(saved), flat(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k.startswith(prefixes) and a.get(k) != b.get(k)]


# Config keys that change the optimizer state's layout: named first when it does not fit.
LAYOUT_KEYS = ("optimizer.name", "optimizer.lion.mu_dtype", "optimizer.lion.block_size",
               "optimizer.lion.distributed", "optimizer.adamw.mu_dtype", "optimizer.adafactor.")


def _differs(saved_config, config, prefixes, fallback: str) -> str:
    """'saved with key: old -> new; ...' for the keys that changed (layout keys first)."""
    if saved_config is None or not config:
        return fallback
    diff = (config_diff(saved_config, config, tuple(k for k in LAYOUT_KEYS if k.startswith(prefixes)))
            or config_diff(saved_config, config, prefixes))
    return f"saved with {'; '.join(diff[:4])}" if diff else fallback


def check_compatible(saved_metadata, abstract_state, step: int, saved_config: dict | None = None,
                     config: dict | None = None) -> None:
    """Raises UserError if checkpoint `step` holds other parameter shapes or optimizer state,
    naming the parameter and the config keys that differ from the saved run's."""
    tree = getattr(saved_metadata, "item_metadata", saved_metadata)
    saved = {jax.tree_util.keystr(p): leaf for p, leaf in
             jax.tree_util.tree_flatten_with_path(tree.get("params", {}))[0]}
    wanted = {jax.tree_util.keystr(p): leaf for p, leaf in
              jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}
    model = _differs(saved_config, config, ("model.",), "saved by a different model")
    for name in sorted(set(saved) | set(wanted)):
        if name not in saved:
            raise UserError(f"checkpoint step {step} has no parameter {name} ({model})")
        if name not in wanted:
            raise UserError(f"checkpoint step {step} has parameter {name} that this model lacks ({model})")
        if tuple(saved[name].shape) != tuple(wanted[name].shape):
            raise UserError(f"checkpoint step {step}: parameter {name} has shape {tuple(saved[name].shape)}, "
                            f"the configured model expects {tuple(wanted[name].shape)} ({model})")

    def signature(leaves):
        return [(tuple(x.shape), np.dtype(x.dtype).name) for x in leaves]
    saved_opt = jax.tree.leaves(tree.get("opt_state", {}))
    if sorted(signature(saved_opt)) != sorted(signature(jax.tree.leaves(abstract_state.opt_state))):
        what = _differs(saved_config, config, ("optimizer.",), "saved with another optimizer.name, "
                        "momentum dtype or layout")
        raise UserError(f"checkpoint step {step}: its optimizer state does not fit the configured "
                        f"optimizer ({what}); resume with the saved settings or use a new workdir")


# What a streaming data position depends on: the documents, their order and tokenization,
# how they are packed, and grain's per-worker iterator state.
STREAM_POSITION_KEYS = ("data.name", "data.train_split", "data.text_key", "data.tokenizer", "data.add_bos",
                        "data.seq_len", "data.document_mask", "data.num_workers", "seed")


def check_data_state(meta: dict, data_iter, step: int, config: dict | None = None) -> None:
    """Raises UserError if checkpoint `step`'s data-iterator state cannot position
    `data_iter`: a streaming iterator's state is per process, so it needs the same kind of
    iterator and the same process count (map-style input is positioned by the step)."""
    kind = "step" if isinstance(data_iter, StepIterator) else "stream"
    saved_kind = meta.get("data_iterator")
    if saved_kind is not None and saved_kind != kind:
        what = _differs(meta.get("config"), config, ("data.",), f"a {saved_kind} data iterator")
        raise UserError(f"checkpoint step {step} holds the state of a {saved_kind} data iterator, this "
                        f"run reads {kind} data ({what}); resume with the saved data settings")
    if kind == "stream":
        changed = config_diff(meta.get("config"), config, STREAM_POSITION_KEYS) if meta.get("config") and config else []
        if changed:
            raise UserError(f"checkpoint step {step} holds a streaming data position that means nothing "
                            f"under the new data settings ({'; '.join(changed[:4])}): resume with the saved "
                            "settings, or use data.pack_mode=cache (positioned by the step)")
    saved_procs = meta.get("process_count")
    if kind == "stream" and saved_procs is not None and saved_procs != jax.process_count():
        raise UserError(f"checkpoint step {step} holds the streaming data position of {saved_procs} "
                        f"process(es), this run has {jax.process_count()}: resume with {saved_procs}, "
                        "or use data.pack_mode=cache (positioned by the step on any process count)")
