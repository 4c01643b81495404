"""absl flag parsing that turns every bad flag or config into one `error:` line + exit 2."""

from __future__ import annotations

import difflib
import os
import sys

from absl import flags


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def _config_without_overrides(argv: list[str]):
    """The `--config=FILE[:ARG]` config loaded by config_flags without the overrides (a
    private FlagValues holding only that flag), or None if that fails too."""
    from ml_collections import config_flags

    spec = [a for a in argv if a.startswith("--config=")]
    if not spec:
        return None
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    saved, sys.argv = sys.argv, [argv[0], spec[-1]]  # config_flags reads overrides from sys.argv
    try:
        values(sys.argv)
    except Exception:  # noqa: BLE001 - the original error is reported instead
        return None
    finally:
        sys.argv = saved
    return values["config"].value


def unknown_key_message(argv: list[str], config=None) -> str | None:
    """'unknown config key config.a.b (...); did you mean config.a.c?' for the first
    `--config.a.b=...` override whose key the config (`config`, else the `--config` file
    loaded without overrides) does not have; else None."""
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not overrides:
        return None
    config = config if config is not None else _config_without_overrides(argv)
    if config is None:
        return None
    for path in overrides:
        node, walked = config, []
        for part in path.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(["config", *walked])
                close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
                hint = (f"did you mean {where}.{close[0]}?" if close
                        else f"valid keys of {where}: {', '.join(sorted(keys))}")
                return f"unknown config key {where}.{part} (in --config.{path}); {hint}"
            node, walked = node[part], walked + [part]
    return None


def expand_home(value):
    """`~/x` (and `hf:~/x`) with the home directory, as a shell would have done: bash expands
    `~` at the start of a word, not after `--flag=`. Other values are returned as they are."""
    if isinstance(value, str):
        scheme = "hf:" if value.startswith("hf:~") else ""
        if value[len(scheme):].startswith("~"):
            return scheme + os.path.expanduser(value[len(scheme):])
    return value


def _expand_config_paths(node) -> None:
    for key in list(node.keys()):
        value = node[key]
        if hasattr(value, "keys"):
            _expand_config_paths(value)
        elif expand_home(value) is not value:
            node[key] = expand_home(value)


def _expand_flag_paths() -> None:
    """Every string flag and string config value that starts with `~` gets the home directory."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if isinstance(flag.value, str) and flag.value.startswith("~"):
            flag.value = expand_home(flag.value)
        elif hasattr(flag.value, "keys") and hasattr(flag.value, "to_dict"):  # a config_flags ConfigDict
            _expand_config_paths(flag.value)


def command_line_keys(argv: list[str]) -> set[str]:
    """The config keys set on the command line: {'model.num_layers', ...}."""
    return {a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")}


def checkpoint_defines_shape(config, argv: list[str], keep: tuple[str, ...]):
    """With `init_from`, the model keys the preset set (not the command line) give way to the
    checkpoint's shape, with one notice line; the keys in `keep` (how to run the model, not
    its shape) and those set on the command line stay (the task rejects a contradiction)."""
    if not str(config.get("init_from") or ""):
        return config
    user = command_line_keys(argv)
    dropped = [k for k in config.model.keys() if k not in keep and f"model.{k}" not in user]
    if not dropped:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key in dropped:
            del config.model[key]
    print(f"notice: init_from defines the model's shape; the preset's model.{{{','.join(sorted(dropped))}}} "
          "give way to the checkpoint's", file=sys.stderr, flush=True)
    return config


def flags_parser(*required: str, commands: tuple[str, ...] = ()):
    """A `flags_parser` for `absl.app.run` that exits 2 on any parse error (unknown flag,
    unknown or mistyped `--config.key`, a config file raising) or missing `required` flag;
    with `commands`, exactly one positional argument, one of them."""

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
        except Exception as e:  # flags.Error, or whatever a config file's get_config raised
            fail(unknown_key_message(argv) or _one_line(e))
        if commands:
            if len(rest) != 2 or rest[1] not in commands:
                fail(f"expected one command ({' | '.join(commands)}), got {' '.join(rest[1:]) or 'none'}")
            command, rest = rest[1], rest[:1]
        for name in required:
            if flags.FLAGS[name].value in (None, ""):
                fail(f"--{name} is required")
        if len(rest) > 1:
            fail(f"unexpected arguments: {' '.join(rest[1:])}")
        for name in list(flags.FLAGS):  # config_flags reports a config file it could not load here
            try:
                hasattr(flags.FLAGS[name].value, "keys")  # a config that failed to load raises on access
            except Exception as e:  # noqa: BLE001 - a missing file, a folder, a broken get_config
                reason = _one_line(e).split("earlier failure to load: ")[-1].strip()
                fail(f"--{name}: cannot load the config file ({reason})")
        _expand_flag_paths()
        return rest + [command] if commands else rest

    return parse
