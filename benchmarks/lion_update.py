"""One optimizer step (update + apply) on ~50M parameters, side by side in one run.

Compares lion_optax.lion (bf16, fp32 and int8 momentum, stochastic rounding, cautious)
and lion_optax.fused_lion (int8, update and apply in one Pallas kernel on TPU; the same
math in XLA on CPU) with optax.lion (bf16 and fp32) and optax.adamw: median wall time of the jitted, donated
step on this machine's default backend (CPU, GPU) and its ratio to ours, optimizer-state bytes per parameter, and XLA's
`cost_analysis()["bytes accessed"]` per parameter for CPU and, when libtpu is
installed (`pip install -e '.[tpu]'`), for one TPU v5e chip compiled ahead of time
(see `tpu_bytes_per_param` for the TPU columns).

    python benchmarks/lion_update.py [--layers 7] [--width 768] [--iters 15]

The parameter tree is a stack of ViT-B-width transformer blocks (qkv, out, two MLP
matrices, biases, norm scales): 7 blocks of width 768 = 49.6M parameters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common  # noqa: F401, E402 - first: sets the environment before jax loads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lion_optax  # noqa: E402
from train.analysis import hlo_bytes  # noqa: E402


def param_shapes(layers: int, width: int) -> dict:
    block = {
        "qkv": {"kernel": (width, 3 * width), "bias": (3 * width,)},
        "out": {"kernel": (width, width), "bias": (width,)},
        "mlp_in": {"kernel": (width, 4 * width), "bias": (4 * width,)},
        "mlp_out": {"kernel": (4 * width, width), "bias": (width,)},
        "norm1": {"scale": (width,)},
        "norm2": {"scale": (width,)},
    }
    return {f"block{i}": block for i in range(layers)}


def contenders(lr: float = 1e-4, wd: float = 1.0) -> dict:
    mask = lion_optax.decay_mask
    return {
        "lion_optax bf16": lion_optax.lion(lr, weight_decay=wd, mask=mask),
        "optax.lion bf16": optax.lion(lr, mu_dtype=jnp.bfloat16, weight_decay=wd, mask=mask),
        "lion_optax fp32": lion_optax.lion(lr, weight_decay=wd, mask=mask, mu_dtype=jnp.float32),
        "lion_optax int8": lion_optax.lion(lr, weight_decay=wd, mask=mask, mu_dtype=jnp.int8),
        "lion_optax int8 fused": lion_optax.fused_lion(lr, weight_decay=wd, mask=mask),
        "lion_optax int8 SR": lion_optax.lion(lr, weight_decay=wd, mask=mask, mu_dtype=jnp.int8,
                                              stochastic_rounding=True),
        "lion_optax bf16 SR": lion_optax.lion(lr, weight_decay=wd, mask=mask, stochastic_rounding=True),
        "lion_optax cautious": lion_optax.lion(lr, weight_decay=wd, mask=mask, cautious=True),
        "optax.lion fp32": optax.lion(lr, weight_decay=wd, mask=mask),
        "optax.adamw": optax.adamw(10 * lr, weight_decay=wd / 10, mask=mask),
    }


def make_step(opt):
    def step(params, state, grads):
        if isinstance(opt, lion_optax.FusedLion):  # update + apply in one pass
            return opt.apply(grads, state, params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _tpu_chip():
    """One TPU v5e chip as an AOT compile target, or None when libtpu is missing."""
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(
            topology_name="v5e:1x1", platform="tpu", chips_per_host_bounds=[1, 1, 1]
        )
    except Exception:  # libtpu not installed / unusable: no TPU columns.
        return None
    mesh = jax.sharding.Mesh(topo.devices, ("chip",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _tpu_bytes(opt, shapes, chip) -> tuple[float, int]:
    """(cost_analysis bytes accessed, `hlo_bytes.hbm_bytes`) of one step compiled for `chip`."""
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=chip), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=chip),
                         jax.eval_shape(opt.init, params))
    compiled = make_step(opt).lower(params, state, params).compile()
    return compiled.cost_analysis()["bytes accessed"], hlo_bytes.hbm_bytes(compiled.as_text())


def tpu_bytes_per_param(opt, shapes, n_params: int, chip) -> tuple[float, float, float, float]:
    """(per tensor, per tensor HBM, whole step, whole step HBM) bytes / param, one TPU v5e chip.

    "Per tensor" compiles the step for each parameter shape alone and sums
    cost_analysis's bytes accessed; "per tensor HBM" is `train.analysis.hlo_bytes.hbm_bytes` of the same
    compiles. "Whole step" compiles the full tree. cost_analysis counts accesses to
    on-chip VMEM too: wherever the TPU compiler stages tensors through VMEM with async
    copies it counts those copies on top of the fusion's own accesses, which the HBM
    estimate does not.
    """
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    per_shape = {s: _tpu_bytes(opt, {"w": s}, chip) for s in set(leaves)}
    accessed, hbm = (sum(per_shape[s][i] for s in leaves) for i in (0, 1))
    whole = _tpu_bytes(opt, shapes, chip)
    return accessed / n_params, hbm / n_params, whole[0] / n_params, whole[1] / n_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--iters", type=int, default=15, help="timed rounds (each runs every contender once)")
    args = ap.parse_args()

    shapes = param_shapes(args.layers, args.width)
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = iter(jax.random.split(jax.random.key(0), 2 * len(leaves)))
    as_tree = lambda f: jax.tree.map(f, shapes, is_leaf=lambda x: isinstance(x, tuple))  # noqa: E731
    params0 = as_tree(lambda s: 0.02 * jax.random.normal(next(keys), s, jnp.float32))
    grads = as_tree(lambda s: jax.random.normal(next(keys), s, jnp.float32))
    n_params = sum(x.size for x in jax.tree.leaves(params0))
    print(f"{n_params / 1e6:.1f}M params, {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}, optax {optax.__version__}")

    runs = {}
    for name, opt in contenders().items():
        params = jax.tree.map(jnp.copy, params0)
        state = opt.init(params)
        step = make_step(opt)
        compiled = step.lower(params, state, grads).compile()
        params, state = step(params, state, grads)  # warm-up
        jax.block_until_ready(params)
        runs[name] = dict(
            opt=opt, step=step, params=params, state=state, times=[],
            state_bpp=tree_bytes(state) / n_params,
            cpu_bpp=compiled.cost_analysis()["bytes accessed"] / n_params,
        )

    for _ in range(args.iters):  # interleaved rounds: drift hits every contender alike
        for run in runs.values():
            t0 = time.perf_counter()
            run["params"], run["state"] = run["step"](run["params"], run["state"], grads)
            jax.block_until_ready(run["params"])
            run["times"].append(time.perf_counter() - t0)

    chip = _tpu_chip()
    ours = statistics.median(runs["lion_optax bf16"]["times"])
    backend = jax.devices()[0].platform.upper()
    header = (f"| {'optimizer':<21} | median ms | time / ours | state B/param | {backend} bytes/param "
              "| TPU v5e bytes/param (per tensor) | TPU v5e HBM bytes/param (per tensor) "
              "| TPU v5e bytes/param (whole step) | TPU v5e HBM bytes/param (whole step) |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, run in runs.items():
        med = statistics.median(run["times"])
        tpu = ("n/a (no libtpu)",) * 4 if chip is None else (
            f"{x:.2f}" for x in tpu_bytes_per_param(run["opt"], shapes, n_params, chip))
        tpu_tensor, tpu_hbm, tpu_step, tpu_step_hbm = tpu
        print(f"| {name:<21} | {1e3 * med:9.1f} | {med / ours:11.3f} | {run['state_bpp']:13.2f} "
              f"| {run['cpu_bpp']:15.2f} | {tpu_tensor:>32} | {tpu_hbm:>36} | {tpu_step:>32} "
              f"| {tpu_step_hbm:>36} |")


if __name__ == "__main__":
    main()
