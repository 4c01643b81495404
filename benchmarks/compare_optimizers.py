"""Lion vs AdamW (and Adafactor on the LM) on the two CPU demos, with a small lr sweep.

    python benchmarks/compare_optimizers.py [--quick] [--out benchmarks/results]

Tasks: `configs/vit.py:demo` (ViT on sklearn digits) shortened to `VIT_STEPS`, and a reduced
`configs/lm.py:demo` (byte LM on the Python stdlib source: 2 layers, batch 16, `LM_STEPS`).
Every run uses the trainer itself (`train.trainer.run`), so schedule, clipping, masking and
data order are exactly those of `python -m train`.

Protocol, per task and optimizer:
  1. Sweep 3 learning rates with seed 0. AdamW and Adafactor try {c/3, c, 3c} around the
     demo config's lr c at the demo's weight decay. Lion's grid is AdamW's grid mapped by the
     paper's rule (`lion_optax.adamw_to_lion_hparams`, factor 3: lr / 3, wd * 3), so against
     AdamW's centre lr it tries lr factors 9, 3 and 1, and keeps lr * wd equal to AdamW's.
     On the LM, Lion uses b1/b2 = 0.95/0.98 as in the paper.
     If the best lr is at an edge of the grid, the sweep extends it by one more 3x step in
     that direction (at most `MAX_EXTEND` times), so no optimizer is left at a grid edge.
  2. Keep the lr with the lowest final eval loss; rerun it with seeds 1 and 2.

Outputs in --out: `compare_optimizers.png` (eval loss and accuracy vs step: seed mean, with
a min-max band) and `compare_optimizers.md` (best lr/wd, final eval metrics as mean ± std
over 3 seeds, and the first eval step at which the seed-mean curve reaches AdamW's final
mean). `--quick`: 1 seed, no sweep, few steps; a smoke test of the whole pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import lion_optax  # noqa: E402
from configs import lm as lm_configs  # noqa: E402
from configs import vit as vit_configs  # noqa: E402
from train import trainer  # noqa: E402

METRICS = ("eval_loss", "eval_accuracy")
SEEDS = (0, 1, 2)
LION_FACTOR = 3.0  # the paper's lr / wd mapping factor (3-10 recommended)
VIT_STEPS, LM_STEPS = 800, 300
MAX_EXTEND = 2  # extra 3x lr steps when the best lr sits at an edge of the grid


@dataclasses.dataclass
class Task:
    name: str
    config: object  # ml_collections.ConfigDict, the base for every run of this task
    optimizers: tuple[str, ...]


def make_tasks(quick: bool) -> list[Task]:
    """The demo configs, shortened; eval often enough to draw curves."""
    vit = vit_configs.get_config("demo")
    vit.num_steps, vit.eval_every, vit.log_every = VIT_STEPS, 50, 50
    vit.optimizer.warmup_steps = 80

    lm = lm_configs.get_config("demo")
    lm.model.num_layers = 2
    lm.num_steps, lm.batch_size, lm.eval_every, lm.log_every = LM_STEPS, 16, 25, 25
    lm.optimizer.warmup_steps = 30

    tasks = [Task("ViT digits", vit, ("adamw", "lion")),
             Task("byte LM", lm, ("adamw", "adafactor", "lion"))]
    for t in tasks:
        t.config.sample_steps = 0
        t.config.checkpoint_every = 0  # only the final (forced) save
        if quick:
            t.config.num_steps, t.config.eval_every, t.config.log_every = 40, 20, 20
            t.config.optimizer.warmup_steps = 10
    return tasks


def lr_grid(config, optimizer: str) -> list[tuple[float, float]]:
    """(lr, wd) candidates: 3x apart around the demo's AdamW / Adafactor setting, and for
    Lion the AdamW grid under the paper's mapping."""
    base = config.optimizer["adamw" if optimizer == "lion" else optimizer]
    grid = [(base.learning_rate * s, base.weight_decay) for s in (1 / 3, 1.0, 3.0)]
    if optimizer == "lion":
        grid = [tuple(map(float, lion_optax.adamw_to_lion_hparams(lr, wd, LION_FACTOR))) for lr, wd in grid]
    return grid


