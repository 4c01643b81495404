"""The families (`models/hf/families/*.py`, found by name), and what picks one: config.json's
`model_type` on import, the model itself (or the checkpoint it came from) on export."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from models import decoder
from models.hf import common
from models.hf import families as _families_pkg

FAMILIES = {m.MODEL_TYPE: m for m in (
    importlib.import_module(f"{_families_pkg.__name__}.{info.name}")
    for info in pkgutil.iter_modules(_families_pkg.__path__))}
_BY_PRIORITY = sorted(FAMILIES.values(), key=lambda m: m.PRIORITY)
ARCHITECTURES = tuple(m.ARCHITECTURE for m in _BY_PRIORITY)
MODEL_TYPES = tuple(m.MODEL_TYPE for m in _BY_PRIORITY)


def family_of(hf: dict):
    """The family module of a config.json dict; HFCheckpointError for any other."""
    archs = hf.get("architectures") or []
    family = FAMILIES.get(hf.get("model_type"))
    if family is None or (archs and family.ARCHITECTURE not in archs):
        raise common.HFCheckpointError(
            f"architecture {'/'.join(archs) or '?'} (model_type {hf.get('model_type')!r}) is not "
            f"supported; expected one of {', '.join(ARCHITECTURES)}")
    return family


def decoder_config(hf: dict, **overrides: Any) -> decoder.DecoderConfig:
    """Our `DecoderConfig` from a Hugging Face `config.json` dict; `overrides` set fields
    the checkpoint does not fix (dtype, param_dtype, scan_layers, remat, attention,
    max_seq_len)."""
    return decoder.DecoderConfig(**{**family_of(hf).decoder_fields(hf), **overrides})


def family_for(cfg: decoder.DecoderConfig, base: dict | None = None):
    """The family that writes `cfg`: the checkpoint's it came from (`base`) when that one can
    express it, else the first by PRIORITY that can; HFCheckpointError when none can."""
    first = FAMILIES.get((base or {}).get("model_type"))
    for family in ([first] if first else []) + _BY_PRIORITY:
        if family.writable(cfg) is None:
            return family
    raise common.HFCheckpointError(
        "no Hugging Face family expresses this model: " + "; ".join(m.writable(cfg) for m in _BY_PRIORITY))


def tensor_map(cfg: decoder.DecoderConfig, base: dict | None = None) -> dict[tuple, common.Tensor]:
    """Our pure-dict parameter path -> checkpoint tensor ('{i}' layer, '{e}' expert)."""
    return family_for(cfg, base).tensors(cfg)


def hf_config(cfg: decoder.DecoderConfig, dtype: str = "bfloat16", base: dict | None = None) -> dict:
    """A `config.json` dict for `cfg`; `base` (the imported checkpoint's config) picks the
    family when it can express `cfg` and keeps fields we do not model (bos/eos ids, ...)."""
    if cfg.attn_logit_softcap is not None:
        raise common.HFCheckpointError(
            f"attn_logit_softcap={cfg.attn_logit_softcap} has no field in these families' config.json: "
            "transformers would compute other logits")
    return family_for(cfg, base).config_json(cfg, base, dtype)
