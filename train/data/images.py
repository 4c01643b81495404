"""NumPy-only image ops for the ViT input: antialiased bilinear resize (two small matmuls, no
PIL or TensorFlow), random-resized and center crops, normalization, and the per-example
train / eval transforms. Pure functions of the example and an RNG the pipeline derives from
(seed, stream position), so batches are reproducible.
"""

from __future__ import annotations

import math

import numpy as np


def _interp_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] antialiased bilinear (triangle filter) resampling matrix."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    centers = (np.arange(out_size) + 0.5) * scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(in_size)[None, :] - centers[:, None]) / support)
    w_sum = w.sum(axis=1, keepdims=True)
    return (w / np.where(w_sum > 0, w_sum, 1.0)).astype(np.float32)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize of an [H, W, C] image to float32 [height, width, C]."""
    h, w, c = image.shape
    x = np.asarray(image, np.float32)
    if (h, w) == (height, width):
        return x
    x = _interp_weights(h, height) @ x.reshape(h, w * c)  # [height, w*c]
    x = x.reshape(height, w, c).transpose(1, 0, 2).reshape(w, height * c)
    x = _interp_weights(w, width) @ x  # [width, height*c]
    return x.reshape(width, height, c).transpose(1, 0, 2)


def as_hwc(image: np.ndarray, channels: int) -> np.ndarray:
    """[H, W] / [H, W, 1|3] -> [H, W, channels] (gray repeated, RGB -> luma)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    c = image.shape[-1]
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if c == 3 and channels == 1:
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return luma[..., None]
    raise ValueError(f"cannot convert an image with {c} channels to {channels}")


def random_resized_crop_box(h, w, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """Inception-style crop (y, x, ch, cw): area fraction in scale, log-uniform aspect."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(tries):
        area = h * w * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(area * aspect)))
        ch = int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    # Fallback: the whole image, clipped to the allowed aspect range, centered.
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif aspect > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def center_crop_box(h, w, fraction=1.0):
    """Centered square of side round(min(h, w) * fraction)."""
    side = max(1, int(round(min(h, w) * fraction)))
    return (h - side) // 2, (w - side) // 2, side, side


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8-range values -> float32 in [-1, 1]."""
    return np.asarray(image, np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


class TrainImageTransform:
    """grain ``random_map`` callable: (crop) + resize + (flip) + normalize -> float32."""

    def __init__(self, image_size, channels, *, random_resized_crop, crop_scale,
                 aspect_ratio, flip, image_key="image", label_key="label"):
        self.size, self.channels = int(image_size), int(channels)
        self.rrc, self.flip = bool(random_resized_crop), bool(flip)
        self.scale, self.ratio = tuple(crop_scale), tuple(aspect_ratio)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, example, rng: np.random.Generator):
        image = as_hwc(example[self.image_key], self.channels)
        h, w = image.shape[:2]
        y, x, ch, cw = (random_resized_crop_box(h, w, rng, self.scale, self.ratio)
                        if self.rrc else (0, 0, h, w))
        out = resize(image[y:y + ch, x:x + cw], self.size, self.size)
        if self.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        return {"image": normalize(out), "label": np.int32(example[self.label_key])}


class EvalImageTransform:
    """grain ``map`` callable: center crop (fraction of the short side) + resize."""

    def __init__(self, image_size, channels, *, crop_fraction=1.0,
                 image_key="image", label_key="label"):
        self.size, self.channels = int(image_size), int(channels)
        self.fraction = float(crop_fraction)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, example):
        image = as_hwc(example[self.image_key], self.channels)
        y, x, ch, cw = center_crop_box(*image.shape[:2], self.fraction)
        out = resize(image[y:y + ch, x:x + cw], self.size, self.size)
        return {"image": normalize(out), "label": np.int32(example[self.label_key])}