def train_once(config, optimizer: str, lr: float, wd: float, seed: int, root: str) -> dict:
    """One training run; returns {metric: (steps, values)} read back from metrics.jsonl."""
    c = config.copy_and_resolve_references()
    c.seed = seed
    c.optimizer.name = optimizer
    c.optimizer[optimizer].learning_rate, c.optimizer[optimizer].weight_decay = lr, wd
    workdir = tempfile.mkdtemp(dir=root)
    t0 = time.perf_counter()
    trainer.run(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    curves = {m: (np.array([r["step"] for r in rows if m in r]),
                  np.array([r[m] for r in rows if m in r])) for m in METRICS}
    print(f"  {optimizer:9s} lr={lr:.3g} wd={wd:.3g} seed={seed}: eval_loss "
          f"{curves['eval_loss'][1][-1]:.4f}, eval_accuracy {curves['eval_accuracy'][1][-1]:.4f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return curves


def benchmark(task: Task, quick: bool, root: str) -> dict:
    """Per optimizer: the chosen (lr, wd), eval steps and a [seed, step] array per metric."""
    results = {}
    for opt in task.optimizers:
        grid = lr_grid(task.config, opt)
        if quick:
            grid = grid[1:2]
        try:
            sweep = {hp: train_once(task.config, opt, *hp, SEEDS[0], root) for hp in grid}
            for _ in range(0 if quick else MAX_EXTEND):
                ordered = sorted(sweep)  # by lr
                best = min(sweep, key=lambda hp: sweep[hp]["eval_loss"][1][-1])
                if best not in (ordered[0], ordered[-1]):
                    break
                lr, wd = best
                step = 3.0 if best == ordered[-1] else 1 / 3
                sweep[(lr * step, wd)] = train_once(task.config, opt, lr * step, wd, SEEDS[0], root)
        except Exception as e:  # reported in the table instead of losing the other optimizers
            print(f"  {opt}: failed: {type(e).__name__}: {e}", flush=True)
            results[opt] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        best = min(sweep, key=lambda hp: sweep[hp]["eval_loss"][1][-1])
        runs = [sweep[best]] + [train_once(task.config, opt, *best, s, root)
                                for s in ([] if quick else SEEDS[1:])]
        steps = runs[0]["eval_loss"][0]
        results[opt] = dict(lr=best[0], wd=best[1], steps=steps, sweep={
            hp: float(c["eval_loss"][1][-1]) for hp, c in sweep.items()},
            **{m: np.stack([r[m][1] for r in runs]) for m in METRICS})
    return results


def steps_to_reach(steps, mean_curve, target: float, lower_is_better: bool):
    """First eval step whose seed-mean value is at least as good as `target` (None: never)."""
    hit = mean_curve <= target if lower_is_better else mean_curve >= target
    return int(steps[np.argmax(hit)]) if hit.any() else None


def table(all_results: dict[str, dict]) -> str:
    lines = ["| task | optimizer | lr | wd | lr sweep: final eval loss (seed 0) | eval loss | eval accuracy "
             "| steps to AdamW's final loss | steps to AdamW's final accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, results in all_results.items():
        ref = {m: results["adamw"][m][:, -1].mean() for m in METRICS}
        for opt, r in results.items():
            if "error" in r:
                lines.append(f"| {task} | {opt} | failed: {r['error']} |||||||")
                continue
            sweep = ", ".join(f"{lr:.2g}: {v:.3f}" for (lr, _), v in sorted(r["sweep"].items()))
            stats = [f"{r[m][:, -1].mean():.4f} ± {r[m][:, -1].std():.4f}" for m in METRICS]
            reach = [steps_to_reach(r["steps"], r[m].mean(0), ref[m], m == "eval_loss") for m in METRICS]
            reach = ["never" if s is None else f"{s} / {r['steps'][-1]}" for s in reach]
            lines.append(f"| {task} | {opt} | {r['lr']:.2g} | {r['wd']:.2g} | {sweep} | "
                         f"{' | '.join(stats)} | {' | '.join(reach)} |")
    return "\n".join(lines)


def plot(all_results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(all_results), len(METRICS), figsize=(11, 4 * len(all_results)),
                             squeeze=False)
    for row, (task, results) in zip(axes, all_results.items()):
        for ax, metric in zip(row, METRICS):
            for opt, r in results.items():
                if "error" in r:
                    continue
                values = r[metric]
                line, = ax.plot(r["steps"], values.mean(0), label=f"{opt} (lr {r['lr']:.2g}, wd {r['wd']:.2g})")
                ax.fill_between(r["steps"], values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
            ax.set(title=f"{task}: {metric.replace('_', ' ')}", xlabel="step", ylabel=metric)
            if metric == "eval_loss":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"seed mean, min-max band over {results['adamw']['eval_loss'].shape[0]} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, no sweep, 40 steps")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    t0 = time.perf_counter()
    all_results = {}
    with tempfile.TemporaryDirectory() as root:
        for task in make_tasks(args.quick):
            print(f"{task.name}: {task.config.num_steps} steps", flush=True)
            all_results[task.name] = benchmark(task, args.quick, root)
    wall = time.perf_counter() - t0

    os.makedirs(args.out, exist_ok=True)
    plot(all_results, os.path.join(args.out, "compare_optimizers.png"))
    md = table(all_results)
    command = "python benchmarks/compare_optimizers.py" + (" --quick" if args.quick else "")
    with open(os.path.join(args.out, "compare_optimizers.md"), "w") as f:
        f.write(f"`{command}`: {wall / 60:.1f} min wall time on {os.cpu_count()} CPU core(s).\n\n{md}\n")
    print(md)
    print(f"wall time {wall:.0f} s; wrote {args.out}/compare_optimizers.{{md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
