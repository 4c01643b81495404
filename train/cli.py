"""absl flag parsing that turns every bad flag or config into one `error:` line + exit 2."""

from __future__ import annotations

import sys

from absl import flags


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def flags_parser(*required: str):
    """A `flags_parser` for `absl.app.run` that exits 2 on any parse error (unknown flag,
    unknown or mistyped `--config.key`, a config file raising) or missing `required` flag."""

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
        except Exception as e:  # flags.Error, or whatever a config file's get_config raised
            fail(_one_line(e))
        for name in required:
            if flags.FLAGS[name].value in (None, ""):
                fail(f"--{name} is required")
        if len(rest) > 1:
            fail(f"unexpected arguments: {' '.join(rest[1:])}")
        return rest

    return parse
