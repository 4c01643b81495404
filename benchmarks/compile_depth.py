"""Compile time of a decoder train step versus depth, scanned vs unrolled layers.

Lowers and compiles (no execution, abstract inputs only) a forward + backward + SGD
update of `models.decoder.Decoder` at 2 and 32 layers, with `scan_layers` on and off,
and prints lower / compile seconds (fastest of --repeats) and the 32-over-2 ratio per
layout. Goal: the scanned 32-layer step compiles within 2x of the 2-layer one.

    python benchmarks/compile_depth.py [--width 256] [--depths 2 32] [--seq 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401, E402 - first: sets the environment before jax loads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from models.decoder import Decoder, DecoderConfig  # noqa: E402
from models.lm_loss import cross_entropy_loss  # noqa: E402
from models.partitioning import sharding_context  # noqa: E402


def compile_seconds(cfg: DecoderConfig, batch: int, seq: int) -> tuple[float, float]:
    """(lower, compile) wall seconds of one jitted train-like step for `cfg`."""
    with sharding_context(None):
        graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))

        def train_step(params, tokens):
            def loss_fn(params):
                logits = nnx.merge(graphdef, params)(tokens[:, :-1])
                return cross_entropy_loss(logits, tokens[:, 1:])[0]

            loss, grads = jax.value_and_grad(loss_fn)(params)
            params = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
            return params, loss

        tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
        start = time.perf_counter()
        lowered = jax.jit(train_step, donate_argnums=0).lower(params, tokens)
        lowered_at = time.perf_counter()
        lowered.compile()
        return lowered_at - start, time.perf_counter() - lowered_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="report the fastest of N")
    args = parser.parse_args()

    heads = max(args.width // 64, 1)
    print(f"backend={jax.default_backend()} width={args.width} heads={heads} "
          f"seq={args.seq} batch={args.batch}")
    print(f"{'layout':<9}{'layers':>7}{'lower s':>10}{'compile s':>11}{'total s':>10}")

    def config(depth: int, scan_layers: bool) -> DecoderConfig:
        return DecoderConfig(
            vocab_size=1024, d_model=args.width, num_layers=depth, num_heads=heads,
            num_kv_heads=heads, ffn_dim=4 * args.width, max_seq_len=args.seq,
            scan_layers=scan_layers)

    # One-time JAX / XLA start-up costs must not land on the first row.
    for scan_layers in (True, False):
        compile_seconds(config(1, scan_layers), args.batch, args.seq)
    totals: dict[tuple[bool, int], float] = {}
    for scan_layers in (True, False):
        for depth in args.depths:
            cfg = config(depth, scan_layers)
            runs = [compile_seconds(cfg, args.batch, args.seq) for _ in range(args.repeats)]
            lower_s, compile_s = min(runs, key=sum)
            totals[scan_layers, depth] = lower_s + compile_s
            layout = "scanned" if scan_layers else "unrolled"
            print(f"{layout:<9}{depth:>7}{lower_s:>10.2f}{compile_s:>11.2f}"
                  f"{lower_s + compile_s:>10.2f}")
    shallow, deep = min(args.depths), max(args.depths)
    for scan_layers in (True, False):
        layout = "scanned" if scan_layers else "unrolled"
        ratio = totals[scan_layers, deep] / totals[scan_layers, shallow]
        print(f"{layout} {deep}/{shallow}-layer total ratio: {ratio:.2f}x")


if __name__ == "__main__":
    main()
