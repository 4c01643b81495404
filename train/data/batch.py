"""Batches: TFDS array_record sources -> grain -> process-local numpy batches.

Design (determinism and state)
------------------------------
For map-style sources (the embedded datasets, any TFDS array_record dataset, the cached
token windows of the embedded text corpus, ``synthetic``) the pipeline is built from
grain's random-access ``MapDataset``::

    stream = MapDataset.source(src).seed(seed).shuffle().repeat()   # infinite, reshuffled per epoch
    stream = stream.random_map(augment)   # per-example RNG = f(seed, stream position)
    local  = stream.batch(B // P, drop_remainder=True)[p::P]

Chunk j of ``stream.batch(B // P)`` holds stream positions [j*B/P, (j+1)*B/P), so chunk
s*P + p = rows [p*B/P, (p+1)*B/P) of global batch s = positions [s*B, (s+1)*B). The global
batch at step s is a pure function of (seed, s, B): identical for 1 or many processes, and
resuming needs only the step. `make_train_iterator` returns a `StepIterator`, a grain
``DatasetIterator`` whose state is ``{"step": s}`` (process-count and worker-count
independent); it reads ``batches[s:]`` through grain threads or ``mp_prefetch`` workers.
Save/restore it with ``grain.checkpoint.CheckpointSave/CheckpointRestore`` inside an
orbax ``CheckpointManager`` (grain writes ``process_{i}-of-{n}.json`` per process); after a
change of process count, pass ``start_step`` instead (the step is the train step).

Why not ``grain.DataLoader`` + ``grain.sharding.ShardByJaxProcess``: that API shards
*records* per process (each process reads its own contiguous shard and shuffles it), so
the global batch depends on the process count. Here ``ShardByJaxProcess()`` only supplies
the default (index, count) and the sharding is the strided slice above, which keeps the
global order process-count invariant.

Streaming text (TFDS text datasets other than the embedded corpus, or
``pack_mode='stream'``): documents are shuffled, sharded by process (``docs[p::P]``),
tokenized, packed with ``grain.experimental.ConcatThenSplitIterDataset`` and batched;
the packer's buffer lives in the grain iterator state, so resume is exact through the
checkpointed state, but batches depend on the process count and ``start_step`` is not
supported.
"""

from __future__ import annotations

import functools
import math
import sys

import grain
import jax
import numpy as np

from train.data import images
from train.data import pack
from train.data import tokenize
from train.data.sources import EMBEDDED_DATASETS, DataError, data_source, dataset_builder
from train.data.synthetic import SyntheticSource
from train.errors import ConfigError
from train.data.tokenize import make_tokenizer


_SYNTHETIC_EVAL_SEED = 2**31 - 1
# ----------------------------------------------------------------------------- helpers
def _shard(process_index, process_count) -> grain.sharding.ShardOptions:
    if process_index is None and process_count is None:
        return grain.sharding.ShardByJaxProcess()
    return grain.sharding.ShardOptions(
        shard_index=int(jax.process_index() if process_index is None else process_index),
        shard_count=int(jax.process_count() if process_count is None else process_count))


def _local_batch_size(global_batch_size: int, shard) -> int:
    if global_batch_size <= 0 or global_batch_size % shard.shard_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive "
                         f"multiple of process_count={shard.shard_count}")
    return global_batch_size // shard.shard_count


def _check_seed(seed) -> int:
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def _is_synthetic(cfg) -> bool:
    return cfg.name == "synthetic"


def _streaming(cfg) -> bool:
    if cfg.kind != "text" or _is_synthetic(cfg):
        return False
    mode = cfg.pack_mode
    if mode == "auto":
        return cfg.name not in EMBEDDED_DATASETS
    if mode not in ("cache", "stream"):
        raise ValueError(f"pack_mode must be 'auto', 'cache' or 'stream', got {mode!r}")
    return mode == "stream"


def _read_options(cfg) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=int(cfg.read_threads),
                             prefetch_buffer_size=int(cfg.prefetch_batches))


