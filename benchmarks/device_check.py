"""What one accelerator measures, in one report (run by benchmarks/device_check.sh).

  device      the devices jax sees, jax / jaxlib versions, the chip table entry used for MFU
  lion_update benchmarks/lion_update.py: ours vs optax.lion vs optax.adamw, time and bytes
  train_step  the `1b` decoder (TinyLlama shape) at seq 2048 on one device, Lion vs AdamW,
              attention `auto` (splash on TPU, cuDNN on GPU) vs `xla`: measured tokens/s, MFU
  attention   on a GPU, cuDNN's packed-document attention (segment lengths and offsets, also
              with more segments than CUDNN_SEGMENTS, and a sliding window) against XLA's
              segment-id attention: max output and gradient differences, ms per call
  demo        `configs/lm.py:demo` trained, checkpointed, then resumed once by the same command
              with more steps: loss, eval loss, tokens/s, the step it resumed from

    python benchmarks/device_check.py --out DIR [--dry-run]

`--dry-run`: the same sections with tiny sizes (any backend, the CPU included). Writes
DIR/device_check.json and DIR/device_check.md; a section that fails is reported as its error
and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The dry run is on the CPU; otherwise the default backend (an explicit empty JAX_PLATFORMS,
# which benchmarks/common.py's CPU default leaves alone).
os.environ.setdefault("JAX_PLATFORMS", "cpu" if "--dry-run" in sys.argv else "")

import jax  # noqa: E402
import jaxlib  # noqa: E402

sys.path[:0] = [REPO, HERE]


def _env(dry: bool) -> dict:
    """The subprocesses' environment: this one's backend choice, the repository importable."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def device_section(dry: bool) -> dict:
    from train import hardware

    d = jax.devices()[0]
    chip = hardware.chip_for_device_kind(d.device_kind)
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": sys.version.split()[0],
            "chip": None if chip is None else {"name": chip.name, "peak_bf16_flops": chip.peak_flops,
                                              "hbm_bytes": chip.hbm_bytes, "hbm_bandwidth": chip.hbm_bandwidth},
            "dry_run": dry}


def lion_update_section(dry: bool) -> dict:
    args = ["--layers", "1", "--width", "128", "--iters", "3"] if dry else ["--layers", "7", "--iters", "15"]
    proc = subprocess.run([sys.executable, os.path.join(HERE, "lion_update.py"), *args], cwd=REPO, env=_env(dry),
                          capture_output=True, text=True, timeout=240)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {"args": args, "summary": proc.stdout.splitlines()[0], "rows": rows, "markdown": "\n".join(lines)}


def _step_config(optimizer: str, attention: str, dry: bool):
    from configs import lm as lm_configs

    c = lm_configs.get_config("1b")
    c.data.name, c.data.kind = "synthetic", "text"
    c.optimizer.name, c.model.attention = optimizer, attention
    c.mesh.fsdp = -1
    if dry:
        c.model.update(dict(size="tiny", dtype="float32", max_seq_len=128))
        c.data.update(dict(seq_len=128, vocab_size=256))
        c.batch_size, c.loss_chunk = 2, 0
    else:
        c.batch_size = 8 * jax.device_count()  # 16k tokens per device per step
    return c


