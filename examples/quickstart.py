"""Lion vs AdamW on real data in under a minute: an MLP on scikit-learn's 8x8 digits.

    python examples/quickstart.py [--steps 300] [--factor 3]

Uses lion_optax.lion with bfloat16 momentum inside a flax.nnx.Optimizer, with the
paper's AdamW -> Lion mapping (lr / factor, weight decay x factor), and prints test accuracy
and optimizer-state bytes for both. (The full trainer is `python -m train`.)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import lion_optax


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, hidden: int = 256):
        self.fc1 = nnx.Linear(64, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.gelu(self.fc2(nnx.gelu(self.fc1(x)))))


def load(seed: int = 0):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def train(tx: optax.GradientTransformation, steps: int, batch: int = 128, seed: int = 0):
    (xtr, ytr), (xte, yte) = load(seed)
    model = MLP(nnx.Rngs(seed))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(xtr), batch)
        loss = step(model, opt, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]))
    acc = float((jnp.argmax(model(jnp.asarray(xte)), -1) == jnp.asarray(yte)).mean())
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(opt, nnx.OptState)))
    return float(loss), acc, state_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--factor", type=float, default=3.0, help="AdamW -> Lion lr/wd factor (paper: 3-10)")
    args = ap.parse_args()
    adamw_lr, adamw_wd = 1e-3, 1e-2
    runs = {
        "adamw": optax.adamw(adamw_lr, weight_decay=adamw_wd),
        "lion (bf16 momentum)": lion_optax.from_adamw(
            adamw_lr, adamw_wd, factor=args.factor, mask=lion_optax.decay_mask
        ),
    }
    print(f"digits MLP, {args.steps} steps, batch 128, {jax.devices()[0].platform}, "
          f"AdamW lr {adamw_lr} wd {adamw_wd} -> Lion lr {adamw_lr / args.factor:.2g} wd {adamw_wd * args.factor:.2g}")
    for name, tx in runs.items():
        loss, acc, nbytes = train(tx, args.steps)
        print(f"{name:>22}: final train loss {loss:.4f}  test accuracy {acc:.3f}  optimizer state {nbytes / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
