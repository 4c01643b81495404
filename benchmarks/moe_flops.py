"""FLOPs of the mixture-of-experts layers as XLA counts them in TPU compiles (libtpu, this CPU):

    python benchmarks/moe_flops.py

1. The moe-demo model's forward pass, layers unrolled, on the XLA ragged_dot path: (MoE model
   - dense model of the same active MLP width + the active experts' FLOPs) / the active
   experts' FLOPs. 1.0 means the experts cost exactly the active experts (the router adds a
   little); a dense dispatch (every expert on every token) would be experts / top-k = 4.
2. One ragged_dot of the demo's shape and its two gradients, each / 2 m k n: XLA:TPU counts
   (and computes) the weight gradient, a contraction over the ragged rows, as a masked dense
   product over every group. That is why the TPU train step runs megablox's tgmm kernel
   there (expert_matmul=auto); XLA counts no FLOPs inside kernels, so the kernel path cannot
   be measured this way.
"""

from __future__ import annotations

import common  # noqa: F401  (compile-only environment first)
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import lm as lm_configs
from train import aot
from train.analysis import moe_flops


def ragged_dot_flops(m: int, k: int, n: int, groups: int) -> dict[str, float]:
    device = aot.topology_devices("v5e:1x1")[0][0]
    one = NamedSharding(Mesh([device], ("x",)), PartitionSpec())
    shapes = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((groups, k, n), jnp.bfloat16),
              jax.ShapeDtypeStruct((groups,), jnp.int32))
    product = lambda a, b, g: jnp.sum(jax.lax.ragged_dot(a, b, g))  # noqa: E731
    fns = {"forward": lambda a, b, g: jax.lax.ragged_dot(a, b, g),
           "input gradient": jax.grad(product, argnums=0),
           "weight gradient": jax.grad(product, argnums=1)}
    return {name: jax.jit(f, in_shardings=(one,) * 3).lower(*shapes).compile().cost_analysis()["flops"]
            / (2 * m * k * n) for name, f in fns.items()}


def main():
    cfg = lm_configs.get_config("moe-demo").model
    print(f"moe-demo forward, {cfg.num_experts} experts top-{cfg.experts_per_token}: MoE layers / active "
          f"experts = {moe_flops.moe_layers_over_active():.4f} (dense dispatch: {cfg.num_experts / cfg.experts_per_token:.0f})")
    tokens, d = moe_flops.BATCH * moe_flops.SEQ, cfg.d_model
    rows = tokens * cfg.experts_per_token
    for name, ratio in ragged_dot_flops(rows, d, cfg.expert_ffn_dim, cfg.num_experts).items():
        print(f"ragged_dot [{rows}, {d}] x [{cfg.num_experts}, {d}, {cfg.expert_ffn_dim}] {name}: {ratio:.3f} x 2mkn")


if __name__ == "__main__":
    main()
