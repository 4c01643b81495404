"""`Qwen3MoeForCausalLM`: Qwen3 attention (q/k-norm) with a mixture of experts in every
layer (no shared expert; the top-k renormalised only with `norm_topk_prob`)."""

from models.hf import common
from models.hf.families import mixtral

MODEL_TYPE, ARCHITECTURE, PRIORITY = "qwen3_moe", "Qwen3MoeForCausalLM", 4


def decoder_fields(hf: dict) -> dict:
    if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step", 1)) != 1:
        raise common.HFCheckpointError(
            "dense layers among the mixture-of-experts layers (mlp_only_layers / decoder_sparse_step) "
            "are not supported: every layer must be a mixture of experts")
    if hf.get("use_sliding_window"):  # transformers 4 and 5 apply it to different layers
        raise common.HFCheckpointError("config.json use_sliding_window=true is not supported for Qwen3-MoE")
    if hf.get("shared_expert_intermediate_size"):
        raise common.HFCheckpointError("a shared expert (shared_expert_intermediate_size) is not supported")
    return {**common.base_fields(hf), "qk_norm": True, "num_experts": mixtral.num_experts(hf),
            "experts_per_token": int(hf.get("num_experts_per_tok", 8)),
            "expert_ffn_dim": int(hf["moe_intermediate_size"]),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False))}


def tensors(cfg) -> dict:
    return {**common.attention_tensors(cfg), **common.expert_tensors(
        "mlp.gate.weight", "mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
        "mlp.experts.{e}.down_proj.weight")}


def writable(cfg) -> str | None:
    if not cfg.num_experts or not cfg.qk_norm or cfg.sliding_window is not None:
        return "a Qwen3-MoE has experts and q/k-norm, and no sliding window here"
    return None


def config_json(cfg, base: dict | None, dtype: str) -> dict:
    out = common.config_json(cfg, ARCHITECTURE, MODEL_TYPE, base, dtype)
    out.pop("num_local_experts", None)
    return {**out, "use_sliding_window": False, "sliding_window": None, "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.experts_per_token,
            "moe_intermediate_size": cfg.expert_ffn_dim or cfg.ffn_dim, "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": []}