def _maybe_mp(ds: grain.IterDataset, cfg) -> grain.IterDataset:
    workers = int(cfg.num_workers)
    if workers <= 0:
        return ds
    from absl import flags

    if not flags.FLAGS.is_parsed():
        # grain 0.2.x reads an absl flag in mp_prefetch and fails in scripts that never
        # parsed flags (google/grain#1355); absl.app-based trainers are unaffected.
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(cfg.worker_buffer_size)))


def get_vocab_size(cfg) -> int:
    """Token vocabulary of a text config (synthetic: ``cfg.vocab_size``)."""
    if _is_synthetic(cfg) and cfg.vocab_size is None:
        raise ConfigError("data.vocab_size is required with synthetic text")
    return int(cfg.vocab_size) if _is_synthetic(cfg) else _tokenizer(cfg).vocab_size


def _check_text_config(cfg) -> None:
    """Fails early when ``cfg.vocab_size`` (used to size the model) is below the tokenizer's."""
    if cfg.kind != "text" or _is_synthetic(cfg):
        return
    need, have = get_vocab_size(cfg), cfg.vocab_size
    if have is not None and int(have) < need:
        raise ConfigError(f"data.vocab_size={have} is smaller than the vocabulary of tokenizer "
                          f"{cfg.tokenizer!r} ({need}); set data.vocab_size >= {need}")


def _tokenizer(cfg):
    return make_tokenizer(cfg.tokenizer, bool(cfg.add_bos))


def _eos_for_masking(cfg) -> int | None:
    """The id that ends documents when `data.document_mask` is on (else None)."""
    return _tokenizer(cfg).eos_id if cfg.document_mask else None


def _check_num_classes(cfg, builder) -> None:
    """ConfigError when the dataset's labels do not fit the model's `data.num_classes`."""
    feature = builder.info.features[cfg.label_key] if cfg.label_key in builder.info.features else None
    have = getattr(feature, "num_classes", None)
    if have is not None and have > int(cfg.num_classes):
        raise ConfigError(f"dataset {cfg.name!r} has {have} classes but data.num_classes={cfg.num_classes}; "
                          f"set --config.data.num_classes={have}")


def _examples(cfg, split: str, *, train: bool):
    """(random-access source, per-example fn, fn is random) for a map-style split."""
    if cfg.kind == "image":
        builder = dataset_builder(cfg.name, cfg.data_dir)
        _check_num_classes(cfg, builder)
        src = data_source(builder, split)
        if train:
            a = cfg.augment
            return src, images.TrainImageTransform(
                cfg.image_size, cfg.channels, random_resized_crop=a.random_resized_crop,
                crop_scale=a.crop_scale, aspect_ratio=a.aspect_ratio,
                flip=a.flip, image_key=cfg.image_key, label_key=cfg.label_key), True
        return src, images.EvalImageTransform(
            cfg.image_size, cfg.channels, crop_fraction=cfg.eval_crop_fraction,
            image_key=cfg.image_key, label_key=cfg.label_key), False
    if cfg.kind == "text":
        builder = dataset_builder(cfg.name, cfg.data_dir)
        tok = _tokenizer(cfg)
        path = pack.cached_token_stream(builder, split, tok, cfg.text_key)
        return (pack.WindowSource(path, int(cfg.seq_len) + 1),
                functools.partial(pack.lm_example, eos_id=_eos_for_masking(cfg)), False)
    raise ValueError(f"data.kind must be 'image' or 'text', got {cfg.kind!r}")


def num_examples(cfg, split: str | None = None) -> int | None:
    """Examples per epoch of a map-style split (images or packed windows), else None."""
    if _is_synthetic(cfg) or _streaming(cfg):
        return None
    return len(_examples(cfg, split or cfg.train_split, train=False)[0])


# ----------------------------------------------------------------------------- training
def make_train_batches(data_cfg, global_batch_size: int, seed: int, *,
                       process_index=None, process_count=None) -> grain.MapDataset:
    """Random-access ``MapDataset`` of process-local batches: element s = step s.

    Map-style sources only (not streaming text). ``len`` is effectively infinite.
    """
    cfg, seed = data_cfg, _check_seed(seed)
    shard = _shard(process_index, process_count)
    b = _local_batch_size(global_batch_size, shard)
    if _streaming(cfg):
        raise ValueError(f"{cfg.name!r} streams packed text; use make_train_iterator")
    if _is_synthetic(cfg):
        stream = grain.MapDataset.source(SyntheticSource(cfg, sys.maxsize, seed))
    else:
        src, fn, is_random = _examples(cfg, cfg.train_split, train=True)
        if len(src) == 0:
            raise DataError(f"split {cfg.train_split!r} of {cfg.name!r} is empty")
        stream = grain.MapDataset.source(src).seed(seed).shuffle().repeat()
        stream = stream.random_map(fn) if is_random else stream.map(fn)
    return stream.batch(b, drop_remainder=True)[shard.shard_index::shard.shard_count]


