"""Hugging Face interop (models/hf.py, train/hf.py, init_from): logits against `transformers`
(the independent reference: tiny random Llama/Mistral models made here with CPU torch)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _util import REPO, cpu_env, train_hf_bpe  # noqa: E402
from models import hf  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, initializer_range=0.2)
# head_dim 16 at theta 5e5: wavelengths 6.3, 32.5, 167, ... across the three bands of an original
# context of 64 (kept below 64 / 4 = 16, scaled above 64, blended between).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
CASES = {
    "gqa_untied": (transformers.LlamaConfig, dict(vocab_size=384, num_key_value_heads=2, rope_theta=10_000.0)),
    "tied_mha": (transformers.LlamaConfig, dict(vocab_size=384, num_key_value_heads=4, tie_word_embeddings=True,
                                                 rms_norm_eps=1e-5)),
    "llama3_rope_scaling": (transformers.LlamaConfig, dict(vocab_size=384, num_key_value_heads=1, rope_theta=500_000.0,
                                                           rope_scaling=LLAMA3_ROPE)),
    "mistral": (transformers.MistralConfig, dict(vocab_size=384, num_key_value_heads=2, sliding_window=None)),
    # A window of 16 over the 96 tokens: logits past position 16 differ from full attention.
    "mistral_window": (transformers.MistralConfig, dict(vocab_size=384, num_key_value_heads=2, sliding_window=16)),
    # q/k-norm, head_dim 32 where d_model / heads is 16; tied as the small Qwen3s are.
    "qwen3_tied": (transformers.Qwen3Config, dict(vocab_size=384, num_key_value_heads=2, head_dim=32,
                                                  tie_word_embeddings=True)),
    "mixtral": (transformers.MixtralConfig, dict(vocab_size=384, num_key_value_heads=2, num_local_experts=4,
                                                 num_experts_per_tok=2, sliding_window=None)),
    "qwen3_moe_topk_renormalised": (transformers.Qwen3MoeConfig, dict(
        vocab_size=384, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True)),
    "qwen3_moe_topk_as_is": (transformers.Qwen3MoeConfig, dict(
        vocab_size=384, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=False)),
}


def save_hf(path, config_cls, seed=0, **fields):
    torch.manual_seed(seed)
    model = config_cls.__name__.replace("Config", "ForCausalLM")
    m = getattr(transformers, model)(config_cls(**{**SMALL, **fields})).eval()
    m.save_pretrained(str(path))
    return m


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


TOKENS = np.random.RandomState(0).randint(0, 384, (2, 96))  # 96 > the llama3 case's 64 original positions


@pytest.mark.parametrize("case", list(CASES))
def test_from_pretrained_logits_equal_transformers(tmp_path, case):
    config_cls, fields = CASES[case]
    reference = save_hf(tmp_path, config_cls, **fields)
    want = hf_logits(reference, TOKENS)
    for scan_layers in (True, False):
        model, cfg = hf.from_pretrained(str(tmp_path), scan_layers=scan_layers, attention="xla")
        got = np.asarray(model(jnp.asarray(TOKENS)))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want).max() > 1.0  # logits large enough for a wrong weight to show
    assert cfg.tie_embeddings == bool(fields.get("tie_word_embeddings", False))
    assert (cfg.rope_scaling is not None) == ("rope_scaling" in fields)


@pytest.mark.parametrize("case", ["qwen3_tied", "mixtral", "qwen3_moe_topk_as_is"])
def test_round_trip_to_transformers(tmp_path, case):
    """import -> save_pretrained -> transformers: the same logits, the same family and
    routing settings in config.json, one tensor per expert."""
    from flax import nnx

    config_cls, fields = CASES[case]
    reference = save_hf(tmp_path / "src", config_cls, **fields)
    model, cfg = hf.from_pretrained(str(tmp_path / "src"), attention="xla")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    hf.save_pretrained(params, cfg, str(tmp_path / "out"), dtype="float32",
                       base_config=hf.read_config(str(tmp_path / "src")))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == [reference.__class__.__name__]
    if cfg.num_experts:
        assert written["num_experts_per_tok"] == 2
        assert written.get("norm_topk_prob", True) == fields.get("norm_topk_prob", True)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), hf_logits(reference, TOKENS), atol=1e-5, rtol=0)
    # A model trained from scratch (no checkpoint config) goes out as the family that can express it.
    assert hf.hf_config(cfg)["architectures"] == [reference.__class__.__name__]


def test_unsupported_family_features_are_one_error_each(tmp_path):
    base = dict(vocab_size=384, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    for extra, message in ((dict(mlp_only_layers=[0]), "dense layers among the mixture-of-experts layers"),
                           (dict(decoder_sparse_step=2), "dense layers among the mixture-of-experts layers")):
        cfg = {**transformers.Qwen3MoeConfig(**{**SMALL, **base}).to_dict(), **extra}
        with pytest.raises(hf.HFCheckpointError, match=message):
            hf.decoder_config(cfg)
    qwen3 = transformers.Qwen3Config(**{**SMALL, "vocab_size": 384, "num_key_value_heads": 2, "use_sliding_window": True,
                                        "sliding_window": 8,
                                        "max_window_layers": 1}).to_dict()
    with pytest.raises(hf.HFCheckpointError, match="a sliding window on some layers only"):
        hf.decoder_config(qwen3)
    assert hf.decoder_config({**qwen3, "max_window_layers": 0, "layer_types": None}).sliding_window == 8
    with pytest.raises(hf.HFCheckpointError, match="is not supported; expected one of LlamaForCausalLM"):
        hf.decoder_config(transformers.GPT2Config().to_dict())
    # A missing expert tensor is named.
    save_hf(tmp_path, transformers.MixtralConfig, vocab_size=384, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2)
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.HFCheckpointError, match="has no tensor model.layers.1.block_sparse_moe.experts.3.w2.weight"):
        hf.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_import_onto_fsdp_tensor_mesh_equals_single_device_import(tmp_path, family):
    """Each device reads its own block; the Mixtral's experts split over an expert axis too,
    so a device reads only its experts' tensors."""
    from flax import nnx

    from models import decoder, partitioning

    if family == "llama":
        save_hf(tmp_path, transformers.LlamaConfig, vocab_size=384, num_key_value_heads=2)
        mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    else:
        save_hf(tmp_path, CASES["mixtral"][0], **CASES["mixtral"][1])
        mesh = jax.make_mesh((2, 2, 2), ("fsdp", "expert", "tensor"))
    cfg = hf.decoder_config(hf.read_config(str(tmp_path)))
    with partitioning.sharding_context(mesh):
        state = nnx.state(nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0))))
        shardings = nnx.to_pure_dict(partitioning.variable_shardings(state, mesh, partitioning.DEFAULT_RULES))
    abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                            nnx.to_pure_dict(state), shardings)
    sharded = hf.load_params(str(tmp_path), cfg, abstract)
    single = hf.load_params(str(tmp_path), cfg, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract))
    for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(single),
                               jax.tree.leaves(shardings)):
        assert a.sharding == s, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    if family == "mixtral":  # [layers, experts, d_model, ffn] over expert x fsdp x tensor
        gate = sharded["layers"]["mlp"]["gate"]
        assert gate.sharding.spec[1:4] == ("expert", "fsdp", "tensor")
        assert gate.addressable_shards[0].data.shape == (2, 2, 32, 48)
        return
    # Really split: the query kernel [embed, heads, head_dim] over fsdp x tensor.
    query = sharded["layers"]["attn"]["query"]
    assert query.sharding.spec[1:3] == ("fsdp", "tensor") and len(query.addressable_shards) == 8
    assert query.addressable_shards[0].data.shape == (2, 16, 2, 16)