def train_step_section(dry: bool) -> dict:
    import common  # the trainer's state and jitted step, timed without a host sync per step

    from train import metrics as metrics_lib

    steps, rows = (3 if dry else 10), []
    for attention in ("auto", "xla"):
        for optimizer in ("lion", "adamw"):
            config = _step_config(optimizer, attention, dry)
            row = {"optimizer": optimizer, "attention": attention, "batch": config.batch_size,
                   "seq_len": config.data.seq_len}
            try:
                start = time.perf_counter()
                runner = common.StepRunner(config)  # builds, initializes, compiles, 2 warm-up steps
                row["compile_and_first_step_s"] = round(time.perf_counter() - start, 2)
                seconds = runner.run(steps)
                peak = metrics_lib.peak_flops_total()
                row.update(ms_per_step=round(seconds * 1e3, 2),
                           tokens_per_s=round(config.batch_size * config.data.seq_len / seconds),
                           mfu=round(runner.flops_per_step / seconds / peak, 4) if peak else None,
                           params=int(sum(x.size for x in jax.tree.leaves(runner.state.params))))
                stats = jax.devices()[0].memory_stats() or {}
                if "peak_bytes_in_use" in stats:
                    row["peak_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
                del runner
            except Exception as e:  # noqa: BLE001 - report it, keep measuring the rest
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rows.append(row)
            print(f"  train_step {row}", file=sys.stderr, flush=True)
    return {"timed_steps": steps, "rows": rows}


def attention_section(dry: bool) -> dict:
    """cuDNN's packed layout against XLA's segment-id mask, forward and gradients (GPU only)."""
    import jax.numpy as jnp
    import numpy as np

    from models import attention

    if attention.platform() != "gpu":
        return {"skipped": f"cuDNN needs a GPU, this is {attention.platform()!r}"}
    batch, seq, heads, kv_heads, dim = (2, 256, 4, 2, 64) if dry else (4, 4096, 32, 8, 128)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(key, (batch, seq, h, dim), jnp.bfloat16) / (dim ** 0.25 if i == 0 else 1)
               for i, (key, h) in enumerate(zip(keys, (heads, kv_heads, kv_heads))))
    docs = np.cumsum(np.random.default_rng(0).random((batch, seq)) < 8 / seq, axis=1) + 1  # ~8 a row
    many = docs.copy()
    many[0] = np.arange(seq) // 2 + 1  # seq / 2 documents: the exact branch
    weights = jax.random.normal(keys[3], (batch, seq, heads, dim))
    rows = []
    for name, ids, window in (("docs", docs, None), ("docs+window", docs, 512 if not dry else 32),
                              ("many docs", many, None)):
        ids = jnp.asarray(ids, jnp.int32)

        def loss(q, k, v, impl):
            out = attention.attend(q, k, v, implementation=impl, causal=True, segment_ids=ids, window=window)
            return (out.astype(jnp.float32) * weights).sum(), out

        grads = {}
        row = {"case": name, "segments_max": int(attention.segment_count(ids).max())}
        for impl in ("cudnn", "xla"):
            fn = jax.jit(jax.value_and_grad(lambda q, k, v: loss(q, k, v, impl), argnums=(0, 1, 2), has_aux=True))
            (_, out), g = jax.block_until_ready(fn(q, k, v))
            start = time.perf_counter()
            for _ in range(5):
                jax.block_until_ready(fn(q, k, v))
            row[f"{impl}_ms_fwd_bwd"] = round((time.perf_counter() - start) / 5 * 1e3, 2)
            grads[impl] = (out, *g)
        diffs = [float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
                 for a, b in zip(grads["cudnn"], grads["xla"])]
        row.update(max_diff_out=diffs[0], max_diff_dq=diffs[1], max_diff_dk=diffs[2], max_diff_dv=diffs[3])
        rows.append(row)
        print(f"  attention {row}", file=sys.stderr, flush=True)
    return {"shape": [batch, seq, heads, kv_heads, dim], "rows": rows}


def demo_section(dry: bool) -> dict:
    first, second = (20, 30) if dry else (100, 150)
    workdir = tempfile.mkdtemp(prefix="device_check_demo_")
    flags = ["--config=configs/lm.py:demo", f"--workdir={workdir}", "--config.sample_steps=0",
             f"--config.checkpoint_every={first}", f"--config.eval_every={first}", "--config.log_every=10"]
    if dry:
        flags += ["--config.model.num_layers=1", "--config.batch_size=8", "--config.data.eval_max_batches=1"]
    runs = []
    for num_steps in (first, second):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "train", *flags, f"--config.num_steps={num_steps}"],
                              cwd=REPO, env=_env(dry), capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
        runs.append(round(time.perf_counter() - start, 1))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if "loss" in r and "step" in r]
    evals = [r for r in rows if "eval_loss" in r]
    starts = [r["step"] for r in rows if r.get("event") == "start"]
    last = train[-1]
    return {"steps": [first, second], "wall_s": runs, "start_steps": starts,
            "resumed_from": starts[-1] if len(starts) > 1 else None,
            "first_loss": train[0]["loss"], "last_loss": last["loss"],
            "eval_loss": [(r["step"], r["eval_loss"]) for r in evals],
            "tokens_per_s": last.get("tokens_per_sec"), "checkpoints": sorted(os.listdir(os.path.join(workdir, "checkpoints")))}


