"""Fields shared by every training config (see configs/vit.py and configs/lm.py)."""

import dataclasses

import ml_collections
import numpy as np


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 1000
    c.batch_size = 128  # global, across all processes
    c.grad_accum_steps = 1
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    # > 0: a jax.profiler trace of this many steps (from the third step of the run on) in
    # workdir/tb, for TensorBoard's profile tab or xprof.
    c.profile_steps = 0
    c.on_nonfinite = "skip"  # NaN/Inf loss or grads: "skip" the update (counted) or "halt"
    # "hf:PATH": the decoder's architecture and starting parameters from a Hugging Face
    # checkpoint directory (config.json + *.safetensors); the optimizer state starts fresh.
    c.init_from = ""
    c.debug_nan_at_step = -1  # fault injection for tests: poison this step's gradients
    # ICI axis sizes (-1 = fill with the remaining devices) and DCN (multi-slice) sizes.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_expert=1, dcn_tensor=1))
    # Logical-axis rules overriding models.partitioning.DEFAULT_RULES, e.g.
    # (("embed", "fsdp"), ("mlp", "tensor"), ...); empty = the defaults.
    c.sharding_rules = ()
    # XLA/libtpu compiler options for the train step when it runs (or is compiled) on TPU,
    # e.g. {"xla_jf_bf16_propagation": False}; ignored on other platforms.
    c.tpu_compiler_options = ml_collections.ConfigDict()
    c.optimizer = ml_collections.ConfigDict(dict(
        name="lion",
        schedule="cosine",
        warmup_steps=100,
        end_lr_fraction=0.0,
        grad_clip_norm=1.0,
        decay_embeddings=True,
        # ZeRO-1: also shard optimizer state over the `data` mesh axis (params replicated
        # over it); gradients are reduce-scattered and new params all-gathered.
        shard_state_over_data=False,
    ))
    return c


def lion(lr: float, wd: float, b1: float = 0.9, b2: float = 0.99, mu_dtype: str = "bfloat16",
         distributed: str = "", vote_axis: str = "data"):
    """Lion hyperparameters. `mu_dtype`: bfloat16 | float32 | int8 (blockwise: `block_size`
    entries of the last axis per scale, 0 = one scale per row); `stochastic_rounding` when storing the momentum; `cautious`: Cautious
    Lion. `distributed`: "" (off), "majority" or "mean" runs Distributed Lion (1-bit sign
    votes over the mesh axis `vote_axis`, see train/dlion.py). `fused_apply`: update and
    apply in one pass (lion_optax.fused_lion; a Pallas kernel for int8 momentum on TPU);
    `kernel`: auto | pallas | interpret | xla."""
    return ml_collections.ConfigDict(dict(learning_rate=lr, weight_decay=wd, b1=b1, b2=b2, mu_dtype=mu_dtype,
                                          block_size=0, stochastic_rounding=False, cautious=False,
                                          distributed=distributed, vote_axis=vote_axis,
                                          fused_apply=False, kernel="auto"))


def adamw(lr: float, wd: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6):
    return ml_collections.ConfigDict(dict(learning_rate=lr, weight_decay=wd, b1=b1, b2=b2, eps=eps))


def adafactor(lr: float, wd: float):
    return ml_collections.ConfigDict(dict(learning_rate=lr, weight_decay=wd))


# Model fields that come from elsewhere: the vocabulary from data.vocab_size (or the tokenizer),
# an image's size, channels and classes from config.data, rope scaling from a checkpoint.
_FROM_ELSEWHERE = ("vocab_size", "rope_scaling", "image_size", "num_classes", "channels")


def model_fields(family: str, name: str, **values) -> ml_collections.ConfigDict:
    """`config.model` of a preset holding every field of the model's config (the preset's
    values, then `values`), so any of them can be overridden on the command line
    (`--config.model.num_layers=4`). Fields the model derives when unset (head_dim) stay
    None: overriding d_model then still gives d_model // num_heads."""
    from models import spec  # the models' hyper-parameters, without jax

    if family == "lm":
        head, built, cls = dict(family="lm", size=name), spec.decoder_config(name, **values), spec.DecoderConfig
    else:
        head, built, cls = dict(family="vit", variant=name), spec.vit_config(name, **values), spec.ViTConfig
    explicit = {**(spec.DECODER_SIZES.get(name, {}) if family == "lm" else {}), **values}
    c = ml_collections.ConfigDict(head)
    for field in dataclasses.fields(cls):
        if field.name in _FROM_ELSEWHERE:
            continue
        if field.name in explicit and field.default is None:  # set by the size or the caller
            value = explicit[field.name]
        elif field.name in values:
            value = values[field.name]
        elif field.default is None:  # derived by the model unless set
            kind = str(field.type).split("|")[0].strip()
            value = ml_collections.config_dict.placeholder({"int": int, "float": float}[kind])
        else:
            value = getattr(built, field.name)
            if field.name in ("dtype", "param_dtype"):
                value = np.dtype(value).name
        c[field.name] = value
    return c