def _finetune(src, **changes) -> dict:
    return {"init_from": f"hf:{src}", "data.name": "python_stdlib_text", "data.seq_len": 64, "batch_size": 8,
            "model.dtype": "float32", "model.remat": "none", "loss_chunk": 0, "eval_every": 0,
            "checkpoint_every": 0, **changes}


def _finetune_config(src, **changes):
    from configs import lm as lm_configs

    config = lm_configs.get_config("finetune")
    config.update_from_flattened_dict(_finetune(src, **changes))
    return config


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_import_train_export_reload_gives_the_original_logits(tmp_path, family):
    """hf -> trainer (init_from, the checkpoint's tokenizer.json, one step at lr 0) -> export
    -> transformers: the same logits; a step at the real lr changes them. Also for a
    Qwen3-MoE through the trainer's MoE step (routers, experts, the auxiliary losses)."""
    from train import hf as hf_export
    from train import trainer
    from train.errors import UserError

    src = tmp_path / "src"
    if family == "llama":
        original = save_hf(src, transformers.LlamaConfig, vocab_size=512, num_key_value_heads=2)
    else:
        original = save_hf(src, transformers.Qwen3MoeConfig, vocab_size=512, num_key_value_heads=2, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    train_hf_bpe(src / "tokenizer.json", vocab_size=400)
    results = {}
    for name, lr in (("zero", 0.0), ("real", 1e-3)):
        config = _finetune_config(src, **{"num_steps": 1, "optimizer.lion.learning_rate": lr,
                                          "optimizer.warmup_steps": 0})
        trainer.run(config, str(tmp_path / name))
        out = tmp_path / f"{name}_hf"
        files = hf_export.export(str(tmp_path / name), str(out), dtype="float32")
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
        results[name] = hf_logits(reloaded, TOKENS[:, :40])
    want = hf_logits(original, TOKENS[:, :40])
    np.testing.assert_allclose(results["zero"], want, atol=1e-5, rtol=0)
    assert np.abs(results["real"] - want).max() > 1e-3
    with pytest.raises(UserError, match="exists and is not an empty directory"):  # never overwrites
        hf_export.export(str(tmp_path / "zero"), str(tmp_path / "zero_hf"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "zero_hf"))
    assert tok.decode(tok("def f(x): return x")["input_ids"], skip_special_tokens=True) == "def f(x): return x"


def test_finetune_takes_the_bos_convention_of_the_checkpoint_tokenizer(tmp_path):
    """`configs/lm.py:finetune` leaves data.add_bos to the checkpoint: tokenizer_config.json's
    add_bos_token when it says (Llama 2, Mistral), else whether it names a bos token (Llama 3:
    yes; Qwen: none); a value set by the user wins."""
    from train import trainer

    for name, tok_config, want in (("llama2", {"add_bos_token": True, "bos_token": "<s>"}, True),
                                   ("llama3", {"bos_token": "<|begin_of_text|>"}, True),
                                   ("qwen", {"bos_token": None, "eos_token": "<|im_end|>"}, False),
                                   ("said_no", {"add_bos_token": False, "bos_token": "<s>"}, False),
                                   ("none", None, False)):
        (tmp_path / name).mkdir()
        if tok_config is not None:
            (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(tok_config))
        config = _finetune_config(tmp_path / name)
        assert trainer._with_checkpoint_tokenizer(config).data.add_bos is want, name
        assert config.data.add_bos is None  # copied, not changed
        config.data.add_bos = not want
        assert trainer._with_checkpoint_tokenizer(config).data.add_bos is (not want), name


def test_finetune_takes_the_load_balancing_weight_of_the_checkpoint(tmp_path):
    """`configs/lm.py:finetune` weighs the load-balancing loss as the checkpoint's config.json
    says (`router_aux_loss_coef`: Mixtral-8x7B's is 0.02), transformers' default 0.001 when it
    says nothing; a weight set by the user wins."""
    from train import tasks

    save_hf(tmp_path / "said", transformers.MixtralConfig, vocab_size=384, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2, sliding_window=None, router_aux_loss_coef=0.02)
    save_hf(tmp_path / "default", transformers.Qwen3MoeConfig, vocab_size=384, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    config_json = tmp_path / "default" / "config.json"
    config_json.write_text(json.dumps({k: v for k, v in json.loads(config_json.read_text()).items()
                                       if k != "router_aux_loss_coef"}))
    assert tasks.make_task(_finetune_config(tmp_path / "said")).moe_aux_loss == 0.02
    assert tasks.make_task(_finetune_config(tmp_path / "default")).moe_aux_loss == 0.001
    assert tasks.make_task(_finetune_config(tmp_path / "said", moe_aux_loss=0.05)).moe_aux_loss == 0.05


def test_export_in_bf16_with_sharded_files_loads_in_transformers(tmp_path):
    from flax import nnx

    src = tmp_path / "src"
    original = save_hf(src, transformers.LlamaConfig, vocab_size=384, num_key_value_heads=2)
    model, cfg = hf.from_pretrained(str(src))
    files = hf.save_pretrained(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, str(tmp_path / "out"),
                               dtype="bfloat16", max_shard_bytes=60_000)
    assert "model.safetensors.index.json" in files and len(files) > 3
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(files) - 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    got, want = hf_logits(reloaded.eval(), TOKENS), hf_logits(original, TOKENS)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # bf16 weights: ~3 significant digits


def _gpt2(path):
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=384)).save_pretrained(str(path))