def markdown(report: dict) -> str:
    d = report["device"]
    out = [f"# Device check ({'dry run, ' if d.get('dry_run') else ''}{d.get('device_count')} x "
           f"{d.get('device_kind')}, jax {d.get('jax')})", ""]
    lu = report.get("lion_update", {})
    out += ["## Lion update", "", lu.get("error") or lu.get("summary", ""), "", lu.get("markdown", ""), ""]
    ts = report.get("train_step", {})
    out += ["## Train step, 1b decoder", "", ts.get("error", ""),
            "| optimizer | attention | batch x seq | ms/step | tokens/s | MFU | peak GiB | compile + first step s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in ts.get("rows", []):
        if "error" in r:
            out.append(f"| {r['optimizer']} | {r['attention']} | {r['batch']}x{r['seq_len']} | error: {r['error']} | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        out.append(f"| {r['optimizer']} | {r['attention']} | {r['batch']}x{r['seq_len']} | {r['ms_per_step']} | "
                   f"{r['tokens_per_s']} | {mfu} | {r.get('peak_gib', 'n/a')} | {r['compile_and_first_step_s']} |")
    att = report.get("attention", {})
    out += ["", "## cuDNN packed documents vs XLA segment mask (bf16)", "",
            att.get("error") or att.get("skipped") or f"batch, seq, heads, kv heads, head dim: {att.get('shape')}"]
    if att.get("rows"):
        out += ["", "| case | max segments | cudnn ms | xla ms | max diff out / dq / dk / dv |", "|---|---|---|---|---|"]
        out += [f"| {r['case']} | {r['segments_max']} | {r['cudnn_ms_fwd_bwd']} | {r['xla_ms_fwd_bwd']} | "
                f"{r['max_diff_out']:.3g} / {r['max_diff_dq']:.3g} / {r['max_diff_dk']:.3g} / {r['max_diff_dv']:.3g} |"
                for r in att["rows"]]
    demo = report.get("demo", {})
    out += ["", "## LM demo: train, checkpoint, resume", ""]
    if not demo:
        out.append("not run")
    elif "error" in demo:
        out.append(f"error: {demo['error']}")
    else:
        out.append(f"steps {demo['steps'][0]} then {demo['steps'][1]} (resumed from {demo['resumed_from']}), "
                   f"wall {demo['wall_s']} s, loss {demo['first_loss']:.3f} -> {demo['last_loss']:.3f}, "
                   f"eval loss {demo['eval_loss']}, {demo['tokens_per_s']} tokens/s, checkpoints {demo['checkpoints']}")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, any backend")
    parser.add_argument("--only", nargs="+", choices=("lion_update", "train_step", "attention", "demo"),
                        default=["lion_update", "train_step", "attention", "demo"])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report = {"device": device_section(args.dry_run)}
    print(f"device: {report['device']}", flush=True)
    sections = {"lion_update": lion_update_section, "train_step": train_step_section, "attention": attention_section,
                "demo": demo_section}
    for name in args.only:
        start = time.perf_counter()
        try:
            report[name] = sections[name](args.dry_run)
        except Exception as e:  # noqa: BLE001 - one section's failure is part of the report
            report[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "traceback": traceback.format_exc()[-2000:]}
        report[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {report[name]['seconds']} s{' (error)' if 'error' in report[name] else ''}", flush=True)
        with open(os.path.join(args.out, "device_check.json"), "w") as f:  # partial report survives a timeout
            json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "device_check.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    sys.exit(1 if any("error" in report[n] for n in args.only) else 0)


if __name__ == "__main__":
    main()