def _streaming_train(cfg, b: int, seed: int, shard) -> grain.IterDataset:
    builder = dataset_builder(cfg.name, cfg.data_dir)
    docs = grain.MapDataset.source(data_source(builder, cfg.train_split))
    docs = docs.seed(seed).shuffle().repeat()[shard.shard_index::shard.shard_count]
    tokens = docs.map(tokenize.TokenizeDocuments(_tokenizer(cfg), cfg.text_key))
    ds = _maybe_mp(tokens.to_iter_dataset(_read_options(cfg)), cfg)
    ds = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct={"tokens": int(cfg.seq_len) + 1})
    return ds.map(pack.PackedToLM(_eos_for_masking(cfg))).batch(b, drop_remainder=True)


class StepIterator(grain.DatasetIterator):
    """grain ``DatasetIterator`` over a random-access dataset of batches; state = step.

    ``get_state()`` is ``{"step": s}`` (the number of batches consumed = the global
    step), identical on every process and independent of the process count and of
    ``num_workers``. ``set_state`` rebuilds the underlying grain pipeline (threads or
    ``mp_prefetch`` workers) from ``batches[s:]``.
    """

    def __init__(self, batches: grain.MapDataset, cfg, step: int = 0):
        super().__init__()
        self._batches, self._cfg, self._step, self._it = batches, cfg, int(step), None

    def _inner(self):
        if self._it is None:
            ds = self._batches[self._step:].to_iter_dataset(_read_options(self._cfg))
            self._it = iter(_maybe_mp(ds, self._cfg))
        return self._it

    def __next__(self):
        self._assert_not_closed()
        batch = next(self._inner())
        self._step += 1
        return batch

    @property
    def step(self) -> int:
        return self._step

    def get_state(self) -> dict:
        return {"step": self._step}

    def set_state(self, state: dict) -> None:
        self._assert_not_closed()
        step = int(state["step"])
        if step != self._step:
            self._close_inner()
            self._step = step

    def start_prefetch(self) -> None:
        self._inner().start_prefetch()

    def _close_inner(self):
        if self._it is not None:
            self._it.close()
            self._it = None

    def close(self) -> None:
        self._close_inner()
        super().close()

    def __str__(self):
        return f"StepIterator(step={self._step})"


def make_train_iterator(data_cfg, global_batch_size: int, seed: int, *, process_index=None,
                        process_count=None, start_step: int = 0) -> grain.DatasetIterator:
    """Infinite iterator of process-local batches (dicts of numpy arrays).

    images: {"image": float32 [b, H, W, C] in [-1, 1], "label": int32 [b]};
    text: {"inputs", "targets": int32 [b, seq_len], "mask": float32 [b, seq_len]};
    b = global_batch_size / process_count. A grain ``DatasetIterator`` (`StepIterator`
    for map-style sources, grain's packing iterator for streaming text): ``get_state()``,
    ``set_state()``, orbax via ``grain.checkpoint.CheckpointSave/CheckpointRestore``.
    ``start_step`` (map-style only) starts at that global step.
    """
    cfg, seed = data_cfg, _check_seed(seed)
    shard = _shard(process_index, process_count)
    _check_text_config(cfg)
    if _streaming(cfg):
        if start_step:
            raise ValueError("start_step is not supported for streaming (packed) text; "
                             "restore the checkpointed iterator state instead")
        return iter(_streaming_train(cfg, _local_batch_size(global_batch_size, shard), seed, shard))
    batches = make_train_batches(cfg, global_batch_size, seed, process_index=shard.shard_index,
                                 process_count=shard.shard_count)
    return StepIterator(batches, cfg, start_step)


