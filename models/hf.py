"""Hugging Face Llama-family checkpoints in and out of `models.decoder.Decoder`.

    model, cfg = hf.from_pretrained("/ckpt/TinyLlama-1.1B")     # config.json + *.safetensors
    logits = model(tokens)                                      # == transformers' logits
    params = hf.load_params(path, cfg, abstract_params)         # straight into shardings
    hf.save_pretrained(params, cfg, out_dir, dtype="bfloat16")  # loadable by transformers

Supported: `LlamaForCausalLM` / `MistralForCausalLM` (`model_type` llama or mistral; also
TinyLlama, Llama 2 / 3 / 3.1): RMSNorm, RoPE (plain, `linear` or `llama3` scaling), grouped-
query attention without biases, SwiGLU, tied or untied embeddings. Anything else is refused
with `HFCheckpointError` naming what differs.

Layouts. Hugging Face stores linear weights as [out, in] (`q_proj`: [heads * head_dim,
d_model]); the decoder stores [in, out] split by axis (`query`: [d_model, heads, head_dim]),
and with `scan_layers` one array per weight stacked over layers. Both use the "rotate half"
RoPE convention, so no permutation of q/k is needed. `load_params` reads, for each device's
shard, only the rows and columns of the safetensors tensors that the shard holds
(`safe_open(...).get_slice`), so no host ever holds the whole model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from models import decoder

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MODEL_TYPES = ("llama", "mistral")


class HFCheckpointError(ValueError):
    """The checkpoint cannot become a `Decoder` (other architecture, missing tensors, ...)."""


def _epath(path: str):
    from etils import epath
    return epath.Path(os.path.expanduser(str(path)))


def read_config(path: str) -> dict:
    """The checkpoint directory's `config.json` as a dict."""
    file = _epath(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise HFCheckpointError(f"{path} has no config.json (not a Hugging Face checkpoint directory)") from None
    except (OSError, ValueError) as e:
        raise HFCheckpointError(f"{file} cannot be read: {str(e).splitlines()[0][:160]}") from None


def _rope(hf: dict) -> tuple[float, decoder.RopeScaling | None]:
    """(rope_theta, scaling) from `rope_theta` + `rope_scaling` (transformers 4) or
    `rope_parameters` (transformers 5)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise HFCheckpointError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
    fields = dict(kind=kind, factor=float(params["factor"]))
    if kind == "llama3":
        fields.update(low_freq_factor=float(params["low_freq_factor"]),
                      high_freq_factor=float(params["high_freq_factor"]),
                      original_max_len=int(params["original_max_position_embeddings"]))
    return theta, decoder.RopeScaling(**fields)


def decoder_config(hf: dict, **overrides: Any) -> decoder.DecoderConfig:
    """Our `DecoderConfig` from a Hugging Face `config.json` dict; `overrides` set fields
    the checkpoint does not fix (dtype, param_dtype, scan_layers, remat, attention,
    max_seq_len)."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") not in MODEL_TYPES or (archs and not set(archs) & set(ARCHITECTURES)):
        raise HFCheckpointError(
            f"architecture {'/'.join(archs) or '?'} (model_type {hf.get('model_type')!r}) is not "
            f"supported; expected {' or '.join(ARCHITECTURES)}")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, want) != want:
            raise HFCheckpointError(f"config.json {key}={hf[key]!r} is not supported (needs {want!r})")
    heads = int(hf["num_attention_heads"])
    theta, scaling = _rope(hf)
    max_len = int(hf.get("max_position_embeddings", 2048))
    # Mistral's sliding window (every layer); transformers' MistralConfig takes a missing
    # key as 4096, so only an explicit null means none.
    window = hf.get("sliding_window", 4096 if hf.get("model_type") == "mistral" else None)
    fields = dict(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        ffn_dim=int(hf["intermediate_size"]),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        max_seq_len=max_len, rope_theta=theta, rope_scaling=scaling,
        sliding_window=int(window) if window else None,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
    return decoder.DecoderConfig(**{**fields, **overrides})


# ----------------------------------------------------------------------------- tensor map


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """How one of our parameters (per layer) is stored in the checkpoint: `name`, and
    `split` > 0 for a linear weight: ours = hf.T reshaped, its first `split` dims being
    hf's input (column) dims; 0 for a tensor stored as is."""

    name: str
    split: int = 0


def tensor_map(cfg: decoder.DecoderConfig) -> dict[tuple, _Tensor]:
    """Our pure-dict parameter path (layers as '{i}' in the HF name) -> checkpoint tensor."""
    layer = "model.layers.{i}."
    out = {("embed",): _Tensor("model.embed_tokens.weight"),
           ("final_norm", "scale"): _Tensor("model.norm.weight")}
    if not cfg.tie_embeddings:
        out[("lm_head",)] = _Tensor("lm_head.weight", split=1)
    per_layer = {
        ("attn", "query"): _Tensor(layer + "self_attn.q_proj.weight", 1),
        ("attn", "key"): _Tensor(layer + "self_attn.k_proj.weight", 1),
        ("attn", "value"): _Tensor(layer + "self_attn.v_proj.weight", 1),
        ("attn", "out"): _Tensor(layer + "self_attn.o_proj.weight", 2),
        ("mlp", "gate"): _Tensor(layer + "mlp.gate_proj.weight", 1),
        ("mlp", "up"): _Tensor(layer + "mlp.up_proj.weight", 1),
        ("mlp", "down"): _Tensor(layer + "mlp.down_proj.weight", 1),
        ("attn_norm", "scale"): _Tensor(layer + "input_layernorm.weight"),
        ("mlp_norm", "scale"): _Tensor(layer + "post_attention_layernorm.weight"),
    }
    for path, t in per_layer.items():
        out[("layers",) + path] = t
    return out


def _hf_shape(t: _Tensor, ours: tuple[int, ...]) -> tuple[int, ...]:
    if not t.split:
        return ours
    return (math.prod(ours[t.split:]), math.prod(ours[:t.split]))


def _flat_range(index: tuple[slice, ...], dims: tuple[int, ...]) -> slice:
    """The contiguous range of the flattened `dims` covering the first dim's slice."""
    s = index[0]
    inner = math.prod(dims[1:])
    return slice(s.start * inner, s.stop * inner)


def _read(view, t: _Tensor, ours: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """The block `index` of our (per-layer) array `ours`, read from `view` (a safetensors
    slice of the tensor `t` describes)."""
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, ours))
    if not t.split:
        return np.asarray(view[index])
    ins, outs = ours[:t.split], ours[t.split:]
    rows, cols = _flat_range(index[t.split:], outs), _flat_range(index[:t.split], ins)
    block = np.asarray(view[rows, cols]).T  # [in range, out range]
    block = block.reshape((index[0].stop - index[0].start,) + ins[1:]
                          + (index[t.split].stop - index[t.split].start,) + outs[1:])
    inner = (slice(None),) + index[1:t.split] + (slice(None),) + index[t.split + 1:]
    return block[inner]


