"""ViT classification configs.

    python -m train --config=configs/vit.py:demo --workdir=/tmp/vit_demo
    python -m train --config=configs/vit.py:B/16 --workdir=gs://bucket/vit_b16 \
        --config.data.data_dir=gs://bucket/tensorflow_datasets

`demo`: a small ViT on scikit-learn's 8x8 digits (bundled, no download), float32, CPU.
`Ti/16`, `S/16`, `B/16`, `L/16`: the Lion paper's ImageNet setup: 224 px, batch 4096,
300 epochs, Lion lr 1e-4 / wd 10 (AdamW baseline lr 1e-3 / wd 1.0, eps 1e-6, selectable
with --config.optimizer.name=adamw), 10k warmup steps then cosine, bf16 compute.
"""

import ml_collections

from configs import common
from configs.data import data_config

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    c = common.base_config()
    c.label_smoothing = 0.0
    c.optimizer.lion = common.lion(1e-4, 10.0)
    c.optimizer.adamw = common.adamw(1e-3, 1.0)
    c.optimizer.adafactor = common.adafactor(1e-3, 1.0)

    if arg == "demo":
        c.data = data_config("digits")
        c.data.augment.random_resized_crop = True
        c.data.augment.crop_scale = (0.6, 1.0)
        c.data.augment.flip = False  # digits are not mirror-symmetric
        c.model = common.model_fields(
            "vit", "Ti/2", width=64, depth=4, mlp_dim=128, num_heads=4, pool_type="gap", posemb="learn",
            head_zero_init=True, dropout=0.0, scan_layers=True, remat="none", dtype="float32", attention="auto")
        c.num_steps, c.batch_size = 1500, 128
        c.log_every, c.eval_every, c.checkpoint_every = 50, 500, 500
        c.optimizer.warmup_steps = 100
        c.optimizer.lion = common.lion(1e-3, 0.1)
        c.optimizer.adamw = common.adamw(3e-3, 0.03)
        return c

    if arg not in ("Ti/16", "S/16", "B/16", "L/16"):
        raise ValueError(f"configs/vit.py: unknown variant {arg!r}; use demo, Ti/16, S/16, B/16 or L/16")
    c.data = data_config("imagenet2012")  # 224 px, crop + flip, center-crop eval
    # Saving only matmul outputs keeps B/16 at batch 4096 within 8 v4 chips (27 GiB of
    # 30.75 per chip, `python -m train.aot`); without remat it needs ~99 GiB per chip.
    c.model = common.model_fields(
        "vit", arg, pool_type="tok", posemb="learn", head_zero_init=True, dropout=0.0, scan_layers=True,
        remat="save_dots", dtype="bfloat16", attention="auto")
    c.batch_size = 4096
    c.num_steps = 300 * IMAGENET_TRAIN_IMAGES // c.batch_size
    c.optimizer.warmup_steps = 10_000
    c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
    return c
