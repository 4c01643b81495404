"""Tokenizers for `data.tokenizer`: UTF-8 bytes, a SentencePiece `.model`, or a Hugging Face
`tokenizer.json`. Each has `encode(text) -> int32 ids`, `decode(ids)`, `vocab_size`, `eos_id`
(the id appended after every document), `bos_id` (None when it has none), `cache_tag` (names
token caches made with it) and `encode_document(text)`: `[bos] + ids + [eos]`, the bos only
when made with `add_bos`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os

import numpy as np

from train.errors import ConfigError, UserError

BYTE_VOCAB_SIZE = 257  # ids 0..255 are bytes, 256 is end-of-document.
BYTE_EOS_ID = 256


class _Documents:
    """`encode_document`, shared by the tokenizers (`add_bos` is set by `make_tokenizer`)."""

    add_bos = False

    def encode_document(self, text: str | bytes) -> np.ndarray:
        ids = [self.encode(text), np.array([self.eos_id], np.int32)]
        if self.add_bos:
            ids.insert(0, np.array([self.bos_id], np.int32))
        return np.concatenate(ids)


class ByteTokenizer(_Documents):
    """UTF-8 bytes as ids 0..255; `eos_id` = 256 separates documents."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID
    bos_id = None
    cache_tag = "bytes"

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8)).decode("utf-8", "replace")


class SentencePieceTokenizer(_Documents):
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

    @property
    def bos_id(self) -> int | None:
        return int(self.sp.bos_id()) if self.sp.bos_id() >= 0 else None

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return np.asarray(self.sp.encode(text, out_type=int), dtype=np.int32)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def __getstate__(self):
        return {**self.__dict__, "_sp": None}


class HFTokenizer(_Documents):
    """A Hugging Face ``tokenizer.json`` (the `tokenizers` library: Llama-3, Mistral, GPT-2
    style BPE, ...), local or any ``etils.epath`` path.

    Documents are encoded without the tokenizer's own special tokens, and a special token's
    text inside a document (a file that mentions `<|end_of_text|>`) is encoded as the plain
    text it is, never as the special id (`encode_special_tokens`); the end-of-document
    id is the ``eos_token`` of a ``tokenizer_config.json`` next to the file when there is
    one, else the first special token named like an end of text (EOS_NAMES).
    Picklable: workers rebuild the tokenizer from the JSON text.
    """

    EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
    BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")

    def __init__(self, path: str):
        self.path = os.path.expanduser(str(path))
        try:
            self._json = self._read(self.path)
        except Exception as e:  # noqa: BLE001 - missing file, permissions, object store
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"data.tokenizer {path} cannot be read: {reason}") from None
        # "literal-specials": caches made when special-token text still became special ids differ.
        self.cache_tag = "hf-" + hashlib.sha1(("literal-specials" + self._json).encode()).hexdigest()[:12]
        self._tok = None
        try:
            tok = self.tok
        except Exception:  # noqa: BLE001 - tokenizers raises a generic Exception
            raise UserError(f"data.tokenizer {path} is not a Hugging Face tokenizer.json "
                            f"({len(self._json)} characters that do not parse)") from None
        special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
        named = self._configured("eos_token") or next((n for n in self.EOS_NAMES if n in special), None)
        self.eos_id = tok.token_to_id(named) if named else None
        bos = self._configured("bos_token") or next((n for n in self.BOS_NAMES if n in special), None)
        self.bos_id = tok.token_to_id(bos) if bos else None
        if self.eos_id is None:
            raise UserError(f"tokenizer {path} has no end-of-text token (looked for "
                            f"{named or ', '.join(self.EOS_NAMES)} among {special[:8]})")
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))

    @staticmethod
    def _read(path: str) -> str:
        from etils import epath

        return epath.Path(path).read_text()

    def _configured(self, key: str) -> str | None:
        """`key` (eos_token, bos_token) of tokenizer_config.json beside the file (transformers' layout)."""
        import json

        try:
            config = json.loads(self._read(os.path.join(os.path.dirname(self.path), "tokenizer_config.json")))
        except Exception:  # noqa: BLE001 - no such file, or not JSON: fall back to the names
            return None
        token = config.get(key)
        return token.get("content") if isinstance(token, dict) else token

    @property
    def tok(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(self._json)
            self._tok.encode_special_tokens = True  # special-token text in a document is text
        return self._tok

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}


def make_tokenizer(spec: str, add_bos: bool = False):
    """``'bytes'``, a SentencePiece ``.model`` file, or a Hugging Face ``tokenizer.json``
    (a file ending in .json, or a directory holding tokenizer.json); read and parsed once
    per process (cached by `spec`). With `add_bos` its documents start with its bos id.
    UserError (one line) for a missing, unreadable or malformed file or a missing bos,
    ConfigError for an empty `spec`."""
    tokenizer = _load(spec)
    if not add_bos:
        return tokenizer
    if tokenizer.bos_id is None:
        raise ConfigError(f"data.add_bos: tokenizer {spec!r} has no beginning-of-text token")
    with_bos = copy.copy(tokenizer)
    with_bos.add_bos, with_bos.cache_tag = True, tokenizer.cache_tag + "-bos"
    return with_bos


def clear_cache() -> None:
    """Forgets the tokenizers `make_tokenizer` has read (the next call reads the file again)."""
    _load.cache_clear()


@functools.lru_cache(maxsize=16)
def _load(spec: str):
    if spec in ("bytes", "byte"):
        return ByteTokenizer()
    if not spec or not isinstance(spec, str):
        raise ConfigError("data.tokenizer is not set: give 'bytes', a SentencePiece .model file or a "
                          f"Hugging Face tokenizer.json (--config.data.tokenizer=PATH), got {spec!r}")
    if spec.endswith(".json"):
        return HFTokenizer(spec)
    if os.path.isdir(os.path.expanduser(spec)):
        json_path = os.path.join(spec, "tokenizer.json")
        if os.path.exists(os.path.expanduser(json_path)):
            return HFTokenizer(json_path)
        raise UserError(f"data.tokenizer {spec} is a directory without tokenizer.json")
    return SentencePieceTokenizer(spec)


class TokenizeDocuments:
    """Document record -> {"tokens": [bos] + ids + [eos]} (for streaming packing)."""

    def __init__(self, tokenizer, text_key):
        self.tokenizer, self.text_key = tokenizer, text_key

    def __call__(self, record):
        return {"tokens": self.tokenizer.encode_document(record[self.text_key]).astype(np.int32)}
