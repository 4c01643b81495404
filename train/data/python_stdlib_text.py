"""TFDS builder: the running interpreter's standard-library source as a text corpus.

One example per ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (sorted relative
paths; ``site-packages``, test directories and non-UTF-8 files skipped), features
``text`` (the file contents) and ``path`` (POSIX path relative to the stdlib root). A file
goes to ``validation`` when the first 8 bytes of ``sha256(path)`` modulo 100 are < 2
(about 2%), otherwise to ``train``. The content depends on the interpreter, so the only
builder config is named after it (e.g. ``cpython3_11_7``) and lands in its own directory.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig

import tensorflow_datasets as tfds
from etils import epath

EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
VALIDATION_PERCENT = 2


def interpreter_tag() -> str:
    v = sys.version_info
    return f"{sys.implementation.name}{v.major}_{v.minor}_{v.micro}"


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def split_of(rel_path: str) -> str:
    h = int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big")
    return "validation" if h % 100 < VALIDATION_PERCENT else "train"


def stdlib_files(root: str | None = None) -> list[tuple[str, str]]:
    """Sorted (relative POSIX path, text) of every UTF-8 ``*.py`` file in the corpus."""
    root = root or stdlib_root()
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                rels.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    out = []
    for rel in sorted(rels):
        try:
            with open(os.path.join(root, rel), "rb") as fh:
                text = fh.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out.append((rel, text))
    return out


class PythonStdlibText(tfds.core.GeneratorBasedBuilder):
    """Source text of the running Python's standard library, one file per example."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: *.py files, ~98/2 split by path hash."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name=interpreter_tag(),
            description=f"Standard library of {platform.python_implementation()} "
            f"{platform.python_version()}.",
        )
    ]
    code_path = epath.Path(__file__)
    pkg_dir_path = epath.Path(__file__).parent

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "Every *.py file of the running interpreter's standard library "
                f"({platform.python_implementation()} {platform.python_version()} at build "
                "time; content depends on the interpreter version), excluding site-packages "
                "and test directories. Features: text (file contents), path (relative). "
                "Split: validation if sha256(path)[:8] % 100 < 2, else train."
            ),
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
            homepage="https://docs.python.org/3/library/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Reads local files only.
        files = stdlib_files()
        by_split = {"train": [], "validation": []}
        for rel, text in files:
            by_split[split_of(rel)].append((rel, text))
        return {name: self._generate_examples(items) for name, items in by_split.items()}

    def _generate_examples(self, items):
        for rel, text in items:
            yield rel, {"text": text, "path": rel}
