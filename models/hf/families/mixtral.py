"""`MixtralForCausalLM`: a Mistral whose MLP is a mixture of experts (softmax over the
router logits, the top-k renormalised), one checkpoint tensor per expert (w1 gate, w3 up,
w2 down)."""

from models.hf import common

MODEL_TYPE, ARCHITECTURE, PRIORITY = "mixtral", "MixtralForCausalLM", 3
_MOE = "block_sparse_moe."


def decoder_fields(hf: dict) -> dict:
    common.refuse(hf, "router_jitter_noise", 0.0)
    window = hf.get("sliding_window")
    return {**common.base_fields(hf), "num_experts": num_experts(hf),
            "experts_per_token": int(hf.get("num_experts_per_tok", 2)), "norm_topk_prob": True,
            "sliding_window": int(window) if window else None}


def num_experts(hf: dict) -> int:
    """`num_local_experts` (what transformers writes) or `num_experts` (Qwen's Hub configs)."""
    counts = {int(hf[k]) for k in ("num_local_experts", "num_experts") if hf.get(k) is not None}
    if len(counts) != 1:
        raise common.HFCheckpointError("config.json needs one expert count (num_local_experts or num_experts), "
                                       f"got {sorted(counts) or 'none'}")
    return counts.pop()


def tensors(cfg) -> dict:
    return {**common.attention_tensors(cfg), **common.expert_tensors(
        _MOE + "gate.weight", _MOE + "experts.{e}.w1.weight", _MOE + "experts.{e}.w3.weight",
        _MOE + "experts.{e}.w2.weight")}


def writable(cfg) -> str | None:
    if not cfg.num_experts or cfg.qk_norm or not cfg.norm_topk_prob or cfg.expert_ffn_dim not in (None, cfg.ffn_dim):
        return "a Mixtral has experts of width ffn_dim with renormalised top-k weights and no q/k-norm"
    return None


def config_json(cfg, base: dict | None, dtype: str) -> dict:
    out = common.config_json(cfg, ARCHITECTURE, MODEL_TYPE, base, dtype)
    out.pop("num_experts", None)
    return {**out, "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
            "router_jitter_noise": 0.0, "sliding_window": cfg.sliding_window}
