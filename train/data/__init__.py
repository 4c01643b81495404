"""The data path, one module per stage, read top to bottom as a batch is made:

    sources.py    a TFDS array_record dataset: built on first use for the embedded ones
                  (digits.py, python_stdlib_text.py), opened (never downloaded) otherwise;
                  synthetic.py for shape-only runs; prepare.py turns your own files into one
                  (`python -m train.data.prepare`)
    tokenize.py   text -> token ids: bytes, SentencePiece, Hugging Face tokenizer.json
    pack.py       documents -> token cache -> fixed windows -> LM examples (segment ids,
                  positions and loss mask for document masking)
    images.py     image -> ViT input (resize, crops, normalization)
    batch.py      grain pipelines: process-local train batches as a pure function of the
                  step (`StepIterator`) or streamed and packed, and eval batches that cover a
                  split exactly once

The names below are the pipeline's public API; they load their module on first use, so
importing a light stage (`train.data.tokenize`, e.g. from configs/) loads no grain or TFDS.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "batch": ("EvalBatches", "StepIterator", "get_vocab_size", "make_eval_batches", "make_train_batches",
              "make_train_iterator", "num_examples"),
    "tokenize": ("BYTE_EOS_ID", "BYTE_VOCAB_SIZE", "make_tokenizer"),
    "sources": ("DEFAULT_DATA_DIR", "DataError", "data_source", "dataset_builder"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
