"""Quality of the Lion options on the demos: momentum dtype, stochastic rounding, Cautious
Lion, the fused int8 apply; 3 seeds each, side by side in one run.

    python benchmarks/lion_variants.py [--task reduced|demo|vit] [--variants bf16,int8,...]
                                       [--seeds 3] [--quick]

Tasks: `reduced` is the LM of benchmarks/compare_optimizers.py (configs/lm.py:demo with 2
layers, batch 16, 300 steps); `demo` is configs/lm.py:demo unchanged (4 layers, batch 32,
900 steps; ~4.5 min per run on 2 idle cores); `vit` is configs/vit.py:demo unchanged (ViT
on the 8x8 digits, 1500 steps, ~1 min per run). Every run goes through `train.trainer.run`
with Lion at the setting benchmarks/compare_optimizers.py picked for it on the reduced task
(read from benchmarks/results/compare_optimizers.json), the demo configs' own Lion settings
otherwise.
Prints a Markdown table: final eval loss (nats/byte for the LMs) and eval accuracy (next
byte / digit), mean ± std over seeds, the loss's relative difference to bf16 momentum, and
wall time per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import common  # first: sets the environment before jax loads

from configs import lm as lm_configs
from configs import vit as vit_configs

# name -> overrides of config.optimizer.lion
VARIANTS = {
    "bf16": {},
    "fp32": {"mu_dtype": "float32"},
    "int8": {"mu_dtype": "int8"},  # one scale per row (block_size 0)
    "int8 SR": {"mu_dtype": "int8", "stochastic_rounding": True},
    "int8 b256": {"mu_dtype": "int8", "block_size": 256},
    "int8 b256 SR": {"mu_dtype": "int8", "block_size": 256, "stochastic_rounding": True},
    "bf16 SR": {"stochastic_rounding": True},
    "cautious": {"cautious": True},
    "int8 fused": {"mu_dtype": "int8", "fused_apply": True},  # lion_optax.fused_lion
}


def base_config(task: str, quick: bool):
    if task == "demo":
        c = lm_configs.get_config("demo")
        c.sample_steps, c.checkpoint_every = 0, 0
    elif task == "vit":
        c = vit_configs.get_config("demo")
        c.checkpoint_every = 0
    else:
        c = common.demo_task("byte LM", quick)
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                               "compare_optimizers.json")) as f:
            chosen = json.load(f)["byte LM"]["lion"]
        c.optimizer.lion.update({k: v for k, v in chosen.items() if v is not None})
    c.optimizer.name = "lion"
    if quick:
        c.num_steps, c.eval_every, c.log_every, c.optimizer.warmup_steps = 40, 20, 20, 10
    return c


def final_eval(config, root: str) -> tuple[float, float]:
    """(eval loss, eval accuracy) of the last evaluation of a fresh run of `config`."""
    _, rows = common.train_and_read(config, root)
    last = [r for r in rows if "eval_loss" in r][-1]
    return last["eval_loss"], last.get("eval_accuracy", float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("reduced", "demo", "vit"), default="reduced")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of "
                    + ", ".join(VARIANTS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 40 steps")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    seeds = range(1 if args.quick else args.seeds)

    results, accuracy, seconds, start = {}, {}, {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for seed in seeds:  # seed-major: a cut-short run still compares every variant
            for name in names:
                c = base_config(args.task, args.quick)
                c.seed = seed
                c.optimizer.lion.update(VARIANTS[name])
                t0 = time.perf_counter()
                loss, acc = final_eval(c, root)
                seconds.setdefault(name, []).append(time.perf_counter() - t0)
                results.setdefault(name, []).append(loss)
                accuracy.setdefault(name, []).append(acc)
                print(f"  {name:9s} seed {seed}: eval loss {loss:.4f}, accuracy {acc:.4f} "
                      f"({seconds[name][-1]:.0f} s)", flush=True)

    ref = statistics.mean(results.get("bf16", results[names[0]]))
    print(f"\n`python benchmarks/lion_variants.py --task {args.task}`"
          f"{' --quick' if args.quick else ''}: {len(seeds)} seed(s), "
          f"{(time.perf_counter() - start) / 60:.1f} min on {os.cpu_count()} CPU core(s)\n")
    unit = "" if args.task == "vit" else " (nats/byte)"
    print(f"| momentum / option | final eval loss{unit} | vs bf16 | eval accuracy | s/run |\n"
          "|---|---|---|---|---|")

    def mean_std(xs):
        return f"{statistics.mean(xs):.4f} ± {statistics.pstdev(xs) if len(xs) > 1 else 0.0:.4f}"

    for name in names:
        losses = results[name]
        print(f"| {name} | {mean_std(losses)} | {statistics.mean(losses) / ref - 1:+.2%} | "
              f"{mean_std(accuracy[name])} | {statistics.mean(seconds[name]):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
