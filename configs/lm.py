"""Decoder-only LM configs.

    python -m train --config=configs/lm.py:demo --workdir=/tmp/lm_demo
    python -m train --config=configs/lm.py:1b --workdir=gs://bucket/lm_1b \
        --config.data.data_dir=gs://bucket/tensorflow_datasets \
        --config.data.tokenizer=gs://bucket/tokenizers/llama.model

`demo`: byte-level LM on the Python standard library's source (on every machine),
float32, CPU; prints a text sample at the end.
`1b` (TinyLlama shape) and `8b` (Llama-3-8B shape): C4 from TFDS with a SentencePiece or
Hugging Face tokenizer, bf16 compute, Lion b1/b2 = 0.95/0.98 as the paper uses for LMs, lr 1e-4 /
wd 0.01 versus the Adafactor baseline 1e-3 / 0.001 (the paper's 7.5B LM setting) and an
AdamW baseline with the same 10x mapping.
"""

import ml_collections

from configs import common
from configs.data import data_config


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    c = common.base_config()
    c.z_loss = 1e-4
    # Mixture-of-experts models (model.num_experts > 0): the routers' load-balancing loss
    # (Switch / Mixtral form) and router z-loss (ST-MoE) weights.
    c.moe_aux_loss = 0.01
    c.moe_z_loss = 0.001
    c.loss_chunk = 0  # sequence positions per output-head/loss chunk (0: whole sequence)
    c.loss_vocab_chunks = 1  # strided vocabulary slices per output-head/loss chunk (models.lm_loss)
    c.sample_steps = 200  # tokens generated after training (0 = none)
    c.optimizer.lion = common.lion(1e-4, 0.01, b1=0.95, b2=0.98)
    c.optimizer.adamw = common.adamw(1e-3, 0.001, b1=0.9, b2=0.95)
    c.optimizer.adafactor = common.adafactor(1e-3, 0.001)

    if arg == "demo":
        c.data = data_config("python_stdlib_text")
        # document_mask off: the demo results in docs/results.md were measured with packed
        # source files attending across file boundaries (most 128-byte windows lie in one file).
        # vocab_size None: the tokenizer's (bytes: 257), padded to a multiple of 128 in the model;
        # a --config.data.tokenizer=tokenizer.json brings its own size.
        c.data.update(dict(seq_len=128, tokenizer="bytes", eval_max_batches=8, document_mask=False))
        c.data.vocab_size = ml_collections.config_dict.placeholder(int)
        c.model = common.model_fields(
            "lm", "tiny", d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_dim=384,
            max_seq_len=512, scan_layers=True, remat="none", dtype="float32", attention="auto")
        c.num_steps, c.batch_size = 900, 32
        c.log_every, c.eval_every, c.checkpoint_every = 50, 300, 300
        c.optimizer.warmup_steps = 100
        c.optimizer.lion = common.lion(1e-3, 0.1, b1=0.95, b2=0.98)
        c.optimizer.adamw = common.adamw(3e-3, 0.03, b1=0.9, b2=0.95)
        c.optimizer.adafactor = common.adafactor(1e-2, 0.01)
        return c

    if arg == "moe-demo":
        # The demo with a mixture of experts in every layer: 8 SwiGLU experts of width 192, 2 per
        # token, so a token runs through the dense demo's 384 of MLP width (equal active parameters).
        c = get_config("demo")
        c.model = common.model_fields(
            "lm", "tiny", d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_dim=384,
            max_seq_len=512, scan_layers=True, remat="none", dtype="float32", attention="auto",
            num_experts=8, experts_per_token=2, expert_ffn_dim=192)
        return c

    if arg == "finetune":
        return finetune_config(c)

    # (seq_len, batch, vocab); 8b at batch 128 needs 12.6 GB of temporaries per v5p-64 chip (train.aot).
    # mixtral-8x7b / qwen3-30b-a3b: the published shapes at seq 4096, 1 sequence per chip of a
    # v5p:2x2x2 (set batch_size to the chip count of the slice).
    sizes = {"1b": (2048, 1024, 32000), "8b": (8192, 128, 128256), "8b-v5e": (8192, 8, 128256),
             "mixtral-8x7b": (4096, 8, 32000), "qwen3-30b-a3b": (4096, 8, 151936)}
    if arg not in sizes:
        raise ValueError(f"configs/lm.py: unknown variant {arg!r}; use demo, moe-demo, 1b, 8b, 8b-v5e, "
                         "mixtral-8x7b, qwen3-30b-a3b or finetune")
    seq_len, batch, vocab = sizes[arg]
    c.data = data_config("c4")
    # tokenizer: a SentencePiece .model or tokenizer.json matching vocab_size (required).
    # Eval reads the first ~50M tokens of the validation split (24 / 48 batches), not all
    # of it at every eval on every process.
    c.data.update(dict(seq_len=seq_len, tokenizer="", vocab_size=vocab,
                       eval_max_batches=-(-50_000_000 // (seq_len * batch))))
    size = arg if arg in ("mixtral-8x7b", "qwen3-30b-a3b") else arg.split("-")[0]
    c.model = common.model_fields("lm", size, max_seq_len=seq_len, scan_layers=True,
                                  remat="full", dtype="bfloat16", attention="auto")
    # The output head and loss run 1024 positions at a time (models.lm_loss): the 8b's
    # float32 logits over 128k tokens would otherwise be the step's largest temporaries.
    c.loss_chunk = 1024
    c.batch_size = batch  # sequences: 2M tokens (1b) / 1M tokens (8b) per step
    c.num_steps = 100_000
    c.optimizer.warmup_steps = 2000
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_expert=1, dcn_tensor=1))
    c.log_every, c.eval_every, c.checkpoint_every = 20, 2000, 1000
    if arg in ("mixtral-8x7b", "qwen3-30b-a3b"):
        # Half the chips MaxText's AdamW needs (docs/results.md): int8 Lion momentum with the
        # fused apply, and libtpu's bf16 propagation off (it keeps a bf16 copy of stacked layer
        # weights alive across the layer loops). Qwen3-30B-A3B on v5p:2x2x1 with
        # --config.mesh.fsdp=1 --config.mesh.expert=4 or on v5e:4x8 (FSDP); Mixtral-8x7B on
        # v5p:2x2x2 with --config.mesh.fsdp=1 --config.mesh.expert=8.
        c.optimizer.lion.update(dict(mu_dtype="int8", fused_apply=True))
        c.tpu_compiler_options = ml_collections.ConfigDict(dict(xla_jf_bf16_propagation=False))
    if arg == "8b-v5e":
        # Llama-3-8B on the cheapest slice, v5e:2x4 (8 chips of 16 GiB), 1 sequence of 8192
        # per chip: int8 Lion momentum with the fused apply; the head and loss over 8 strided
        # vocabulary slices of the whole sequence; and libtpu's bf16 propagation off, which
        # would otherwise keep a bf16 copy of every stacked layer weight (2 GB per chip)
        # alive through the forward and backward layer loops (docs/results.md).
        c.optimizer.lion.update(dict(mu_dtype="int8", fused_apply=True))
        c.loss_chunk, c.loss_vocab_chunks = 0, 8
        c.tpu_compiler_options = ml_collections.ConfigDict(dict(xla_jf_bf16_propagation=False))
    return c


def finetune_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fine-tuning a Hugging Face Llama-family checkpoint (docs/finetune.md):

        python -m train --config=configs/lm.py:finetune --workdir=DIR \\
            --config.init_from=hf:/ckpt/Llama-3.2-1B \\
            --config.data.name=my_corpus --config.data.data_dir=/data/tfds

    The architecture and the starting weights come from the checkpoint, the tokenizer from its
    tokenizer.json (unless data.tokenizer is set). Lion at 1/5 of a typical AdamW fine-tuning
    lr (2e-5 -> 4e-6) with 10x the weight decay, and b1/b2 0.95/0.98 as the paper uses for LMs.
    """
    c.init_from = ""  # required: hf:PATH
    c.data = data_config("c4")
    # vocab_size None: the checkpoint's; seq_len None: the checkpoint's context, at most 2048;
    # document masking as Llama models train; bos as the checkpoint's tokenizer does.
    c.data.update(dict(tokenizer="", eval_max_batches=16))
    # None: as the checkpoint's tokenizer does (Llama, Mistral: bos; Qwen: none).
    c.data.add_bos = ml_collections.config_dict.placeholder(bool)
    c.data.vocab_size = ml_collections.config_dict.placeholder(int)
    c.data.seq_len = ml_collections.config_dict.placeholder(int)
    c.model = ml_collections.ConfigDict(dict(
        family="lm", scan_layers=True, remat="full", dtype="bfloat16", attention="auto"))
    c.loss_chunk = 1024
    c.batch_size, c.num_steps = 64, 2000  # 128k tokens per step
    c.z_loss = 0.0  # the pretrained head was not trained with one
    # None: the load-balancing loss weight of the checkpoint's config.json (router_aux_loss_coef).
    c.moe_aux_loss = ml_collections.config_dict.placeholder(float)
    c.optimizer.update(dict(warmup_steps=100, schedule="cosine", end_lr_fraction=0.1, grad_clip_norm=1.0))
    c.optimizer.lion = common.lion(4e-6, 0.1, b1=0.95, b2=0.98)
    c.optimizer.adamw = common.adamw(2e-5, 0.01, b1=0.9, b2=0.95)
    c.optimizer.adafactor = common.adafactor(2e-5, 0.01)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_expert=1, dcn_tensor=1))
    c.log_every, c.eval_every, c.checkpoint_every = 10, 200, 200
    c.sample_steps = 0
    return c
