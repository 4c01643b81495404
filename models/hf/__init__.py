"""Hugging Face checkpoints in and out of `models.decoder.Decoder`.

    model, cfg = hf.from_pretrained("/ckpt/Qwen3-30B-A3B")      # config.json + *.safetensors
    logits = model(tokens)                                      # == transformers' logits
    params = hf.load_params(path, cfg, abstract_params)         # straight into shardings
    hf.save_pretrained(params, cfg, out_dir, dtype="bfloat16")  # loadable by transformers

Families (one module each in `families/`; adding one is adding a file): `LlamaForCausalLM`
(Llama 2 / 3 / 3.1, TinyLlama), `MistralForCausalLM` (its sliding window modelled at any
length), `Qwen3ForCausalLM` (q/k-norm), `MixtralForCausalLM` and `Qwen3MoeForCausalLM`
(mixtures of experts, `norm_topk_prob` as the checkpoint says): RMSNorm, RoPE (plain,
`linear` or `llama3` scaling), grouped-query attention without biases, SwiGLU, tied or
untied embeddings. Anything a checkpoint has that the decoder cannot express (another
architecture, biases, other rope scalings, a window on some layers only, dense layers among
MoE layers, a shared expert, quantized weights) is refused with `HFCheckpointError` naming it.

Layouts. Hugging Face stores linear weights as [out, in] (`q_proj`: [heads * head_dim,
d_model]); the decoder stores [in, out] split by axis (`query`: [d_model, heads, head_dim]),
with `scan_layers` one array per weight stacked over layers, and experts' weights stacked
over experts ([experts, d_model, ffn]) where checkpoints hold one tensor per expert. Both
use the "rotate half" RoPE convention, so no permutation of q/k is needed. `load_params`
reads, for each device's shard, only the rows and columns - and of an expert-parallel
weight only the experts - that the shard holds (`safe_open(...).get_slice`), so no host
ever holds the whole model.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from models import decoder
from models.hf.checkpoint import (Checkpoint, abstract_params, check_tensors, hf_tensors, load_params,
                                      read_config, save_pretrained)
from models.hf.common import HFCheckpointError
from models.hf.registry import ARCHITECTURES, MODEL_TYPES, decoder_config, hf_config, tensor_map

__all__ = ["ARCHITECTURES", "MODEL_TYPES", "Checkpoint", "HFCheckpointError", "abstract_params", "check_tensors",
           "decoder_config", "from_pretrained", "hf_config", "hf_tensors", "load_params", "read_config",
           "save_pretrained", "tensor_map"]


def from_pretrained(path: str, **overrides: Any) -> tuple[decoder.Decoder, decoder.DecoderConfig]:
    """(Decoder with the checkpoint's weights, its config) on the default device; `overrides`
    as for `decoder_config` (e.g. dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)."""
    from models import partitioning

    cfg = decoder_config(read_config(path), **overrides)
    with partitioning.sharding_context(None):  # abstract: nothing is initialized
        model = nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, load_params(path, cfg, nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model, cfg