class Checkpoint:
    """The safetensors files of a checkpoint directory: which file holds which tensor."""

    def __init__(self, path: str):
        self.path, self.remote = _epath(path), "://" in str(path)
        self._handles: dict[str, Any] = {}
        self._cache: str | None = None
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        elif (self.path / "model.safetensors").exists():
            self.files = {name: "model.safetensors" for name in self.handle("model.safetensors").keys()}
        else:
            raise HFCheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json")

    def handle(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open
            self._handles[file] = safe_open(self._local(file), framework="numpy")
        return self._handles[file]

    def _local(self, file: str) -> str:
        """A local path of `file`: itself, or for an object-store checkpoint (gs://, s3://) a
        copy on local disk made once per process (safetensors reads by memory-mapping),
        removed by `close`."""
        source = self.path / file
        if not self.remote:
            return os.fspath(source)
        import tempfile
        if self._cache is None:
            self._cache = tempfile.mkdtemp(prefix="hf_checkpoint_")
        target = os.path.join(self._cache, file)
        if not os.path.exists(target):
            source.copy(target)
        return target

    def close(self) -> None:
        """Closes the files and removes the local copies of a remote checkpoint."""
        import shutil

        self._handles.clear()
        if self._cache is not None:
            shutil.rmtree(self._cache, ignore_errors=True)
            self._cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.files:
            raise HFCheckpointError(f"{self.path} has no tensor {name}")
        return tuple(self.handle(self.files[name]).get_slice(name).get_shape())

    def read(self, name: str, t: _Tensor, ours, index) -> np.ndarray:
        return _read(self.handle(self.files[name]).get_slice(name), t, ours, index)


def _leaf_tensors(cfg, path: tuple, t: _Tensor, shape: tuple[int, ...]):
    """[(hf name, per-layer shape)] for one of our leaves: one per layer under `layers`."""
    if path[0] != "layers":
        return [(t.name, shape)]
    if cfg.scan_layers:
        return [(t.name.format(i=i), shape[1:]) for i in range(cfg.num_layers)]
    return [(t.name.format(i=path[1]), shape)]


def _walk(params: dict, prefix=()):
    for k, v in params.items():
        if isinstance(v, dict):
            yield from _walk(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _key(cfg, path: tuple) -> tuple:
    return path[:1] + path[2:] if path[0] == "layers" and not cfg.scan_layers else path


def abstract_params(cfg: decoder.DecoderConfig) -> dict:
    """The decoder's parameters as a pure dict of ShapeDtypeStructs (nothing allocated)."""
    from models import partitioning

    with partitioning.sharding_context(None):
        model = nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _checked_tensors(ckpt: Checkpoint, cfg, tensors, leaf_path: tuple, shape: tuple[int, ...]):
    """(tensor, [(name, per-layer shape)]) of one of our leaves, each name present in `ckpt`
    in the shape `cfg` implies; HFCheckpointError naming the first that is not."""
    t = tensors.get(_key(cfg, leaf_path))
    if t is None:
        raise HFCheckpointError(f"no checkpoint tensor maps to parameter {'/'.join(map(str, leaf_path))}")
    parts = _leaf_tensors(cfg, leaf_path, t, shape)
    for name, ours in parts:
        want, got = _hf_shape(t, ours), ckpt.shape(name)
        if got != want:
            raise HFCheckpointError(f"tensor {name} has shape {got}, config.json implies {want}")
    return t, parts


def check_tensors(path: str, cfg: decoder.DecoderConfig) -> None:
    """Raises HFCheckpointError naming the first tensor `cfg` needs that the checkpoint at
    `path` lacks or holds in another shape (reads only the safetensors headers)."""
    with Checkpoint(path) as ckpt:
        tensors = tensor_map(cfg)
        for leaf_path, leaf in _walk(abstract_params(cfg)):
            _checked_tensors(ckpt, cfg, tensors, leaf_path, tuple(leaf.shape))


def load_params(path: str, cfg: decoder.DecoderConfig, abstract_params: dict) -> dict:
    """The checkpoint's tensors as our pure-dict params, each created in the sharding of its
    `abstract_params` leaf (ShapeDtypeStruct; without a sharding: on the default device).
    Every device's block is read on its own: a process reads only what its devices hold."""
    with Checkpoint(path) as ckpt:
        return _load_params(ckpt, cfg, abstract_params)


def _load_params(ckpt: Checkpoint, cfg: decoder.DecoderConfig, abstract_params: dict) -> dict:
    tensors = tensor_map(cfg)
    out: dict = {}
    for leaf_path, leaf in _walk(abstract_params):
        t, parts = _checked_tensors(ckpt, cfg, tensors, leaf_path, tuple(leaf.shape))
        stacked = leaf_path[0] == "layers" and cfg.scan_layers

        def block(index, parts=parts, t=t, stacked=stacked, dtype=leaf.dtype, shape=leaf.shape):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            if not stacked:
                name, ours = parts[0]
                return ckpt.read(name, t, ours, index).astype(dtype)
            layers = range(*index[0].indices(shape[0]))
            return np.stack([ckpt.read(parts[i][0], t, parts[i][1], index[1:]) for i in layers]).astype(dtype)

        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            array = jax.numpy.asarray(block((slice(None),) * len(leaf.shape)))
        else:
            array = jax.make_array_from_callback(tuple(leaf.shape), sharding, block)
        node = out
        for k in leaf_path[:-1]:
            node = node.setdefault(k, {})
        node[leaf_path[-1]] = array
    return out


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


# ----------------------------------------------------------------------------- export


def hf_config(cfg: decoder.DecoderConfig, dtype: str = "bfloat16", base: dict | None = None) -> dict:
    """A `config.json` dict for `cfg` (written with transformers-4 key names, which 5 also
    reads); `base` (the imported checkpoint's config) keeps fields we do not model, such
    as the bos/eos token ids."""
    if cfg.attn_logit_softcap is not None:
        raise HFCheckpointError(f"attn_logit_softcap={cfg.attn_logit_softcap} has no field in a Llama or "
                                "Mistral config.json: transformers would compute other logits")
    if cfg.num_experts or cfg.qk_norm:
        raise HFCheckpointError("mixture-of-experts and q/k-norm models (Mixtral, Qwen3) are not "
                                "written as Hugging Face checkpoints yet")
    out = {k: v for k, v in (base or {}).items()
           if k not in ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype")}
    # A sliding window is written as a Mistral (with the window), as is a Mistral checkpoint
    # without one (its window an explicit null: MistralConfig reads a missing one as 4096);
    # anything else as a Llama.
    window = cfg.sliding_window
    mistral = window is not None or out.get("model_type") == "mistral"
    family = ("MistralForCausalLM", "mistral") if mistral else ("LlamaForCausalLM", "llama")
    out.update(
        architectures=[family[0]], model_type=family[1], hidden_act="silu",
        attention_bias=False, mlp_bias=False, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=int(out.get("max_position_embeddings", cfg.max_seq_len)),
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        torch_dtype=dtype)
    if mistral:
        out["sliding_window"] = window
    else:
        out.pop("sliding_window", None)
    s = cfg.rope_scaling
    if s is not None:
        out["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor} if s.kind == "linear" else {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_len}
    return out


def hf_tensors(params: dict, cfg: decoder.DecoderConfig, fetch=None):
    """Yields (checkpoint name, numpy array in Hugging Face layout) for our pure-dict
    `params`, one tensor at a time; `fetch(leaf) -> np.ndarray` gets a leaf to this host
    (default `np.asarray`; a sharded multi-process array needs a gather)."""
    fetch = fetch or np.asarray
    tensors = tensor_map(cfg)
    for leaf_path, leaf in _walk(params):
        t = tensors[_key(cfg, leaf_path)]
        value = fetch(leaf)
        names = [name for name, _ in _leaf_tensors(cfg, leaf_path, t, value.shape)]
        values = value if leaf_path[0] == "layers" and cfg.scan_layers else [value]
        for name, v in zip(names, values, strict=True):
            if t.split:
                v = v.reshape(math.prod(v.shape[:t.split]), -1).T
            yield name, np.ascontiguousarray(v)


def save_pretrained(params: dict, cfg: decoder.DecoderConfig, out_dir: str, *, dtype: str = "bfloat16",
                    max_shard_bytes: int = 5 * 2**30, base_config: dict | None = None, fetch=None) -> list[str]:
    """Writes `config.json` and `model-0000i-of-0000n.safetensors` (+ index when sharded)
    into `out_dir`: `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads it.
    Holds at most one shard file's tensors in host memory. Returns the files written."""
    import ml_dtypes
    from safetensors.numpy import save_file

    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[dtype]
    out = _epath(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, os.fspath(out / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
        current, size = {}, 0

    for name, value in hf_tensors(params, cfg, fetch):
        value = value.astype(np_dtype)
        if current and size + value.nbytes > max_shard_bytes:
            flush()
        current[name], size, total = value, size + value.nbytes, total + value.nbytes
    flush()
    files = []
    weight_map = {}
    for i, (name, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        (out / name).rename(out / final)
        files.append(final)
        weight_map.update({n: final for n in names})
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        files.append("model.safetensors.index.json")
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype, base_config), indent=2))
    return files + ["config.json"]
