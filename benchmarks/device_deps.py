"""Prints the pip names of this project's run-time dependencies that this Python lacks
(space-separated; nothing when all are there). Used by benchmarks/device_check.sh."""

import importlib.util

# import name -> pip name (pyproject.toml's dependencies, jax itself excluded: it must come
# with the accelerator's plugin).
MODULES = {
    "flax": "flax", "optax": "optax", "orbax": "orbax-checkpoint", "grain": "grain",
    "ml_collections": "ml-collections", "tensorboardX": "tensorboardX",
    "tensorflow_datasets": "tensorflow-datasets", "array_record": "array-record", "tqdm": "tqdm",
    "sentencepiece": "sentencepiece", "tokenizers": "tokenizers", "sklearn": "scikit-learn",
    "safetensors": "safetensors", "absl": "absl-py", "pyarrow": "pyarrow", "zstandard": "zstandard",
    "PIL": "pillow",
}

print(" ".join(pip for module, pip in MODULES.items() if importlib.util.find_spec(module) is None))
