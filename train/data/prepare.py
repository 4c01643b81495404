"""Your own files as a TFDS dataset the trainer reads: a text corpus or a folder of images.

    python -m train.data.prepare --input='corpus/**/*.jsonl.gz' --name=my_corpus --data_dir=~/data
    python -m train.data.prepare --input=photos/ --name=my_photos --data_dir=~/data --kind=image
    python -m train --config=configs/lm.py:demo --workdir=W \
        --config.data.name=my_corpus --config.data.data_dir=~/data [--config.data.tokenizer=PATH]

Text (`--kind=text`, the default): `*.jsonl` / `*.json` (one JSON record per line, the text in
field `--text_key`), `*.parquet` (column `--text_key`), and any other file as one document
(`*.txt`, `*.md`, source code, ...); each may be gzip (`.gz`) or zstd (`.zst`) compressed.
Image (`--kind=image`): a folder with one subfolder per class of PNG / JPEG files ->
`{image, label}`, the class names (sorted subfolder names) in the label feature.

The output is `DATA_DIR/NAME/1.0.0/` as TFDS writes it: array_record shards, and
`dataset_info.json` with the features and split counts, readable by `tfds.builder(NAME,
data_dir=DATA_DIR)` and `tfds.data_source` without this code. TFDS writes into a temporary
directory and renames it into place, so an interrupted run leaves no half dataset; running
the same command on a finished dataset is a no-op, on a dataset made from other input an
error (the input's fingerprint hashes every file's content, so an edited file of the same
size is other input). Deterministic: a record's key is its file (relative to the input root) and index in
the file, and it goes to `validation` when a hash of the key falls below
`--validation_fraction`, so the same input gives the same records and split whatever the
file order or the number of workers (`--num_workers` processes read and check the files).

Bad input: documents that are not UTF-8 (a whole file, or one JSON line: the rest of the file
is kept), JSON lines that do not parse or lack the key, and images that do not decode are
skipped and counted in one `warning:` line; empty and whitespace-only documents are dropped
(`--on_bad_input=stop`: the first one is an `error:`); an input that yields nothing, TFRecord
files (they need TensorFlow: convert them with `tfds build NAME --file_format=array_record`)
and an existing dataset of other content are one `error:` line, exit 2.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time

from absl import app, flags, logging

from train import cli
from train.errors import UserError

KINDS = ("text", "image")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


class BadInput(UserError):
    """Input that cannot be used, found while writing: TFDS then removes its temporary output."""


# ------------------------------------------------------------------------- reading inputs
def find_files(pattern: str, kind: str) -> tuple[str, list[str]]:
    """(root, sorted files) of a glob or a directory (walked recursively)."""
    path = os.path.expanduser(pattern)
    if os.path.isdir(path):
        root = path
        files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if not f.startswith(".")]
    else:
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
        root = os.path.commonpath([os.path.dirname(f) for f in files]) if files else os.path.dirname(path)
    if kind == "image":
        files = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise UserError(f"--input={pattern} matches no {'image ' if kind == 'image' else ''}files")
    return root, sorted(files)


def _open(path: str):
    suffix = os.path.splitext(path)[1].lower()
    if _COMPRESSED.get(suffix) == "gzip":
        return gzip.open(path, "rb")
    if _COMPRESSED.get(suffix) == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _format(path: str) -> str:
    name = path.lower()
    if os.path.splitext(name)[1] in _COMPRESSED:
        name = os.path.splitext(name)[0]
    if ".tfrecord" in name or name.endswith(".riegeli"):
        return "tfrecord"
    ext = os.path.splitext(name)[1]
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(ext, "document")


def read_texts(path: str, text_key: str) -> tuple[list[str], list[str]]:
    """(documents of one file, problems found in it: one message each). JSON lines are read
    a line at a time (a file's documents are all it holds in memory), and a line that is not
    UTF-8 or not a JSON record with the key is one problem, not the whole file; empty and
    whitespace-only documents are dropped in every format."""
    kind = _format(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=[text_key])
        except Exception as e:  # noqa: BLE001 - missing column, not parquet
            return [], [f"{path}: not readable as parquet with column {text_key!r} ({str(e).splitlines()[0][:120]})"]
        return [t for t in table.column(text_key).to_pylist() if t and t.strip()], []
    docs, problems = [], []
    try:
        with _open(path) as f:
            if kind == "document":
                try:
                    text = f.read().decode("utf-8")
                except UnicodeDecodeError as e:
                    return [], [f"{path}: not UTF-8 (byte {e.start})"]
                return ([text] if text.strip() else []), []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except UnicodeDecodeError as e:
                    problems.append(f"{path}:{n}: not UTF-8 (byte {e.start} of the line)")
                    continue
                except json.JSONDecodeError:
                    problems.append(f"{path}:{n}: not a JSON record")
                    continue
                value = record.get(text_key) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    problems.append(f"{path}:{n}: no string field {text_key!r}")
                elif value.strip():
                    docs.append(value)
    except (OSError, EOFError) as e:
        return docs, problems + [f"{path}: {e}"]
    return docs, problems


def read_image(path: str) -> tuple[bytes | None, list[str]]:
    """(PNG/JPEG bytes in RGB, problems): other modes are converted to RGB PNG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode == "RGB" and image.format in ("PNG", "JPEG"):
                return data, []
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG")
            return out.getvalue(), []
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return None, [f"{path}: not a readable PNG or JPEG image ({type(e).__name__})"]


def _read_one(args):
    kind, path, text_key = args
    if kind == "image":
        data, problems = read_image(path)
        return ([data] if data is not None else []), problems
    return read_texts(path, text_key)


# ------------------------------------------------------------------------------ the builder
def key_hash(key: str) -> float:
    """A record key's place in [0, 1): below `validation_fraction` means validation."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(root: str, files: list[str], options: dict, num_workers: int = 1) -> str:
    """What the dataset is made of: each file's name and content (sha256, read in
    `num_workers` threads) and the options. An edited file changes it, whatever its size."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    with concurrent.futures.ThreadPoolExecutor(max(2, num_workers)) as pool:
        for f, digest in zip(files, pool.map(_file_digest, files)):
            h.update(f"{os.path.relpath(f, root)}\0{digest}\0".encode())
    return h.hexdigest()[:16]


