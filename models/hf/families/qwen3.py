"""`Qwen3ForCausalLM`: a Llama with RMSNorm over each query and key head before RoPE
(q/k-norm), an explicit head_dim, and an optional sliding window on some layers."""

from models.hf import common

MODEL_TYPE, ARCHITECTURE, PRIORITY = "qwen3", "Qwen3ForCausalLM", 2


def window(hf: dict) -> int | None:
    """The one sliding window of every layer, or None; a window on some layers only (Qwen's
    `max_window_layers`, `layer_types`) cannot be expressed: HFCheckpointError."""
    layers = int(hf["num_hidden_layers"])
    if hf.get("layer_types"):
        kinds = list(hf["layer_types"])
    elif hf.get("use_sliding_window") and hf.get("sliding_window"):
        first = int(hf.get("max_window_layers", layers))
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    else:
        return None
    if set(kinds) - {"sliding_attention", "full_attention"}:
        raise common.HFCheckpointError(f"config.json layer_types {sorted(set(kinds))} are not supported")
    if len(set(kinds)) > 1:
        raise common.HFCheckpointError(
            "a sliding window on some layers only (layer_types / max_window_layers) is not supported: "
            "every layer must use the window or none")
    return int(hf["sliding_window"]) if kinds[0] == "sliding_attention" else None



def decoder_fields(hf: dict) -> dict:
    return {**common.base_fields(hf), "qk_norm": True, "sliding_window": window(hf)}


def tensors(cfg) -> dict:
    return {**common.attention_tensors(cfg), **common.dense_mlp_tensors()}


def writable(cfg) -> str | None:
    if cfg.num_experts or not cfg.qk_norm:
        return "a Qwen3 has q/k-norm and no experts"
    return None


def window_json(cfg) -> dict:
    w = cfg.sliding_window
    return dict(use_sliding_window=w is not None, sliding_window=w, max_window_layers=0 if w else cfg.num_layers,
                layer_types=[("sliding_attention" if w else "full_attention")] * cfg.num_layers)


def config_json(cfg, base: dict | None, dtype: str) -> dict:
    return {**common.config_json(cfg, ARCHITECTURE, MODEL_TYPE, base, dtype), **window_json(cfg)}
