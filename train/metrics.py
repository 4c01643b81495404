"""Training metrics: metrics.jsonl, TensorBoard (tensorboardX), a tqdm bar, and MFU.

Only process 0 writes or shows anything. Metrics arrive as host floats, fetched from the
device once per `log_every` steps by the trainer.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from train import hardware


def peak_flops_total() -> float:
    """Peak FLOP/s of all devices: per-chip peak x chips, or on CPU the measured matmul
    rate of each host (virtual CPU devices share the host's cores) x hosts."""
    if jax.devices()[0].platform == "cpu":
        return measure_matmul_flops() * jax.process_count()
    return peak_flops_per_device() * jax.device_count()


def peak_flops_per_device(device: jax.Device | None = None) -> float:
    """Peak FLOP/s of one device: published bf16 peak for accelerators, a measured
    float32 matmul rate on CPU."""
    device = device or jax.devices()[0]
    chip = hardware.chip_for_device_kind(getattr(device, "device_kind", ""))
    if chip is not None:
        return chip.peak_flops
    if device.platform == "cpu":
        return measure_matmul_flops()
    return float("nan")


_MEASURED: dict[str, float] = {}


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best observed float32 matmul FLOP/s of one CPU device (measured once, then cached)."""
    if "cpu" in _MEASURED:
        return _MEASURED["cpu"]
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    _MEASURED["cpu"] = 2 * n**3 / best
    return _MEASURED["cpu"]


class MetricsLogger:
    """Appends metrics to `workdir/metrics.jsonl`, `workdir/tb/` and a progress bar."""

    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = self._bar = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                         disable=None)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Appends `metrics` of `step`; on the console, eval metrics get a line of their own,
        and train metrics a line each time when there is no progress bar (a log file)."""
        if not self.enabled:
            return
        clean = {k: _to_float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        shown = {k: f"{clean[k]:.4g}" for k in ("loss", "eval_loss", "tokens_per_sec", "examples_per_sec") if k in clean}
        if shown:
            self._bar.set_postfix(shown, refresh=False)
        if any(k.startswith("eval_") for k in clean):
            evals = sorted((k[len("eval_"):], v) for k, v in clean.items() if k.startswith("eval_"))
            evals.sort(key=lambda kv: kv[0] != "loss")  # loss first
            self._line(f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in evals))
        elif "loss" in clean and self._bar.disable:
            self._line(train_line(step, self._bar.total, clean))

    def _line(self, text: str) -> None:
        self._bar.write(text, file=sys.stdout)
        sys.stdout.flush()

    def summary(self, text: str) -> None:
        """The run's closing line (stdout)."""
        if self.enabled:
            self._line(text)

    def event(self, step: int, name: str) -> None:
        """A `{"step": step, "event": name}` row in metrics.jsonl (not a metric), e.g. where
        each invocation of the trainer started ("start" at step 0 or the resumed step)."""
        if self.enabled:
            self._jsonl.write(json.dumps({"step": step, "event": name}) + "\n")

    def advance(self, step: int) -> None:
        if self.enabled and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def message(self, text: str) -> None:
        if self.enabled:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()
            self._jsonl.close()


def train_line(step: int, total: int, m: Mapping[str, float]) -> str:
    """`step 50/900  loss 2.3456  lr 1.00e-03  12.3k tokens/s  mfu 3.2%` (what is there)."""
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}"]
    if "lr" in m:
        parts.append(f"lr {m['lr']:.2e}")
    for unit in ("tokens", "examples"):
        if f"{unit}_per_sec" in m:
            parts.append(f"{_si(m[unit + '_per_sec'])} {unit}/s")
            break
    if "mfu" in m:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if m.get("nonfinite_steps"):
        parts.append(f"skipped {int(m['nonfinite_steps'])}")
    return "  ".join(parts)


def _si(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _to_float(v) -> float | int:
    if isinstance(v, (int, np.integer)):
        return int(v)
    return float(v)