def _missing_tensor(path):
    from safetensors.numpy import load_file, save_file

    save_hf(path, transformers.LlamaConfig, vocab_size=384, num_key_value_heads=2)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("make, message", [
    (_gpt2, "architecture GPT2LMHeadModel (model_type 'gpt2') is not supported"),
    (_missing_tensor, "has no tensor model.layers.1.mlp.up_proj.weight"),
])
def test_unusable_checkpoint_is_one_error_line_before_the_workdir(tmp_path, make, message):
    import subprocess
    import sys

    make(tmp_path / "src")
    train_hf_bpe(tmp_path / "src" / "tokenizer.json", vocab_size=300)
    flags = [f"--config.{k}={v}" for k, v in _finetune(tmp_path / "src").items()]
    proc = subprocess.run([sys.executable, "-m", "train", "--config=configs/lm.py:finetune",
                           f"--workdir={tmp_path / 'w'}", *flags],
                          cwd=REPO, env=cpu_env(1), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("args, message", [
    (["export", "--workdir={tmp}/none", "--out={tmp}/out"], "has no checkpoints/ (not a training workdir)"),
    (["convert", "--workdir={tmp}", "--out={tmp}/out"], "expected one command (export), got convert"),
    (["export", "--workdir={tmp}"], "--out is required"),
])
def test_export_cli_refusals_are_one_error_line(tmp_path, args, message):
    import subprocess
    import sys

    args = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-m", "train.hf", *args], cwd=REPO, env=cpu_env(1),
                          capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: ") and message in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_first_hour_import_then_export_from_the_command_line(tmp_path):
    """The README's fine-tune commands as pasted, with `~` paths (bash leaves `~` after `=`
    alone), on a checkpoint whose context (48) is shorter than the preset's 2048: the
    finetune preset follows it; num_steps=0 saves step 0, so import -> export needs no
    training; a preset that names a model shape (demo) gives way to the checkpoint with one
    notice line, and only a shape key set on the command line that contradicts it stops."""
    import subprocess
    import sys

    home = tmp_path / "home"
    original = save_hf(home / "ckpt", transformers.LlamaConfig, vocab_size=512, num_key_value_heads=2,
                       max_position_embeddings=48)
    train_hf_bpe(home / "ckpt" / "tokenizer.json", vocab_size=400)
    env = {**cpu_env(1), "HOME": str(home)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=str(tmp_path), env={**env, "PYTHONPATH": REPO},
                              capture_output=True, text=True, timeout=240)

    small = ["--config.data.name=python_stdlib_text", "--config.batch_size=8", "--config.model.dtype=float32",
             "--config.eval_every=0", "--config.num_steps=0", "--config.init_from=hf:~/ckpt"]
    result = cli("train", f"--config={REPO}/configs/lm.py:finetune", "--workdir=~/ft", *small)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((home / "ft" / "checkpoints" / "0" / "meta" / "metadata").read_text())
    assert meta["config"]["data"]["seq_len"] == 48  # the checkpoint's context, not 2048
    result = cli("train.hf", "export", "--workdir=~/ft", "--out=~/ft_hf", "--dtype=float32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "~").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(home / "ft_hf")).eval()
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS[:, :40]), hf_logits(original, TOKENS[:, :40]),
                               atol=1e-5, rtol=0)

    demo = [f"--config={REPO}/configs/lm.py:demo", "--config.data.seq_len=32", *small]
    result = cli("train", "--workdir=~/demo", *demo)
    assert result.returncode == 0, result.stderr[-3000:]
    notices = [line for line in result.stderr.splitlines() if line.startswith("notice: init_from")]
    assert len(notices) == 1 and "d_model" in notices[0], result.stderr[-3000:]
    assert (home / "demo" / "checkpoints" / "0").is_dir()
    result = cli("train", "--workdir=~/demo2", *demo, "--config.model.d_model=128")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "model.d_model=128 contradicts the checkpoint" in errors[0] and "which has 64" in errors[0]
    assert not (home / "demo2").exists()


