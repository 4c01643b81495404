"""Helpers shared by the trainer tests: tiny configs, metrics readers, subprocess runners."""

import json
import os
import socket
import subprocess
import sys

from configs import lm as lm_configs
from configs import vit as vit_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny LM of the trainer tests, as config overrides (flattened keys).
TINY_LM = {
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.ffn_dim": 64, "model.max_seq_len": 64, "data.seq_len": 32, "data.eval_max_batches": 2,
    "num_steps": 6, "batch_size": 16, "log_every": 1, "eval_every": 0, "checkpoint_every": 3,
    "sample_steps": 0, "optimizer.schedule": "constant", "optimizer.warmup_steps": 0,
}


def tiny_lm(**overrides):
    c = lm_configs.get_config("demo")
    c.update_from_flattened_dict({**TINY_LM, **overrides})
    return c


def tiny_vit(**overrides):
    c = vit_configs.get_config("demo")
    c.model.update(dict(width=32, depth=2, mlp_dim=64, num_heads=2))
    c.update(dict(num_steps=4, batch_size=16, log_every=1, eval_every=4, checkpoint_every=4))
    c.update_from_flattened_dict(overrides)
    return c


def cli_flags(**overrides) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**TINY_LM, **overrides}.items()]


def read_metrics(workdir):
    path = os.path.join(str(workdir), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(workdir):
    """step -> loss; for steps logged twice (replayed after a crash) the last entry wins."""
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def starts(workdir):
    """The step each invocation of the trainer on `workdir` started at (its "start" events):
    [0, 4] is a fresh run resumed once from step 4; a restart would show as [0, 0]."""
    return [m["step"] for m in read_metrics(workdir) if m.get("event") == "start"]


def assert_resumed_at(workdir, step, stderr=None):
    """The last invocation resumed at `step`: its start event says so (and its stderr, when
    given), and no step up to `step` was trained (logged) twice."""
    assert starts(workdir)[-1] == step, starts(workdir)
    if stderr is not None:
        assert f"resumed from step {step}" in stderr, stderr[-2000:]
    logged = [m["step"] for m in read_metrics(workdir) if "loss" in m and m["step"] <= step]
    assert len(logged) == len(set(logged)), "steps before the resume point were trained again"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int = 8) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def start_trainer(*args, devices: int = 8, **popen_kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, env=cpu_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs)


def run_trainer(*args, devices: int = 8, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=cpu_env(devices),
                          capture_output=True, text=True, timeout=timeout)


def run_two_processes(workdir, *, check: bool = True, **overrides):
    """`python -m train` as 2 processes x 4 CPU devices (gloo over loopback); with
    check=False, returns [(returncode, stderr)] per process instead of asserting rc 0."""
    port = free_port()
    args = ["--config=configs/lm.py:demo", f"--workdir={workdir}", *cli_flags(**overrides),
            f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
    procs = [start_trainer(*args, f"--process_id={i}", devices=4) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    if not check:
        return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


def train_hf_bpe(path, vocab_size=400, special=("<|begin_of_text|>", "<|end_of_text|>")):
    """A byte-level BPE tokenizer.json (GPT-2 / Llama-3 style) trained here on stdlib text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from train.data import python_stdlib_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    files = python_stdlib_text.stdlib_files()
    tok.train_from_iterator((t for _, t in files[:30]), trainer=trainer)
    # Like Llama-3's: encode() prepends the first special token unless told not to.
    tok.post_processor = processors.TemplateProcessing(single=f"{special[0]} $A",
                                                       special_tokens=[(special[0], 0)])
    tok.save(str(path))
    return tok
