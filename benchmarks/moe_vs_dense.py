"""The MoE byte LM against the dense byte LM at equal active parameters and steps, with AdamW
and Lion at the byte LM's tuned settings, 3 seeds each:

    python benchmarks/moe_vs_dense.py [--out benchmarks/results]

Tasks as `benchmarks/compare_optimizers.py` cuts them (2 layers, batch 16, 300 steps): the
byte LM (SwiGLU width 384) and the MoE byte LM (8 experts of width 192, top-2: 384 of active
width, 4x the MLP parameters). Both optimizers run at the lr / weight decay / betas
compare_optimizers.py chose on the dense byte LM (benchmarks/results/compare_optimizers.json),
not re-tuned on the MoE (`compare_optimizers.py --tasks "MoE byte LM"` tunes it). Also
reports the MoE's expert load (largest rows per expert over layers / mean) at the first and
last logged step, seed-mean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import common  # first: sets the environment before jax loads
import numpy as np

SEEDS = (0, 1, 2)
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def run(config, optimizer: str, hp: dict, seed: int, root: str) -> list[dict]:
    c = config.copy_and_resolve_references()
    c.seed, c.optimizer.name = seed, optimizer
    for key, value in hp.items():
        if value is not None:
            c.optimizer[optimizer][key] = value
    return common.train_and_read(c, root)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    with open(os.path.join(RESULTS, "compare_optimizers.json")) as f:
        tuned = json.load(f)["byte LM"]
    t0 = time.perf_counter()
    lines = ["| task | optimizer | eval loss | eval accuracy | expert load max/mean, first -> last step |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        for task in ("byte LM", "MoE byte LM"):
            config = common.demo_task(task, quick=False)
            for optimizer in ("adamw", "lion"):
                finals, loads = [], []
                for seed in SEEDS:
                    rows = run(config, optimizer, tuned[optimizer], seed, root)
                    evals = [r for r in rows if "eval_loss" in r]
                    finals.append((evals[-1]["eval_loss"], evals[-1]["eval_accuracy"]))
                    logged = [r for r in rows if "expert_load_max" in r]
                    if logged:
                        loads.append([r["expert_load_max"] / r["expert_load_mean"] for r in (logged[0], logged[-1])])
                    print(f"{task} {optimizer} seed {seed}: eval loss {finals[-1][0]:.4f}", flush=True)
                loss, acc = np.array(finals).T
                load = (" -> ".join(f"{v:.2f}" for v in np.mean(loads, axis=0)) if loads else "-")
                lines.append(f"| {task} | {optimizer} | {loss.mean():.4f} ± {loss.std():.4f} | "
                             f"{acc.mean():.4f} ± {acc.std():.4f} | {load} |")
    wall = time.perf_counter() - t0
    table = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "moe_vs_dense.md"), "w") as f:
        f.write(f"`python benchmarks/moe_vs_dense.py`: {wall / 60:.1f} min wall time on {os.cpu_count()} "
                f"CPU core(s); 3 seeds, mean ± std.\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
