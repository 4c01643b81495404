"""Per-chip TPU memory of the real train step: Lion vs AdamW vs Adafactor, at scale.

Compiles the train step ahead of time for TPU slices on this CPU (`train.aot`, libtpu; no
chip is touched) and prints Markdown tables of per-chip HBM: parameters, optimizer state,
XLA temporaries (activations, gradients, buffers), total, and whether it fits.

  vit      ViT-B/16, 224 px, batch 4096 on TPU v4 with 4 / 8 / 16 chips, remat none / full
           (the Lion paper: AdamW needs 16 v4 chips, Lion 8).
  lm       the `1b` and `8b` decoders (FSDP mesh) on v5e:4x4 and `8b` on v5p:2x2x2.
  largest  the largest decoder preset (small, base, 1b, 7b, 8b) that fits each slice.
  options  ZeRO-sharded state (ViT-B/16, v4:2x2x2) and int8 Lion momentum, with and without
           the fused update-and-apply kernel (7b/8b on v5e:2x4).
  remat    the remat policies on Llama-3-8B at seq 8192, v5p:4x4x4, batch 128: memory and
           the compiled step's FLOPs (recompute included) against its HBM traffic.

    python benchmarks/memory_scale.py [--only vit|lm|largest|options|remat ...] [--json PATH] [--load PATH ...]

A step that does not fit fails to compile with RESOURCE_EXHAUSTED; `compile_report` turns
that into `fits: False` with the temporaries the compiler asked for, shown as "> HBM".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import common  # noqa: F401, E402 - first: sets the environment before jax loads

from configs import lm as lm_configs  # noqa: E402
from configs import vit as vit_configs  # noqa: E402
from models import decoder  # noqa: E402
from train import aot  # noqa: E402

OPTIMIZERS = ("lion", "adamw", "adafactor")
VIT_TOPOLOGIES = ("v4:2x2x1", "v4:2x2x2", "v4:2x2x4")
# (preset, slice) rows of the lm table: 16 v5e chips (256 GiB) and 8 v5p chips (760 GiB).
LM_ROWS = (("1b", "v5e:4x4"), ("8b", "v5e:4x4"), ("8b", "v5p:2x2x2"))
LARGEST_TOPOLOGIES = ("v5e:2x4", "v5e:4x4", "v5p:2x2x2")
LM_SIZES = ("small", "base", "1b", "7b", "8b")  # increasing parameter count
LM_SEQ_LEN = 2048
LM_SEQS_PER_CHIP = 2  # 32 x 2048 = 64k tokens per step on 16 chips


def vit_config(optimizer: str, remat: str):
    c = vit_configs.get_config("B/16")  # 224 px, batch 4096, bf16 compute, data-parallel
    c.optimizer.name = optimizer
    c.model.remat = remat
    return c


def lm_config(size: str, optimizer: str, chips: int):
    """Decoder preset `size` with the `1b` recipe (FSDP, remat full, bf16) at 2048 tokens."""
    c = lm_configs.get_config("1b")
    c.optimizer.name = optimizer
    c.model.size = size
    c.data.vocab_size = decoder.decoder_config(size).vocab_size
    c.data.seq_len = c.model.max_seq_len = LM_SEQ_LEN
    c.batch_size = LM_SEQS_PER_CHIP * chips
    return c


def chips_of(topology: str) -> int:
    """'v5e:4x4' -> 16."""
    return math.prod(int(d) for d in topology.split(":")[1].split("x"))


class Runner:
    """Compiles reports once each (keyed by name), logging progress to stderr."""

    def __init__(self, json_path: str | None = None):
        self.reports: dict[str, dict] = {}
        self.json_path = json_path

    def __call__(self, key: str, config, topology: str) -> dict:
        if key not in self.reports:
            start = time.perf_counter()
            try:
                report = aot.compile_report(config, topology)
            except Exception as e:  # a failure other than out-of-memory: keep going, show it
                report = {"topology": topology, "optimizer": config.optimizer.name, "fits": None,
                          "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            report["compile_seconds"] = round(time.perf_counter() - start, 1)
            self.reports[key] = report
            if self.json_path:  # rewritten after every compile: a cut-short run keeps its data
                with open(self.json_path, "w") as f:
                    json.dump(self.reports, f, indent=1)
            print(f"  {key}: fits={report['fits']} ({report['compile_seconds']} s)",
                  file=sys.stderr, flush=True)
        return self.reports[key]


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def memory_row(label: str, r: dict) -> str:
    """Table cells; for a step that does not fit, the temporaries XLA asked for and '> HBM'."""
    if "error" in r:  # the message is in the --json reports
        return f"| {label} | {r['optimizer']} | error: {r['error'].split(':')[0]} | | | | |"
    temp = gib(r["temp_bytes_per_chip"]) if "temp_bytes_per_chip" in r else "?"
    total = gib(r["total_bytes_per_chip"]) if "total_bytes_per_chip" in r else f"> {gib(r['hbm_bytes_per_chip'])}"
    return (f"| {label} | {r['optimizer']} | {gib(r['params_bytes_per_chip'])} | "
            f"{gib(r['optimizer_state_bytes_per_chip'])} | {temp} | {total} | "
            f"{'yes' if r['fits'] else 'no'} |")


HEADER = ("| {} | optimizer | params GiB/chip | opt state GiB/chip | temporaries GiB/chip | "
          "total GiB/chip | fits |\n|---|---|---|---|---|---|---|")


def vit_table(run: Runner) -> str:
    lines = ["ViT-B/16 (86.6M params), 224 px, global batch 4096, bf16 compute, data-parallel, "
             "TPU v4 (30.75 GiB usable HBM per chip):", "", HEADER.format("v4 slice, remat")]
    for topology in VIT_TOPOLOGIES:
        for remat in ("none", "full"):
            for opt in OPTIMIZERS:
                r = run(f"vit/{topology}/{remat}/{opt}", vit_config(opt, remat), topology)
                lines.append(memory_row(f"{topology} ({chips_of(topology)} chips), {remat}", r))
    return "\n".join(lines)


def lm_table(run: Runner) -> str:
    lines = [f"Decoders at seq {LM_SEQ_LEN}, {LM_SEQS_PER_CHIP} sequences per chip, FSDP over all "
             "chips, remat full, bf16 compute, fp32 params:", "",
             HEADER.format("model, slice, batch")]
    for size, topology in LM_ROWS:
        chips = chips_of(topology)
        for opt in OPTIMIZERS:
            r = run(f"lm/{size}/{topology}/{opt}", lm_config(size, opt, chips), topology)
            label = f"{size}, {topology}, {LM_SEQS_PER_CHIP * chips}x{LM_SEQ_LEN}"
            lines.append(memory_row(label, r))
    return "\n".join(lines)


def largest_table(run: Runner) -> str:
    """Tries presets from the largest down; the first that fits is the answer (the next
    larger one, already tried, did not)."""
    lines = [f"Largest decoder preset ({', '.join(LM_SIZES)}) whose train step fits, same "
             f"recipe as above (seq {LM_SEQ_LEN}, {LM_SEQS_PER_CHIP} sequences per chip); "
             "cell: preset (total GiB/chip):", "",
             "| slice | HBM GiB/chip | " + " | ".join(OPTIMIZERS) + " |",
             "|---|---|" + "---|" * len(OPTIMIZERS)]
    for topology in LARGEST_TOPOLOGIES:
        chips = chips_of(topology)
        cells, hbm = [], None
        for opt in OPTIMIZERS:
            cell = "none"
            for size in reversed(LM_SIZES):
                r = run(f"lm/{size}/{topology}/{opt}", lm_config(size, opt, chips), topology)
                hbm = r.get("hbm_bytes_per_chip", hbm)
                if "error" in r:
                    cell = "error"
                    break
                if r["fits"]:
                    cell = f"{size} ({gib(r['total_bytes_per_chip'])})"
                    break
            cells.append(cell)
        hbm = gib(hbm) if hbm else "?"
        lines.append(f"| {topology} ({chips} chips) | {hbm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def options_table(run: Runner) -> str:
    """ZeRO (optimizer state also sharded over data) on the ViT, and int8 Lion momentum on
    the largest decoder that bf16 momentum could not fit on 8 v5e chips."""
    lines = ["Lion options (`optimizer.shard_state_over_data`: ZeRO; `optimizer.lion.mu_dtype=int8`):",
             "", HEADER.format("model, slice, option")]
    topology = "v4:2x2x2"
    for zero in (False, True):
        for opt in OPTIMIZERS:
            c = vit_config(opt, "full")
            c.optimizer.shard_state_over_data = zero
            r = run(f"vit/{topology}/full/{opt}" + ("/zero" if zero else ""), c, topology)
            lines.append(memory_row(f"ViT-B/16 b4096 remat full, {topology}, "
                                    + ("state over data (ZeRO)" if zero else "state replicated"), r))
    topology = "v5e:2x4"
    for size in ("7b", "8b"):
        for mu, fused in (("bfloat16", False), ("int8", False), ("int8", True)):
            c = lm_config(size, "lion", chips_of(topology))
            c.optimizer.lion.mu_dtype = mu
            c.optimizer.lion.fused_apply = fused
            key = f"lm/{size}/{topology}/lion" + ("/int8" if mu == "int8" else "") + ("/fused" if fused else "")
            label = f"{size}, {topology}, momentum {mu}" + (", fused apply (Pallas)" if fused else "")
            lines.append(memory_row(label, run(key, c, topology)))
    return "\n".join(lines)


REMAT_POLICIES = ("full", "save_qkv_proj", "save_dot_except_mlp")
REMAT_BATCHES = (128,)  # 2 sequences of 8192 per chip (each report: ~10 min on 2 CPU cores)


def remat_table(run: Runner) -> str:
    """What each remat policy keeps in memory on the 8b step."""
    lines = ["Remat policies, `configs/lm.py:8b` (seq 8192, Lion) on v5p:4x4x4 (64 chips):", "",
             "| batch | remat | temporaries GiB/chip | total GiB/chip | fits |",
             "|---|---|---|---|---|"]
    for batch in REMAT_BATCHES:
        for policy in REMAT_POLICIES:
            c = lm_configs.get_config("8b")
            c.batch_size, c.model.remat = batch, policy
            r = run(f"remat/8b/v5p:4x4x4/{batch}/{policy}", c, "v5p:4x4x4")
            if "error" in r:
                lines.append(f"| {batch} | {policy} | error: {r['error'][:80]} | | |")
                continue
            total = gib(r["total_bytes_per_chip"]) if "total_bytes_per_chip" in r else f"> {gib(r['hbm_bytes_per_chip'])}"
            temp = gib(r["temp_bytes_per_chip"]) if "temp_bytes_per_chip" in r else "?"
            lines.append(f"| {batch} | {policy} | {temp} | {total} | {'yes' if r['fits'] else 'no'} |")
    return "\n".join(lines)


TABLES = {"vit": vit_table, "lm": lm_table, "largest": largest_table, "options": options_table,
          "remat": remat_table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(TABLES), default=list(TABLES),
                        help="tables to build (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write every raw report here")
    parser.add_argument("--load", metavar="PATH", nargs="+", default=[],
                        help="reuse reports saved by --json; only missing ones are compiled")
    args = parser.parse_args()

    run, start = Runner(args.json), time.perf_counter()
    for path in args.load:
        with open(path) as f:
            run.reports.update(json.load(f))
    for name in args.only:
        print(f"[{name}]", file=sys.stderr, flush=True)
        print(TABLES[name](run) + "\n", flush=True)
    print(f"{len(run.reports)} compiles in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
