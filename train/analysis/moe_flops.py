"""The mixture-of-experts layers' forward FLOPs against the active experts', as XLA's TPU cost
model counts them (libtpu ahead-of-time compile; see benchmarks/moe_flops.py).

The moe-demo model (8 experts of width 192, top-2) and the dense model of the same active MLP
width (384), layers unrolled, on the XLA ragged_dot path: their difference plus the active
experts' FLOPs is what the MoE layers cost. 1.0 means exactly the active experts (the router
adds a little); a dense dispatch, every expert on every token, would be experts / top-k.
"""

from __future__ import annotations

from configs import lm as lm_configs
from train import aot, setup

BATCH, SEQ = 8, 256


def forward_flops(topology: str = "v5e:1x1", **model) -> float:
    """XLA's FLOPs for one forward pass of the moe-demo model with `model` fields changed."""
    config = lm_configs.get_config("moe-demo")
    config.batch_size, config.data.seq_len = BATCH, SEQ
    config.model.update(dict(scan_layers=False, expert_matmul="ragged_dot", **model))
    built = setup.build(config, aot.topology_devices(topology)[0])
    return built.lower_eval_step().compile().cost_analysis()["flops"]


def moe_layers_over_active() -> float:
    """(MoE model - dense model + active expert FLOPs) / active expert FLOPs, forward only."""
    cfg = lm_configs.get_config("moe-demo").model
    active = 2 * BATCH * SEQ * cfg.num_layers * 3 * cfg.d_model * cfg.experts_per_token * cfg.expert_ffn_dim
    return (forward_flops() - forward_flops(num_experts=0) + active) / active
