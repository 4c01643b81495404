"""The models' hyper-parameters, importable without jax: `DecoderConfig` and `ViTConfig`,
their named sizes (`decoder_config`, `vit_config`) and the choices they are checked against
(remat policies, attention kernels). `configs/` builds a preset's `config.model` from them
(every field, so any can be set from the command line) without loading jax; `models.decoder`
and `models.vit` re-export them beside the models.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes  # noqa: F401 - numpy then knows bfloat16
import numpy as np

# How a layer is rematerialised (models.layer_stack) and which attention kernel runs
# (models.attention).
REMAT_POLICIES = ("none", "full", "save_dots", "save_qkv_proj", "save_dot_except_mlp")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "flash", "cudnn", "splash_interpret", "flash_interpret")
# The experts' grouped matmul (models.expert_dispatch): auto = megablox on TPU, ragged_dot elsewhere.
EXPERT_MATMULS = ("auto", "ragged_dot", "megablox", "megablox_interpret")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling for long contexts, as Hugging Face's `rope_scaling` names it:
    `linear` divides every frequency by `factor`; `llama3` (Llama 3.1) divides the low
    frequencies (wavelength > original_max_len / low_freq_factor) by `factor`, keeps the
    high ones (wavelength < original_max_len / high_freq_factor) and blends in between."""

    kind: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope scaling {self.kind!r} is not one of linear, llama3")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of `Decoder`; `head_dim` defaults to d_model // num_heads."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    attn_logit_softcap: float | None = None
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    # Sliding-window attention (Mistral): each position attends to itself and the
    # sliding_window - 1 positions before it; None: every earlier position.
    sliding_window: int | None = None
    # Mixture of experts (models.moe): num_experts > 0 puts one in every layer's MLP, each
    # token through `experts_per_token` SwiGLU experts of width `expert_ffn_dim` (None:
    # ffn_dim); `norm_topk_prob` renormalises the top-k routing weights (Mixtral always does).
    num_experts: int = 0
    experts_per_token: int = 2
    expert_ffn_dim: int | None = None
    norm_topk_prob: bool = True
    expert_matmul: str = "auto"  # see EXPERT_MATMULS
    dtype: Any = np.float32
    param_dtype: Any = np.float32
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "auto"  # see models.attention.IMPLEMENTATIONS

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", np.dtype(self.param_dtype))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 (or None: no window)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_experts < 0 or (self.num_experts and not 1 <= self.experts_per_token <= self.num_experts):
            raise ValueError(f"experts_per_token={self.experts_per_token} must be between 1 and "
                             f"num_experts={self.num_experts}")
        if self.expert_matmul not in EXPERT_MATMULS:
            raise ValueError(f"expert_matmul={self.expert_matmul!r} is not one of {EXPERT_MATMULS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")


DECODER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 ffn_dim=128, max_seq_len=128),
    "small": dict(vocab_size=32000, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4,
                  ffn_dim=2048),
    "base": dict(vocab_size=32000, d_model=1024, num_layers=24, num_heads=16, num_kv_heads=8,
                 ffn_dim=2816),
    # TinyLlama-1.1B.
    "1b": dict(vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4,
               ffn_dim=5632),
    # Llama-2-7B.
    "7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
               ffn_dim=11008, max_seq_len=4096),
    # Llama-3-8B.
    "8b": dict(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
               ffn_dim=14336, max_seq_len=8192, rope_theta=500_000.0),
    # Mixtral-8x7B (46.7B parameters, 12.9B active): 8 experts, top-2, weights renormalised.
    "mixtral-8x7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                         ffn_dim=14336, max_seq_len=32768, rope_theta=1_000_000.0, num_experts=8,
                         experts_per_token=2, norm_topk_prob=True),
    # Qwen3-30B-A3B (30.5B parameters, 3.3B active): 128 experts of width 768, top-8, q/k norm.
    "qwen3-30b-a3b": dict(vocab_size=151936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4,
                          head_dim=128, ffn_dim=6144, max_seq_len=40960, rope_theta=1_000_000.0,
                          norm_eps=1e-6, qk_norm=True, num_experts=128, experts_per_token=8,
                          expert_ffn_dim=768, norm_topk_prob=True),
}


def decoder_config(size: str, **overrides: Any) -> DecoderConfig:
    """Named preset (`tiny`, `small`, `base`, `1b`, `7b`, `8b`) with field overrides."""
    if size not in DECODER_SIZES:
        raise ValueError(f"unknown decoder size {size!r}; expected one of {sorted(DECODER_SIZES)}")
    return DecoderConfig(**{**DECODER_SIZES[size], **overrides})


VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}

@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of a ViT; defaults are B/16 at 224 px with 1000 classes."""

    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    patch_size: int = 16
    image_size: int = 224
    num_classes: int = 1000
    channels: int = 3
    pool_type: str = "tok"  # 'tok' (class token) | 'gap' (global average pool)
    posemb: str = "learn"  # 'learn' | 'sincos2d'
    dropout: float = 0.0
    head_zero_init: bool = True
    qkv_bias: bool = True
    dtype: Any = np.float32  # compute dtype
    param_dtype: Any = np.float32
    scan_layers: bool = False
    remat: str = "none"  # 'none' | 'full' | 'save_dots'
    attention: str = "auto"  # see models.attention.IMPLEMENTATIONS

    def __post_init__(self):
        _check_choice("pool_type", self.pool_type, ("tok", "gap"))
        _check_choice("attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        _check_choice("posemb", self.posemb, ("learn", "sincos2d"))
        _check_choice("remat", self.remat, REMAT_POLICIES)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}."
            )
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
        if self.posemb == "sincos2d" and self.width % 4:
            raise ValueError(f"sincos2d posemb needs width divisible by 4, got {self.width}.")

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        """Tokens seen by the encoder (patches plus the class token, if any)."""
        return self.num_patches + (self.pool_type == "tok")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def vit_config(variant: str, **overrides: Any) -> ViTConfig:
    """Config for a named variant '<size>/<patch>' (e.g. 'B/16', 'S/8'); overrides win."""
    size, _, patch = variant.partition("/")
    if size not in VIT_SIZES or not patch.isdigit() or int(patch) < 1:
        raise ValueError(
            f"Unknown ViT variant {variant!r}: expected '<size>/<patch>' with size in "
            f"{sorted(VIT_SIZES)} and an integer patch, e.g. 'B/16'."
        )
    width, depth, mlp_dim, num_heads = VIT_SIZES[size]
    fields = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
                  patch_size=int(patch))
    return ViTConfig(**(fields | overrides))
