"""TFDS builder for scikit-learn's bundled 8x8 handwritten digits (no download).

1797 grayscale 8x8 images with values 0..16 (UCI optdigits test set, shipped inside
scikit-learn), stored as uint8 0..255 (``round(v * 255 / 16)``) with shape (8, 8, 1).
The split is a fixed permutation (``numpy.random.default_rng(0)``): the first 1437
permuted examples are ``train``, the remaining 360 are ``test``. The ``index`` feature is
the row in ``sklearn.datasets.load_digits()``.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_EXAMPLES = 1797
NUM_TRAIN = 1437
SPLIT_SEED = 0


def load_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as (uint8 [N, 8, 8, 1] scaled to 0..255, int64 labels [N])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
    perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_EXAMPLES)
    return {"train": np.sort(perm[:NUM_TRAIN]), "test": np.sort(perm[NUM_TRAIN:])}


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits as an image classification dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 1437 train / 360 test, uint8 0..255."}
    # TFDS derives these from the package via importlib_resources (not installed here);
    # setting them explicitly also keeps metadata lookup inside this package.
    code_path = epath.Path(__file__)
    pkg_dir_path = epath.Path(__file__).parent

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), "
                "pixel values 0..16 rescaled to uint8 0..255; deterministic 1437/360 "
                "train/test split by a fixed permutation (seed 0)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships with scikit-learn.
        images, labels = load_uint8()
        return {
            split: self._generate_examples(images, labels, idx)
            for split, idx in split_indices().items()
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            i = int(i)
            yield i, {"image": images[i], "label": int(labels[i]), "index": i}
