"""Safetensors in and out: reading each device's block of each tensor straight into its
sharding, checking names and shapes from the headers, and writing checkpoints in shards."""

from __future__ import annotations

import itertools
import json
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from models import decoder
from models.hf.common import HFCheckpointError, Tensor
from models.hf.registry import hf_config, tensor_map


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


def _hf_shape(t: Tensor, ours: tuple[int, ...]) -> tuple[int, ...]:
    if not t.split:
        return ours
    return (math.prod(ours[t.split:]), math.prod(ours[:t.split]))


def _flat_range(index: tuple[slice, ...], dims: tuple[int, ...]) -> slice:
    """The contiguous range of the flattened `dims` covering the first dim's slice."""
    s = index[0]
    inner = math.prod(dims[1:])
    return slice(s.start * inner, s.stop * inner)


def _read(view, t: Tensor, ours: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
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

    def read(self, name: str, t: Tensor, ours, index) -> np.ndarray:
        return _read(self.handle(self.files[name]).get_slice(name), t, ours, index)



def _leaf_tensors(cfg, path: tuple, t: Tensor, shape: tuple[int, ...]):
    """(n, {index: hf name}, per-tensor shape) for one of our leaves: its first n dims (the
    stacked layers, the experts) are enumerated in the checkpoint's names."""
    dims, fixed = [], {}
    if path[0] == "layers":
        if cfg.scan_layers:
            dims.append("i")
        else:
            fixed["i"] = path[1]
    if t.expert:
        dims.append("e")
    n = len(dims)
    names = {idx: t.name.format(**fixed, **dict(zip(dims, idx)))
             for idx in itertools.product(*(range(s) for s in shape[:n]))}
    return n, names, tuple(shape[n:])


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
    """(tensor, n, names, per-tensor shape) of one of our leaves, each name present in `ckpt`
    in the shape `cfg` implies; HFCheckpointError naming the first that is not."""
    t = tensors.get(_key(cfg, leaf_path))
    if t is None:
        raise HFCheckpointError(f"no checkpoint tensor maps to parameter {'/'.join(map(str, leaf_path))}")
    n, names, ours = _leaf_tensors(cfg, leaf_path, t, shape)
    want = _hf_shape(t, ours)
    for name in names.values():
        got = ckpt.shape(name)
        if got != want:
            raise HFCheckpointError(f"tensor {name} has shape {got}, config.json implies {want}")
    return t, n, names, ours


def check_tensors(path: str, cfg: decoder.DecoderConfig) -> None:
    """Raises HFCheckpointError naming the first tensor `cfg` needs that the checkpoint at
    `path` lacks or holds in another shape (reads only the safetensors headers)."""
    with Checkpoint(path) as ckpt:
        tensors = tensor_map(cfg, read_config(path))
        for leaf_path, leaf in _walk(abstract_params(cfg)):
            _checked_tensors(ckpt, cfg, tensors, leaf_path, tuple(leaf.shape))


def load_params(path: str, cfg: decoder.DecoderConfig, abstract_params: dict) -> dict:
    """The checkpoint's tensors as our pure-dict params, each created in the sharding of its
    `abstract_params` leaf (ShapeDtypeStruct; without a sharding: on the default device).
    Every device's block is read on its own: a process reads only what its devices hold,
    and of a stacked expert weight only its layers' and experts' tensors."""
    with Checkpoint(path) as ckpt:
        return _load_params(ckpt, cfg, abstract_params, tensor_map(cfg, read_config(path)))


def _load_params(ckpt: Checkpoint, cfg, abstract_params: dict, tensors) -> dict:
    out: dict = {}
    for leaf_path, leaf in _walk(abstract_params):
        t, n, names, ours = _checked_tensors(ckpt, cfg, tensors, leaf_path, tuple(leaf.shape))

        def block(index, t=t, n=n, names=names, ours=ours, dtype=leaf.dtype, shape=tuple(leaf.shape)):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            ranges = [range(*index[d].indices(shape[d])) for d in range(n)]
            parts = [ckpt.read(names[idx], t, ours, index[n:]) for idx in itertools.product(*ranges)]
            return np.stack(parts).reshape(tuple(map(len, ranges)) + parts[0].shape).astype(dtype)

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


def hf_tensors(params: dict, cfg: decoder.DecoderConfig, fetch=None, base: dict | None = None):
    """Yields (checkpoint name, numpy array in Hugging Face layout) for our pure-dict
    `params`, one tensor at a time; `fetch(leaf) -> np.ndarray` gets a leaf to this host
    (default `np.asarray`; a sharded multi-process array needs a gather)."""
    fetch = fetch or np.asarray
    tensors = tensor_map(cfg, base)
    for leaf_path, leaf in _walk(params):
        t = tensors[_key(cfg, leaf_path)]
        n, names, _ = _leaf_tensors(cfg, leaf_path, t, tuple(leaf.shape))
        # A stacked leaf comes to the host one layer at a time (Qwen3-30B-A3B's stacked
        # float32 expert weights are 38.6 GB each; one layer's, 0.8).
        chunks = [((), leaf)] if n == 0 else (((i,), leaf[i]) for i in range(leaf.shape[0]))
        for prefix, part in chunks:
            value = fetch(part)
            for idx, name in names.items():
                if idx[:len(prefix)] != prefix:
                    continue
                v = value[idx[len(prefix):]]
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

    for name, value in hf_tensors(params, cfg, fetch, base_config):
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
