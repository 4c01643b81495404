"""NumPy-only preprocessing for `train.data`: LM packing and ViT image ops.

Everything here is a pure function of its inputs (images: of the example and an RNG that
the pipeline derives from (seed, stream position)), so batches are reproducible.
No TensorFlow and no PIL: resizing is antialiased bilinear done with two small matmuls.
"""

from __future__ import annotations

import math
import os
import re
import tempfile

import numpy as np


# ----------------------------------------------------------------------------- LM packing
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
    from train.datasets import data_source, file_lock

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


class TokenizeDocuments:
    """Document record -> {"tokens": [bos] + ids + [eos]} (for streaming packing)."""

    def __init__(self, tokenizer, text_key):
        self.tokenizer, self.text_key = tokenizer, text_key

    def __call__(self, record):
        return {"tokens": self.tokenizer.encode_document(record[self.text_key]).astype(np.int32)}


class PackedToLM:
    """grain map: a packed window (ConcatThenSplit's tokens and segment ids) -> LM example."""

    def __init__(self, eos_id: int | None):
        self.eos_id = eos_id

    def __call__(self, packed):
        return lm_example(packed["tokens"], packed["tokens_segment_ids"] != 0, self.eos_id)


# ----------------------------------------------------------------------------- images
def _interp_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] antialiased bilinear (triangle filter) resampling matrix."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    centers = (np.arange(out_size) + 0.5) * scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(in_size)[None, :] - centers[:, None]) / support)
    w_sum = w.sum(axis=1, keepdims=True)
    return (w / np.where(w_sum > 0, w_sum, 1.0)).astype(np.float32)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize of an [H, W, C] image to float32 [height, width, C]."""
    h, w, c = image.shape
    x = np.asarray(image, np.float32)
    if (h, w) == (height, width):
        return x
    x = _interp_weights(h, height) @ x.reshape(h, w * c)  # [height, w*c]
    x = x.reshape(height, w, c).transpose(1, 0, 2).reshape(w, height * c)
    x = _interp_weights(w, width) @ x  # [width, height*c]
    return x.reshape(width, height, c).transpose(1, 0, 2)


def as_hwc(image: np.ndarray, channels: int) -> np.ndarray:
    """[H, W] / [H, W, 1|3] -> [H, W, channels] (gray repeated, RGB -> luma)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    c = image.shape[-1]
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if c == 3 and channels == 1:
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return luma[..., None]
    raise ValueError(f"cannot convert an image with {c} channels to {channels}")


def random_resized_crop_box(h, w, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """Inception-style crop (y, x, ch, cw): area fraction in scale, log-uniform aspect."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(tries):
        area = h * w * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(area * aspect)))
        ch = int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    # Fallback: the whole image, clipped to the allowed aspect range, centered.
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif aspect > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def center_crop_box(h, w, fraction=1.0):
    """Centered square of side round(min(h, w) * fraction)."""
    side = max(1, int(round(min(h, w) * fraction)))
    return (h - side) // 2, (w - side) // 2, side, side


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8-range values -> float32 in [-1, 1]."""
    return np.asarray(image, np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


class TrainImageTransform:
    """grain ``random_map`` callable: (crop) + resize + (flip) + normalize -> float32."""

    def __init__(self, image_size, channels, *, random_resized_crop, crop_scale,
                 aspect_ratio, flip, image_key="image", label_key="label"):
        self.size, self.channels = int(image_size), int(channels)
        self.rrc, self.flip = bool(random_resized_crop), bool(flip)
        self.scale, self.ratio = tuple(crop_scale), tuple(aspect_ratio)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, example, rng: np.random.Generator):
        image = as_hwc(example[self.image_key], self.channels)
        h, w = image.shape[:2]
        y, x, ch, cw = (random_resized_crop_box(h, w, rng, self.scale, self.ratio)
                        if self.rrc else (0, 0, h, w))
        out = resize(image[y:y + ch, x:x + cw], self.size, self.size)
        if self.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        return {"image": normalize(out), "label": np.int32(example[self.label_key])}


class EvalImageTransform:
    """grain ``map`` callable: center crop (fraction of the short side) + resize."""

    def __init__(self, image_size, channels, *, crop_fraction=1.0,
                 image_key="image", label_key="label"):
        self.size, self.channels = int(image_size), int(channels)
        self.fraction = float(crop_fraction)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, example):
        image = as_hwc(example[self.image_key], self.channels)
        y, x, ch, cw = center_crop_box(*image.shape[:2], self.fraction)
        out = resize(image[y:y + ch, x:x + cw], self.size, self.size)
        return {"image": normalize(out), "label": np.int32(example[self.label_key])}
