"""`python -m train.hf export --workdir=W [--step=N] --out=DIR [--dtype=bfloat16|float32]`

Writes a trained decoder as a Hugging Face checkpoint: `config.json`, `*.safetensors`
(sharded at `--max_shard_gb`) and the run's tokenizer files, loadable with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)`. Only the parameters are read
from the checkpoint (not the optimizer state), in shards over all devices, and gathered
to the host one tensor at a time. Run it with as many processes as the model needs
(`--coordinator` etc. as for training); process 0 writes. Errors: one `error:` line, exit 2.
"""

from __future__ import annotations

import os
import shutil
import sys

from absl import app, flags, logging

from train import cli
from train.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's --workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist or be empty).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "Tensor dtype written.")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors file, GiB.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _saved(workdir: str, step: int | None):
    """(step, meta) of the run's checkpoint; UserError when there is none."""
    import orbax.checkpoint as ocp

    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise UserError(f"{workdir} has no checkpoints/ (not a training workdir)")
    manager = ocp.CheckpointManager(directory, item_names=("state", "data", "meta"))
    steps = manager.all_steps()
    if not steps:
        raise UserError(f"{directory} holds no checkpoint")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise UserError(f"no checkpoint step {step} in {directory} (steps: {sorted(steps)})")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta or {}
    return manager, step, meta


def _model_config(meta: dict):
    """The run's DecoderConfig: from the `hf_config` the trainer saved, else rebuilt from
    the saved training config."""
    import ml_collections

    from models import hf
    from train import tasks

    config = ml_collections.ConfigDict(meta.get("config") or {})
    if config.get("model", {}).get("family") != "lm":
        raise UserError("the checkpoint is not a decoder LM's (model.family is not 'lm')")
    run_fields = {k: v for k, v in config.model.items() if k in ("scan_layers", "param_dtype")}
    if "hf_config" in meta:
        params_dtype = tasks._DTYPES[run_fields.pop("param_dtype", "float32")]
        return config, meta["hf_config"], hf.decoder_config(meta["hf_config"], param_dtype=params_dtype,
                                                            attention="xla", **run_fields)
    model_config = tasks.make_task(config).model_config
    return config, hf.hf_config(model_config), model_config


def _restore_params(manager, step: int, model_config):
    """The checkpoint's parameters only, sharded over all devices (fsdp rules)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    from models import decoder, partitioning

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
    with partitioning.sharding_context(mesh):
        model = nnx.eval_shape(lambda: decoder.Decoder(model_config, rngs=nnx.Rngs(0)))
        state = nnx.state(model)
        shardings = nnx.to_pure_dict(partitioning.variable_shardings(state, mesh, partitioning.DEFAULT_RULES))
    abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                            nnx.to_pure_dict(state), shardings)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    item = ocp.args.PyTreeRestore(item={"params": abstract}, restore_args={"params": restore_args},
                                  partial_restore=True)
    return manager.restore(step, args=ocp.args.Composite(state=item)).state["params"]


def _copy_tokenizer(tokenizer: str, out: str) -> list[str]:
    """The run's tokenizer files next to the weights: `data.tokenizer` (a tokenizer.json or
    SentencePiece .model, or a directory holding one) and the tokenizer_config.json /
    special_tokens_map.json beside it; [] for the byte tokenizer."""
    if not tokenizer or tokenizer == "bytes":
        return []
    path = os.path.expanduser(tokenizer)
    written = []
    if not os.path.isdir(path):
        target = "tokenizer.model" if path.endswith(".model") else "tokenizer.json"
        shutil.copyfile(path, os.path.join(out, target))
        written.append(target)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for name in TOKENIZER_FILES:
        source = os.path.join(folder, name)
        if name not in written and os.path.isfile(source) and (os.path.isdir(path) or name in TOKENIZER_FILES[1:3]):
            shutil.copyfile(source, os.path.join(out, name))
            written.append(name)
    return written


def export(workdir: str, out: str, step: int | None = None, dtype: str = "bfloat16",
           max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes the checkpoint of `workdir` (newest, or `step`) to `out`; returns the files."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from models import hf

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out} exists and is not an empty directory")
    manager, step, meta = _saved(workdir, step)
    try:
        config, hf_config, model_config = _model_config(meta)
    except hf.HFCheckpointError as e:
        raise UserError(f"step {step} of {workdir} cannot be written as a Hugging Face checkpoint: {e}") from None
    params = _restore_params(manager, step, model_config)

    def fetch(leaf):
        if jax.process_count() > 1:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(jax.device_get(leaf))

    tokenizer = str(config.data.get("tokenizer", ""))
    if tokenizer and tokenizer != "bytes" and "eos_token_id" not in hf_config:
        from train.data.tokenize import make_tokenizer  # a model trained here: ids from its tokenizer
        tok = make_tokenizer(tokenizer, False)
        hf_config = {**hf_config, "eos_token_id": tok.eos_id, "bos_token_id": tok.bos_id}
    files = []
    if jax.process_index() == 0:
        files = hf.save_pretrained(params, model_config, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
                                   base_config=hf_config, fetch=fetch)
        files += _copy_tokenizer(tokenizer, out)
    else:  # the gathers are collective: every process takes part
        for _ in hf.hf_tensors(params, model_config, fetch, hf_config):
            pass
    return files


def main(argv: list[str]) -> None:
    del argv  # ["export"], checked by the flags parser
    logging.set_verbosity(logging.WARNING)
    from train import multihost

    try:
        multihost.skip_tpu_probe_without_chips()
        multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        files = export(_WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value,
                       int(_MAX_SHARD_GB.value * 2**30))
    except UserError as e:
        cli.fail(str(e))
    if files:
        print(f"wrote {_OUT.value}: {', '.join(files)}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("workdir", "out", commands=("export",)))
