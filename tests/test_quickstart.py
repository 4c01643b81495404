"""The README's first command: Lion trains the digits MLP and uses a quarter of AdamW's state."""

import importlib.util
import os

import optax

import lion_optax

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "quickstart.py")
_spec = importlib.util.spec_from_file_location("quickstart", _PATH)
quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quickstart)


def test_quickstart_lion_learns_digits_with_quarter_of_adamw_state():
    _, lion_acc, lion_bytes = quickstart.train(
        lion_optax.from_adamw(1e-3, 1e-2, factor=3, mask=lion_optax.decay_mask), steps=80
    )
    _, adamw_acc, adamw_bytes = quickstart.train(optax.adamw(1e-3, weight_decay=1e-2), steps=80)
    assert lion_acc > 0.85 and adamw_acc > 0.85
    # bf16 momentum (2 B/param) vs two fp32 moments (8 B/param), plus a few counters.
    assert abs(lion_bytes / adamw_bytes - 0.25) < 0.01
