"""Train-step speed of Lion vs AdamW (and Adafactor), measured on this CPU.

CPU: the LM and ViT demo train steps (configs/lm.py:demo, configs/vit.py:demo), built as
`train.trainer` builds them (sharded `init_state`, jitted donated `make_train_step`, a real
batch from the demo's data pipeline), timed in interleaved rounds so every optimizer sees
the same machine load. Reports the median step time, steps/s, MFU against the CPU matmul
peak measured in the same run, and each optimizer's step time over Lion's.

No TPU estimate: the roofline this benchmark used to print (max(model FLOPs / peak, XLA's
HBM bytes / bandwidth)) is the peak by definition whenever compute dominates; step times on a
chip come from `benchmarks/device_check.sh` on the chip itself.

    python benchmarks/train_step.py [--steps 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import common  # noqa: E402 - first: sets the environment before jax loads

import jax  # noqa: E402

from configs import lm as lm_configs  # noqa: E402
from configs import vit as vit_configs  # noqa: E402
from train import metrics as metrics_lib  # noqa: E402

# (name, config module, variant, optimizers); Lion first: ratios are relative to it.
CPU_CASES = (("LM demo", lm_configs, "demo", ("lion", "adamw", "adafactor")),
             ("ViT demo", vit_configs, "demo", ("lion", "adamw")))


def cpu_table(num_steps: int, rounds: int) -> str:
    peak = metrics_lib.measure_matmul_flops()
    runners, failed = {}, {}
    for name, module, variant, optimizers in CPU_CASES:
        for opt in optimizers:
            config = module.get_config(variant)
            config.optimizer.name = opt
            try:
                runners[name, opt] = common.StepRunner(config)
            except Exception as e:  # keep timing the others; show the failure in the table
                failed[name, opt] = type(e).__name__
                print(f"  {name} {opt}: {type(e).__name__}: {str(e).splitlines()[0]}",
                      file=sys.stderr, flush=True)
    for _ in range(rounds):  # interleaved: each round times every runner once
        for runner in runners.values():
            runner.seconds.append(runner.run(num_steps))

    lines = [f"CPU ({os.cpu_count()} cores, {jax.devices()[0].device_kind}), measured float32 matmul "
             f"peak {peak / 1e9:.1f} GFLOP/s; median of {rounds} interleaved rounds x {num_steps} steps:",
             "", "| model | batch | optimizer | ms/step | steps/s | MFU | step time / Lion |",
             "|---|---|---|---|---|---|---|"]
    for (name, opt), runner in runners.items():
        seconds = statistics.median(runner.seconds)
        lion = statistics.median(runners[name, "lion"].seconds)
        lines.append(f"| {name} | {runner.config.batch_size} | {opt} | {seconds * 1e3:.2f} | "
                     f"{1 / seconds:.1f} | {runner.flops_per_step / seconds / peak:.1%} | "
                     f"{seconds / lion:.3f} |")
    for (name, opt), error in failed.items():
        lines.append(f"| {name} | | {opt} | error: {error} | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    args = parser.parse_args()

    start = time.perf_counter()
    print(cpu_table(args.steps, args.rounds) + "\n", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
