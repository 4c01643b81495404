"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class UserError(ValueError):
    """Bad configuration or input, detected before anything expensive happens."""


class ConfigError(UserError):
    """Invalid config value (mesh, batch size, optimizer, ...)."""


class TrainingHalted(Exception):
    """Training stopped on purpose (e.g. non-finite loss with on_nonfinite=halt); exit 3."""

    exit_code = 3


class CheckpointWriteError(TrainingHalted):
    """A checkpoint could not be written (disk full, quota, permissions); exit 4. The
    partial save is removed and older checkpoints are intact."""

    exit_code = 4
