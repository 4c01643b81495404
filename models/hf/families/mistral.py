"""`MistralForCausalLM`: a Llama with a sliding window over every layer."""

from models.hf import common

MODEL_TYPE, ARCHITECTURE, PRIORITY = "mistral", "MistralForCausalLM", 1


def decoder_fields(hf: dict) -> dict:
    # transformers' MistralConfig takes a missing key as 4096: only an explicit null means none.
    window = hf.get("sliding_window", 4096)
    return {**common.base_fields(hf), "sliding_window": int(window) if window else None}


def tensors(cfg) -> dict:
    return {**common.attention_tensors(cfg), **common.dense_mlp_tensors()}


def writable(cfg) -> str | None:
    if cfg.num_experts or cfg.qk_norm:
        return "a Mistral has no experts or q/k-norm"
    return None


def config_json(cfg, base: dict | None, dtype: str) -> dict:
    # The window always explicit: a missing one would read as 4096.
    return {**common.config_json(cfg, ARCHITECTURE, MODEL_TYPE, base, dtype), "sliding_window": cfg.sliding_window}
