"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class UserError(ValueError):
    """Bad configuration or input, detected before anything expensive happens."""


class ConfigError(UserError):
    """Invalid config value (mesh, batch size, optimizer, ...)."""
