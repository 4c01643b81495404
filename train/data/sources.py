"""Where examples come from: `dataset_builder`, one code path for embedded and real TFDS datasets.

Embedded datasets (``digits``, ``python_stdlib_text``) are TFDS ``GeneratorBasedBuilder``s
built from local files into ``data_dir`` (default ``~/.cache/lion_tpu/tensorflow_datasets``)
as ``array_record`` on first use, in a few seconds. Any other name goes through
``tfds.builder(name, data_dir=...)`` and must already be prepared in ``array_record``
format: nothing is ever downloaded, a missing dataset raises `DataError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os

import tensorflow_datasets as tfds

from train.data.digits import Digits
from train.data.python_stdlib_text import PythonStdlibText
from train.errors import UserError

DEFAULT_DATA_DIR = "~/.cache/lion_tpu/tensorflow_datasets"
EMBEDDED_DATASETS = {"digits": Digits, "python_stdlib_text": PythonStdlibText}

class DataError(UserError):
    """A dataset is missing or unusable; the message is one line naming it and data_dir."""


def _is_local(path: str) -> bool:
    return "://" not in path


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive advisory lock (fcntl) on a local file; no-op for remote paths."""
    if not _is_local(path):
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dataset_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Returns a prepared builder for `name`, building embedded datasets if missing.

    Embedded: idempotent and safe when several processes start at once (a file lock in
    data_dir serializes the build; TFDS itself writes into a temporary directory and
    renames it into place). Real TFDS datasets: never downloads; raises `DataError` if
    the data is not in data_dir (``None`` = TFDS's default, ``$TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets``).
    """
    with _quiet_tfds():
        if name in EMBEDDED_DATASETS:
            return _prepare_embedded(EMBEDDED_DATASETS[name], name, os.path.expanduser(data_dir or DEFAULT_DATA_DIR))
        return _prepare_tfds(name, data_dir)


@contextlib.contextmanager
def _quiet_tfds():
    """Keeps TFDS's console lines about local data off the console: "Downloading and preparing
    dataset Unknown size ..." (printed to stdout, for data that is never downloaded) and absl
    warnings about a version folder without dataset_info.json (one being written)."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logger.setLevel(level)


def _prepare_embedded(cls, name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    builder = cls(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    with file_lock(os.path.join(data_dir, f".{name}.lock")):
        builder = cls(data_dir=data_dir)  # Re-read: another process may have built it.
        if not builder.is_prepared():
            bars = getattr(tfds.core.utils.tqdm_utils, "_active", True)
            tfds.display_progress_bar(False)  # A second-long build needs no bars.
            try:
                builder.download_and_prepare(
                    file_format="array_record",
                    download_dir=os.path.join(data_dir, "downloads"),
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False),
                )
            finally:
                tfds.display_progress_bar(bars)
            builder = cls(data_dir=data_dir)
    return builder


def _prepare_tfds(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    where = data_dir if data_dir is not None else os.path.expanduser(tfds.core.constants.DATA_DIR)
    hint = f"prepare it offline, e.g. `tfds build {name} --file_format=array_record`"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"dataset {name!r} not found in data_dir={where!r}: it is neither a TFDS "
            f"builder nor prepared there; this code never downloads data, {hint}"
        ) from None
    if not builder.is_prepared():
        raise DataError(
            f"dataset {name!r} is not prepared in data_dir={where!r} (looked in "
            f"{builder.data_dir}); this code never downloads data, {hint}"
        )
    return builder


def data_source(builder: tfds.core.DatasetBuilder, split: str):
    """``builder.as_data_source(split)``, turning format/split problems into DataError."""
    try:
        return builder.as_data_source(split=split)
    except (NotImplementedError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"dataset {builder.name!r} split {split!r} in {builder.data_dir} is not "
            f"readable as an array_record data source: {first}"
        ) from None
