"""Lion vs AdamW (and Adafactor on the LM) on the two CPU demos, with a small lr sweep.

    python benchmarks/compare_optimizers.py [--quick] [--tasks "MoE byte LM"] [--out benchmarks/results]
        [--cache DIR]

Tasks: `configs/vit.py:demo` (ViT on sklearn digits) shortened to `common.VIT_STEPS`, and a reduced
`configs/lm.py:demo` (byte LM on the Python stdlib source: 2 layers, batch 16, `common.LM_STEPS`),
and `configs/lm.py:moe-demo` reduced the same way (8 experts, top-2: the byte LM's active
MLP width). `--tasks` runs only the named ones.
Every run uses the trainer itself (`train.trainer.run`), so schedule, clipping, masking and
data order are exactly those of `python -m train`.

Protocol, per task and optimizer (`search`), every optimizer tuned the same way:
  1. Start from the demo config's AdamW / Adafactor (lr, wd); Lion starts from AdamW's
     mapped by the paper's rule (`lion_optax.adamw_to_lion_hparams`, factor 3: lr / 3,
     wd * 3). On the LM, Lion uses b1/b2 = 0.95/0.98 as in the paper.
  2. With seed 0, sweep lr over {x/3, x, 3x}, then weight decay likewise at the best lr,
     then lr again at the best wd; a best value at an edge of its grid is extended by one
     more 3x step (at most `MAX_EXTEND` times), so nothing is left at a grid edge. Lion on
     the LMs (byte LM, MoE byte LM) then tries b1/b2 = 0.9/0.95 and 0.9/0.99 as well.
  3. Keep the setting with the lowest final eval loss; rerun it with seeds 1 and 2.

Outputs in --out: `compare_optimizers.png` (eval loss and accuracy vs step: seed mean, with
a min-max band) and `compare_optimizers.md` (best lr/wd, final eval metrics as mean ± std
over 3 seeds, and the first eval step at which the seed-mean curve reaches AdamW's final
mean). `--quick`: 1 seed, no sweep, few steps; a smoke test of the whole pipeline.
`--cache DIR` keeps every finished run's metrics in DIR, keyed by a hash of its whole config,
so an interrupted sweep rerun with the same DIR redoes only the runs it had not finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import common  # first: sets the environment before jax loads
import numpy as np

import lion_optax

METRICS = ("eval_loss", "eval_accuracy")
SEEDS = (0, 1, 2)
LION_FACTOR = 3.0  # the paper's lr / wd mapping factor (3-10 recommended)
MAX_EXTEND = 2  # extra 3x steps when the best value sits at an edge of its grid
# Lion (b1, b2) tried on the LM after lr and wd: the paper's LM setting is the config's
# 0.95 / 0.98; 0.9 / 0.95 is Wen et al. 2025's (arXiv 2509.02046), 0.9 / 0.99 the default.
LION_BETAS = ((0.9, 0.95), (0.9, 0.99))


Task, make_tasks = common.Task, common.demo_tasks


HParams = tuple  # (lr, wd, b1, b2); b1 / b2 None = the config's


def base_hparams(config, optimizer: str) -> HParams:
    """The starting point: the demo's AdamW / Adafactor setting, and for Lion AdamW's
    mapped by the paper's rule (`lion_optax.adamw_to_lion_hparams`, factor 3: lr / 3,
    wd * 3, so lr * wd equals AdamW's)."""
    base = config.optimizer["adamw" if optimizer == "lion" else optimizer]
    lr, wd = float(base.learning_rate), float(base.weight_decay)
    if optimizer == "lion":
        lr, wd = map(float, lion_optax.adamw_to_lion_hparams(lr, wd, LION_FACTOR))
    return (lr, wd, None, None)


CACHE: str | None = None  # --cache


