"""Logit parity with Hugging Face `transformers` (CPU torch) for every supported family.

For random models of each family (Llama GQA untied, Llama tied, Llama-3.1 rope scaling,
Mistral with and without its sliding window, Qwen3 untied and tied, Mixtral, Qwen3-MoE with
the top-k renormalised and as is), saved with `save_pretrained`: the largest |logit difference| of
`models.hf.from_pretrained` against `transformers` in float32 and with bf16 compute, and of
the round trip `from_pretrained` -> `save_pretrained` (fp32 and bf16 files) -> transformers.
Needs the test extra (torch, transformers); a few minutes on 2 CPU cores.

    python benchmarks/hf_parity.py
"""

from __future__ import annotations

import tempfile

import common  # noqa: F401 - first: sets the environment before jax loads

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from models import hf  # noqa: E402

SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             max_position_embeddings=1024)
CASES = {
    "llama, GQA 8/2, untied": (transformers.LlamaConfig, dict(vocab_size=32000, num_key_value_heads=2)),
    "llama, MHA, tied": (transformers.LlamaConfig, dict(vocab_size=32000, num_key_value_heads=8,
                                                        tie_word_embeddings=True)),
    "llama-3.1 rope scaling": (transformers.LlamaConfig, dict(
        vocab_size=128256, num_key_value_heads=2, rope_theta=500_000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128})),
    "mistral, GQA 8/2": (transformers.MistralConfig, dict(vocab_size=32000, num_key_value_heads=2,
                                                          sliding_window=None)),
    "mistral, sliding window 128": (transformers.MistralConfig, dict(vocab_size=32000, num_key_value_heads=2,
                                                                     sliding_window=128)),
    "qwen3, q/k-norm, head_dim 64": (transformers.Qwen3Config, dict(vocab_size=32000, num_key_value_heads=2,
                                                                    head_dim=64)),
    "qwen3, tied": (transformers.Qwen3Config, dict(vocab_size=32000, num_key_value_heads=2, head_dim=32,
                                                   tie_word_embeddings=True)),
    "mixtral, 8 experts top-2": (transformers.MixtralConfig, dict(vocab_size=32000, num_key_value_heads=2,
                                                                  num_local_experts=8, num_experts_per_tok=2)),
    "qwen3-moe, 16 experts top-4, renormalised": (transformers.Qwen3MoeConfig, dict(
        vocab_size=32000, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=128, norm_topk_prob=True)),
    "qwen3-moe, 16 experts top-4, as is": (transformers.Qwen3MoeConfig, dict(
        vocab_size=32000, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=128, norm_topk_prob=False)),
}
SEQ = 512


def logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def main() -> None:
    tokens = np.random.RandomState(0).randint(0, 32000, (2, SEQ))
    print(f"Random models d_model {SHAPE['hidden_size']}, {SHAPE['num_hidden_layers']} layers, "
          f"batch 2 x {SEQ} tokens; cells: max |logit - transformers' fp32 logit| (max |logit| in "
          "the first column):\n")
    print("| checkpoint | max abs logit | ours fp32 | ours bf16 compute | export fp32 -> transformers "
          "| export bf16 -> transformers (bf16 weights) |\n|---|---|---|---|---|---|")
    for name, (config_cls, fields) in CASES.items():
        torch.manual_seed(0)
        arch = getattr(transformers, config_cls.__name__.replace("Config", "ForCausalLM"))
        reference = arch(config_cls(**SHAPE, **fields, initializer_range=0.05)).eval()
        with tempfile.TemporaryDirectory() as d:
            reference.save_pretrained(d)
            want = logits(reference, tokens)
            model, cfg = hf.from_pretrained(d, attention="xla")
            fp32 = np.abs(np.asarray(model(jnp.asarray(tokens))) - want).max()
            bf16_model, _ = hf.from_pretrained(d, attention="xla", dtype=jnp.bfloat16)
            bf16 = np.abs(np.asarray(bf16_model(jnp.asarray(tokens))) - want).max()
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            trips = []
            for dtype in ("float32", "bfloat16"):
                hf.save_pretrained(params, cfg, f"{d}/{dtype}", dtype=dtype)
                back = transformers.AutoModelForCausalLM.from_pretrained(f"{d}/{dtype}", dtype=torch.float32)
                trips.append(np.abs(logits(back.eval(), tokens) - want).max())
        print(f"| {name} | {np.abs(want).max():.2f} | {fp32:.1e} | {bf16:.1e} | {trips[0]:.1e} | {trips[1]:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