def make_builder(name: str, data_dir: str, kind: str, root: str, files: list[str], *, text_key: str,
                 validation_fraction: float, num_workers: int, stop_on_bad: bool, stats: dict):
    """A TFDS GeneratorBasedBuilder (not registered) that writes `files` as dataset `name`."""
    import tensorflow_datasets as tfds
    from etils import epath

    classes = sorted({os.path.relpath(f, root).split(os.sep)[0] for f in files}) if kind == "image" else []
    if kind == "image" and any(os.sep not in os.path.relpath(f, root) for f in files):
        raise UserError(f"--input={root}: images must sit in one subfolder per class (found images "
                        "directly in the folder)")
    options = dict(kind=kind, text_key=text_key, validation_fraction=validation_fraction)
    description = (f"Prepared by `python -m train.data.prepare` from {len(files)} files under {root} "
                   f"(fingerprint {fingerprint(root, files, options, num_workers)}).")

    def read_all():
        """(split, key, example) of every record, reading each file once, in file order."""
        jobs = [(kind, f, text_key) for f in files]
        spawn = multiprocessing.get_context("spawn")  # no fork of a process with threads
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=spawn) as pool:
            chunk = max(1, len(jobs) // (16 * num_workers))  # files to a worker at a time
            results = pool.map(_read_one, jobs, chunksize=chunk) if num_workers > 1 else map(_read_one, jobs)
            for path, (items, problems) in zip(files, _progress(results, len(files))):
                if problems and stop_on_bad:
                    raise BadInput(f"{problems[0]} (--on_bad_input=stop)")
                stats["bad"] += problems
                rel = os.path.relpath(path, root)
                for i, item in enumerate(items):
                    key = f"{rel}#{i}"
                    stats["bytes"] += len(item.encode() if isinstance(item, str) else item)
                    stats["records"] += 1
                    if kind == "image":
                        example = {"image": io.BytesIO(item), "label": classes.index(rel.split(os.sep)[0])}
                    else:
                        example = {"text": item}
                    yield key_hash(key), key, example
        if not stats["bytes"]:
            raise BadInput(f"--input={root}: no {'images' if kind == 'image' else 'documents'} in "
                           f"{len(files)} files" + (f" ({problems_note(stats['bad'])})" if stats["bad"] else ""))

    held: list | None = None  # the validation records, kept while the train split is written

    def examples(split: str):
        """Train: every record whose key hashes at or above the fraction, except that the
        lowest-hashing one is held back until the end and goes to validation if nothing
        else does (a small input still gets a validation split; nothing else depends on
        the order of reading). Validation: the records held."""
        nonlocal held
        if split == "train" or held is None:
            held, lowest = [], None
            for record in read_all():  # (hash, key, example)
                if record[0] < validation_fraction:
                    held.append(record[1:])
                    continue
                if validation_fraction > 0 and (lowest is None or record[0] < lowest[0]):
                    record, lowest = lowest, record  # hold the new lowest back, release the old
                if record is not None and split == "train":
                    yield record[1:]
            if lowest is not None and not held:
                held.append(lowest[1:])
            elif lowest is not None and split == "train":
                yield lowest[1:]
            stats["train"], stats["validation"] = stats["records"] - len(held), len(held)
        if split == "validation":
            yield from held

    if kind == "image":
        features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                               "label": tfds.features.ClassLabel(names=classes)})
    else:
        features = tfds.features.FeaturesDict({"text": tfds.features.Text()})

    class Prepared(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        code_path = epath.Path(__file__)
        pkg_dir_path = epath.Path(__file__).parent

        def _info(self):
            return self.dataset_info_from_configs(description=description, features=features)

        def _split_generators(self, dl_manager):
            del dl_manager
            splits = {"train": self._generate_examples("train")}
            if validation_fraction > 0:
                splits["validation"] = self._generate_examples("validation")
            return splits

        def _generate_examples(self, split):
            return examples(split)

    Prepared.name = name
    return Prepared(data_dir=data_dir), description


def problems_note(problems: list[str]) -> str:
    return f"{len(problems)} unusable, e.g. {problems[0]}"


def _progress(results, total: int):
    from tqdm import tqdm

    return tqdm(results, total=total, desc="reading", unit="file", disable=not sys.stderr.isatty(), leave=False)


def prepare(input_pattern: str, name: str, data_dir: str, *, kind: str = "text", text_key: str = "text",
            validation_fraction: float = 0.01, num_workers: int = 1, on_bad_input: str = "skip") -> dict:
    """Writes dataset `name` under `data_dir` (see the module doc); returns a summary dict."""
    import tensorflow_datasets as tfds

    if kind not in KINDS:
        raise UserError(f"--kind must be one of {KINDS}, got {kind!r}")
    if on_bad_input not in ("skip", "stop"):
        raise UserError(f"--on_bad_input must be skip or stop, got {on_bad_input!r}")
    if not 0 <= validation_fraction < 1:
        raise UserError(f"--validation_fraction must be in [0, 1), got {validation_fraction}")
    if not name or not name.isidentifier() or name != name.lower():
        raise UserError(f"--name must be a lower-case Python identifier (TFDS names), got {name!r}")
    data_dir = os.path.expanduser(data_dir)
    root, files = find_files(input_pattern, kind)
    tfrecords = [f for f in files if _format(f) == "tfrecord"]
    if kind == "text" and tfrecords:
        raise UserError(f"{tfrecords[0]}: TFRecord input needs TensorFlow; convert the dataset with "
                        "`tfds build NAME --file_format=array_record` (or export it to jsonl/parquet)")
    stats = {"train": 0, "validation": 0, "records": 0, "bytes": 0, "bad": []}
    builder, description = make_builder(
        name, data_dir, kind, root, files, text_key=text_key, validation_fraction=validation_fraction,
        num_workers=max(1, int(num_workers)), stop_on_bad=on_bad_input == "stop", stats=stats)
    summary = {"name": name, "data_dir": data_dir, "files": len(files), "kind": kind}
    if builder.is_prepared():
        with open(os.path.join(builder.data_dir, "dataset_info.json")) as f:
            saved = json.load(f).get("description")
        if saved != description:
            raise UserError(f"{builder.data_dir} already holds a dataset {name!r} made from other input "
                            "or options; use another --name or --data_dir, or remove it")
        info = builder.info.splits
        return {**summary, "train": info["train"].num_examples,
                "validation": info["validation"].num_examples if "validation" in info else 0,
                "already_prepared": True}
    start = time.perf_counter()
    bars = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    tfds.display_progress_bar(sys.stderr.isatty())
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints two lines of its own
            builder.download_and_prepare(
                file_format="array_record", download_dir=os.path.join(data_dir, "downloads"),
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except (UserError, OSError) as e:  # TFDS has removed its temporary directory
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(builder.data_dir))  # NAME/, if nothing else is in it
        if isinstance(e, UserError):
            raise UserError(f"{e}; nothing was written") from None
        raise UserError(f"could not write {builder.data_dir}: {e}") from None
    finally:
        tfds.display_progress_bar(bars)
    seconds = time.perf_counter() - start
    return {**summary, "train": stats["train"], "validation": stats["validation"],
            "classes": builder.info.features["label"].num_classes if kind == "image" else None,
            "skipped": stats["bad"], "seconds": seconds, "mb_per_second": stats["bytes"] / 1e6 / seconds}


_INPUT = flags.DEFINE_string("input", None, "A file glob (`**` recurses) or a directory.")
_NAME = flags.DEFINE_string("name", None, "Dataset name (then --config.data.name=NAME).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where to write it (then --config.data.data_dir=DIR).")
_KIND = flags.DEFINE_string("kind", "text", "text | image.")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "JSON field / parquet column holding the text.")
_VALIDATION = flags.DEFINE_float("validation_fraction", 0.01, "Share of records in the validation split.")
_WORKERS = flags.DEFINE_integer("num_workers", 1, "Processes reading and checking the input files.")
_ON_BAD = flags.DEFINE_string("on_bad_input", "skip", "skip (count them) | stop (error on the first).")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.ERROR)  # TFDS logs every shard it writes, and its checks
    try:
        s = prepare(_INPUT.value, _NAME.value, _DATA_DIR.value, kind=_KIND.value, text_key=_TEXT_KEY.value,
                    validation_fraction=_VALIDATION.value, num_workers=_WORKERS.value,
                    on_bad_input=_ON_BAD.value)
    except UserError as e:
        cli.fail(str(e))
    unit = "images" if s["kind"] == "image" else "documents"
    if s.get("already_prepared"):
        print(f"{s['name']} is already prepared in {s['data_dir']} ({s['train']} train / "
              f"{s['validation']} validation {unit}); nothing to do", flush=True)
        return
    if s["skipped"]:
        print(f"warning: skipped {problems_note(s['skipped'])}", file=sys.stderr)
    print(f"prepared {s['name']} in {s['data_dir']}: {s['train']} train / {s['validation']} validation "
          f"{unit} from {s['files']} files in {s['seconds']:.1f} s ({s['mb_per_second']:.1f} MB/s)", flush=True)
    flags_ = f"--config.data.name={s['name']} --config.data.data_dir={s['data_dir']}"
    if s["kind"] == "image":
        flags_ += f" --config.data.eval_split=validation --config.data.num_classes={s['classes']}"
    print(f"train on it with: python -m train --config=configs/{'vit' if s['kind'] == 'image' else 'lm'}.py:... "
          f"{flags_}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("input", "name", "data_dir"))
