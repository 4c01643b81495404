"""What the trainer needs to know about each model family: build, loss, eval, FLOPs.

A task turns `config.model` into a Flax NNX model and defines the training loss and the
evaluation sums for a batch dict produced by `train.data`. Models hold parameters only;
dropout randomness comes in as a key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models import decoder as decoder_lib
from models import hf as hf_lib
from models import lm_loss
from models import partitioning
from models import vit as vit_lib
from train.errors import ConfigError
from train.data.tokenize import make_tokenizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _model_overrides(model_cfg: Mapping, skip: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for k, v in model_cfg.items():
        if k in skip:
            continue
        if k in ("dtype", "param_dtype"):
            if v not in _DTYPES:
                raise ConfigError(f"model.{k} must be one of {list(_DTYPES)}, got {v!r}")
            v = _DTYPES[v]
        out[k] = v
    return out


# data.seq_len when the config leaves it to the model (None): its context, at most this.
DEFAULT_SEQ_LEN = 2048


class _Task:
    init_from = None  # a Hugging Face checkpoint directory the parameters start from

    def hf_config(self) -> dict | None:
        """The model as a Hugging Face `config.json` dict (for `train.hf export`), or None."""
        return None

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    def resolve(self, config):
        """`config` with what the task derived from it filled in (LM: data.seq_len)."""
        return config

    def abstract_params(self) -> tuple[dict, dict]:
        """(ShapeDtypeStructs, logical axis names) of the parameters as pure dicts, from
        an abstract build (nothing allocated, no mesh); computed once per task."""
        if getattr(self, "_abstract", None) is None:
            with partitioning.sharding_context(None):
                state = nnx.state(nnx.eval_shape(lambda: self.build(nnx.Rngs(0))))
            self._abstract = (nnx.to_pure_dict(state), partitioning.logical_axes(state))
        return self._abstract


class ImageClassification(_Task):
    """ViT on (image, label) batches; softmax cross-entropy with optional label smoothing."""

    batch_keys = ("image", "label")
    depth_field = "depth"

    def __init__(self, config):
        overrides = _model_overrides(config.model, skip=("family", "variant"))
        overrides.setdefault("image_size", config.data.image_size)
        overrides.setdefault("num_classes", config.data.num_classes)
        overrides.setdefault("channels", config.data.channels)
        try:
            self.model_config = vit_lib.vit_config(config.model.variant, **overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None
        self.label_smoothing = float(config.label_smoothing)

    @property
    def num_layers(self) -> int:
        return self.model_config.depth

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        return vit_lib.ViT(self.model_config, rngs=rngs)

    def flops_per_example(self) -> float:
        return vit_lib.train_flops_per_image(self.model_config)

    def units(self, batch_size: int) -> dict[str, float]:
        return {"examples": batch_size}

    def example_batch_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        c = self.model_config
        return {"image": jax.ShapeDtypeStruct((batch_size, c.image_size, c.image_size, c.channels), jnp.float32),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    def loss(self, model, batch, rng):
        logits = model(batch["image"], train=True, dropout_rng=rng)
        labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), self.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, labels).mean()
        accuracy = (jnp.argmax(logits, -1) == batch["label"]).mean()
        return loss, {"accuracy": accuracy}

    def eval_sums(self, model, batch):
        logits = model(batch["image"])
        w = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32)).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"loss": jnp.sum(nll * w), "accuracy": jnp.sum(correct * w), "count": jnp.sum(w)}


class LanguageModeling(_Task):
    """Decoder LM on packed (inputs, targets, mask) batches; cross-entropy + z-loss."""

    batch_keys = ("inputs", "targets", "mask")
    depth_field = "num_layers"

    def __init__(self, config):
        overrides = _model_overrides(config.model, skip=("family", "size"))
        init_from = str(config.get("init_from") or "")
        if init_from:
            self._from_checkpoint(init_from, overrides, config.data.vocab_size)
        else:
            # The vocabulary is data.vocab_size, or the tokenizer's when that is None; padded to a
            # multiple of 128 so the tables shard evenly and map to TPU tiles (32000 and 128256
            # already are; the 257-entry byte vocabulary becomes 384).
            vocab = config.data.vocab_size
            if vocab is None:
                vocab = make_tokenizer(config.data.tokenizer).vocab_size
            overrides.setdefault("vocab_size", -(-int(vocab) // 128) * 128)
            try:
                self.model_config = decoder_lib.decoder_config(config.model.size, **overrides)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"model: {e}") from None
        # data.seq_len None: the model's context, at most DEFAULT_SEQ_LEN (configs/lm.py:finetune).
        seq_len = config.data.seq_len
        self.seq_len = int(seq_len) if seq_len is not None else min(DEFAULT_SEQ_LEN, self.model_config.max_seq_len)
        self.document_mask = bool(config.data.document_mask)
        if self.seq_len > self.model_config.max_seq_len:
            raise ConfigError(
                f"data.seq_len {self.seq_len} exceeds the model's max_seq_len {self.model_config.max_seq_len}")
        self.z_loss = float(config.z_loss)
        # Mixture of experts: weights of the routers' load-balancing and z losses.
        # None (configs/lm.py:finetune): the checkpoint's weight, config.json's router_aux_loss_coef
        # (Mixtral-8x7B 0.02, Qwen3-30B-A3B 0.001; transformers' default 0.001 when absent).
        aux = config.get("moe_aux_loss", 0.0)
        if aux is None:
            aux = self._hf_source.get("router_aux_loss_coef", 0.001) if self.init_from else 0.01
        self.moe_aux_loss, self.moe_z_loss = float(aux), float(config.get("moe_z_loss", 0.0))
        # Sequence positions per chunk of the output head and loss (0: the whole sequence).
        self.loss_chunk = int(config.loss_chunk)
        if self.loss_chunk < 0 or (0 < self.loss_chunk < self.seq_len and self.seq_len % self.loss_chunk):
            raise ConfigError(f"loss_chunk {self.loss_chunk} must be 0 or divide data.seq_len {self.seq_len}")
        # Strided vocabulary slices per output-head/loss step (1: the whole vocabulary).
        self.loss_vocab_chunks = int(config.loss_vocab_chunks)
        vocab = self.model_config.vocab_size
        if self.loss_vocab_chunks < 1 or vocab % self.loss_vocab_chunks:
            raise ConfigError(f"loss_vocab_chunks {self.loss_vocab_chunks} must be >= 1 and divide the "
                              f"model's vocab_size {vocab}")

    # What config.model may still set when the architecture comes from a checkpoint: how to run
    # it, and a cap on its context.
    HOW_TO_RUN = ("dtype", "param_dtype", "scan_layers", "remat", "attention", "expert_matmul")
    RUN_FIELDS = (*HOW_TO_RUN, "max_seq_len")

    def _from_checkpoint(self, init_from: str, overrides: dict, data_vocab) -> None:
        """`init_from='hf:PATH'`: the model config from PATH's config.json (checked against
        its tensors' names and shapes, reading only the safetensors headers)."""
        if not init_from.startswith("hf:"):
            raise ConfigError(f"init_from must be hf:PATH (a Hugging Face checkpoint directory), got {init_from!r}")
        path = init_from[len("hf:"):]
        run = {k: v for k, v in overrides.items() if k in self.RUN_FIELDS}
        try:
            self._hf_source = hf_lib.read_config(path)
            self.model_config = hf_lib.decoder_config(self._hf_source, **run)
            hf_lib.check_tensors(path, self.model_config)
        except (hf_lib.HFCheckpointError, ValueError, TypeError, KeyError) as e:
            what = f"missing config.json field {e}" if isinstance(e, KeyError) else str(e)
            raise ConfigError(f"init_from {path}: {what}") from None
        # The checkpoint defines the shape: a shape key that agrees with it is harmless, one that
        # contradicts it is an error (the CLI drops a preset's own shape keys, train.cli).
        for key, value in sorted(overrides.items()):
            if key in run or value is None:
                continue
            have = getattr(self.model_config, key, None)
            if have != value:
                raise ConfigError(f"model.{key}={value!r} contradicts the checkpoint of init_from ({path}), "
                                  f"which has {have!r}: the checkpoint defines the model's shape; remove it")
        self.init_from = path
        if data_vocab is not None and int(data_vocab) > self.model_config.vocab_size:
            raise ConfigError(f"data.vocab_size={data_vocab} exceeds the vocabulary of the checkpoint "
                              f"{path} ({self.model_config.vocab_size})")

    def resolve(self, config):
        if config.data.seq_len == self.seq_len:
            return config
        config = config.copy_and_resolve_references()
        config.data.seq_len = self.seq_len
        return config

    def hf_config(self) -> dict | None:
        try:
            return hf_lib.hf_config(self.model_config, base=getattr(self, "_hf_source", None))
        except hf_lib.HFCheckpointError:  # not writable as a Hugging Face config: export says why
            return None

    @property
    def num_layers(self) -> int:
        return self.model_config.num_layers

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        return decoder_lib.Decoder(self.model_config, rngs=rngs)

    def flops_per_example(self) -> float:
        return self.seq_len * decoder_lib.train_flops_per_token(self.model_config, self.seq_len)

    def units(self, batch_size: int) -> dict[str, float]:
        return {"examples": batch_size, "tokens": batch_size * self.seq_len}

    def example_batch_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        tokens = jax.ShapeDtypeStruct((batch_size, self.seq_len), jnp.int32)
        shapes = {"inputs": tokens, "targets": tokens,
                  "mask": jax.ShapeDtypeStruct((batch_size, self.seq_len), jnp.float32)}
        if self.document_mask:
            shapes.update(segment_ids=tokens, positions=tokens)
        return shapes

    def _loss(self, model, batch, z_loss):
        hidden, router = model.hidden_and_aux(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
        loss, aux = lm_loss.chunked_cross_entropy(hidden, model.head_kernel(), batch["targets"], batch.get("mask"),
                                                  z_loss, self.loss_chunk, self.loss_vocab_chunks)
        return loss, aux, router

    def loss(self, model, batch, rng):
        del rng  # no dropout in the decoder
        loss, aux, router = self._loss(model, batch, self.z_loss)
        if router:  # a mixture of experts: balance the experts' load, keep the router logits small
            loss = loss + self.moe_aux_loss * router["load_balancing_loss"] + self.moe_z_loss * router["router_z_loss"]
        return loss, {"accuracy": aux["accuracy"], "nll": aux["nll"], **router}

    def eval_sums(self, model, batch):
        _, aux, _ = self._loss(model, batch, 0.0)
        n = aux["num_tokens"]
        return {"loss": aux["nll"] * n, "accuracy": aux["accuracy"] * n, "count": n}


TASKS = {"vit": ImageClassification, "lm": LanguageModeling}


def make_task(config):
    family = config.model.get("family")
    if family not in TASKS:
        raise ConfigError(f"model.family must be one of {list(TASKS)}, got {family!r}")
    return TASKS[family](config)
