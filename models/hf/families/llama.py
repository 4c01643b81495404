"""`LlamaForCausalLM` (Llama 2 / 3 / 3.1, TinyLlama): the base of the other families."""

from models.hf import common

MODEL_TYPE, ARCHITECTURE, PRIORITY = "llama", "LlamaForCausalLM", 0


def decoder_fields(hf: dict) -> dict:
    return common.base_fields(hf)


def tensors(cfg) -> dict:
    return {**common.attention_tensors(cfg), **common.dense_mlp_tensors()}


def writable(cfg) -> str | None:
    if cfg.num_experts or cfg.qk_norm or cfg.sliding_window is not None:
        return "a Llama has no experts, q/k-norm or sliding window"
    return None


def config_json(cfg, base: dict | None, dtype: str) -> dict:
    out = common.config_json(cfg, ARCHITECTURE, MODEL_TYPE, base, dtype)
    out.pop("sliding_window", None)
    return {**out, "mlp_bias": False}