def _config_key(config) -> str:
    """A hash of the config's fields, those set to None left out (a field added to the
    configs later, unset, then keeps the runs cached before it)."""
    def drop_none(x):
        if isinstance(x, dict):
            return {k: drop_none(v) for k, v in x.items() if v is not None}
        return x

    text = json.dumps(drop_none(json.loads(config.to_json_best_effort())), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def train_once(config, optimizer: str, hp: HParams, seed: int, root: str) -> dict:
    """One training run; returns {metric: (steps, values)} read back from metrics.jsonl
    (or from `CACHE` when a run of the same config finished there)."""
    lr, wd, b1, b2 = hp
    c = config.copy_and_resolve_references()
    c.seed = seed
    c.optimizer.name = optimizer
    c.optimizer[optimizer].learning_rate, c.optimizer[optimizer].weight_decay = lr, wd
    if b1 is not None:
        c.optimizer[optimizer].b1, c.optimizer[optimizer].b2 = b1, b2
    t0 = time.perf_counter()
    cached = None
    if CACHE:
        key = _config_key(c)
        cached = os.path.join(CACHE, f"{optimizer}-{key}.json")
    if cached and os.path.exists(cached):
        with open(cached) as f:
            rows = json.load(f)
    else:
        _, rows = common.train_and_read(c, root)
        if cached:
            os.makedirs(CACHE, exist_ok=True)
            with open(cached + ".tmp", "w") as f:
                json.dump(rows, f)
            os.replace(cached + ".tmp", cached)
    curves = {m: (np.array([r["step"] for r in rows if m in r]),
                  np.array([r[m] for r in rows if m in r])) for m in METRICS}
    print(f"  {optimizer:9s} {describe(hp)} seed={seed}: eval_loss "
          f"{curves['eval_loss'][1][-1]:.4f}, eval_accuracy {curves['eval_accuracy'][1][-1]:.4f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return curves


def describe(hp: HParams) -> str:
    lr, wd, b1, b2 = hp
    betas = "" if b1 is None else f" b1/b2={b1}/{b2}"
    return f"lr={lr:.2g} wd={wd:.2g}{betas}"


def _final(curves) -> float:
    return float(curves["eval_loss"][1][-1])


def search(task: Task, opt: str, quick: bool, root: str) -> tuple[HParams, dict]:
    """Coordinate search with seed 0: learning rate, then weight decay, then learning rate
    again (factors of 3 around the best so far; a best value at an edge of its grid is
    extended by up to `MAX_EXTEND` more 3x steps), then for Lion on the LMs the (b1, b2)
    pairs of `LION_BETAS`. Runs are cached, so a revisited point costs nothing."""
    runs: dict[HParams, dict] = {}

    def run(hp):
        if hp not in runs:
            runs[hp] = train_once(task.config, opt, hp, SEEDS[0], root)
        return _final(runs[hp])

    best = base_hparams(task.config, opt)
    if quick:
        run(best)
        return best, runs
    for index in (0, 1, 0):  # lr, wd, lr
        def moved(factor, hp=best):
            return tuple(v * factor if i == index else v for i, v in enumerate(hp))

        line = {f: moved(f) for f in (1 / 3, 1.0, 3.0)}
        for _ in range(MAX_EXTEND):
            for hp in line.values():
                run(hp)
            lo, hi = min(line), max(line)
            pick = min(line, key=lambda f: run(line[f]))
            if pick not in (lo, hi):
                break
            edge = hi * 3.0 if pick == hi else lo / 3.0
            line[edge] = moved(edge)
        best = min(line.values(), key=run)
    if opt == "lion" and task.config.model.get("family") == "lm":  # the LMs: byte LM, MoE byte LM
        best = min([best] + [best[:2] + betas for betas in LION_BETAS], key=run)
    return best, runs


def benchmark(task: Task, quick: bool, root: str) -> dict:
    """Per optimizer: the chosen hyperparameters, every sweep run's final eval loss, eval
    steps and a [seed, step] array per metric."""
    results = {}
    for opt in task.optimizers:
        try:
            best, sweep = search(task, opt, quick, root)
        except Exception as e:  # reported in the table instead of losing the other optimizers
            print(f"  {opt}: failed: {type(e).__name__}: {e}", flush=True)
            results[opt] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        runs = [sweep[best]] + [train_once(task.config, opt, best, s, root)
                                for s in ([] if quick else SEEDS[1:])]
        steps = runs[0]["eval_loss"][0]
        results[opt] = dict(hp=best, steps=steps, sweep={hp: _final(c) for hp, c in sweep.items()},
                            **{m: np.stack([r[m][1] for r in runs]) for m in METRICS})
    return results


def steps_to_reach(steps, mean_curve, target: float, lower_is_better: bool):
    """First eval step whose seed-mean value is at least as good as `target` (None: never)."""
    hit = mean_curve <= target if lower_is_better else mean_curve >= target
    return int(steps[np.argmax(hit)]) if hit.any() else None


def table(all_results: dict[str, dict]) -> str:
    lines = ["| task | optimizer | chosen (seed 0 sweep) | sweep runs | eval loss | eval accuracy "
             "| vs AdamW eval loss | steps to AdamW's final loss | steps to AdamW's final accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, results in all_results.items():
        ref = {m: results["adamw"][m][:, -1].mean() for m in METRICS} if "adamw" in results else None
        for opt, r in results.items():
            if "error" in r:
                lines.append(f"| {task} | {opt} | failed: {r['error']} |||||||")
                continue
            stats = [f"{r[m][:, -1].mean():.4f} ± {r[m][:, -1].std():.4f}" for m in METRICS]
            if ref is None or "error" in results["adamw"]:
                rel, reach = "", ["", ""]
            else:
                rel = f"{100 * (r['eval_loss'][:, -1].mean() / ref['eval_loss'] - 1):+.1f}%"
                reach = [steps_to_reach(r["steps"], r[m].mean(0), ref[m], m == "eval_loss") for m in METRICS]
                reach = ["never" if x is None else f"{x} / {r['steps'][-1]}" for x in reach]
            lines.append(f"| {task} | {opt} | {describe(r['hp'])} | {len(r['sweep'])} | "
                         f"{' | '.join(stats)} | {rel} | {' | '.join(reach)} |")
    lines += ["", "Every sweep run (seed 0, final eval loss):", ""]
    for task, results in all_results.items():
        for opt, r in results.items():
            if "error" not in r:
                runs = ", ".join(f"{describe(hp)}: {v:.3f}" for hp, v in sorted(
                    r["sweep"].items(), key=lambda kv: tuple(-1 if x is None else x for x in kv[0])))
                lines.append(f"- {task}, {opt}: {runs}")
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
                line, = ax.plot(r["steps"], values.mean(0), label=f"{opt} ({describe(r['hp'])})")
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
    parser.add_argument("--tasks", nargs="*", default=None, help="task names (default: all)")
    parser.add_argument("--cache", default=None, help="keep finished runs here; a rerun reuses them")
    args = parser.parse_args()
    global CACHE
    CACHE = args.cache
    tasks = [t for t in make_tasks(args.quick) if args.tasks is None or t.name in args.tasks]
    if not tasks:
        print(f"error: no task named {args.tasks}; tasks are {[t.name for t in make_tasks(True)]}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    all_results = {}
    with tempfile.TemporaryDirectory() as root:
        for task in tasks:
            print(f"{task.name}: {task.config.num_steps} steps", flush=True)
            all_results[task.name] = benchmark(task, args.quick, root)
    wall = time.perf_counter() - t0

    os.makedirs(args.out, exist_ok=True)
    # A subset of the tasks writes its own files (compare_optimizers_moe_byte_lm.md, ...).
    stem = "compare_optimizers" + ("".join("_" + t.lower().replace(" ", "_") for t in args.tasks) if args.tasks else "")
    plot(all_results, os.path.join(args.out, f"{stem}.png"))
    md = table(all_results)
    command = "python benchmarks/compare_optimizers.py" + (" --quick" if args.quick else "")
    if args.tasks:
        command += " --tasks " + " ".join(f'"{t}"' for t in args.tasks)
    chosen = {task: {opt: dict(zip(("learning_rate", "weight_decay", "b1", "b2"), r["hp"]))
                     for opt, r in results.items() if "error" not in r}
              for task, results in all_results.items()}
    if not args.quick:  # benchmarks/lion_variants.py runs Lion at these settings
        with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
            json.dump(chosen, f, indent=1)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(f"`{command}`: {wall / 60:.1f} min wall time on {os.cpu_count()} CPU core(s).\n\n{md}\n")
    print(md)
    print(f"wall time {wall:.0f} s; wrote {args.out}/{stem}.{{md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