def test_export_writes_back_what_it_imported_and_refuses_what_it_cannot(tmp_path, monkeypatch):
    """Mistral's sliding window: modelled at any length (logits of 48 tokens over a window of
    16 equal transformers', which differ from full attention's), and the export is a Mistral
    with the same window; a Mistral without a window exports an explicit null (a missing key
    reads as 4096); a tied checkpoint exports tied (no lm_head tensor); a logit soft-cap,
    which a Llama config.json cannot say, is refused."""
    import dataclasses
    import tempfile

    from flax import nnx
    from safetensors import safe_open

    src = tmp_path / "mistral"
    reference = save_hf(src, transformers.MistralConfig, vocab_size=384, num_key_value_heads=2, sliding_window=16)
    model, cfg = hf.from_pretrained(str(src), attention="xla")
    assert cfg.sliding_window == 16 and cfg.max_seq_len == 256
    tokens = TOKENS[:, :48]
    want = hf_logits(reference, tokens)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), want, atol=1e-4, rtol=0)
    full = hf.from_pretrained(str(src), attention="xla", sliding_window=None)[0]  # the old import
    assert np.abs(np.asarray(full(jnp.asarray(tokens))) - want)[:, 16:].max() > 1e-2
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    hf.save_pretrained(params, cfg, str(tmp_path / "mistral_out"), dtype="float32", base_config=hf.read_config(str(src)))
    written = json.loads((tmp_path / "mistral_out" / "config.json").read_text())
    assert written["sliding_window"] == 16 and written["architectures"] == ["MistralForCausalLM"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "mistral_out")).eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens), want, atol=1e-5, rtol=0)
    hf.save_pretrained(params, dataclasses.replace(cfg, sliding_window=None), str(tmp_path / "no_window"),
                       dtype="float32", base_config=hf.read_config(str(src)))
    written = json.loads((tmp_path / "no_window" / "config.json").read_text())
    assert "sliding_window" in written and written["sliding_window"] is None

    tied_src = tmp_path / "tied"
    tied = save_hf(tied_src, transformers.LlamaConfig, vocab_size=384, num_key_value_heads=4, tie_word_embeddings=True)
    model, cfg = hf.from_pretrained(str(tied_src), attention="xla")
    hf.save_pretrained(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, str(tmp_path / "tied_out"), dtype="float32")
    assert json.loads((tmp_path / "tied_out" / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(tmp_path / "tied_out" / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" not in f.keys()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "tied_out")).eval()
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), hf_logits(tied, TOKENS), atol=1e-5, rtol=0)

    with pytest.raises(hf.HFCheckpointError, match="attn_logit_softcap=30.0 has no field"):
        hf.hf_config(dataclasses.replace(cfg, attn_logit_softcap=30.0))

    # A remote checkpoint (gs://) is read through local copies that are gone afterwards.
    from etils import epath

    local = epath.Path(str(tied_src))
    from models.hf import checkpoint as hf_files

    monkeypatch.setattr(hf_files, "_epath", lambda p: local if str(p).startswith("remote://") else epath.Path(str(p)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    model, _ = hf.from_pretrained("remote://bucket/tied", attention="xla")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), hf_logits(tied, TOKENS), atol=1e-4, rtol=0)
    assert os.listdir(tmp_path / "tmp") == []  # the copies were made there, and removed
