"""`config.data`: every field the input pipeline (train/data/) reads, with its default,
adjusted for a few known datasets."""

import ml_collections

from train.data.tokenize import BYTE_VOCAB_SIZE  # a constant; the pipeline itself is not imported

_PRESETS = {
    "digits": dict(kind="image", eval_split="test", image_size=8, channels=1, num_classes=10),
    "python_stdlib_text": dict(kind="text", eval_split="validation"),
    "imagenet2012": dict(
        kind="image", eval_split="validation", image_size=224, channels=3, num_classes=1000,
        eval_crop_fraction=0.875, augment=dict(random_resized_crop=True, flip=True)),
    "c4": dict(name="c4/en", kind="text", eval_split="validation", seq_len=1024),
    "synthetic": dict(kind="image", image_size=224, channels=3, num_classes=1000),
}


def data_config(name: str = "digits") -> ml_collections.ConfigDict:
    """The ``config.data`` fields with their defaults (adjusted for a few known names)."""
    c = ml_collections.ConfigDict()
    c.name = name  # 'digits' | 'python_stdlib_text' | 'synthetic' | any TFDS name
    c.kind = "image"  # 'image' | 'text'
    c.data_dir = ml_collections.config_dict.placeholder(str)  # None: ~/.cache/lion_tpu/tensorflow_datasets (embedded), TFDS default
    c.train_split = "train"
    c.eval_split = "test"
    c.image_key, c.label_key, c.text_key = "image", "label", "text"
    c.image_size = 8
    c.channels = 1
    c.num_classes = 10
    c.augment = ml_collections.ConfigDict(dict(
        random_resized_crop=False, crop_scale=(0.08, 1.0), aspect_ratio=(3 / 4, 4 / 3),
        flip=False))
    c.eval_crop_fraction = 1.0  # eval: center square of this fraction of the short side
    c.seq_len = 256
    c.tokenizer = "bytes"  # 'bytes', a SentencePiece .model, or a Hugging Face tokenizer.json
    c.vocab_size = BYTE_VOCAB_SIZE  # synthetic text only; real: from the tokenizer
    # Packed text: documents do not attend to each other (segment ids), positions restart at 0
    # per document, and the loss skips the token after each end of document.
    c.document_mask = True
    c.add_bos = False  # start every document with the tokenizer's bos id (as Llama-3 trains)
    c.pack_mode = "auto"  # text: 'cache' (token .npy, map-style) | 'stream' | 'auto'
    c.num_workers = 0  # grain mp_prefetch worker processes (0 = in-process)
    c.worker_buffer_size = 2  # batches buffered per worker
    c.read_threads = 2  # threads computing batches in each process
    c.prefetch_batches = 4  # batches read ahead per process
    c.eval_max_batches = ml_collections.config_dict.placeholder(int)  # cap on eval batches (None = whole split)
    c.synthetic_eval_examples = 512
    preset = dict(_PRESETS.get(name.split("/")[0], {}))
    c.augment.update(preset.pop("augment", {}))
    c.update(preset)
    return c
