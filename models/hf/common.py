"""What every Hugging Face family shares: the error type, how a tensor is stored, the config
fields and tensors of the Llama-style attention block, RoPE settings, and config.json output."""

from __future__ import annotations

import dataclasses
from typing import Any

from models import decoder


class HFCheckpointError(ValueError):
    """The checkpoint cannot become a `Decoder` (other architecture, missing tensors, ...)."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """How one of our parameters (per layer, per expert) is stored in the checkpoint: `name`
    ('{i}' for the layer, '{e}' for the expert), `split` > 0 for a linear weight: ours =
    hf.T reshaped, its first `split` dims being hf's input (column) dims; 0 for a tensor
    stored as is. `expert`: our leaf has an expert axis (after the layers'), one checkpoint
    tensor per expert."""

    name: str
    split: int = 0
    expert: bool = False


LAYER = "model.layers.{i}."


def refuse(hf: dict, key: str, want: Any) -> None:
    """HFCheckpointError unless config.json's `key` (when present) is `want`."""
    if hf.get(key, want) != want:
        raise HFCheckpointError(f"config.json {key}={hf[key]!r} is not supported (needs {want!r})")


def rope(hf: dict) -> tuple[float, decoder.RopeScaling | None]:
    """(rope_theta, scaling) from `rope_theta` + `rope_scaling` (transformers 4) or
    `rope_parameters` (transformers 5)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise HFCheckpointError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
    fields = dict(kind=kind, factor=float(params["factor"]))
    if kind == "llama3":
        fields.update(low_freq_factor=float(params["low_freq_factor"]),
                      high_freq_factor=float(params["high_freq_factor"]),
                      original_max_len=int(params["original_max_position_embeddings"]))
    return theta, decoder.RopeScaling(**fields)


def base_fields(hf: dict) -> dict[str, Any]:
    """The `DecoderConfig` fields every family reads the same way (and refusals they share)."""
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                      ("partial_rotary_factor", 1.0)):
        refuse(hf, key, want)
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise HFCheckpointError(f"quantized checkpoints ({method}) are not supported: use the unquantized weights")
    heads = int(hf["num_attention_heads"])
    theta, scaling = rope(hf)
    return dict(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        ffn_dim=int(hf["intermediate_size"]),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)))


def attention_tensors(cfg: decoder.DecoderConfig) -> dict[tuple, Tensor]:
    """Embedding, head, final norm and every layer's attention and norms (Llama naming;
    Qwen3's q/k-norm when `cfg.qk_norm`)."""
    out = {("embed",): Tensor("model.embed_tokens.weight"),
           ("final_norm", "scale"): Tensor("model.norm.weight")}
    if not cfg.tie_embeddings:
        out[("lm_head",)] = Tensor("lm_head.weight", split=1)
    per_layer = {
        ("attn", "query"): Tensor(LAYER + "self_attn.q_proj.weight", 1),
        ("attn", "key"): Tensor(LAYER + "self_attn.k_proj.weight", 1),
        ("attn", "value"): Tensor(LAYER + "self_attn.v_proj.weight", 1),
        ("attn", "out"): Tensor(LAYER + "self_attn.o_proj.weight", 2),
        ("attn_norm", "scale"): Tensor(LAYER + "input_layernorm.weight"),
        ("mlp_norm", "scale"): Tensor(LAYER + "post_attention_layernorm.weight"),
    }
    if cfg.qk_norm:
        per_layer[("attn", "q_norm", "scale")] = Tensor(LAYER + "self_attn.q_norm.weight")
        per_layer[("attn", "k_norm", "scale")] = Tensor(LAYER + "self_attn.k_norm.weight")
    out.update({("layers",) + path: t for path, t in per_layer.items()})
    return out


def dense_mlp_tensors() -> dict[tuple, Tensor]:
    return {("layers", "mlp", "gate"): Tensor(LAYER + "mlp.gate_proj.weight", 1),
            ("layers", "mlp", "up"): Tensor(LAYER + "mlp.up_proj.weight", 1),
            ("layers", "mlp", "down"): Tensor(LAYER + "mlp.down_proj.weight", 1)}


def expert_tensors(router: str, gate: str, up: str, down: str) -> dict[tuple, Tensor]:
    """A mixture of experts' router and per-expert SwiGLU weights ('{e}' in the names). Our
    down projection is stored [experts, d_model, ffn] (models.moe), as the checkpoint's
    per-expert [d_model, ffn] `down`: no transpose."""
    return {("layers", "mlp", "router"): Tensor(LAYER + router, 1),
            ("layers", "mlp", "gate"): Tensor(LAYER + gate, 1, expert=True),
            ("layers", "mlp", "up"): Tensor(LAYER + up, 1, expert=True),
            ("layers", "mlp", "down"): Tensor(LAYER + down, 0, expert=True)}


def config_json(cfg: decoder.DecoderConfig, architecture: str, model_type: str, base: dict | None,
                dtype: str) -> dict:
    """The config.json fields every family writes (transformers-4 key names, which 5 also
    reads); `base` (the imported checkpoint's config) keeps fields we do not model, such as
    the bos/eos token ids."""
    out = {k: v for k, v in (base or {}).items()
           if k not in ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype")}
    out.update(
        architectures=[architecture], model_type=model_type, hidden_act="silu",
        attention_bias=False, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=int(out.get("max_position_embeddings", cfg.max_seq_len)),
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        torch_dtype=dtype)
    s = cfg.rope_scaling
    if s is not None:
        out["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor} if s.kind == "linear" else {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_len}
    return out
