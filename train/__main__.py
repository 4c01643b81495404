"""`python -m train --config=configs/<file>.py:<variant> --workdir=DIR [--config.key=value ...]`

Trains (or resumes) per the config. Exit codes: 0 done (or preempted and checkpointed);
2 bad flags, config or input, one `error:` line, before anything is compiled or the workdir
is touched (or a checkpoint that does not fit the config, left untouched); 3 halted on a
non-finite step with `on_nonfinite=halt`; 130 Ctrl-C outside the training loop (during
training, Ctrl-C saves like SIGTERM and exits 0; a second one exits 130 at once); 4 a checkpoint could not be written (disk full:
the partial save is removed, older checkpoints are intact).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import cli
from train.errors import TrainingHalted, UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config: configs/<file>.py:<variant>.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs off TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")


def _quiet_orbax_failures() -> None:
    """A failed checkpoint write makes orbax's background threads log the same error many
    times over, and asyncio callbacks fail as its event loop closes; the trainer reports
    every checkpoint failure itself as one line (`error:` or `warning: skipped`), so those
    repeats are kept off the console."""
    import threading

    def drop_orbax_errors(record):
        return record.levelno < logging.ERROR or "orbax" not in record.pathname

    logging.get_absl_handler().addFilter(drop_orbax_errors)

    def loop_closed(exc) -> bool:
        return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)

    unraisable, thread_hook = sys.unraisablehook, threading.excepthook
    sys.unraisablehook = lambda u: None if loop_closed(u.exc_value) else unraisable(u)
    threading.excepthook = lambda a: None if loop_closed(a.exc_value) else thread_hook(a)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # keep orbax/grain INFO chatter off the console
    _quiet_orbax_failures()
    from train import multihost, trainer

    multihost.skip_tpu_probe_without_chips()
    try:
        multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        from train.tasks import LanguageModeling

        config = cli.checkpoint_defines_shape(_CONFIG.value, sys.argv, ("family", *LanguageModeling.HOW_TO_RUN))
        trainer.run(config, _WORKDIR.value)
    except UserError as e:
        cli.fail(str(e))
    except TrainingHalted as e:
        cli.fail(str(e), code=e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves on it)
        print("interrupted: exiting (committed checkpoints are kept)", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("config", "workdir"))
