"""Distributed Lion vs Lion: bytes communicated per step, and quality on the byte-LM demo.

    python benchmarks/distributed_lion.py [--quick] [--no-tpu] [--out FILE.md]

(a) Communication: the real train step (trainer code path, `train.aot`) is compiled for 8
    CPU devices (mesh data=8) on `configs/lm.py:demo`, and, with libtpu, ahead of time for
    a TPU v5e 2x4 slice on the `small` decoder (d 768, 12 layers, seq 1024, batch 32,
    data=8), with standard Lion and Distributed Lion (majority and mean votes).
    `train.analysis.hlo_bytes` sums the collectives of each compiled program: operand bytes and
    per-device wire bytes (ring convention) per step, and the ratios against the compiled
    standard Lion step (on TPU, XLA all-reduces most gradients in bfloat16) and against a
    ring all-reduce of every gradient in float32.
(b) Quality: the reduced LM demo of benchmarks/compare_optimizers.py (2 layers, 300 steps)
    at batch 32 on 8 CPU devices (8 data-parallel workers of 4 sequences), Lion lr 1e-3,
    wd 0.09, b1/b2 0.95/0.98 (that benchmark's Lion choice), seeds 0, 1, 2: final eval
    loss mean ± std per optimizer and the relative gap to standard Lion.

`--quick`: one seed, 40 steps, no TPU compile; a smoke run. `--no-tpu`, `--no-quality`
leave those parts out. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
import common  # noqa: E402 - after XLA_FLAGS, before jax loads

import jax
import numpy as np

from configs import lm as lm_configs
from train import aot, setup
from train.analysis import hlo_bytes
from train.errors import UserError

VARIANTS = {"lion": "", "majority": "majority", "mean": "mean"}  # name -> lion.distributed
SEEDS = (0, 1, 2)
LION = {"learning_rate": 1e-3, "weight_decay": 0.09, "b1": 0.95, "b2": 0.98}


def with_vote(config, vote: str):
    c = config.copy_and_resolve_references()
    c.optimizer.name = "lion"
    c.optimizer.lion.distributed = vote
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8, 1, 1
    return c


def comm_of(config, devices=None) -> dict:
    """hlo_bytes totals and per-kind numbers of the compiled train step of `config`."""
    built = setup.build(config, devices)
    state, lowered = built.abstract_state, built.lower_train_step()
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    return {"params": params, **hlo_bytes.collective_bytes(lowered.compile().as_text())}


def tpu_config():
    c = lm_configs.get_config("1b")
    c.model.size = "small"
    c.data.vocab_size = 32000
    c.data.seq_len = c.model.max_seq_len = 1024
    c.batch_size = 32
    return c


def comm_table(quick: bool, tpu: bool) -> str:
    setups = [("CPU x8, `lm.py:demo`", lm_configs.get_config("demo"), None)]
    if tpu and not quick:
        try:
            setups.append(("TPU v5e 2x4 (AOT), `small` decoder", tpu_config(),
                           aot.topology_devices("v5e:2x4")[0]))
        except (UserError, ImportError) as e:
            print(f"TPU compile skipped: {e}", flush=True)
    lines = [("| setup | params | optimizer | collectives per step | operand bytes / step "
              "| wire bytes / device / step | less than compiled Lion | less than fp32 all-reduce |"),
             "|---|---|---|---|---|---|---|---|"]
    for label, config, devices in setups:
        results = {}
        for name, vote in VARIANTS.items():
            t0 = time.perf_counter()
            results[name] = comm_of(with_vote(config, vote), devices)
            print(f"  {label} {name}: compiled in {time.perf_counter() - t0:.0f} s: "
                  f"{json.dumps(results[name])}", flush=True)
        reference = results["lion"]["total"]["wire_bytes"]
        fp32 = 2 * 7 / 8 * 4 * results["lion"]["params"]  # ring all-reduce of fp32 grads, N=8
        for name, r in results.items():
            kinds = ", ".join(f"{r[k]['count']} {k}" for k in hlo_bytes.KINDS if k in r)
            total = r["total"]
            lines.append(f"| {label} | {r['params']:,} | {name} | {kinds} | {total['operand_bytes']:,.0f} | "
                         f"{total['wire_bytes']:,.0f} | {reference / total['wire_bytes']:.1f}x | "
                         f"{fp32 / total['wire_bytes']:.1f}x |")
    return "\n".join(lines)


def lm_task(quick: bool):
    """compare_optimizers' reduced byte-LM demo, at batch 32 on mesh data=8."""
    config = common.demo_task("byte LM", quick)
    config.batch_size = 32
    config.eval_every = config.num_steps  # only the final eval is reported
    config.optimizer.lion.update(LION)
    return config


def quality_table(quick: bool, root: str) -> str:
    base = lm_task(quick)
    seeds = SEEDS[:1] if quick else SEEDS
    finals: dict[str, list[float]] = {}
    for name, vote in VARIANTS.items():
        for seed in seeds:
            c = with_vote(base, vote)
            c.seed = seed
            t0 = time.perf_counter()
            last, rows = common.train_and_read(c, root)
            evals = [r for r in rows if "eval_loss" in r]
            finals.setdefault(name, []).append(evals[-1]["eval_loss"])
            print(f"  {name} seed {seed}: final eval loss {evals[-1]['eval_loss']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s, {last['examples_per_sec'] / c.batch_size:.1f} "
                  "steps/s)", flush=True)
    ref = np.mean(finals["lion"])
    lines = [(f"| optimizer ({base.num_steps} steps, batch {base.batch_size} on 8 workers) "
              f"| final eval loss (mean ± std, {len(seeds)} seed(s)) | gap vs Lion |"),
             "|---|---|---|"]
    for name, values in finals.items():
        gap = "-" if name == "lion" else f"{(np.mean(values) - ref) / ref:+.2%}"
        lines.append(f"| {name} | {np.mean(values):.4f} ± {np.std(values):.4f} | {gap} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 40 steps, no TPU")
    parser.add_argument("--no-tpu", action="store_true", help="skip the TPU ahead-of-time compile")
    parser.add_argument("--no-quality", action="store_true", help="communication tables only")
    parser.add_argument("--out", default="", help="also write the tables to this Markdown file")
    args = parser.parse_args()

    t0 = time.perf_counter()
    print("communication:", flush=True)
    comm = comm_table(args.quick, not args.no_tpu)
    quality = ""
    if not args.no_quality:
        print("quality:", flush=True)
        with tempfile.TemporaryDirectory() as root:
            quality = quality_table(args.quick, root)
    wall = time.perf_counter() - t0
    command = ("python benchmarks/distributed_lion.py" + " --quick" * args.quick + " --no-tpu" * args.no_tpu
               + " --no-quality" * args.no_quality)
    text = f"`{command}`: {wall / 60:.1f} min on {os.cpu_count()} CPU core(s).\n\n{comm}\n\n{quality}\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