# ----------------------------------------------------------------------------- evaluation
class EvalBatches:
    """Finite, re-iterable process-local eval batches; every example once, padding masked.

    Each batch has the training keys plus ``mask`` (images: float32 [b], 1 = real
    example; text: float32 [b, seq_len], 1 = real target token). ``len()`` = number of
    batches, equal on all processes (``None``-like TypeError for streaming text).
    """

    def __init__(self, dataset, num_batches: int | None, read_options=None):
        self._dataset, self._num_batches, self._read = dataset, num_batches, read_options

    def __iter__(self):
        if isinstance(self._dataset, grain.MapDataset):
            return iter(self._dataset.to_iter_dataset(self._read))
        return iter(self._dataset)

    def __len__(self) -> int:
        if self._num_batches is None:
            raise TypeError("number of eval batches is unknown for streaming text")
        return self._num_batches

    @property
    def num_batches(self) -> int | None:
        return self._num_batches


class _MaskPadding:
    """map_with_index: mark examples at positions >= n (wrap-around padding) as masked."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, index, example):
        valid = np.float32(index < self.n)
        mask = example.get("mask", np.float32(1.0))
        return {**example, "mask": (np.asarray(mask, np.float32) * valid).astype(np.float32)}


class _GlobalToLocal:
    """Pads a (possibly short) global batch to B rows with mask 0 and keeps this process's rows."""

    def __init__(self, global_batch_size: int, shard):
        self.B, self.p, self.P = global_batch_size, shard.shard_index, shard.shard_count

    def __call__(self, batch):
        b = self.B // self.P
        out = {}
        for k, v in batch.items():
            pad = self.B - len(v)
            if pad:
                v = np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
            out[k] = v[self.p * b:(self.p + 1) * b]
        return out


def make_eval_batches(data_cfg, global_batch_size: int, *, process_index=None,
                      process_count=None) -> EvalBatches:
    """Process-local batches covering ``eval_split`` exactly once (see `EvalBatches`).

    Global eval batch k = examples [k*B, (k+1)*B) in split order, the last one padded;
    process p gets rows [p*b, (p+1)*b). ``eval_max_batches`` caps the number of batches.
    """
    cfg = data_cfg
    shard = _shard(process_index, process_count)
    b = _local_batch_size(global_batch_size, shard)
    _check_text_config(cfg)
    cap = cfg.eval_max_batches
    if _streaming(cfg):
        builder = dataset_builder(cfg.name, cfg.data_dir)
        docs = grain.MapDataset.source(data_source(builder, cfg.eval_split)).map(
            tokenize.TokenizeDocuments(_tokenizer(cfg), cfg.text_key))
        ds = grain.experimental.ConcatThenSplitIterDataset(
            docs.to_iter_dataset(_read_options(cfg)),
            length_struct={"tokens": int(cfg.seq_len) + 1})
        # Every process packs the same global stream, so all see the same batch count.
        ds = ds.map(pack.PackedToLM(_eos_for_masking(cfg))).batch(global_batch_size)
        ds = ds.map(_GlobalToLocal(global_batch_size, shard))
        if cap:
            ds = grain.experimental.LimitIterDataset(ds, int(cap))
        return EvalBatches(ds, None)
    if _is_synthetic(cfg):
        n = int(cfg.synthetic_eval_examples)
        examples = grain.MapDataset.source(SyntheticSource(cfg, n, _SYNTHETIC_EVAL_SEED))
    else:
        src, fn, _ = _examples(cfg, cfg.eval_split, train=False)
        n = len(src)
        examples = grain.MapDataset.source(src).map(fn)
    if n == 0:
        raise DataError(f"eval split {cfg.eval_split!r} of {cfg.name!r} is empty")
    num_batches = math.ceil(n / global_batch_size)
    if cap:
        num_batches = min(num_batches, int(cap))
    total = num_batches * global_batch_size
    padded = examples.repeat(math.ceil(total / n))[:total].map_with_index(_MaskPadding(n))
    local = padded.batch(b, drop_remainder=True)[shard.shard_index::shard.shard_count]
    return EvalBatches(local, num_batches, _read_options(cfg))
