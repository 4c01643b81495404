"""Packing tokenized documents into LM examples (NumPy only): the token cache of a text split
(every document's `[bos] + ids + [eos]`, concatenated, saved once as .npy), fixed windows
over it (`WindowSource`), and the LM example of a window (`lm_example`: inputs, targets, loss
mask, and with document masking segment ids and positions); `PackedToLM` does the same for
the windows grain's streaming packer cuts. Pure functions of their inputs: batches are
reproducible.
"""

from __future__ import annotations

import os
import re
import tempfile

import numpy as np


def pack_documents(docs, tokenizer) -> np.ndarray:
    """Concatenation of ``tokenizer.encode_document(doc)`` (``[bos] + ids + [eos]``) over
    docs, as int32."""
    parts = [tokenizer.encode_document(d) for d in docs]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros([0], np.int32)


def _atomic_save(path: str, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def token_cache_path(data_dir: str, split: str, tokenizer) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", split)
    return os.path.join(str(data_dir), f"tokens.{safe}.{tokenizer.cache_tag}.npy")


def cached_token_stream(builder, split: str, tokenizer, text_key: str = "text") -> str:
    """Path of the packed token stream of a split (built once, under a lock, atomically).

    Documents are taken in order of their ``path`` feature when present (else storage
    order), so the stream does not depend on how TFDS laid the records out.
    """
    from train.data.sources import data_source, file_lock

    path = token_cache_path(builder.data_dir, split, tokenizer)
    if os.path.exists(path):
        return path
    with file_lock(path + ".lock"):
        if not os.path.exists(path):
            src = data_source(builder, split)
            records = [src[i] for i in range(len(src))]
            if records and "path" in records[0]:
                records.sort(key=lambda r: r["path"])
            tokens = pack_documents([r[text_key] for r in records], tokenizer)
            dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
            _atomic_save(path, tokens.astype(dtype))
    return path


class WindowSource:
    """Random-access windows of ``window`` tokens (stride ``window``) of a cached stream.

    A grain ``RandomAccessDataSource``: ``len`` windows, item i = tokens[i*w : (i+1)*w]
    (a trailing partial window is dropped). Pickles by path (memory-mapped on demand).
    """

    def __init__(self, path: str, window: int):
        self.path, self.window = path, int(window)
        self._tokens = None
        self._len = len(self.tokens) // self.window

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.load(self.path, mmap_mode="r")
        return self._tokens

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(i)
        return np.asarray(self.tokens[i * self.window : (i + 1) * self.window], np.int32)

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}

    def __repr__(self):
        return f"WindowSource({os.path.basename(self.path)}, window={self.window})"


def lm_example(window: np.ndarray, valid: np.ndarray | None = None, eos_id: int | None = None) -> dict:
    """A seq_len+1 window -> inputs w[:-1], targets w[1:], mask over valid targets.

    With `eos_id` (document masking) also `segment_ids` (1, 2, ... per document in the
    window, a document ending with its eos; 0 on padding) and `positions` restarting at 0
    per document, and the mask drops each target that follows an eos (the first token of
    the next document, which nothing before it in its own document predicts).
    """
    w = np.asarray(window, np.int32)
    valid = np.ones(len(w), bool) if valid is None else np.asarray(valid, bool)
    inputs, targets, mask = w[:-1], w[1:], valid[1:].astype(np.float32)
    if eos_id is None:
        return {"inputs": inputs, "targets": targets, "mask": mask}
    ends = inputs == eos_id
    starts = np.concatenate([[True], ends[:-1]])  # a document starts after each eos
    segment = np.cumsum(starts).astype(np.int32)
    first = np.maximum.accumulate(np.where(starts, np.arange(len(inputs)), 0))
    positions = (np.arange(len(inputs)) - first).astype(np.int32)
    return {"inputs": inputs, "targets": targets, "mask": mask * ~ends,
            "segment_ids": np.where(valid[:-1], segment, 0).astype(np.int32), "positions": positions}


class PackedToLM:
    """grain map: a packed window (ConcatThenSplit's tokens and segment ids) -> LM example."""

    def __init__(self, eos_id: int | None):
        self.eos_id = eos_id

    def __call__(self, packed):
        return lm_example(packed["tokens"], packed["tokens_segment_ids"] != 0, self.eos_id)
