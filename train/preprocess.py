"""NumPy-only preprocessing for `train.data`: tokenizers, LM packing, ViT image ops.

Everything here is a pure function of its inputs (images: of the example and an RNG that
the pipeline derives from (seed, stream position)), so batches are reproducible.
No TensorFlow and no PIL: resizing is antialiased bilinear done with two small matmuls.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import tempfile

import numpy as np

from train.errors import ConfigError, UserError

BYTE_VOCAB_SIZE = 257  # ids 0..255 are bytes, 256 is end-of-document.
BYTE_EOS_ID = 256


# ----------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; `eos_id` = 256 separates documents."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID
    cache_tag = "bytes"

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8)).decode("utf-8", "replace")


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file (local or any ``etils.epath`` path, e.g. gs://).

    Picklable: workers re-read the model from its path and load it lazily.
    """

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.model_path = os.path.expanduser(str(model_path))
        try:
            proto = self._read()
        except Exception as e:  # noqa: BLE001 - missing file, permissions, object store
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"data.tokenizer {model_path} cannot be read: {reason}") from None
        self.cache_tag = "sp-" + hashlib.sha1(proto).hexdigest()[:12]
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception:  # noqa: BLE001 - sentencepiece raises RuntimeError / OSError
            raise UserError(f"data.tokenizer {model_path} is not a SentencePiece .model file "
                            f"({len(proto)} bytes that do not parse)") from None
        if self.eos_id < 0:
            raise UserError(f"SentencePiece model {model_path} has no eos piece (eos_id=-1)")

    def _read(self) -> bytes:
        from etils import epath

        return epath.Path(self.model_path).read_bytes()

    @property
    def sp(self):
        if self._sp is None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_proto=self._read())
        return self._sp

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return np.asarray(self.sp.encode(text, out_type=int), dtype=np.int32)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def __getstate__(self):
        return {**self.__dict__, "_sp": None}


@functools.lru_cache(maxsize=16)
def make_tokenizer(spec: str):
    """``'bytes'`` or a path to a SentencePiece model file; read and parsed once per
    process (cached by `spec`). UserError (one line) for a missing, unreadable or
    malformed file, ConfigError for an empty `spec`."""
    if spec in ("bytes", "byte"):
        return ByteTokenizer()
    if not spec or not isinstance(spec, str):
        raise ConfigError("data.tokenizer is not set: give 'bytes' or the path of a SentencePiece "
                          f".model file (--config.data.tokenizer=PATH), got {spec!r}")
    return SentencePieceTokenizer(spec)


# ----------------------------------------------------------------------------- LM packing
def pack_documents(docs, tokenizer) -> np.ndarray:
    """Concatenation of ``tokenizer.encode(doc) + [eos]`` over docs, as int32."""
    eos = np.array([tokenizer.eos_id], np.int32)
    parts = []
    for d in docs:
        parts += [tokenizer.encode(d), eos]
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)


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


def lm_example(window: np.ndarray, valid: np.ndarray | None = None) -> dict:
    """A seq_len+1 window -> inputs w[:-1], targets w[1:], mask over valid targets."""
    w = np.asarray(window, np.int32)
    mask = np.ones(len(w) - 1, np.float32) if valid is None else valid[1:].astype(np.float32)
    return {"inputs": w[:-1], "targets": w[1:], "mask": mask}


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
